"""`make gpu-check`: everything the project measures on a GPU, in one command, each stage under its
own timeout, into one report: ``benchmarks/results/gpu_check_<device>.md``.

    python3 benchmarks/gpu_check.py                      # the whole check, < 8 min on one H100/H200
    python3 benchmarks/gpu_check.py --quick              # a subset, < 3 min
    python3 benchmarks/gpu_check.py --stages build,kernels
    python3 benchmarks/gpu_check.py --dry-run            # the plan; CPU-sized where there is no GPU
    python3 benchmarks/gpu_check.py --copy-to "$OUT"     # report, CSV, PNG and logs copied after each stage
    python3 benchmarks/gpu_check.py --download-wheels --python-version 3.12   # `make gpu-wheels`

Stages, in order (``STAGES``):
  env          nvidia-smi, python/torch/triton/CUDA versions, device, SMs, clocks, tools present
  wheels       installs the wheels in .wheels/ whose distributions this python lacks (no index)
  build        pip install -e . for the device's compute capability only (TORCH_CUDA_ARCH_LIST)
  tests        the GPU tests (pytest), in parallel with:
  extras       determinism, CUDA-graph capture, odd shapes, streams (benchmarks/gpu_extras.py),
               the measured ceilings, compute-sanitizer memcheck/racecheck on small shapes
  kernels      benchmarks/bench_kernels.py: every op and backend, GPU and eager time, floors, targets
  training     benchmarks/run_training.py (its table, then --check resume)
  ddp          torchrun --nproc-per-node <GPUs> benchmarks/run_training.py --check ddp (NCCL)
  ultralytics  benchmarks/run_ultralytics.py overhead: YOLOv8n <- YOLOv8s, ICD vs ultralytics' own

Every command runs in its own process group and is killed with its group at its stage's timeout;
its output goes to the console and to ``<report folder>/logs/<stage>.log``; the next stage runs
whatever happened. Stage timeouts come from one budget (``--budget``, default 450 s; ``--quick``
175 s): a stage gets at most its own limit and never the time the later stages need at least.
The report is rewritten after every stage (and copied to ``--copy-to``), so a check cut short
still leaves a report of what ran.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from git_info import git_commit

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
WHEELS_DIR = ROOT / ".wheels"
STATUSES = ("ok", "failed", "timeout", "skipped", "not selected")

# Pinned distributions (requirements-*.txt) that the device image lacks (KINDS.md's package list
# for the lent NVIDIA machines): `make gpu-wheels` downloads these, the wheels stage installs them.
DEVICE_LACKS = ("pycocotools", "ultralytics", "ultralytics-thop", "polars", "polars-runtime-32")
CARRY_LIMIT = 64 * 2**20  # the device tool's limit for the working tree plus carried paths


def slug(text: str) -> str:
    """A file-name-safe lower-case form, as benchmarks/common.slug (the driver imports no torch)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


# --- running one command -----------------------------------------------------------------------


@dataclass
class CommandResult:
    rc: int | None  # None when killed at the timeout
    seconds: float
    timed_out: bool
    lines: list[str]  # the last lines of its output

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


