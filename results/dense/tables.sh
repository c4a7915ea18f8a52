#!/usr/bin/env bash
# The tables of results/dense/README.md from a finished study (STUDY=study_dense by default).
set -euo pipefail
S=${STUDY:-study_dense}
py=.venv/bin/python
echo "## AP (last evaluation), mean ± sample std over seeds"; echo
$py results/study/summarize.py $S/runs --against baseline fpn_mse
echo; echo "## Attention of the ICD runs (last evaluation) and of the teacher-side probes"; echo
$py results/dense/attention_table.py $S/runs --pretrain $(ls -d $S/pre_* | grep -v '\.log$')
echo; echo "## A freshly initialised teacher side (results/dense/init_attention.py)"; echo
cat $S/init_attention.md
