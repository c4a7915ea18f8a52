"""``icd study``: does distillation pay on my data, and which method? One command that answers it honestly.

Under ``--out`` (``study/``)::

    study.json                the settings and plan (a later ``--resume`` must give the same)
    runs/teacher_eval/        icd eval of the teacher on val: the teacher check, before any student
                              (a preset's teacher, --shapes' and icd demo's, is checked by its own
                              evaluation: its run is scheduled with the students)
    runs/calibrate_M_wW/      --calibrate's short runs (first seed)
    runs/pretrain_sS/         icd pretrain of ICD's teacher side per seed (icd-pre only)
    runs/METHOD_eE_sS/        one icd train per method, schedule (E epochs) and seed (S)
    study.md                  per-run AP, mean ± std, paired differences, verdicts, loss health, commands
    curves.png                loss and AP curves (icd plot)

Every run is a separate ``python -m icd`` process, scheduled and stamped by the demo's scheduler
and stamps (:mod:`icd.apps.demo.scheduler`, :mod:`icd.apps.demo.stamps`): a finished run's stamp
holds its identity, the hash of its command, so ``--resume`` runs only what is missing and a
changed plan is never taken for a finished run.

    settings.py    StudyConfig and the methods
    plan.py        the runs: their icd train / pretrain / eval arguments
    stats.py       mean ± std, paired differences, the verdict sentence, seeds needed (pure)
    calibrate.py   --calibrate: the loss weights from short runs
    report.py      study.md
    pipeline.py    the whole study: the folder, the teacher check, calibration, runs, report
    command.py     the flags of ``icd study`` and the command (called by ``icd.cli``)
"""

from icd.apps.study.pipeline import run_study, teacher_warning
from icd.apps.study.plan import plan_runs, run_name, train_argv
from icd.apps.study.settings import METHODS, StudyConfig
from icd.apps.study.stats import interval, mean_std, paired_differences, seeds_needed, t975, verdict

__all__ = [
    "METHODS",
    "StudyConfig",
    "interval",
    "mean_std",
    "paired_differences",
    "plan_runs",
    "run_name",
    "run_study",
    "seeds_needed",
    "t975",
    "teacher_warning",
    "train_argv",
    "verdict",
]