def run_command(
    cmd: Sequence[str], timeout: float, log: Path, *, env: dict | None = None, cwd: Path = ROOT, tag: str = ""
) -> CommandResult:
    """Run ``cmd`` in a new process group, its output tee'd to the console and appended to ``log``;
    at ``timeout`` seconds the whole group gets SIGTERM, then SIGKILL 5 s later."""
    log.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=400)
    start = time.monotonic()
    with open(log, "a", encoding="utf-8", errors="replace") as sink:
        sink.write(f"\n$ {shlex.join(cmd)}   # timeout {timeout:.0f} s\n")
        sink.flush()
        try:
            proc = subprocess.Popen(
                list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cwd, env=env, **_OWN_GROUP,
            )  # fmt: skip
        except OSError as exc:
            sink.write(f"could not start: {exc}\n")
            return CommandResult(127, time.monotonic() - start, False, [f"could not start: {exc}"])
        with _ACTIVE_LOCK:
            _ACTIVE.add(proc.pid)

        def pump() -> None:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                tail.append(line)
                sink.write(line + "\n")
                sink.flush()
                print(f"[{tag}] {line}" if tag else line, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc: int | None = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            timed_out, rc = True, None
        _kill_group(proc)  # also what a finished command left running in its group (it may hold the GPU)
        with _ACTIVE_LOCK:
            _ACTIVE.discard(proc.pid)
        reader.join(timeout=5)  # a grandchild that left the group may hold the pipe: stop reading
        seconds = time.monotonic() - start
        note = f"# killed at the {timeout:.0f} s timeout" if timed_out else f"# exit {rc} after {seconds:.1f} s"
        sink.write(note + "\n")
    if timed_out:
        tail.append(note)
    return CommandResult(rc, seconds, timed_out, list(tail))


# A command runs in a process group of its own (killed as one), inside the driver's session, so
# that whoever ends the driver's session (a device tool at its limit) ends the commands too.
_OWN_GROUP: dict = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
_ACTIVE: set[int] = set()  # the process groups of the commands running now
_ACTIVE_LOCK = threading.Lock()


def kill_active(signum: int = signal.SIGKILL) -> None:
    """Signal every running command's group (the driver is being stopped)."""
    with _ACTIVE_LOCK:
        groups = list(_ACTIVE)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL to what is left 5 s later; returns once
    no process of the group runs (zombies aside)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader
            if not _group_alive(proc.pid):
                return
            time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (not a zombie): /proc on Linux."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):  # state, ppid, pgrp
            return True
    return False


# --- stages --------------------------------------------------------------------------------------


@dataclass
class StageResult:
    status: str  # one of STATUSES
    summary: str = ""
    details: str = ""  # markdown for the stage's section of the report
    seconds: float = 0.0
    timeout: float = 0.0


@dataclass(frozen=True)
class Stage:
    """One stage: ``run(check, timeout)`` -> StageResult. ``full_s``/``quick_s``: its timeout
    (``quick_s`` None: not part of --quick); ``reserve_s``: the least time it needs, kept
    free by the stages before it."""

    name: str
    title: str
    run: Callable[[Check, float], StageResult]
    full_s: float
    quick_s: float | None
    reserve_s: float = 10.0


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@dataclass
class Check:
    """One gpu_check run: its options, its folder, what the stages found so far."""

    out: Path  # the folder that holds gpu_check_<device>.md and gpu_check_<device>/
    quick: bool = False
    dry_run: bool = False
    budget_s: float = 450.0
    copy_to: Path | None = None
    python: str = sys.executable
    command: str = ""
    env_info: dict = field(default_factory=dict)
    results: dict[str, StageResult] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=lambda: _utc_now())
    _gpu_backends: list[str] | None = field(default=None, repr=False)

    # -- where things go
    @property
    def has_cuda(self) -> bool:
        return bool(self.env_info.get("cuda_available"))

    @property
    def device_slug(self) -> str:
        return slug(self.env_info["device_name"]) if self.has_cuda else "cpu"

    @property
    def folder(self) -> Path:
        return self.out / f"gpu_check_{self.device_slug}"

    @property
    def report_path(self) -> Path:
        return self.out / f"gpu_check_{self.device_slug}.md"

    def log(self, stage: str) -> Path:
        return self.folder / "logs" / f"{stage}.log"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def environ(self, extra: dict | None = None) -> dict[str, str]:
        """The commands' environment: the repository on PYTHONPATH, so that icd imports from the
        source tree also when an editable install was cut short (the Triton backend needs no build)."""
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **(extra or {})}

    def run(self, stage: str, cmd: Sequence[str], timeout: float, env: dict | None = None) -> CommandResult:
        return run_command(cmd, timeout, self.log(stage), env=self.environ(env), tag=stage)

    def py(self, *args: str) -> list[str]:
        return [self.python, *args]

    def gpu_backends(self, stage: str, timeout: float = 60) -> list[str]:
        """The kernel backends of icd's backend table that run on CUDA tensors, built or not
        (icd.ops.backends.native_backends), asked of ``python`` once (in ``stage``'s log)."""
        if self._gpu_backends is None:
            res = self.run(stage, self.py("-c", GPU_BACKENDS_SNIPPET), timeout)
            found = _tail_match(res.lines, r"^GPU_BACKENDS ").removeprefix("GPU_BACKENDS ")
            self._gpu_backends = [b for b in found.split(",") if b]
        return self._gpu_backends


def _tail_match(lines: Sequence[str], pattern: str) -> str:
    found = [ln for ln in lines if re.search(pattern, ln)]
    return found[-1].strip() if found else ""


def _status(res: CommandResult) -> str:
    return "timeout" if res.timed_out else "ok" if res.rc == 0 else "failed"


def _worst(statuses: Sequence[str]) -> str:
    for s in ("timeout", "failed", "ok", "skipped"):
        if s in statuses:
            return s
    return "skipped"


def _code(lines: Sequence[str], limit: int = 40) -> str:
    body = "\n".join(list(lines)[-limit:])
    return f"```\n{body}\n```\n" if body.strip() else ""


# env ----------------------------------------------------------------------------------------------

ENV_SNIPPET = r"""
import glob, json, platform, shutil, subprocess, sys
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device_name=torch.cuda.get_device_name(0), capability="%d.%d" % (p.major, p.minor),
                    sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1), gpus=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version())
except Exception as exc:
    info["torch_error"] = f"{type(exc).__name__}: {exc}"
try:
    import triton
    info["triton"] = triton.__version__
except Exception:
    info["triton"] = "not installed"
nvcc = shutil.which("nvcc") or next(iter(glob.glob("/usr/local/cuda/bin/nvcc")), None)
if nvcc:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    info["nvcc"] = out[-1] if out else nvcc
found = [p for d in ("bin", "compute-sanitizer") for p in glob.glob(f"/usr/local/cuda*/{d}/compute-sanitizer")]
info["compute_sanitizer"] = shutil.which("compute-sanitizer") or next(iter(sorted(found)), "")
print("ENV_JSON " + json.dumps(info))
"""


