"""Non-finite inputs follow one rule on every backend (docs/nn.md, "Non-finite values").

What is masked is never read: keys with key_padding_mask True, slots of weight 0 in
instance_value_mask and locations of weight 0 in masked_feature_mse may hold NaN or inf and
change no output and no gradient, and outputs at masked keys (value mask, dk, dv) and the
student gradient at weight-0 locations are exactly 0. A NaN anywhere else gives NaN in the
outputs it reaches (and nowhere else).

Each check compares a poisoned call with a clean one on the same backend, so it holds for
the reference too. The Triton backend runs on CUDA tensors or, with TRITON_INTERPRET=1, on
CPU tensors (tiny shapes here); the cuda backend needs a GPU.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import backend_params

import icd.ops as ops

NAN, INF = float("nan"), float("inf")
N, H, K, S, D = 3, 2, 5, 23, 16  # image 0 partly masked, image 1 unmasked, image 2 fully masked
POISONS = [pytest.param(NAN, id="nan"), pytest.param(INF, id="inf"), pytest.param(-INF, id="-inf")]


def params() -> list:
    """(backend, device) params: the reference on the CPU, then every fused backend."""
    return [pytest.param("reference", torch.device("cpu"), id="reference"), *backend_params()]


_CLEAN: dict = {}


def clean_once(key: tuple, compute):
    """``compute()``, once per process for each ``key`` (test inputs are seeded, so the clean result of an op
    and backend is the same for every poison that is compared with it; under the Triton interpreter it is
    the expensive part of these tests). Callers only read the tensors it returns."""
    if key not in _CLEAN:
        _CLEAN[key] = compute()
    return _CLEAN[key]


def clean_attention(backend: str, device: torch.device):
    """``attention_with_grads`` of the unpoisoned ``attention_bases`` and ``key_padding_mask``."""
    return clean_once(("attention", backend, str(device)), lambda: attention_with_grads(
        *attention_bases(device), key_padding_mask(device), backend))


def clean_self_lse(backend: str, device: torch.device) -> torch.Tensor:
    """The lse of the clean attention of ``attention_bases``' q over its keys as keys and values."""
    def compute():
        q, k, _ = attention_bases(device)
        return ops.instance_attention(q, sequence_first(k), sequence_first(k), key_padding_mask(device),
                                      backend=backend)[1]  # fmt: skip
    return clean_once(("self_lse", backend, str(device)), compute)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def key_padding_mask(device: torch.device) -> torch.Tensor:
    """bool [N, S]: image 0 has masked keys at both ends and inside, 1 none, 2 all."""
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[0, :3] = mask[0, 9:13] = mask[0, -2:] = True
    mask[2] = True
    return mask.to(device)


def sequence_first(base: torch.Tensor) -> torch.Tensor:
    """[S, N, h, D] -> the [N, h, S, D] view ICD's layout gives the ops."""
    return base.permute(1, 2, 0, 3)


def attention_bases(device: torch.device):
    gen = _gen()
    q = torch.randn(N, H, K, D, generator=gen)
    k = torch.randn(S, N, H, D, generator=gen)
    v = torch.randn(S, N, H, D, generator=gen)
    return q.to(device), k.to(device), v.to(device)


def attention_with_grads(q, k_base, v_base, mask, backend):
    """(out, lse, dq, dk, dv) of a loss that uses out and the finite part of lse."""
    q = q.clone().requires_grad_()
    k_base = k_base.clone().requires_grad_()
    v_base = v_base.clone().requires_grad_()
    out, lse = ops.instance_attention(q, sequence_first(k_base), sequence_first(v_base), mask, backend=backend)
    gen = _gen(1)
    grad_out = torch.randn(out.shape, generator=gen).to(out.device)
    grad_lse = torch.randn(lse.shape, generator=gen).to(lse.device)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # NaN stays
    loss = (out * grad_out).sum() + (finite_lse * grad_lse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k_base, v_base))
    return out.detach(), lse.detach(), dq, sequence_first(dk), sequence_first(dv)


def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal up to float32 rounding of a different summation order; NaN only where b has it."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")


