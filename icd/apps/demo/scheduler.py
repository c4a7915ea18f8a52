"""Runs the processes of a demo or a study in ``cfg.jobs`` job slots, each once the runs it needs are done.

Every run is a separate ``python -m icd`` process with its output in ``RUN_DIR/train.log``. Each
run takes one slot and ``cfg.threads`` threads, the demo's teacher (``all_threads``) every slot's
threads (OpenMP threads waiting passively rather than spinning, so a run beside it uses what they
leave). A slot's own environment comes from ``cfg.slot_env(slot)`` when the settings have one (a
study on GPUs: one GPU per slot). The parent shows one progress bar per run, fed by the runs'
``metrics.jsonl``. ``cfg``: a :class:`~icd.apps.demo.settings.DemoConfig` or a
:class:`~icd.apps.study.settings.StudyConfig` (``run_dir``, ``jobs``, ``threads``, ``label``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

from icd.apps.demo.plan import Run
from icd.apps.demo.stamps import STAMP_FILE, mark_owned, write_run_stamp
from icd.engine.output_dir import lock_holder, previous_run_files
from icd.errors import RunFailedError

POLL_S = 0.5


def iterations_done(run_dir: str) -> int:
    """The last logged training iteration of a run (0 before its first metrics line)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    done = 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("type") in ("train", "pretrain"):
                done = max(done, int(record["iter"]))
    return done


def runs_to_start(pending: Sequence[Run], active: int, done: set[str], jobs: int) -> list[Run]:
    """The pending runs that start now: those whose needs are done, in plan order, one per free slot."""
    ready = [r for r in pending if set(r.needs) <= done]
    return ready[: max(0, jobs - active)]


def _start(run: Run, cfg, slot: int) -> None:
    run_dir = cfg.run_dir(run.name)
    holder = lock_holder(run_dir)
    if holder is not None:  # a run left behind by a killed demo or study: its files are not to be removed
        raise RuntimeError(f"{run_dir} is in use by a live run ({holder}); stop it, then start again")
    mark_owned(run_dir)  # check_out_dir made sure the folder is the demo's own (or new)
    # a fresh run, not a resume: nothing of an earlier run may stay (icd train refuses to start on it)
    for path in [*previous_run_files(run_dir), os.path.join(run_dir, STAMP_FILE)]:
        if os.path.exists(path):
            os.remove(path)
    threads = str(cfg.threads * (cfg.jobs if run.all_threads else 1))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE"}
    slot_env = getattr(cfg, "slot_env", None)
    env.update(slot_env(slot) if slot_env else {})
    run.slot = slot
    run.log_file = open(os.path.join(run_dir, "train.log"), "w")  # noqa: SIM115 - closed in _finish
    run.process = subprocess.Popen(
        [sys.executable, "-m", "icd", *run.argv], stdout=run.log_file, stderr=subprocess.STDOUT, env=env
    )
    run.started = time.time()


def _finish(run: Run, cfg) -> None:
    run.log_file.close()
    run.seconds = time.time() - run.started
    if run.process.returncode != 0:
        log_path = os.path.join(cfg.run_dir(run.name), "train.log")
        with open(log_path, errors="replace") as f:
            last = next((line.strip() for line in reversed(f.readlines()) if line.strip()), "(an empty log)")
        raise RunFailedError(
            f"{getattr(cfg, 'label', 'demo')} run {run.name!r} failed (exit {run.process.returncode}): "
            f"{last.removeprefix('icd: error: ')} (its log: {log_path})"
        )
    write_run_stamp(run, cfg)


def execute(
    runs: Sequence[Run], cfg, progress: bool = True, on_done: Callable[[Run], None] | None = None
) -> None:
    """Run the plan, ``cfg.jobs`` processes at a time, a run once the runs it needs are done
    (runs marked ``reused`` count as done); a failed run stops the others and raises RunFailedError.
    ``on_done(run)``: called as each run finishes, while the others go on (a study's teacher check)."""
    done = {r.name for r in runs if r.reused}
    pending = [r for r in runs if not r.reused]
    active: list[Run] = []
    bars = {
        r.name: tqdm(
            total=r.total_iters,
            desc=f"{r.title:<22}",
            position=i,
            disable=not progress,
            dynamic_ncols=True,
            unit="it",
        )
        for i, r in enumerate(runs)
    }
    for r in runs:
        if r.reused:
            bars[r.name].update(r.total_iters)
            bars[r.name].set_postfix_str("reused")
    try:
        while pending or active:
            for run in runs_to_start(pending, len(active), done, cfg.jobs):
                free = sorted(set(range(cfg.jobs)) - {r.slot for r in active})
                _start(run, cfg, free[0])
                pending.remove(run)
                active.append(run)
            time.sleep(POLL_S)
            for run in list(active):
                bar = bars[run.name]
                bar.update(iterations_done(cfg.run_dir(run.name)) - bar.n)
                if run.process.poll() is None:
                    continue
                active.remove(run)
                _finish(run, cfg)
                bar.update(run.total_iters - bar.n)
                bar.set_postfix_str(f"{run.seconds:.0f} s")
                done.add(run.name)
                if on_done is not None:
                    on_done(run)
            if pending and not active and not any(set(r.needs) <= done for r in pending):
                raise RuntimeError(f"{getattr(cfg, 'label', 'demo')}: runs {[r.name for r in pending]} cannot start")
    finally:
        for run in active:  # an error or Ctrl-C: do not leave training processes behind
            run.process.kill()
            run.process.wait()
            run.log_file.close()
        for bar in bars.values():
            bar.close()
