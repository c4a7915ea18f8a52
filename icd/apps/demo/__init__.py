"""``icd demo``: teacher -> student with ICD on the synthetic shapes data, end to end on a CPU.

A preset of ``icd study`` (:mod:`icd.apps.study`): the demo generates its data, then runs the
study's pipeline with the demo's teacher run scheduled beside its students, one seed of the
baseline, FPN-MSE and ICD, in the demo's own folders. Under ``--out`` (``demo_output/``)::

    data/                       icd data shapes (seeded; kept when the same settings exist)
    teacher/  baseline/         icd train runs: the big teacher and the small student alone
    icd_pretrain/               with --pretrain-iters: ICD's teacher side pre-trained on the teacher
    icd/      fpn_mse/          the small student distilled from the teacher (ICD, FPN-MSE peer)
    results.md                  AP, AP50, AP75, lift, distinctness and training time, as markdown;
                                every loss-health warning and each run's command
    curves.png                  loss and AP curves of the four runs (the study's, ``icd plot``)
    attention_maps.png          ICD attention of each real instance over the FPN levels
    study.md  study.json        the study's own report and settings (one seed: no spread)

Every run is a separate ``python -m icd`` process. Everything but the baseline waits for the
teacher, so it runs with the threads of every job slot (``--jobs`` x ``--threads``, OpenMP
threads waiting passively rather than spinning) and the baseline beside it; then the runs take
one slot and one thread each: the teacher-side pre-training beside the FPN-MSE student, the ICD
student once the pre-training is done. The teacher check is the teacher's own evaluation at its
end. A finished teacher with the same settings is reused; the students are trained again. The
parent process shows one progress bar per run, fed by the runs' ``metrics.jsonl``.

The modules, one job each:

    settings.py    DemoConfig (everything the result depends on) and TINY (the smoke test's)
    plan.py        the teacher's run, and the demo's icd study (student_study): the students'
                   and the pre-training's runs, named as the demo's folders
    stamps.py      demo_run.json: what a finished run or the data was made with (reuse)
    scheduler.py   the runs (a demo's or a study's) as processes in job slots, with progress bars
    report.py      each run's last evaluation, results.md (with icd study's loss-health and
                   commands sections), the summary over several outputs
    figures.py     attention_maps.png
    pipeline.py    the whole demo: the data, icd study's pipeline, the table and picture
    command.py     the flags of ``icd demo`` and the command (called by ``icd.cli``)
"""

from icd.apps.demo.command import add_demo_flags, config_from_args, run_command
from icd.apps.demo.figures import attention_maps_figure, draw_figures
from icd.apps.demo.pipeline import prepare_data, run_demo
from icd.apps.demo.plan import PRETRAIN_ITERS, PRETRAIN_RUN, RUN_NAMES, Run, plan_runs, student_study, teacher_run
from icd.apps.demo.report import last_eval, results_table, summarize, write_results
from icd.apps.demo.scheduler import execute
from icd.apps.demo.settings import TINY, DemoConfig
from icd.apps.demo.stamps import STAMP_FILE, finished_stamp

__all__ = [
    "PRETRAIN_ITERS",
    "PRETRAIN_RUN",
    "RUN_NAMES",
    "STAMP_FILE",
    "TINY",
    "DemoConfig",
    "Run",
    "add_demo_flags",
    "attention_maps_figure",
    "config_from_args",
    "draw_figures",
    "execute",
    "finished_stamp",
    "last_eval",
    "plan_runs",
    "prepare_data",
    "results_table",
    "run_command",
    "run_demo",
    "student_study",
    "summarize",
    "teacher_run",
    "write_results",
]
