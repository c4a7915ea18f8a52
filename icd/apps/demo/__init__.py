"""``icd demo``: teacher -> student with ICD on the synthetic shapes data, end to end on a CPU.

What it does, under ``--out`` (``demo_output/``)::

    data/                       icd data shapes (seeded; kept when the same settings exist)
    teacher/  baseline/         icd train runs: the big teacher and the small student alone
    icd_pretrain/               ICD's teacher side pre-trained on the finished teacher (icd pretrain)
    icd/      fpn_mse/          the small student distilled from the teacher (ICD, FPN-MSE peer)
    results.md                  AP, AP50, AP75, lift, distinctness and training time, as markdown;
                                every loss-health warning and each run's command
    curves.png                  loss and AP curves of the four runs (``icd plot``)
    attention_maps.png          ICD attention of each real instance over the FPN levels

Every run is a separate ``python -m icd`` process. Everything else waits for the teacher, so
it runs alone with the threads of every job slot (``--jobs`` x ``--threads``, OpenMP threads
waiting passively rather than spinning); then the runs take one slot and one thread each: the
teacher-side pre-training beside the FPN-MSE student, the ICD student once the pre-training
is done, the baseline last. A finished teacher with the same settings is reused. The parent
process shows one progress bar per run, fed by the runs' ``metrics.jsonl``.

The modules, one job each:

    settings.py    DemoConfig (everything the result depends on) and TINY (the smoke test's)
    plan.py        the runs: their icd train / icd pretrain arguments (the students' and the
                   pre-training's by icd study's planner), lengths and dependencies
    stamps.py      demo_run.json: what a finished run or the data was made with (reuse)
    scheduler.py   the runs as processes in job slots, with progress bars
    report.py      each run's last evaluation, results.md (with icd study's loss-health and
                   commands sections), the summary over several outputs
    figures.py     curves.png and attention_maps.png
    pipeline.py    the whole demo: data, runs, table, figures
    command.py     the flags of ``icd demo`` and the command (called by ``icd.cli``)
"""

from icd.apps.demo.command import add_demo_flags, config_from_args, run_command
from icd.apps.demo.figures import attention_maps_figure, draw_figures
from icd.apps.demo.pipeline import prepare_data, run_demo
from icd.apps.demo.plan import PRETRAIN_ITERS, PRETRAIN_RUN, RUN_NAMES, Run, plan_runs, pretrain_argv, train_argv
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
    "pretrain_argv",
    "results_table",
    "run_command",
    "run_demo",
    "summarize",
    "train_argv",
    "write_results",
]