def poison_keys(base: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """A [S, N, h, D] base with every masked key's row set to ``value``."""
    return base.masked_fill(mask.T[:, :, None, None], value)


# --- masked keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("backend, device", params())
def test_masked_keys_never_reach_attention(backend, device, poison):
    q, k, v = attention_bases(device)
    mask = key_padding_mask(device)
    clean = clean_attention(backend, device)
    poisoned = attention_with_grads(q, poison_keys(k, mask, poison), poison_keys(v, mask, poison), mask, backend)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), poisoned, clean, strict=True):
        same(a, b, f"{name} {backend}")
    out, lse, dq, dk, dv = poisoned
    assert torch.isfinite(out).all() and torch.isfinite(dq).all(), backend
    assert torch.isneginf(lse[2]).all() and torch.isfinite(lse[:2]).all(), backend
    for g in (dk, dv):
        assert torch.isfinite(g).all(), backend
        assert (g.transpose(1, 2)[mask] == 0).all(), f"{backend}: masked keys got a gradient"


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("backend, device", params())
def test_masked_keys_never_reach_value_mask(backend, device, poison):
    q, k, _ = attention_bases(device)
    mask = key_padding_mask(device)
    weight = torch.tensor([[1.0, 0.5, 0.0, 2.0, 0.0]] * N, device=device)
    k_bad = sequence_first(poison_keys(k, mask, poison))
    lse = clean_self_lse(backend, device)
    for temperature, row_lse in ((1.0, None), (0.7, None), (1.0, lse)):
        what = f"{backend} T={temperature} lse={'given' if row_lse is not None else 'none'}"
        clean = clean_once(
            ("masked_keys_value_mask", backend, str(device), temperature, row_lse is not None),
            lambda: ops.instance_value_mask(q, sequence_first(k), weight, mask, temperature=temperature,  # noqa: B023
                                            lse=row_lse, backend=backend),  # noqa: B023
        )  # fmt: skip
        got = ops.instance_value_mask(q, k_bad, weight, mask, temperature=temperature, lse=row_lse,
                                      backend=backend)  # fmt: skip
        same(got, clean, what)
        assert torch.isfinite(got).all(), what
        assert (got.transpose(1, 2)[mask] == 0).all(), f"{what}: masked keys are not 0"


@pytest.mark.parametrize("backend, device", params())
def test_masked_keys_are_zero_in_value_mask_of_a_nan_row(backend, device):
    """A NaN query row makes its image's unmasked keys NaN; the masked ones stay exactly 0."""
    q, k, _ = attention_bases(device)
    mask = key_padding_mask(device)
    q[0, 1, 3] = NAN
    weight = torch.ones(N, K, device=device)
    got = ops.instance_value_mask(q, sequence_first(k), weight, mask, backend=backend)
    assert (got[0, 1][mask[0]] == 0).all(), backend
    assert torch.isnan(got[0, 1][~mask[0]]).all(), backend
    assert torch.isfinite(got[0, 0]).all() and torch.isfinite(got[1:]).all(), backend


# --- weights of 0 ------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("backend, device", params())
def test_zero_weight_slots_never_reach_value_mask(backend, device, poison):
    q, k, _ = attention_bases(device)
    mask = key_padding_mask(device)
    weight = torch.tensor([[1.0, 0.0, 0.5, 0.0, 0.0]] * N, device=device)
    q_bad = q.masked_fill((weight == 0)[:, None, :, None], poison)
    for with_lse in (False, True):
        lse_bad = lse = None
        if with_lse:  # the attention's lse: NaN or inf on the poisoned rows
            lse = clean_self_lse(backend, device)
            lse_bad = ops.instance_attention(q_bad, sequence_first(k), sequence_first(k), mask, backend=backend)[1]
        clean = clean_once(
            ("zero_weight_value_mask", backend, str(device), with_lse),
            lambda: ops.instance_value_mask(q, sequence_first(k), weight, mask, lse=lse, backend=backend),  # noqa: B023
        )
        got = ops.instance_value_mask(q_bad, sequence_first(k), weight, mask, lse=lse_bad, backend=backend)
        same(got, clean, f"{backend} lse={with_lse}")
        assert torch.isfinite(got).all(), backend


