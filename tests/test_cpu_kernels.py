"""What is specific to the C++ CPU kernels (csrc/cpu): memory, argument checks, threads.

The comparison with the reference on many shapes and dtypes lives in tests/test_<op>.py,
parametrised over backends; here: no [N, h, K, S] allocation, no full copy of permuted
k / v, gradients in the inputs' layout (no copy by autograd), TORCH_CHECK messages that name
the argument, the same result for 1 and 2 threads, key tiles that are skipped because all
their keys are masked, and grad_lse = None.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import icd.ops as ops
from icd.ops import reference
from icd.ops.library import instance_attention_backward_op, masked_feature_mse_backward_op
from icd.profiling import profile_cpu_allocations

pytestmark = pytest.mark.skipif(
    "cpu" not in ops.available_backends(), reason="the C++ extension icd._C is not built"
)
kernels = torch.ops.icd_ext


@contextlib.contextmanager
def num_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def allocations(fn) -> list[int]:
    """Bytes of each allocation made while fn() runs (one thread, so the profiler sees all)."""
    with num_threads(1):
        _, profiled = profile_cpu_allocations(fn)
    return list(profiled.sizes)


def largest_allocation(fn) -> int:
    return max(allocations(fn) + [0])


def _inputs(n, h, kq, s, d, dtype=torch.float32, permuted=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, kq, d, generator=gen).to(dtype)
    if permuted:
        k = torch.randn(s, n, h, d, generator=gen).to(dtype).permute(1, 2, 0, 3)
        v = torch.randn(s, n, h, d, generator=gen).to(dtype).permute(1, 2, 0, 3)
    else:
        k = torch.randn(n, h, s, d, generator=gen).to(dtype)
        v = torch.randn(n, h, s, d, generator=gen).to(dtype)
    mask = torch.rand(n, s, generator=gen) < 0.2
    return q, k, v, mask


# --- memory ----------------------------------------------------------------------------------

# [N, h, K, S] is 16 MiB in float32 here, k and v 1 MiB each.
MEMORY_SIZES = dict(n=1, h=2, kq=128, s=16384, d=8)


def _attention_step(backend: str, permuted: bool, dtype=torch.float32):
    q, k, v, mask = _inputs(**MEMORY_SIZES, dtype=dtype, permuted=permuted)
    for t in (q, k, v):
        t.requires_grad_(True)

    def step():
        out, lse = ops.instance_attention(q, k, v, mask, backend=backend)
        loss = out.float().square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
        loss.backward()

    return step, q, k


@pytest.mark.parametrize("permuted", [False, True], ids=["contiguous", "permuted"])
def test_attention_never_allocates_nhks(permuted):
    n, h, kq, s = (MEMORY_SIZES[x] for x in ("n", "h", "kq", "s"))
    nhks_bytes = n * h * kq * s * 4
    step, _, k = _attention_step("cpu", permuted)
    largest = largest_allocation(step)
    assert largest < nhks_bytes / 8, f"largest allocation {largest} B vs [N,h,K,S] {nhks_bytes} B"
    # the measurement can fail: the reference materialises the logits
    ref_step, _, _ = _attention_step("reference", permuted)
    assert largest_allocation(ref_step) >= nhks_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_forward_copies_no_permuted_key_tensor(dtype):
    q, k, v, mask = _inputs(**MEMORY_SIZES, dtype=dtype, permuted=True)
    largest = largest_allocation(lambda: ops.instance_attention(q, k, v, mask, backend="cpu"))
    # a copy of k (in float32 for the half types) would take at least k's bytes
    assert largest < k.numel() * k.element_size()


def test_backward_allocates_little_besides_the_gradients():
    """All allocations of the backward sum to dk + dv + a little: no copy of k or v."""
    q, k, v, mask = _inputs(1, 2, 128, 65536, 8, permuted=True)
    out, lse = kernels.attention_forward(q, k, v, mask, 0.3)
    grad_out = torch.randn_like(out)

    def backward():
        kernels.attention_backward(grad_out, None, q, k, v, mask, out, lse, 0.3)

    total = sum(allocations(backward))
    k_bytes = k.numel() * k.element_size()  # 4 MiB
    assert 2 * k_bytes <= total < 2 * k_bytes + k_bytes // 2, total


def test_value_mask_never_allocates_nhks():
    n, h, kq, s = (MEMORY_SIZES[x] for x in ("n", "h", "kq", "s"))
    q, k, _, mask = _inputs(**MEMORY_SIZES)
    weight = (torch.arange(kq) < kq // 2).float().expand(n, kq).contiguous()
    largest = largest_allocation(lambda: ops.instance_value_mask(q, k, weight, mask, backend="cpu"))
    assert largest < n * h * kq * s * 4 / 8


# --- gradients in the inputs' layout ----------------------------------------------------------

# How ICD's tensors reach the ops: [N, h, L, D] views of [L, N, h, D] ("sequence"), of
# [N, L, h, D] ("tokens", a [N, L, C] projection split into heads), or contiguous.
LAYOUTS = {
    "sequence": lambda x: x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3),
    "tokens": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),
    "contiguous": lambda x: x.contiguous(),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_attention_gradients_have_the_inputs_strides(layout, dtype):
    n, h, kq, s, d = 2, 3, 7, 300, 16
    q, k, v, mask = _inputs(n, h, kq, s, d, dtype=dtype)
    q, k, v = (LAYOUTS[layout](x) for x in (q, k, v))
    mask[1, :40] = True
    out, lse = kernels.attention_forward(q, k, v, mask, 0.25)
    grad_out = torch.randn(out.shape, dtype=dtype)
    grad_lse = torch.randn(lse.shape, dtype=lse.dtype)
    grads = kernels.attention_backward(grad_out, grad_lse, q, k, v, mask, out, lse, 0.25)  # no fix-up
    for name, g, x in zip(("dq", "dk", "dv"), grads, (q, k, v), strict=True):
        assert g.stride() == x.stride() and g.dtype == x.dtype, f"{name}: {g.stride()} vs {x.stride()}"
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference.instance_attention(*leaves, mask, 0.25)
    finite = torch.isfinite(ref_lse)
    want = torch.autograd.grad(
        (ref_out * grad_out.double()).sum() + (ref_lse[finite] * grad_lse.double()[finite]).sum(), leaves
    )
    tol = dict(atol=1e-9, rtol=1e-7) if dtype == torch.float64 else dict(atol=3e-2, rtol=3e-2)
    if dtype == torch.float32:
        tol = dict(atol=2e-5, rtol=2e-4)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want, strict=True):
        torch.testing.assert_close(g.double(), w, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_feature_mse_gradient_has_the_students_strides(layout, dtype):
    gen = torch.Generator().manual_seed(3)
    student, teacher = (LAYOUTS[layout](torch.randn(2, 3, 600, 24, generator=gen).to(dtype)) for _ in range(2))
    weight = torch.rand(2, 3, 600, generator=gen).to(reference.compute_dtype(student))
    weight[:, :, 100:200] = 0
    for norm, reduction in (("ln", "per_head"), ("tln", "global"), ("none", "per_head")):
        grad = kernels.feature_mse_backward(torch.tensor(1.25), student, teacher, weight, norm, 1e-5, reduction)
        assert grad.stride() == student.stride() and grad.dtype == dtype, (norm, grad.stride(), student.stride())
        leaf = student.detach().double().requires_grad_()
        loss = reference.masked_feature_mse(leaf, teacher.double(), weight.double(), norm, 1e-5, reduction)
        (want,) = torch.autograd.grad(loss * 1.25, leaf)
        scale = want.abs().max()  # the gradients are ~1e-4: compare relative to their scale
        atol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(grad.double() / scale, want / scale, atol=atol, rtol=0)


def test_gradcheck_float64_sequence_first_layout():
    q, k, v, mask = _inputs(2, 2, 3, 29, 8, dtype=torch.float64, permuted=True)
    mask[0] = True  # a fully masked image
    student, teacher = (torch.randn(29, 2, 2, 8, dtype=torch.float64).permute(1, 2, 0, 3) for _ in range(2))
    weight = torch.rand(2, 2, 29, dtype=torch.float64)
    weight[:, :, :5] = 0

    def attention(q, k, v):
        out, lse = ops.instance_attention(q, k, v, mask, backend="cpu")
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(attention, leaves, eps=1e-6, atol=1e-5)
    mse = lambda s: ops.masked_feature_mse(s, teacher, weight, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(mse, (student.detach().requires_grad_(),), eps=1e-6, atol=1e-6)


def test_fake_kernels_state_the_real_strides():
    """Under FakeTensorMode (torch.compile's tracing) the gradients have the real strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, mask = _inputs(2, 2, 5, 40, 8, permuted=True)
    out, lse = kernels.attention_forward(q, k, v, mask, 0.3)
    student, teacher = torch.randn(40, 2, 2, 8).permute(1, 2, 0, 3), torch.randn(2, 2, 40, 8)
    weight = torch.rand(2, 2, 40)
    args = (torch.ones_like(out), None, q, k, v, mask, out, lse, 0.3, "cpu")
    mse_args = (torch.tensor(1.0), student, teacher, weight, "ln", 1e-5, "per_head", "cpu")
    real = (*instance_attention_backward_op(*args), masked_feature_mse_backward_op(*mse_args))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake_mse = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in mse_args]
        fake = (*instance_attention_backward_op(*fake_args), masked_feature_mse_backward_op(*fake_mse))
    for r, f, x in zip(real, fake, (q, k, v, student), strict=True):
        assert r.stride() == f.stride() == x.stride()
    torch.library.opcheck(torch.ops.icd.instance_attention_backward.default, args)
    torch.library.opcheck(torch.ops.icd.masked_feature_mse_backward.default, mse_args)


