"""GPU correctness checks that the project's GPU tests do not make, run by benchmarks/gpu_check.py
(its ``extras`` and ``sanitize`` stages); absorbed from the shared gpu_check tool.

    python benchmarks/gpu_extras.py checks determinism graphs   # one PASS|FAIL|SKIP|NOTE line per check
    python benchmarks/gpu_extras.py ceilings                    # measured copy bandwidth, bf16 matmul rate
    compute-sanitizer --tool memcheck python benchmarks/gpu_extras.py sanitize --backend cuda

Subcommands (run from the repository root, after the project is installed):
  checks NAME... [--dtype D]  NAME: configs (every autotune config of every Triton kernel, at
                              K=300, S=22,401), shapes (odd K/S/D at rotating configs, both
                              backends, poisoned allocator), streams (non-default stream),
                              determinism, offsets (element offsets > 2^31), multigpu,
                              graphs (CUDA-graph capture). Default: all.
  ceilings                    a device-to-device copy and an 8192^3 bf16 matmul: the measured
                              ceilings beside bench_kernels.py's datasheet peaks.
  profile [--dtype D]         per-kernel device time of one fwd+bwd (+ value mask + MSE) per
                              backend at N=2, h=8, K=300, S=22,400, D=32.
  sanitize [--backend B]      a tiny workload (attention fwd+bwd, value mask, MSE) to run under
                              compute-sanitizer; no allocator poisoning.

On a CPU under TRITON_INTERPRET=1 the checks run at tiny sizes (a smoke test of this file).
Tolerances are norm-wise relative errors against a float64 reference computed from the
same (rounded) inputs: fp32 1e-3 (3xTF32 dots), fp16 1e-2, bf16 5e-2. Real bugs (a
missed tile, a wrong stride, a race) give errors of order 1 or NaN.
"""

from __future__ import annotations

# ruff: noqa: B023 (the closures in loops are called within their own iteration)
import argparse
import contextlib
import math
import os
import subprocess
import sys
import time
import traceback

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
FAILS: list[str] = []


def say(status: str, name: str, detail: str = "") -> None:
    print(f"{status} {name} {detail}".rstrip(), flush=True)
    if status == "FAIL":
        FAILS.append(name)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if os.environ.get("TRITON_INTERPRET") == "1":  # smoke-testing this helper on a CPU
        return torch.device("cpu")
    raise SystemExit("no CUDA device")


DEV = None


def backends() -> list[str]:
    """The kernel backends checked: those of the backend table (icd.ops.backends) built for
    CUDA tensors; on a CPU, those that run there under TRITON_INTERPRET=1 (the smoke test)."""
    import icd.ops as ops
    from icd.ops.backends import BACKEND_TABLE, native_backends

    if DEV.type == "cpu":
        return [b for b in ops.available_backends(DEV) if BACKEND_TABLE[b].interpreted_on(DEV)]
    built = set(ops.available_backends())
    return [b for b in native_backends(DEV.type, with_kernels=True) if b in built]


# --- inputs and runs ---------------------------------------------------------------------


SANITIZING = False  # under compute-sanitizer: no 1 GB poisoning fill (instrumented, slow)


def poison() -> None:
    """Fill freed allocator blocks with 0xFF bytes (NaN in fp32, fp16 and bf16), so that an
    output element a kernel never writes shows up as NaN instead of stale valid data."""
    if DEV.type != "cuda" or SANITIZING:
        return
    big = torch.empty(1 << 30, dtype=torch.uint8, device=DEV).fill_(255)
    small = [torch.empty(1 << 19, dtype=torch.uint8, device=DEV).fill_(255) for _ in range(64)]
    del big, small