def stage_env(check: Check, timeout: float) -> StageResult:
    details = []
    statuses = []
    # the report folder is named after the device, known only at the end: log beside it first
    staging = check.out / ".gpu_check_env.log"
    staging.unlink(missing_ok=True)
    start = time.monotonic()
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu"
        res = run_command(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], min(timeout / 4, 10), staging,
                          tag="env")  # fmt: skip
        details.append(_code(res.lines, 12))
        statuses.append(_status(res))
    # the rest for the snippet: importing torch alone can take 10 s on a busy machine
    left = max(timeout - (time.monotonic() - start) - 1, timeout / 2)
    res = run_command(check.py("-c", ENV_SNIPPET), left, staging, env=check.environ(), tag="env")
    if staging.exists():
        check.log("env").parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, check.log("env"))
    statuses.append(_status(res))
    line = _tail_match(res.lines, r"^ENV_JSON ")
    if line:
        check.env_info.update(json.loads(line.removeprefix("ENV_JSON ")))
    info = check.env_info
    if check.has_cuda:
        summary = (f"{info['device_name']}, sm_{info['capability'].replace('.', '')}, {info['sms']} SMs, "
                   f"{info['memory_gib']} GiB, {info['gpus']} GPU(s); torch {info.get('torch')}, triton "
                   f"{info.get('triton')}, CUDA {info.get('cuda')}, python {info.get('python')}")  # fmt: skip
    else:
        summary = f"no CUDA device; torch {info.get('torch', '?')}, python {info.get('python', '?')}"
    details.append("```\n" + json.dumps(info, indent=1) + "\n```\n")
    return StageResult(_worst(statuses) if line else "failed", summary, "\n".join(details))


# wheels -------------------------------------------------------------------------------------------


def _wheel_dist(path: Path) -> str:
    return path.name.split("-")[0].lower().replace("_", "-")


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def stage_wheels(check: Check, timeout: float) -> StageResult:
    wheels = sorted(WHEELS_DIR.glob("*.whl")) if WHEELS_DIR.is_dir() else []
    if not wheels:
        return StageResult("skipped", "no .wheels/ folder (make gpu-wheels; carry .wheels)")
    missing = [w for w in wheels if not _installed(_wheel_dist(w))]
    names = ", ".join(_wheel_dist(w) for w in missing) or "none"
    if not missing:
        return StageResult("ok", f"all {len(wheels)} carried distributions already installed")
    if check.dry_run:
        return StageResult("skipped", f"dry run: would install {names}")
    cmd = check.py("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--find-links", str(WHEELS_DIR), *map(str, missing))  # fmt: skip
    res = check.run("wheels", cmd, timeout)
    return StageResult(_status(res), f"installed {names}" if res.ok else f"pip rc {res.rc}", _code(res.lines, 15))


# build --------------------------------------------------------------------------------------------


BACKENDS_SNIPPET = "import icd.ops as o; print('BACKENDS ' + ','.join(o.available_backends()))"
GPU_BACKENDS_SNIPPET = ("from icd.ops.backends import native_backends as n; "
                        "print('GPU_BACKENDS ' + ','.join(n('cuda', with_kernels=True)))")  # fmt: skip


def _backends(check: Check, timeout: float) -> str:
    res = check.run("build", check.py("-c", BACKENDS_SNIPPET), timeout)
    return _tail_match(res.lines, r"^BACKENDS ").removeprefix("BACKENDS ")