@pytest.mark.parametrize("layout", ["sequence", "tokens"])
def test_permuted_leaves_get_their_gradients_without_a_copy(layout):
    """fwd + bwd through autograd into [L, N, h, D] / [N, L, h, D] leaves allocates dk, dv and
    the student gradient once each (plus K-sized tensors): autograd copies nothing."""
    n, h, kq, s, d = 1, 2, 16, 65536, 8
    shape = {"sequence": (s, n, h, d), "tokens": (n, s, h, d)}[layout]
    to_heads = {"sequence": lambda x: x.permute(1, 2, 0, 3), "tokens": lambda x: x.transpose(1, 2)}[layout]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, h, kq, d, generator=gen, requires_grad=True)
    k_base, v_base, student = (torch.randn(shape, generator=gen, requires_grad=True) for _ in range(3))
    teacher = torch.randn(n, h, s, d, generator=gen)
    mask = torch.rand(n, s, generator=gen) < 0.2
    weight = torch.rand(n, h, s, generator=gen)
    tensor_bytes = k_base.numel() * 4  # 4 MiB

    def attention_step():
        out, _ = ops.instance_attention(q, to_heads(k_base), to_heads(v_base), mask, backend="cpu")
        out.square().sum().backward()

    def mse_step():
        ops.masked_feature_mse(to_heads(student), teacher, weight, backend="cpu").backward()

    total = sum(allocations(attention_step))
    assert 2 * tensor_bytes <= total < 2 * tensor_bytes + tensor_bytes // 2, total / tensor_bytes
    total = sum(allocations(mse_step))
    assert tensor_bytes <= total < tensor_bytes + tensor_bytes // 2, total / tensor_bytes
    for base in (k_base, v_base, student):
        assert base.grad.stride() == base.stride()