def make_inputs(n, h, kq, s, d, dtype, *, permuted=True, pad=0.25, empty_image=True, q_scale=1.0):
    def heads(length):
        if permuted:  # [L, N, h, D] buffer viewed as [N, h, L, D], as split from [N, L, C]
            return torch.randn(length, n, h, d, device=DEV).to(dtype).permute(1, 2, 0, 3)
        return torch.randn(n, h, length, d, device=DEV).to(dtype)

    q = (torch.randn(n, h, kq, d, device=DEV) * q_scale).to(dtype)
    k, v = heads(s), heads(s)
    mask = torch.rand(n, s, device=DEV) < pad
    if empty_image and n > 1:
        mask[0] = True
    g = torch.randn(n, h, kq, d, device=DEV).to(dtype)  # rounded: the reference sees the same
    gl = torch.randn(n, h, kq, device=DEV)
    weight = (torch.rand(n, kq, device=DEV) < 0.3).float()
    weight[:, 0] = 1.0
    weight[-1, : min(kq, 40)] = 1.0  # >= 40 real slots on an image that has keys: 2 row blocks
    return q, k, v, mask, g, gl, weight


def leaf(t, dtype=None):
    t = t.detach() if dtype is None else t.detach().to(dtype)
    return t.requires_grad_(True)


def attention(q, k, v, mask, g, gl, backend, scale=None):
    import icd.ops as ops

    ref = backend == "reference"
    dt = torch.float64 if ref else None
    q, k, v = leaf(q, dt), leaf(k, dt), leaf(v, dt)
    out, lse = ops.instance_attention(q, k, v, mask, scale=scale, backend=backend)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out * g.to(out.dtype)).sum() + (finite * gl.to(finite.dtype)).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return {"out": out.detach(), "lse": lse.detach(), "dq": dq, "dk": dk, "dv": dv}


def value_mask(q, k, weight, mask, backend, temperature=1.0, lse=None):
    import icd.ops as ops

    if backend == "reference":
        q, k = q.double(), k.double()
        lse = None if lse is None else lse.double()
    return ops.instance_value_mask(q, k, weight, mask, temperature=temperature, lse=lse, backend=backend)