def stage_build(check: Check, timeout: float) -> StageResult:
    if check.dry_run or not check.has_cuda:
        found = _backends(check, min(timeout, 60))
        return StageResult("skipped", f"dry run: the existing build (backends {found or '?'}); would run "
                           "pip install --no-build-isolation --no-deps -e . for the device's architecture")  # fmt: skip
    deadline = time.monotonic() + timeout
    arch = check.env_info["capability"]
    env = {"TORCH_CUDA_ARCH_LIST": arch, "FORCE_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)}
    if Path("/usr/local/cuda/bin/nvcc").exists():
        env["CUDA_HOME"] = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if check.quick:  # the CUDA sources take ~90 s to compile: --quick measures the Triton backend
        env = {"ICD_NO_CUDA": "1", "MAX_JOBS": env["MAX_JOBS"]}
    cmd = check.py("-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", ".")
    # full: keep ~40 s for a rebuild without the CUDA kernels (the Triton backend needs the install)
    res = check.run("build", cmd, max(deadline - time.monotonic() - (10 if check.quick else 45), 10), env)
    found = _backends(check, max(min(deadline - time.monotonic(), 60), 10))
    wanted = "triton" if check.quick else "cuda"
    if res.ok and wanted in found.split(","):
        how = "ICD_NO_CUDA=1 (--quick)" if check.quick else f"TORCH_CUDA_ARCH_LIST={arch}"
        return StageResult("ok", f"{how} in {res.seconds:.0f} s; backends {found}", _code(res.lines, 5))
    details = _code(res.lines, 30)
    left = deadline - time.monotonic()
    if not check.quick and left > 15:  # keep the Triton backend: rebuild without the CUDA kernels
        retry = check.run("build", cmd, left - 5, {"ICD_NO_CUDA": "1", "MAX_JOBS": env["MAX_JOBS"]})
        found = _backends(check, 30)
        details += "\nRetried with ICD_NO_CUDA=1:\n" + _code(retry.lines, 10)
    note = "timed out" if res.timed_out else f"rc {res.rc}"
    return StageResult("timeout" if res.timed_out else "failed", f"CUDA build {note}; backends {found or 'none'}",
                       details)  # fmt: skip


# tests and extras -------------------------------------------------------------------------------

GPU_TEST_FILES = ("tests/test_cuda_gpu.py", "tests/test_triton_gpu.py")
# op tests whose cases include every GPU backend of the table on a GPU (tests/op_cases.py)
OP_TEST_FILES = (
    "tests/test_instance_attention.py", "tests/test_value_mask.py", "tests/test_feature_mse.py",
    "tests/test_nonfinite_inputs.py", "tests/test_triton_kernels.py",
)  # fmt: skip


def _pytest_summary(res: CommandResult) -> str:
    line = _tail_match(res.lines, r"\d+ (passed|failed|error|skipped|deselected)")
    return line.strip("= ") or ("killed at the timeout" if res.timed_out else f"rc {res.rc}")


def stage_tests(check: Check, timeout: float) -> StageResult:
    if check.dry_run or not check.has_cuda:
        return StageResult("skipped", "dry run / no CUDA: would run pytest " + " ".join(GPU_TEST_FILES)
                           + " and -k '<each GPU backend>' of the op tests")  # fmt: skip
    workers = max(2, min(8, (os.cpu_count() or 4) // 2))
    common = ["-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist"):
        common += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout"):  # one hung test fails alone, the file goes on
        common += ["--timeout", str(int(max(timeout - 10, 30)))]
    if check.quick:  # the Triton backend's attention tests only (the quick build has no CUDA kernels)
        runs = {"ops": check.py(*common, "-k", "triton", "tests/test_instance_attention.py")}
    else:
        runs = {"gpu": check.py(*common, *GPU_TEST_FILES)}
        gpu_backends = check.gpu_backends("tests")  # none when icd does not import: the gpu run says why
        if gpu_backends:
            runs["ops"] = check.py(*common, "-k", " or ".join(gpu_backends), *OP_TEST_FILES)
    results = _run_parallel(check, "tests", runs, timeout)
    lines = [f"- {name}: {_pytest_summary(res)} ({res.seconds:.0f} s)" for name, res in results.items()]
    details = "\n".join(lines) + "\n\n"
    for name, res in results.items():
        fails = [ln for ln in res.lines if ln.startswith(("FAILED", "ERROR"))]
        if fails:
            details += f"{name}:\n" + _code(fails, 25)
    statuses = [_status(r) if r.rc != 5 else "skipped" for r in results.values()]
    return StageResult(_worst(statuses), "; ".join(f"{n}: {_pytest_summary(r)}" for n, r in results.items()), details)


def _run_parallel(check: Check, stage: str, runs: dict[str, list[str]], timeout: float) -> dict[str, CommandResult]:
    results: dict[str, CommandResult] = {}

    def one(name: str, cmd: list[str]) -> None:
        results[name] = run_command(cmd, timeout, check.log(f"{stage}_{name}"), env=check.environ(),
                                    tag=f"{stage}:{name}")  # fmt: skip

    threads = [threading.Thread(target=one, args=item) for item in runs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {name: results[name] for name in runs}


def extra_steps(check: Check) -> list[tuple[str, list[str], float]]:
    """(label, command, its longest run) of the extras stage, the most wanted first: each in its
    own process, so that a crash or a hang costs only that step."""
    script = "benchmarks/gpu_extras.py"
    steps = [("checks determinism graphs", check.py(script, "checks", "determinism", "graphs"), 60.0)]
    if check.quick:
        return steps
    sanitizer = check.env_info.get("compute_sanitizer")
    racecheck = [("racecheck", backend) for backend in (check.gpu_backends("extras") if sanitizer else ())]
    runs = (("memcheck", None), *racecheck)  # racecheck one backend at a time (its run is slow)
    sanitize = [
        (f"compute-sanitizer {tool} {backend or 'all backends'}",
         [sanitizer, "--tool", tool, "--print-limit", "20", "--error-exitcode", "3",
          *check.py(script, "sanitize", *(["--backend", backend] if backend else []))], 60.0)
        for tool, backend in runs
    ] if sanitizer else []  # fmt: skip
    steps += sanitize[:2]
    steps.append(("checks shapes streams offsets multigpu",
                  check.py(script, "checks", "shapes", "streams", "offsets", "multigpu"), 90.0))  # fmt: skip
    steps.append(("ceilings", check.py(script, "ceilings"), 30.0))
    return steps + sanitize[2:]


def stage_extras(check: Check, timeout: float) -> StageResult:
    deadline = time.monotonic() + timeout
    if check.dry_run or not check.has_cuda:  # the Triton interpreter on CPU tensors, tiny sizes
        cmd = check.py("benchmarks/gpu_extras.py", "checks", "determinism")
        res = check.run("extras", cmd, timeout, {"TRITON_INTERPRET": "1"})
        counts = _check_counts(res.lines)
        return StageResult(_status(res), f"CPU smoke test under TRITON_INTERPRET=1: {counts}", _code(res.lines, 10))
    outcomes = []
    lines: list[str] = []
    if not check.env_info.get("compute_sanitizer"):
        lines.append("SKIP compute-sanitizer not on PATH")
    for label, cmd, longest in extra_steps(check):
        left = deadline - time.monotonic()
        if left < 10:
            lines.append(f"SKIP {label}: out of time")
            continue
        res = check.run("extras", cmd, min(left, longest))
        outcomes.append(_status(res))
        if label.startswith("compute-sanitizer"):
            summary = _tail_match(res.lines, r"ERROR SUMMARY|RACECHECK SUMMARY") or _status(res)
            lines.append(f"{'PASS' if res.ok else 'FAIL'} {label}: {summary}")
            continue
        lines += [ln for ln in res.lines if re.match(r"^(PASS|FAIL|SKIP|NOTE|CEILING) ", ln)]
        if res.timed_out:
            lines.append(f"FAIL {label}: killed at its timeout")
        elif res.rc not in (0, 1):  # 1: some check failed (its FAIL lines say which)
            lines.append(f"FAIL {label}: exit {res.rc}")
    counts = _check_counts(lines)
    status = "failed" if not counts.startswith("0 FAIL") else _worst(outcomes or ["skipped"])
    return StageResult(status, counts, _code(lines, 80))


def _check_counts(lines: Sequence[str]) -> str:
    n = {k: sum(ln.startswith(k + " ") for ln in lines) for k in ("FAIL", "PASS", "NOTE", "SKIP")}
    return ", ".join(f"{v} {k}" for k, v in n.items())


# kernels ------------------------------------------------------------------------------------------


def stage_kernels(check: Check, timeout: float) -> StageResult:
    out = check.folder
    if check.dry_run or not check.has_cuda:
        args = ["--device", "cpu", "--shapes", "icd", "--repeats", "3"]
    else:
        args = ["--device", "cuda", "--max-seconds", str(int(max(timeout - 35, 10)))]
        args += ["--quick"] if check.quick else []
    env = {"ICD_COMMIT": git_commit()}
    res = check.run("kernels", check.py("benchmarks/bench_kernels.py", *args, "--out", str(out)), timeout, env)
    found = sorted(out.glob("kernels_*.md"))
    details = found[0].read_text() if found else _code(res.lines, 30)
    targets = [ln for ln in res.lines if ln.startswith("TARGET ")]
    passed = sum(" PASS " in ln for ln in targets)
    failed = sum(" FAIL " in ln for ln in targets)
    summary = f"targets: {passed} PASS, {failed} FAIL, {len(targets) - passed - failed} n/a"
    if not targets:  # cut short: the tables and targets of the blocks that finished are in the .md
        summary = "cut short; partial tables below" if found else "no results"
    return StageResult(_status(res), summary, details)


# training, ultralytics, ddp -------------------------------------------------------------------------

TRAINING = ROOT / "benchmarks" / "run_training.py"
TRAINING_FULL_S = 300.0  # a training stage given less runs run_training.py --quick


def _include(paths: Sequence[Path]) -> str:
    parts = []
    for p in paths:
        if p.exists():
            parts.append(f"`{p.name}`:\n\n{p.read_text().strip()}\n")
    return "\n".join(parts)


def stage_training(check: Check, timeout: float) -> StageResult:
    if not TRAINING.exists():
        return StageResult("skipped", "skipped: not present (benchmarks/run_training.py)")
    if check.dry_run or not check.has_cuda:
        return StageResult("skipped", "dry run / no CUDA: would run run_training.py --device cuda, then --check resume")
    deadline = time.monotonic() + timeout
    out = check.folder / "training"
    base = check.py(str(TRAINING.relative_to(ROOT)), "--device", "cuda", "--out", str(out))
    # the whole sweep (10 warm-up + 30 timed steps of 11 configurations) needs minutes: --quick below that
    quick = check.quick or timeout < TRAINING_FULL_S
    table_s = max(timeout - 30, timeout * 0.75)  # the rest for --check resume
    # --budget: run_training.py stops starting configurations in time to write its table itself
    res = check.run("training", base + (["--quick"] if quick else []) + ["--budget", f"{table_s - 10:.0f}"], table_s)
    statuses, notes = [_status(res)], [f"table{' (--quick)' if quick else ''}: {_status(res)} ({res.seconds:.0f} s)"]
    left = deadline - time.monotonic()
    if left >= 10:
        resume = check.run("training", base + ["--check", "resume"], left)
        statuses.append(_status(resume))
        notes.append(f"resume: {_status(resume)} ({resume.seconds:.0f} s)")
    else:
        statuses.append("timeout")
        notes.append("resume: no time left")
    details = _include([out / "training.md", out / "resume.md"]) or _code(res.lines, 30)
    return StageResult(_worst(statuses), "; ".join(notes), details)


def stage_ultralytics(check: Check, timeout: float) -> StageResult:
    if check.dry_run or not check.has_cuda:
        return StageResult("skipped", "dry run / no CUDA: would run run_ultralytics.py overhead --device 0")
    out = check.folder / "ultralytics"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="icd_gpu_check_ultralytics_") as work:  # data, weights, runs
        cmd = check.py("benchmarks/run_ultralytics.py", "overhead", "--device", "0", "--out", work, "--imgsz", "128",
                       "--iters", "100")  # fmt: skip
        res = check.run("ultralytics", cmd, timeout)
        if (Path(work) / "ultralytics.md").exists():
            shutil.copy2(Path(work) / "ultralytics.md", out / "ultralytics.md")
    details = _include([out / "ultralytics.md"]) or _code(res.lines, 30)
    summary = _tail_match(res.lines, r"^OVERHEAD ") or _status(res)
    return StageResult(_status(res), summary, details)


def stage_ddp(check: Check, timeout: float) -> StageResult:
    if not TRAINING.exists():
        return StageResult("skipped", "skipped: not present (benchmarks/run_training.py)")
    if check.dry_run or not check.has_cuda:
        return StageResult("skipped", "dry run / no CUDA: would run torchrun --nproc-per-node <GPUs> "
                           "run_training.py --check ddp")  # fmt: skip
    gpus = int(check.env_info.get("gpus", 1))
    out = check.folder / "ddp"
    script = str(TRAINING.relative_to(ROOT))
    cmd = check.py("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", script,
                   "--device", "cuda", "--out", str(out), "--check", "ddp")  # fmt: skip
    res = check.run("ddp", cmd, timeout)
    details = _include([out / "ddp.md"]) or _code(res.lines, 30)
    return StageResult(_status(res), f"world size {gpus} (NCCL): {_status(res)}", details)


STAGES = (
    Stage("env", "environment", stage_env, 20, 20, reserve_s=5),
    Stage("wheels", "carried wheels", stage_wheels, 20, 20, reserve_s=5),
    Stage("build", "build for the device's architecture", stage_build, 150, 60, reserve_s=40),
    Stage("tests", "GPU tests (pytest)", stage_tests, 80, 40, reserve_s=20),
    Stage("extras", "extra checks: determinism, graphs, shapes, sanitizer", stage_extras, 80, 30, reserve_s=20),
    Stage("kernels", "kernel benchmark", stage_kernels, 100, 45, reserve_s=60),
    Stage("training", "training (run_training.py)", stage_training, 90, 30, reserve_s=60),
    Stage("ddp", "DDP with NCCL", stage_ddp, 30, 20, reserve_s=20),
    Stage("ultralytics", "ultralytics on CUDA", stage_ultralytics, 50, None, reserve_s=30),
)
PARALLEL = {"tests": "extras"}  # correctness only: these two share the GPU, no timing is taken


# --- the run ---------------------------------------------------------------------------------------


def _limit(stage: Stage, check: Check) -> float:
    return (stage.quick_s if check.quick else stage.full_s) or 0.0


def reserve_of(later: Sequence[Stage], check: Check) -> float:
    """The time the ``later`` stages keep: each its ``reserve_s``, at most half its limit (the
    --quick limits are small), a parallel pair (PARALLEL) the larger of its two."""
    keep = {s.name: min(s.reserve_s, _limit(s, check) / 2) for s in later}
    for first, second in PARALLEL.items():
        if first in keep and second in keep:
            keep[first] = max(keep[first], keep.pop(second))
    return sum(keep.values())


def timeout_for(stage: Stage, later: Sequence[Stage], check: Check) -> float:
    """The stage's own limit, cut so that the later stages keep their reserve of the budget."""
    return max(min(_limit(stage, check), check.left() - reserve_of(later, check)), 0.0)


def run_stages(check: Check, stages: Sequence[Stage], selected: set[str] | None = None) -> dict[str, StageResult]:
    """Run ``stages`` in order (those in ``selected``; with --quick, those that have a quick
    limit), each under its timeout; write the report after each."""
    chosen = [s for s in stages if (selected is None or s.name in selected) and (not check.quick or s.quick_s)]
    for stage in stages:
        if stage not in chosen:
            quick_only = check.quick and not stage.quick_s and (selected is None or stage.name in selected)
            check.results[stage.name] = StageResult("not selected", "not part of --quick" if quick_only else "")
    done: set[str] = set()
    for i, stage in enumerate(chosen):
        if stage.name in done:
            continue
        group = [stage]
        partner = next((s for s in chosen if s.name == PARALLEL.get(stage.name)), None)
        if partner is not None:
            group.append(partner)
        later = [s for s in chosen[i + 1 :] if s not in group]
        timeouts = [timeout_for(s, later, check) for s in group]
        threads = []
        for s, t in zip(group, timeouts, strict=True):
            threads.append(threading.Thread(target=_run_one, args=(check, s, t), daemon=True))
            threads[-1].start()
        for t in threads:
            t.join()
        done |= {s.name for s in group}
        write_report(check, stages)
    return check.results


def _run_one(check: Check, stage: Stage, timeout: float) -> None:
    print(f"\n==== {stage.name}: {stage.title} (timeout {timeout:.0f} s, {check.left():.0f} s of budget left)",
          flush=True)  # fmt: skip
    start = time.monotonic()
    if timeout < min(5.0, _limit(stage, check)):
        result = StageResult("skipped", "out of time budget")
    else:
        try:
            result = stage.run(check, timeout)
        except Exception as exc:  # a bug in a stage is that stage's failure, not the run's
            result = StageResult("failed", f"driver error: {type(exc).__name__}: {exc}")
    result.seconds, result.timeout = time.monotonic() - start, timeout
    check.results[stage.name] = result
    print(f"==== {stage.name}: {result.status} in {result.seconds:.0f} s: {result.summary}", flush=True)


# --- the report ------------------------------------------------------------------------------------


def format_report(check: Check, stages: Sequence[Stage]) -> str:
    info = check.env_info
    title = info.get("device_name") if check.has_cuda else "no GPU (dry run)" if check.dry_run else "no GPU"
    mode = "dry run" if check.dry_run else "quick" if check.quick else "full"
    used = time.monotonic() - check.started
    lines = [
        f"# GPU check on {title} ({check.started_at})",
        "",
        f"Commit {git_commit()}; `{check.command}`; mode {mode}; budget {check.budget_s:.0f} s, {used:.0f} s used.",
        "",
        "| stage | status | seconds | timeout | summary |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for s in stages:
        r = check.results.get(s.name, StageResult("pending"))
        summary = r.summary.replace("|", "/").replace("\n", " ")
        lines.append(f"| {s.name} | {r.status} | {r.seconds:.1f} | {r.timeout:.0f} | {summary} |")
    lines.append("")
    for s in stages:
        r = check.results.get(s.name)
        if r is None or r.status == "not selected" or not r.details.strip():
            continue
        lines += [f"## {s.name}: {s.title}", "", r.details.rstrip(), ""]
    lines += ["Logs: " + f"`{check.folder.name}/logs/` (one file per stage; the whole folder as "
              f"`{check.folder.name}.tar.gz` under --copy-to).", ""]  # fmt: skip
    return "\n".join(lines)


ROW = re.compile(
    r"^\| (?P<stage>[\w-]+) \| (?P<status>[^|]+?) \| (?P<seconds>[\d.]+) \| (?P<timeout>\d+) \| (?P<summary>.*) \|$"
)


def parse_report(text: str) -> dict[str, dict[str, object]]:
    """The stage table of a report: stage -> {status, seconds, timeout, summary}."""
    found = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            found[m["stage"]] = {"status": m["status"], "seconds": float(m["seconds"]),
                                 "timeout": int(m["timeout"]), "summary": m["summary"]}  # fmt: skip
    return found


_REPORT_LOCK = threading.RLock()  # also taken by the SIGTERM handler, maybe while held


def write_report(check: Check, stages: Sequence[Stage]) -> Path:
    """Write the report atomically (and copy it, the kernel CSV/PNG/MD and a tarball of the
    folder to --copy-to: at most 8 files come back from the device tool)."""
    with _REPORT_LOCK:
        check.folder.mkdir(parents=True, exist_ok=True)
        path = check.report_path
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(format_report(check, stages))
        os.replace(tmp, path)
        if check.copy_to is not None:
            try:
                _copy_out(check, path)
            except OSError as exc:  # the report here is written; the next stage may copy again
                print(f"--copy-to {check.copy_to}: {exc}", flush=True)
        return path


TAR_SUFFIXES = {".md", ".csv", ".png", ".log", ".txt", ".json", ".jsonl", ".yaml"}
TAR_MAX_FILE = 4 * 2**20


def _small_text(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Reports, tables, plots and logs only: checkpoints and data stay out of the tarball (the
    device tool returns files of at most 16 MB)."""
    if info.isdir():
        return info
    if Path(info.name).suffix not in TAR_SUFFIXES or info.size > TAR_MAX_FILE:
        return None
    return info


def _copy_out(check: Check, report: Path) -> None:
    dest = check.copy_to
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(report, dest / report.name)
    for found in sorted(check.folder.glob("kernels_*"))[:3]:
        shutil.copy2(found, dest / found.name)
    tmp = dest / f".{check.folder.name}.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(check.folder, arcname=check.folder.name, filter=_small_text)
    os.replace(tmp, dest / f"{check.folder.name}.tar.gz")


# --- wheels for the device (run here, with network) ------------------------------------------------


def pinned_versions(names: Sequence[str]) -> dict[str, str]:
    """name -> version pinned in requirements-*.txt, for ``names``."""
    pins = {}
    for req in sorted(ROOT.glob("requirements-*.txt")):
        for line in req.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
            if m and m[1].lower().replace("_", "-") in names:
                pins[m[1].lower().replace("_", "-")] = m[2]
    return pins


def download_wheels(python_version: str, dest: Path = WHEELS_DIR) -> int:
    """Download the pinned wheels of DEVICE_LACKS for CPython ``python_version`` on x86-64 Linux."""
    pins = pinned_versions(DEVICE_LACKS)
    missing = sorted(set(DEVICE_LACKS) - set(pins))
    if missing:
        print(f"--download-wheels: {missing} are not pinned in requirements-*.txt", file=sys.stderr)
        return 2
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                 "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")]  # fmt: skip
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python_version, *platforms, "-d", str(dest),
           *(f"{n}=={v}" for n, v in sorted(pins.items()))]  # fmt: skip
    print("$ " + shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    size = sum(p.stat().st_size for p in dest.glob("*.whl"))
    tree = _tree_bytes()
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB; with the working tree "
          f"({tree / 2**20:.1f} MiB) {(size + tree) / 2**20:.1f} of the {CARRY_LIMIT / 2**20:.0f} MiB the device "
          "tool carries")  # fmt: skip
    if size + tree > CARRY_LIMIT:
        print("too large to carry: leave out polars and polars-runtime-32 (ultralytics reads its results.csv with "
              "them when it saves a checkpoint)", file=sys.stderr)  # fmt: skip
        return 1
    return rc


def _tree_bytes() -> int:
    """Bytes of the files the device tool sends: tracked, and untracked files git does not ignore."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True, timeout=30).stdout.split(b"\0")  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return 0
    paths = [ROOT / os.fsdecode(p) for p in listed if p]
    return sum(p.stat().st_size for p in paths if p.is_file())


# --- command line ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    stages_text = "Stages: " + ", ".join(s.name for s in STAGES)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=stages_text)
    p.add_argument("--quick", action="store_true", help="the quick subset (< 3 min): ICD_NO_CUDA build, bf16 ICD shape")
    p.add_argument("--stages", default=None, help="comma list of stages to run (default all)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; run each stage CPU-sized or skip it")
    p.add_argument("--copy-to", type=Path, default=None, help="copy the report, CSV/PNG and logs here after each stage")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of gpu_check_<device>.md and its folder")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default 450, quick 175)")
    p.add_argument("--download-wheels", action="store_true", help="download the wheels the device lacks to .wheels/")
    p.add_argument("--python-version", default="3.12", help="the device's python, for --download-wheels")
    args = p.parse_args(argv)
    if args.download_wheels:
        return download_wheels(args.python_version)
    names = [s.name for s in STAGES]
    selected = None
    if args.stages:
        selected = {x.strip() for x in args.stages.split(",") if x.strip()}
        if selected - set(names):
            unknown = ", ".join(sorted(selected - set(names)))
            raise SystemExit(f"--stages: {unknown}; expected some of {', '.join(names)}")
    if args.budget is not None and args.budget <= 0:
        raise SystemExit(f"--budget: {args.budget:g}; expected seconds > 0")
    if args.copy_to is not None and args.copy_to.exists() and not args.copy_to.is_dir():
        raise SystemExit(f"--copy-to {args.copy_to}: a file; expected a folder")
    budget = args.budget or (175.0 if args.quick else 450.0)
    check = Check(out=args.out, quick=args.quick, dry_run=args.dry_run, budget_s=budget, copy_to=args.copy_to,
                  command=shlex.join(["gpu_check.py", *(argv if argv is not None else sys.argv[1:])]))  # fmt: skip
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    plan = [s for s in STAGES if (selected is None or s.name in selected) and (not args.quick or s.quick_s)]
    print("plan: " + ", ".join(f"{s.name} (<= {(s.quick_s if args.quick else s.full_s):.0f} s)" for s in plan)
          + f"; budget {budget:.0f} s" + ("; dry run" if args.dry_run else ""), flush=True)  # fmt: skip
    if "env" not in {s.name for s in plan}:  # every stage needs the device facts
        stage_env(check, 30)
    def stop(signum: int, frame: object) -> None:  # stopped from outside: no command outlives the driver
        kill_active()
        write_report(check, STAGES)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        run_stages(check, STAGES, selected)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    path = write_report(check, STAGES)
    print(f"\nwrote {path}")
    for s in STAGES:
        r = check.results[s.name]
        print(f"  {s.name:12s} {r.status:12s} {r.seconds:6.1f} s  {r.summary}")
    for found in sorted(check.folder.glob("kernels_*.md")):  # the targets last: the device tool returns the tail
        print("\n".join(ln for ln in found.read_text().splitlines() if ln.startswith("TARGET ")))
    bad = [n for n, r in check.results.items() if r.status in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