# --- argument checks of the direct icd_ext ops -------------------------------------------------


def _small():
    q, k, v, mask = _inputs(2, 2, 3, 10, 8)
    out, lse = kernels.attention_forward(q, k, v, mask, 0.5)
    return q, k, v, mask, out, lse


def test_attention_forward_rejects_bad_inputs():
    q, k, v, mask, _, _ = _small()
    cases = [
        ((q[0], k, v, mask, 0.5), "`q`"),
        ((q, k.double(), v, mask, 0.5), "`k`"),
        ((q, k, v[:, :, :5], mask, 0.5), "`v`"),
        ((q, k, v, mask[:, :5], 0.5), "`key_padding_mask`"),
        ((q, k, v, mask.float(), 0.5), "`key_padding_mask`"),
        ((q.int(), k.int(), v.int(), mask, 0.5), "`q`"),
    ]
    for args, name in cases:
        with pytest.raises(RuntimeError, match=f"attention_forward: {name}"):
            kernels.attention_forward(*args)


def test_attention_backward_rejects_bad_inputs():
    q, k, v, mask, out, lse = _small()
    g = torch.randn_like(out)
    good = dict(grad_out=g, grad_lse=None, q=q, k=k, v=v, mask=mask, out=out, lse=lse)
    bad = [
        ("grad_out", g[..., :4], "`grad_out`"),
        ("grad_lse", torch.zeros(2, 2), "`grad_lse`"),
        ("out", out[:, :1], "`out`"),
        ("lse", lse.double(), "`lse`"),
        ("lse", lse[..., :2], "`lse`"),
    ]
    for key, value, name in bad:
        args = dict(good, **{key: value})
        with pytest.raises(RuntimeError, match=f"attention_backward: {name}"):
            kernels.attention_backward(*args.values(), 0.5)