def mse(student, teacher, weight, backend, norm, reduction):
    import icd.ops as ops

    dt = torch.float64 if backend == "reference" else None
    s = leaf(student, dt)
    t = teacher.detach() if dt is None else teacher.double()
    loss = ops.masked_feature_mse(s, t, weight, norm, reduction=reduction, backend=backend)
    (grad,) = torch.autograd.grad(loss * 1.3, s)
    return {"loss": loss.detach(), "grad": grad}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise relative error; inf when non-finite entries differ in place or value."""
    a, b = got.detach().double(), want.detach().double()
    if a.shape != b.shape:
        return math.inf
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb) or not torch.equal(a[~fb], b[~fb]):
        return math.inf
    diff, norm = (a[fb] - b[fb]).norm().item(), b[fb].norm().item()
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def compare(name: str, got: dict, want: dict, dtype) -> bool:
    tol = TOL[dtype]
    errs = {key: rel_err(got[key], want[key]) for key in want}
    worst = max(errs, key=errs.get)
    ok = all(e <= tol for e in errs.values())
    detail = " ".join(f"{k}={e:.1e}" for k, e in errs.items())
    say("PASS" if ok else "FAIL", name, f"(tol {tol:.0e}; worst {worst}) {detail}")
    return ok


REFS: dict = {}


def ref(key, fn):
    """float64 references, memoised: the inputs of one (shape, dtype) are seeded, hence equal."""
    if key not in REFS:
        REFS[key] = fn()
    return REFS[key]


def full_check(tag, backend, dtype, n, h, kq, s, d, *, with_mse=True, permuted=True):
    """Attention fwd+bwd, value mask (lse reuse, T=0.5) and MSE against a float64 reference."""
    torch.manual_seed(hash((n, h, kq, s, d)) % 2**31)
    q, k, v, mask, g, gl, weight = make_inputs(n, h, kq, s, d, dtype, permuted=permuted)
    key = (n, h, kq, s, d, dtype, permuted)
    want = ref(key + ("attention",), lambda: attention(q, k, v, mask, g, gl, "reference"))
    poison()
    got = attention(q, k, v, mask, g, gl, backend)
    label = f"{tag} {backend} {str(dtype)[6:]} N{n}h{h}K{kq}S{s}D{d}"
    compare(f"attention {label}", got, want, dtype)
    structural = []
    if n > 1:  # image 0 is fully padded: out 0, lse -inf, zero gradients
        structural.append(bool((got["out"][0] == 0).all()) and bool(torch.isneginf(got["lse"][0]).all()))
        structural.append(all(bool((got[x][0] == 0).all()) for x in ("dq", "dk", "dv")))
    masked = mask[-1]
    structural.append(bool((got["dk"][-1][:, masked] == 0).all()) and bool((got["dv"][-1][:, masked] == 0).all()))
    say("PASS" if all(structural) else "FAIL", f"masked-zeros {label}")

    vm_want = ref(key + ("vm",), lambda: value_mask(q, k, weight, mask, "reference"))
    poison()
    vm_got = {
        "lse_reuse": value_mask(q, k, weight, mask, backend, lse=got["lse"]),
        "two_pass": value_mask(q, k, weight, mask, backend),
    }
    compare(f"value_mask {label}", vm_got, {"lse_reuse": vm_want, "two_pass": vm_want}, dtype)
    compare(
        f"value_mask_T0.5 {label}",
        {"vm": value_mask(q, k, weight, mask, backend, temperature=0.5)},
        {"vm": ref(key + ("vm0.5",), lambda: value_mask(q, k, weight, mask, "reference", temperature=0.5))},
        dtype,
    )
    if not with_mse:
        return
    student, teacher = k * 2 + 0.5, v
    mweight = torch.rand(n, h, s, device=DEV) * (torch.rand(n, h, s, device=DEV) < 0.7)
    for norm, reduction in (("ln", "per_head"), ("tln", "global")):
        want_m = ref(key + (norm, reduction), lambda: mse(student, teacher, mweight, "reference", norm, reduction))
        poison()
        got_m = mse(student, teacher, mweight, backend, norm, reduction)
        compare(f"mse_{norm}_{reduction} {label}", got_m, want_m, dtype)


# --- Triton autotune configs ---------------------------------------------------------------


def autotuners() -> dict:
    from icd.kernels import feature_mse, instance_attention
    from icd.kernels import value_mask as vm
    from triton.runtime.autotuner import Autotuner

    found = {}
    for mod in (instance_attention, vm, feature_mse):
        for name, obj in vars(mod).items():
            if isinstance(obj, Autotuner):
                found[name] = obj
    return found


@contextlib.contextmanager
def pinned(index: int | None):
    """Every Triton autotuner runs its config number ``index`` (mod its count), no tuning."""
    if index is None:
        yield ""
        return
    tuners = autotuners()
    saved = {n: list(t.configs) for n, t in tuners.items()}
    chosen = []
    try:
        for n, t in tuners.items():
            cfg = saved[n][index % len(saved[n])]
            t.configs = [cfg]
            if hasattr(t, "cache"):
                t.cache.clear()
            kw = ",".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in cfg.kwargs.items())
            chosen.append(f"{n.strip('_').replace('_kernel', '')}[{kw},w{cfg.num_warps},s{cfg.num_stages}]")
        yield " ".join(chosen)
    finally:
        for n, t in tuners.items():
            t.configs = saved[n]
            if hasattr(t, "cache"):
                t.cache.clear()


def out_of_resources(exc: BaseException) -> bool:
    return "OutOfResources" in type(exc).__name__ or "out of resource" in str(exc).lower()


def check_configs(dtype) -> None:
    if "triton" not in backends():
        return say("SKIP", "configs", "triton backend not available")
    tiny = DEV.type == "cpu"
    shape = (2, 2, 20, 50, 16) if tiny else (2, 4, 300, 22_401, 32)  # S = 22,401: a key tail
    count = max(len(t.configs) for t in autotuners().values())
    for i in range(count):
        with pinned(i) as which:
            print(f"# config set {i}: {which}", flush=True)
            t0 = time.time()
            try:
                full_check(f"cfg{i}", "triton", dtype, *shape)
            except Exception as exc:
                status = "NOTE" if out_of_resources(exc) else "FAIL"
                why = " (autotune prunes such a config; it fails only if every config does)" if status == "NOTE" else ""
                say(status, f"cfg{i} {str(dtype)[6:]}", f"raised {type(exc).__name__}: {exc}"[:300] + why)
            print(f"# config set {i} took {time.time() - t0:.1f} s", flush=True)


# --- other checks --------------------------------------------------------------------------

SHAPES = [  # (N, h, K, S, D, dtype): K = 1, S = 1, tails on every block size, D not a power of 2
    (2, 3, 1, 1, 8, torch.float16),
    (2, 2, 65, 129, 24, torch.bfloat16),
    (1, 2, 17, 4097, 128, torch.float32),
    (2, 2, 33, 2049, 64, torch.bfloat16),
    (3, 1, 300, 1025, 32, torch.float16),
    (1, 1, 7, 70_001, 32, torch.bfloat16),
]


def check_shapes() -> None:
    shapes = SHAPES if DEV.type == "cuda" else [(2, 2, 3, 19, 8, torch.float32)]
    for i, (n, h, kq, s, d, dtype) in enumerate(shapes):
        for backend in backends():
            label = f"shape{i} {backend} D{d} {str(dtype)[6:]}"
            try:
                with pinned(i if backend == "triton" else None) as which:
                    if which:
                        print(f"# shape {i} runs Triton config set {i}", flush=True)
                    full_check(f"shape{i}", backend, dtype, n, h, kq, s, d, permuted=i % 2 == 0)
            except Exception as exc:
                if not (backend == "triton" and out_of_resources(exc)):
                    say("FAIL", label, f"raised {type(exc).__name__}: {exc}"[:300])
                    continue
                say("NOTE", label, f"config set {i} is out of resources here; rerunning with autotune")
                try:
                    full_check(f"shape{i}-autotuned", backend, dtype, n, h, kq, s, d, permuted=i % 2 == 0)
                except Exception as exc2:  # every config out of resources: a real failure
                    say("FAIL", label + " autotuned", f"raised {type(exc2).__name__}: {exc2}"[:300])


def check_streams() -> None:
    """Inputs are produced on a side stream behind a ~50 ms sleep; the op, called under that
    stream, must run on it (a launch on another stream would read the unwritten inputs)."""
    if DEV.type != "cuda":
        return say("SKIP", "streams", "needs CUDA")
    import icd.ops as ops

    for backend in backends():
        with pinned(0 if backend == "triton" else None):
            torch.manual_seed(3)
            q, k, v, mask, g, gl, weight = make_inputs(2, 4, 300, 8191, 32, torch.bfloat16)
            want = attention(q, k, v, mask, g, gl, backend)
            want_vm = value_mask(q, k, weight, mask, backend, lse=want["lse"])
            want_mse = mse(k, v, want_vm, backend, "ln", "per_head")
            torch.cuda.synchronize()
            poison()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                torch.cuda._sleep(100_000_000)
                q2, k2, v2 = q.clone(), k.clone(), v.clone()  # written only after the sleep
                got = attention(q2, k2, v2, mask, g, gl, backend)
                got_vm = value_mask(q2, k2, weight, mask, backend, lse=got["lse"])
                got_mse = mse(k2, v2, got_vm, backend, "ln", "per_head")
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            same = all(torch.equal(got[x], want[x]) for x in want) and torch.equal(got_vm, want_vm)
            same = same and all(torch.equal(got_mse[x], want_mse[x]) for x in want_mse)
            detail = "" if same else " ".join(f"{x}={rel_err(got[x], want[x]):.1e}" for x in want)
            say("PASS" if same else "FAIL", f"streams {backend}", detail + " (bitwise vs default stream)")
            _ = ops  # keep the import: it registers the ops


def check_determinism() -> None:
    for backend in backends():
        with pinned(0 if backend == "triton" else None):
            shape = (2, 4, 300, 8191, 32) if DEV.type == "cuda" else (2, 2, 5, 40, 16)
            torch.manual_seed(4)
            q, k, v, mask, g, gl, weight = make_inputs(*shape, torch.bfloat16 if DEV.type == "cuda" else torch.float32)
            runs = [attention(q, k, v, mask, g, gl, backend) for _ in range(2)]
            vms = [value_mask(q, k, weight, mask, backend) for _ in range(2)]
            same = all(torch.equal(runs[0][x], runs[1][x]) for x in runs[0]) and torch.equal(*vms)
            say("PASS" if same else "FAIL", f"determinism {backend}", "(two runs bitwise equal)")


def check_offsets() -> None:
    """k, v, student and teacher as column slices of one [S, 525,312] bf16 buffer: the
    largest element offset is 2.15e9 > 2^31, so any int32 offset arithmetic breaks."""
    if DEV.type != "cuda":
        return say("SKIP", "offsets", "needs CUDA")
    s, d, row = 4096, 32, (1 << 19) + 1024
    try:
        buf = torch.empty(s, row, dtype=torch.bfloat16, device=DEV)
    except torch.OutOfMemoryError:
        return say("SKIP", "offsets", "could not allocate 4.3 GB")
    views = []
    for j in range(4):
        col = buf[:, row - (j + 1) * 64 : row - (j + 1) * 64 + d]  # columns near the row end
        col.normal_()
        views.append(col.unsqueeze(0).unsqueeze(0))  # [1, 1, S, D], stride_s = 525,312
    k, v, student, teacher = views
    assert (s - 1) * row + row - 64 > 2**31
    torch.manual_seed(5)
    q = torch.randn(1, 1, 8, d, device=DEV).to(torch.bfloat16)
    g = torch.randn(1, 1, 8, d, device=DEV).to(torch.bfloat16)
    gl = torch.randn(1, 1, 8, device=DEV)
    mask = torch.rand(1, s, device=DEV) < 0.2
    weight = torch.ones(1, 8, device=DEV)
    want = attention(q, k.contiguous(), v.contiguous(), mask, g, gl, "reference")
    mweight = torch.rand(1, 1, s, device=DEV)
    want_m = mse(student.contiguous(), teacher.contiguous(), mweight, "reference", "ln", "per_head")
    want_vm = value_mask(q, k.contiguous(), weight, mask, "reference")
    for backend in backends():
        with pinned(0 if backend == "triton" else None):
            got = attention(q, k, v, mask, g, gl, backend)
            compare(f"offsets>2^31 attention {backend}", got, want, torch.bfloat16)
            compare(f"offsets>2^31 value_mask {backend}", {"vm": value_mask(q, k, weight, mask, backend)},
                    {"vm": want_vm}, torch.bfloat16)
            compare(f"offsets>2^31 mse {backend}", mse(student, teacher, mweight, backend, "ln", "per_head"),
                    want_m, torch.bfloat16)
    del buf


def check_multigpu() -> None:
    global DEV
    if DEV.type != "cuda" or torch.cuda.device_count() < 2:
        return say("SKIP", "multigpu", f"{torch.cuda.device_count()} GPU(s): needs 2")
    home = DEV
    DEV = torch.device("cuda", 1)
    try:
        with torch.cuda.device(0):
            for backend in backends():
                with pinned(0 if backend == "triton" else None):
                    torch.manual_seed(6)
                    q, k, v, mask, g, gl, weight = make_inputs(2, 2, 37, 1031, 32, torch.bfloat16)
                    before = torch.cuda.memory_allocated(0)
                    got = attention(q, k, v, mask, g, gl, backend)
                    ok_dev = all(t.device == DEV for t in got.values())
                    compare(f"multigpu cuda:1 attention {backend}", got,
                            attention(q, k, v, mask, g, gl, "reference"), torch.bfloat16)
                    say("PASS" if ok_dev and torch.cuda.memory_allocated(0) == before else "FAIL",
                        f"multigpu {backend} outputs on cuda:1, nothing allocated on cuda:0")
    finally:
        DEV = home


def check_graphs() -> None:
    """Capture attention fwd+bwd in a CUDA graph, replay on new inputs, compare with eager.
    Then try value mask and MSE (their argument checks read tensor values on the host)."""
    if DEV.type != "cuda":
        return say("SKIP", "graphs", "needs CUDA")
    import icd.ops as ops

    for backend in backends():
        with pinned(0 if backend == "triton" else None):
            torch.manual_seed(7)
            q, k, v, mask, g, gl, weight = make_inputs(2, 4, 300, 8191, 32, torch.bfloat16)
            sq, sk, sv = leaf(q), leaf(k), leaf(v)

            def step():
                out, lse = ops.instance_attention(sq, sk, sv, mask, backend=backend)
                finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
                loss = (out * g).sum() + (finite * gl).sum()
                return (out, lse, *torch.autograd.grad(loss, (sq, sk, sv)))

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    static = step()
                torch.manual_seed(8)
                q2, k2, v2, *_ = make_inputs(2, 4, 300, 8191, 32, torch.bfloat16)
                with torch.no_grad():
                    sq.copy_(q2), sk.copy_(k2), sv.copy_(v2)
                graph.replay()
                torch.cuda.synchronize()
                eager = attention(q2, k2, v2, mask, g, gl, backend)
                names = ("out", "lse", "dq", "dk", "dv")
                same = all(torch.equal(a, eager[x]) for a, x in zip(static, names, strict=True))
                say("PASS" if same else "FAIL", f"graph-capture attention fwd+bwd {backend}",
                    "(replay == eager, bitwise)")
            except Exception as exc:
                say("FAIL", f"graph-capture attention fwd+bwd {backend}", f"{type(exc).__name__}: {exc}"[:300])
                continue
            for what, fn in (
                ("value_mask", lambda: ops.instance_value_mask(sq, sk, weight, mask, backend=backend)),
                ("masked_feature_mse", lambda: ops.masked_feature_mse(
                    sk, sv.detach(), torch.rand(2, 4, 8191, device=DEV), backend=backend)),
            ):
                fn()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph):
                        fn()
                    graph.replay()
                    torch.cuda.synchronize()
                    say("PASS", f"graph-capture {what} {backend}")
                except Exception as exc:
                    say("FAIL", f"graph-capture {what} {backend}",
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]} "
                        "(expected cause: host sync in icd/ops/validation.py check_nonnegative)")
                    return  # the capture error can poison the context: stop here


CHECKS = {
    "configs": check_configs,
    "shapes": check_shapes,
    "streams": check_streams,
    "determinism": check_determinism,
    "offsets": check_offsets,
    "multigpu": check_multigpu,
    "graphs": check_graphs,
}


# --- measured ceilings ---------------------------------------------------------------------


def _events_ms(fn, reps=10, warm=3) -> float:
    for _ in range(warm):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def ceilings() -> dict:
    src = torch.empty(1 << 31, dtype=torch.uint8, device=DEV).fill_(1)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / (_events_ms(lambda: dst.copy_(src)) * 1e-3)
    src = dst = None
    x = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    mm = 2 * 8192**3 / (_events_ms(lambda: x @ y) * 1e-3)
    props = torch.cuda.get_device_properties(DEV)
    clock = 1.98e9  # H100/H200 SXM boost; replaced by nvidia-smi's max SM clock when readable
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits",
                              f"--id={DEV.index}"], capture_output=True, text=True, timeout=10).stdout
        clock = float(out.strip().splitlines()[0]) * 1e6
    exp_rate = 16 * props.multi_processor_count * clock  # MUFU ex2: 16 per clock per SM (sm_80/90)
    print(f"CEILING {props.name}: copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {mm / 1e12:.0f} TFLOP/s, "
          f"MUFU exp2 {exp_rate / 1e12:.2f} T/s ({props.multi_processor_count} SMs @ {clock / 1e9:.2f} GHz)")
    return {"bw": bw, "mm": mm, "exp": exp_rate}


# --- per-kernel profile --------------------------------------------------------------------


def profile(dtype) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(9)
    n, h, kq, s, d = 2, 8, 300, 22_400, 32
    q, k, v, mask, g, gl, weight = make_inputs(n, h, kq, s, d, dtype, pad=0.2, empty_image=False)
    weight = torch.zeros(n, kq, device=DEV)
    weight[0, :7], weight[1, :12] = 1.0, 1.0
    mweight = torch.rand(n, h, s, device=DEV) * 1e-3

    for backend in backends():
        def step():
            res = attention(q, k, v, mask, g, gl, backend)
            vm = value_mask(q, k, weight, mask, backend, lse=res["lse"])
            mse(k, v, mweight, backend, "ln", "per_head")
            return vm

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        total, lines = 0.0, []
        for evt in prof.key_averages():
            us = getattr(evt, "device_time_total", None)
            if us is None:
                us = getattr(evt, "cuda_time_total", 0.0)
            if us and us > 0 and evt.key and not evt.key.startswith(("ProfilerStep", "cuda")):
                lines.append((us, evt.count, evt.key))
        lines.sort(reverse=True)
        kernels = [x for x in lines if "Memcpy" not in x[2] and "Memset" not in x[2]]
        total = sum(x[0] for x in kernels)
        print(f"PROFILE {backend} {str(dtype)[6:]} attention fwd+bwd + value mask + MSE fwd+bwd: "
              f"{total:.0f} us of kernels ({len(kernels)} names)")
        for us, count, key in kernels[:14]:
            print(f"PROFILE   {us:9.1f} us  x{count:<3d} {key[:100]}")


# --- compute-sanitizer workload --------------------------------------------------------------


def sanitize(only: str | None) -> None:
    global SANITIZING
    SANITIZING = True
    shapes = ((2, 2, 37, 300, 32, torch.bfloat16), (1, 2, 9, 100, 128, torch.float32), (2, 1, 5, 70, 8, torch.float16))
    for backend in backends():
        if only in (None, backend):
            for n, h, kq, s, d, dtype in shapes:
                full_check("sanitize", backend, dtype, n, h, kq, s, d)


def main() -> int:
    global DEV
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=("checks", "ceilings", "profile", "sanitize"))
    p.add_argument("args", nargs="*")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    from icd.ops.backends import native_backends

    p.add_argument("--backend", choices=native_backends("cuda", with_kernels=True), default=None,
                   help="sanitize: one backend only")  # fmt: skip
    a = p.parse_args()
    DEV = device()
    if DEV.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the float64 reference is unaffected anyway
    t0 = time.time()
    try:
        if a.cmd == "checks":
            for name in a.args or list(CHECKS):
                try:
                    if name == "configs":
                        check_configs(DTYPES[a.dtype])
                    else:
                        CHECKS[name]()
                except Exception as exc:
                    say("FAIL", name, f"raised {type(exc).__name__}: {exc}"[:400])
                    traceback.print_exc()
        elif a.cmd == "ceilings":
            if DEV.type == "cuda":
                ceilings()
        elif a.cmd == "profile":
            profile(DTYPES[a.dtype])
        else:
            sanitize(a.backend)
    finally:
        print(f"# {a.cmd} {' '.join(a.args)} done in {time.time() - t0:.1f} s, {len(FAILS)} FAIL", flush=True)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
