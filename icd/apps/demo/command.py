"""``icd demo``: its flags, the settings they give, and the command itself (``icd.cli`` calls these)."""

from __future__ import annotations

import argparse

from icd.apps.demo.pipeline import run_demo
from icd.apps.demo.plan import PRETRAIN_ITERS
from icd.apps.demo.report import summarize
from icd.apps.demo.settings import TINY, DemoConfig
from icd.flags import finite_float, int_at_least

# the flags whose None means "DemoConfig's value (or TINY's with --tiny)"
_OPTIONAL_SETTINGS = ("image_size", "num_train", "num_val", "teacher_epochs", "student_epochs", "lr", "icd_weight",
                      "distill_warmup_iters", "fpn_mse_weight", "attention_images", "pretrain_iters")  # fmt: skip


def add_demo_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``icd demo`` (defaults: DemoConfig's)."""
    d = DemoConfig()
    p.add_argument("--out", default=d.out_dir, metavar="DIR", help="output folder")
    p.add_argument("--tiny", action="store_true", help="seconds-long settings (smoke test)")
    p.add_argument("--seed", type=int, default=d.seed, help="data, initialisation and order")
    p.add_argument(
        "--student-seed",
        type=int,
        default=None,
        help="seed of the three student runs only (default --seed): with the data and teacher "
        "of --seed copied into --out, repeats the students over seeds",
    )
    def default(key: str, what: str) -> str:  # the value a None flag stands for, in its help
        tiny = f"; {TINY[key]} with --tiny" if key in TINY else ""
        return f"{what} (default {getattr(d, key)}{tiny})"

    p.add_argument(  # smaller: the shapes' backgrounds fail
        "--image-size", type=int_at_least(48), default=None, help=default("image_size", "side of the generated images")
    )
    p.add_argument(
        "--num-train", type=int_at_least(1), default=None, help=default("num_train", "generated training images")
    )
    p.add_argument(
        "--num-val", type=int_at_least(1), default=None, help=default("num_val", "generated validation images")
    )
    p.add_argument(
        "--teacher-epochs", type=int_at_least(1), default=None, help=default("teacher_epochs", "the teacher's epochs")
    )
    p.add_argument(
        "--student-epochs", type=int_at_least(1), default=None, help=default("student_epochs", "each student's epochs")
    )
    p.add_argument("--lr", type=finite_float(above=0.0), default=None, help=default("lr", "SGD lr of every run"))
    p.add_argument("--icd-weight", type=finite_float(minimum=0.0), default=None, help="ICD loss weight (default 8)")
    p.add_argument(
        "--distill-warmup-iters",
        type=int_at_least(0),
        default=None,
        help="the students' distillation warm-up (default icd train's: min(1000, 10%% of the run))",
    )
    p.add_argument(
        "--fpn-mse-weight",
        type=finite_float(minimum=0.0),
        default=None,
        help="FPN-MSE loss weight (default icd train's: 16)",
    )
    p.add_argument(
        "--pretrain-iters",
        type=int_at_least(0),
        nargs="?",
        const=PRETRAIN_ITERS,
        default=None,
        help=f"pre-train ICD's teacher side first (icd pretrain, {PRETRAIN_ITERS} iterations without a value); "
        "default: the paper's recipe, which measured better in AP",
    )
    p.add_argument("--jobs", type=int_at_least(1), default=d.jobs, help="training runs side by side")
    p.add_argument("--threads", type=int_at_least(1), default=d.threads, help="intra-op threads per run")
    p.add_argument(
        "--attention-images",
        type=int_at_least(1),
        default=None,
        help=default("attention_images", "validation images of the attention maps picture"),
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument(
        "--summarize",
        nargs="+",
        metavar="DIR",
        default=None,
        help="train nothing: print mean ± std of each run's AP over these demo outputs (seeds), and the paired "
        "differences with icd study's verdicts",
    )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The settings of ``icd demo ARGS``: DemoConfig's (TINY's with --tiny), then the flags given."""
    values = dict(TINY) if args.tiny else {}
    values.update(out_dir=args.out, seed=args.seed, student_seed=args.student_seed, jobs=args.jobs,
                  threads=args.threads)  # fmt: skip
    for key in _OPTIONAL_SETTINGS:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return DemoConfig(**values)


def run_command(args: argparse.Namespace) -> int:
    """``icd demo``: the whole demo, or with --summarize the table over earlier outputs; 0 when done."""
    if args.summarize:
        print(summarize(args.summarize), end="")
    else:
        run_demo(config_from_args(args), progress=not args.no_progress)
    return 0