def test_value_mask_rejects_bad_inputs():
    q, k, _, mask, _, lse = _small()
    w = torch.ones(2, 3)
    cases = [
        ((q, k, w[:, :2], mask, None, 0.5, 1.0), "`weight`"),
        ((q, k, w.double(), mask, None, 0.5, 1.0), "`weight`"),
        ((q, k, w, mask, lse, 0.5, 2.0), "`lse`"),
        ((q, k, w, mask, lse[0], 0.5, 1.0), "`lse`"),
        ((q, k, w, mask, None, 0.5, 0.0), "`temperature`"),
        ((q, k[..., :4], w, mask, None, 0.5, 1.0), "`k`"),
    ]
    for args, name in cases:
        with pytest.raises(RuntimeError, match=f"value_mask: {name}"):
            kernels.value_mask(*args)


def test_feature_mse_rejects_bad_inputs():
    s, t = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    w = torch.rand(2, 2, 10)
    cases = [
        ((s, t, w, "layer", 1e-5, "per_head"), "`norm`"),
        ((s, t, w, "ln", 1e-5, "mean"), "`reduction`"),
        ((s, t, w, "ln", 0.0, "per_head"), "`eps`"),
        ((s, t[:, :, :5], w, "ln", 1e-5, "per_head"), "`teacher`"),
        ((s, t.double(), w, "ln", 1e-5, "per_head"), "`teacher`"),
        ((s, t, w.double(), "ln", 1e-5, "per_head"), "`weight`"),
        ((s, t, w.transpose(0, 1), "ln", 1e-5, "per_head"), "`weight`"),
        ((s[0], t, w, "ln", 1e-5, "per_head"), "`student`"),
    ]
    for args, name in cases:
        with pytest.raises(RuntimeError, match=f"feature_mse_forward: {name}"):
            kernels.feature_mse_forward(*args)
    with pytest.raises(RuntimeError, match="feature_mse_backward: `grad_loss`"):
        kernels.feature_mse_backward(torch.ones(2), s, t, w, "ln", 1e-5, "per_head")


# --- threads -----------------------------------------------------------------------------------