def feature_inputs(device: torch.device):
    """student, teacher [S, N, h, D] bases and a weight [N, h, S] with ~30% zeros."""
    gen = _gen(2)
    student = torch.randn(S, N, H, D, generator=gen)
    teacher = torch.randn(S, N, H, D, generator=gen)
    weight = torch.rand(N, H, S, generator=gen)
    weight[torch.rand(N, H, S, generator=gen) < 0.3] = 0.0
    weight[:, :, 0] = 0.0
    return student.to(device), teacher.to(device), weight.to(device)


def mse_with_grad(student_base, teacher_base, weight, norm, reduction, backend):
    student_base = student_base.clone().requires_grad_()
    loss = ops.masked_feature_mse(
        sequence_first(student_base), sequence_first(teacher_base), weight, norm=norm,
        reduction=reduction, backend=backend,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, student_base)
    return loss.detach(), sequence_first(grad)


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("backend, device", params())
def test_zero_weight_locations_never_reach_feature_mse(backend, device, poison):
    student, teacher, weight = feature_inputs(device)
    hole = (weight == 0).permute(2, 0, 1)[..., None]  # [S, N, h, 1], like the bases
    for norm in ("ln", "tln", "none"):
        for reduction in ("per_head", "global"):
            what = f"{backend} {norm} {reduction}"
            clean = clean_once(
                ("mse", backend, str(device), norm, reduction),
                lambda: mse_with_grad(student, teacher, weight, norm, reduction, backend),  # noqa: B023
            )
            got = mse_with_grad(
                student.masked_fill(hole, poison), teacher.masked_fill(hole, poison), weight, norm, reduction,
                backend,
            )  # fmt: skip
            same(got[0], clean[0], f"loss {what}")
            same(got[1], clean[1], f"grad {what}")
            assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all(), what
            assert (got[1][weight == 0] == 0).all(), f"{what}: weight-0 locations got a gradient"


# --- NaN elsewhere -----------------------------------------------------------------------------


def _others(x: torch.Tensor, n: int, h: int) -> torch.Tensor:
    """Every (image, head) of x [N, h, ...] but (n, h), flattened."""
    keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    keep[n, h] = False
    return x[keep]


@pytest.mark.parametrize("backend, device", params())
def test_nan_in_an_unmasked_key_gives_nan(backend, device):
    """A NaN in key s of head (0, 1): every row of that head is NaN (out, lse, dq), so are
    dk and dv of its unmasked keys; its masked keys keep 0 and the other heads are as clean."""
    q, k, v = attention_bases(device)
    mask = key_padding_mask(device)
    clean = clean_attention(backend, device)
    k_bad = k.clone()
    k_bad[5, 0, 1, 2] = NAN  # key 5 of image 0 is unmasked
    got = attention_with_grads(q, k_bad, v, mask, backend)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, clean, strict=True):
        same(_others(a, 0, 1), _others(b, 0, 1), f"{name} {backend}: other heads")
    out, lse, dq, dk, dv = got
    assert torch.isnan(out[0, 1]).all() and torch.isnan(lse[0, 1]).all(), backend
    assert torch.isnan(dq[0, 1]).all(), backend
    for g in (dk, dv):
        assert torch.isnan(g[0, 1][~mask[0]]).all(), backend
        assert (g[0, 1][mask[0]] == 0).all(), f"{backend}: masked keys got a gradient"


@pytest.mark.parametrize("backend, device", params())
def test_nan_in_a_query_row_gives_nan_in_that_row(backend, device):
    q, k, v = attention_bases(device)
    mask = key_padding_mask(device)
    clean = clean_attention(backend, device)
    q_bad = q.clone()
    q_bad[1, 0, 2, 7] = NAN
    out, lse, dq, dk, dv = attention_with_grads(q_bad, k, v, mask, backend)
    rows = torch.ones(N, H, K, dtype=torch.bool)
    rows[1, 0, 2] = False
    same(out[rows], clean[0][rows], f"out {backend}: other rows")
    same(lse[rows], clean[1][rows], f"lse {backend}: other rows")
    same(dq[rows], clean[2][rows], f"dq {backend}: other rows")  # rows are independent in dq
    assert torch.isnan(out[1, 0, 2]).all() and torch.isnan(lse[1, 0, 2]), backend
    assert torch.isnan(dq[1, 0, 2]).all(), backend
    assert torch.isnan(dk[1, 0]).all() and torch.isnan(dv[1, 0]).all(), backend  # image 1: no masked key
    for name, a, b in zip(("dk", "dv"), (dk, dv), clean[3:], strict=True):
        same(_others(a, 1, 0), _others(b, 1, 0), f"{name} {backend}: other heads")