def _all_ops(n=2, h=3, kq=37, s=1500, d=16):
    q, k, v, mask = _inputs(n, h, kq, s, d, permuted=True)
    weight = (torch.rand(n, kq) < 0.5).float()
    student, teacher = torch.randn(n, h, s, d), torch.randn(n, h, s, d)
    mse_weight = torch.rand(n, h, s)

    def run():
        out, lse = kernels.attention_forward(q, k, v, mask, 0.25)
        grads = kernels.attention_backward(
            torch.randn(out.shape, generator=torch.Generator().manual_seed(1)),
            torch.randn(lse.shape, generator=torch.Generator().manual_seed(2)),
            q, k, v, mask, out, lse, 0.25,
        )
        vmask = kernels.value_mask(q, k, weight, mask, None, 0.25, 0.7)
        loss = kernels.feature_mse_forward(student, teacher, mse_weight, "ln", 1e-5, "per_head")
        grad_student = kernels.feature_mse_backward(
            torch.tensor(1.5), student, teacher, mse_weight, "ln", 1e-5, "global"
        )
        return (out, lse, *grads, vmask, loss, grad_student)

    return run


def test_one_and_two_threads_give_the_same_result():
    run = _all_ops()
    with num_threads(1):
        single = run()
    with num_threads(2):
        double = run()
    names = ("out", "lse", "dq", "dk", "dv", "value_mask", "loss", "grad_student")
    for name, a, b in zip(names, single, double, strict=True):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


# --- paths the generic op tests do not reach ---------------------------------------------------


def test_masked_key_tiles_are_skipped_correctly():
    """Long runs of masked keys make whole key tiles dead (skipped); results stay exact."""
    n, h, kq, s, d = 2, 2, 300, 1500, 16
    q, k, v, _ = _inputs(n, h, kq, s, d)
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[0, 400:1300] = True  # spans several whole tiles of 224 keys
    mask[1, :1000] = True
    for t in (q, k, v):
        t.requires_grad_(True)
    got = ops.instance_attention(q, k, v, mask, backend="cpu")
    want = reference.instance_attention(q, k, v, mask, q.shape[-1] ** -0.5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)
    grads = torch.autograd.grad(got[0].sum() + got[1].sum(), (q, k, v))
    ref_grads = torch.autograd.grad(want[0].sum() + want[1].sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert torch.all(grads[1][0][:, 400:1300] == 0) and torch.all(grads[2][1][:, :1000] == 0)
    weight = torch.ones(n, kq)
    vmask = ops.instance_value_mask(q, k, weight, mask, backend="cpu")
    torch.testing.assert_close(
        vmask, reference.instance_value_mask(q.detach(), k.detach(), weight, mask, d**-0.5),
        atol=1e-5, rtol=1e-4,
    )


def test_backward_without_grad_lse_matches_reference():
    q, k, v, mask = _inputs(2, 2, 5, 300, 8, dtype=torch.float64, permuted=True)
    scale = 0.3
    out, lse = kernels.attention_forward(q, k, v, mask, scale)
    grad_out = torch.randn_like(out).expand(2, 2, 5, 8)
    dq, dk, dv = kernels.attention_backward(grad_out, None, q, k, v, mask, out, lse, scale)
    for t in (q, k, v):
        t.requires_grad_(True)
    ref_out, _ = reference.instance_attention(q, k, v, mask, scale)
    want = torch.autograd.grad(ref_out, (q, k, v), grad_out)
    for a, b, x in zip((dq, dk, dv), want, (q, k, v), strict=True):
        assert a.stride() == x.stride()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_expanded_grad_of_lse_sum():
    """lse.sum().backward() hands the kernel a stride-0 grad_lse."""
    q, k, v, mask = _inputs(1, 2, 4, 50, 8, dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    _, lse = ops.instance_attention(q, k, v, mask, backend="cpu")
    got = torch.autograd.grad(lse.sum(), (q, k, v))
    _, ref_lse = reference.instance_attention(q, k, v, mask, 8**-0.5)
    want = torch.autograd.grad(ref_lse.sum(), (q, k))  # lse does not depend on v
    for a, b in zip(got[:2], want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert torch.all(got[2] == 0)