@pytest.mark.parametrize("backend, device", params())
def test_nan_in_an_unmasked_value_gives_nan_in_that_column(backend, device):
    q, k, v = attention_bases(device)
    mask = key_padding_mask(device)
    clean = clean_attention(backend, device)
    v_bad = v.clone()
    v_bad[20, 0, 0, 4] = NAN  # key 20 of image 0 is unmasked
    out, lse, dq, dk, dv = attention_with_grads(q, k, v_bad, mask, backend)
    same(lse, clean[1], f"lse {backend}")  # v does not enter lse
    assert torch.isnan(out[0, 0, :, 4]).all(), backend
    columns = torch.ones(D, dtype=torch.bool)
    columns[4] = False
    same(out[0, 0][:, columns], clean[0][0, 0][:, columns], f"out {backend}: other columns")
    same(_others(out, 0, 0), _others(clean[0], 0, 0), f"out {backend}: other heads")
    same(dv, clean[4], f"dv {backend}")  # dv = P^T dO: v does not enter it
    assert torch.isnan(dk[0, 0][~mask[0]]).all(), backend  # through delta = rowsum(dO * out)
    assert (dk[0, 0][mask[0]] == 0).all(), f"{backend}: masked keys got a gradient"


@pytest.mark.parametrize("backend, device", params())
def test_nan_in_value_mask_inputs_gives_nan(backend, device):
    q, k, _ = attention_bases(device)
    mask = key_padding_mask(device)
    weight = torch.tensor([[1.0, 0.0, 0.5, 0.0, 2.0]] * N, device=device)
    clean = ops.instance_value_mask(q, sequence_first(k), weight, mask, backend=backend)
    k_bad = k.clone()
    k_bad[5, 0, 1, 0] = NAN  # an unmasked key of image 0, head 1
    q_bad = q.clone()
    q_bad[1, 0, 2, 3] = NAN  # a weighted slot of image 1, head 0
    lse_bad = clean_self_lse(backend, device).clone()
    lse_bad[1, 1, 4] = NAN  # a weighted slot of image 1, head 1
    cases = (
        ("k", dict(q=q, k=sequence_first(k_bad), lse=None), (0, 1)),
        ("q", dict(q=q_bad, k=sequence_first(k), lse=None), (1, 0)),
        ("lse", dict(q=q, k=sequence_first(k), lse=lse_bad), (1, 1)),
    )
    for name, args, (n, h) in cases:
        got = ops.instance_value_mask(args["q"], args["k"], weight, mask, lse=args["lse"], backend=backend)
        what = f"NaN {name} {backend}"
        assert torch.isnan(got[n, h][~mask[n]]).all(), what
        assert (got[n, h][mask[n]] == 0).all(), f"{what}: masked keys are not 0"
        same(_others(got, n, h), _others(clean, n, h), f"{what}: other heads")


@pytest.mark.parametrize("backend, device", params())
def test_nan_in_weighted_features_gives_nan(backend, device):
    student, teacher, weight = feature_inputs(device)
    s_at, n_at, h_at = 7, 1, 0
    weight[n_at, h_at, s_at] = 0.5
    for which in ("student", "teacher"):
        for norm in ("ln", "none"):
            what = f"NaN {which} {backend} {norm}"
            clean_loss, clean_grad = clean_once(
                ("weighted_mse", backend, str(device), norm),
                lambda: mse_with_grad(student, teacher, weight, norm, "per_head", backend),  # noqa: B023
            )
            s_bad, t_bad = student.clone(), teacher.clone()
            (s_bad if which == "student" else t_bad)[s_at, n_at, h_at, 3] = NAN
            loss, grad = mse_with_grad(s_bad, t_bad, weight, norm, "per_head", backend)
            assert torch.isnan(loss), what
            row = grad[n_at, h_at, s_at]
            assert torch.isnan(row).all() if norm == "ln" else torch.isnan(row[3]), what
            others = torch.ones(N, H, S, dtype=torch.bool)
            others[n_at, h_at, s_at] = False
            same(grad[others], clean_grad[others], f"{what}: other rows")
