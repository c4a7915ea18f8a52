"""Bad input gets an error that names the argument and what was expected, before any kernel."""

from __future__ import annotations

import pytest
import torch

import icd.ops as ops

N, H, K, S, D = 2, 2, 3, 7, 8


def qkv(**changes):
    t = dict(q=torch.randn(N, H, K, D), k=torch.randn(N, H, S, D), v=torch.randn(N, H, S, D))
    t.update(changes)
    return t["q"], t["k"], t["v"]


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(q=torch.randn(N, K, D)), ValueError, r"`q` has shape \[2, 3, 8\]; expected \[N, h, K, D\]"),
        (dict(k=torch.randn(N, H + 1, S, D)), ValueError, r"same N, h and D"),
        (dict(k=torch.randn(N, H, S, D + 1)), ValueError, r"same N, h and D"),
        (dict(v=torch.randn(N, H, S + 1, D)), ValueError, r"`v` has shape \[2, 2, 8, 8\]; expected the shape of `k`"),
        (dict(q=torch.randint(0, 3, (N, H, K, D))), TypeError, r"`q` has dtype int64; expected one of float32"),
        (dict(v=torch.randn(N, H, S, D).half()), TypeError, r"`v` has dtype torch.float16 but `q` has torch.float32"),
        (dict(k=torch.randn(N, H, 0, D)), ValueError, r"`k` has shape .*S must be at least 1"),
        (dict(q="nope"), TypeError, r"`q` is a str; expected a tensor"),
    ],
)
def test_instance_attention_rejects(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.instance_attention(*qkv(**kwargs), backend="reference")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mask_errors(backend):
    if backend not in ops.available_backends():
        pytest.skip("cpu backend not built")
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"`key_padding_mask` has dtype float32; expected bool"):
        ops.instance_attention(q, k, v, torch.zeros(N, S), backend=backend)
    with pytest.raises(ValueError, match=r"`key_padding_mask` has shape \[2, 6\]; expected \[N, S\] = \[2, 7\]"):
        ops.instance_attention(q, k, v, torch.zeros(N, S - 1, dtype=torch.bool), backend=backend)


def test_float64_only_where_supported():
    q, k, v = (t.double() for t in qkv())
    expected = r"`q` has dtype float64; expected one of float32, float16, bfloat16 \(backend 'triton'\)"
    with pytest.raises(TypeError, match=expected):
        ops.instance_attention(q, k, v, backend="triton")


def test_head_dim_beyond_the_cuda_kernels_is_rejected():
    """The CUDA kernels take D <= 128: a wider head is refused in Python, naming the others."""
    from icd.ops.validation import check_instance_attention_args, check_value_mask_args

    q, k, v = qkv(q=torch.randn(N, H, K, 129), k=torch.randn(N, H, S, 129), v=torch.randn(N, H, S, 129))
    expected = r"`q` has head dim D = 129; backend 'cuda' takes 1 <= D <= 128 \(backends 'reference', 'cpu', 'triton'"
    with pytest.raises(ValueError, match=expected):
        check_instance_attention_args(q, k, v, None, "cuda")
    with pytest.raises(ValueError, match=expected):
        check_value_mask_args(q, k, torch.ones(N, K), None, 1.0, None, "cuda")
    check_instance_attention_args(*qkv(q=torch.randn(N, H, K, 128), k=torch.randn(N, H, S, 128),
                                       v=torch.randn(N, H, S, 128)), None, "cuda")
    for backend in ("reference", "cpu", "triton"):
        check_instance_attention_args(q, k, v, None, backend)


def test_scale_must_be_finite():
    with pytest.raises(ValueError, match="scale = nan"):
        ops.instance_attention(*qkv(), scale=float("nan"), backend="reference")


def test_value_mask_rejects():
    q, k, _ = qkv()
    w = torch.ones(N, K)
    with pytest.raises(ValueError, match=r"`weight` has shape \[2, 4\]; expected \[N, K\] = \[2, 3\]"):
        ops.instance_value_mask(q, k, torch.ones(N, K + 1))
    with pytest.raises(ValueError, match=r"`weight` has negative entries \(min -1\)"):
        ops.instance_value_mask(q, k, -w)
    with pytest.raises(ValueError, match=r"`weight` has NaN or infinite entries"):
        ops.instance_value_mask(q, k, w * float("nan"))
    with pytest.raises(TypeError, match=r"`weight` has dtype int64; expected a float tensor"):
        ops.instance_value_mask(q, k, torch.ones(N, K, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`temperature` = 0.0; expected a finite number > 0"):
        ops.instance_value_mask(q, k, w, temperature=0.0)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=rf"`temperature` = {bad}; expected a finite number > 0"):
            ops.instance_value_mask(q, k, w, temperature=bad)
    lse = torch.zeros(N, H, K)
    with pytest.raises(ValueError, match=r"`lse` was given with temperature = 2.0"):
        ops.instance_value_mask(q, k, w, temperature=2.0, lse=lse)
    with pytest.raises(ValueError, match=r"`lse` has shape \[2, 2, 2\]; expected \[N, h, K\] = \[2, 2, 3\]"):
        ops.instance_value_mask(q, k, w, lse=torch.zeros(N, H, K - 1))


def test_feature_mse_rejects():
    s = torch.randn(N, H, S, D)
    w = torch.rand(N, H, S)
    with pytest.raises(ValueError, match=r"`teacher` has shape \[2, 2, 7, 4\]; expected the shape of `student`"):
        ops.masked_feature_mse(s, torch.randn(N, H, S, 4), w)
    with pytest.raises(ValueError, match=r"`weight` has shape \[2, 7\]; expected \[N, h, S\]"):
        ops.masked_feature_mse(s, s, torch.rand(N, S))
    with pytest.raises(ValueError, match=r"`weight` has shape \[2, 2, 6\]; expected \[N, h, S\] = \[2, 2, 7\]"):
        ops.masked_feature_mse(s, s, torch.rand(N, H, S - 1))
    with pytest.raises(ValueError, match=r"`weight` has negative entries"):
        ops.masked_feature_mse(s, s, -w)
    with pytest.raises(ValueError, match=r"`norm` = 'batch'; expected one of ln, tln, none"):
        ops.masked_feature_mse(s, s, w, norm="batch")
    with pytest.raises(ValueError, match=r"`reduction` = 'mean'; expected one of per_head, global"):
        ops.masked_feature_mse(s, s, w, reduction="mean")
    with pytest.raises(ValueError, match=r"`eps` = 0; expected a finite number > 0"):
        ops.masked_feature_mse(s, s, w, eps=0)
    with pytest.raises(TypeError, match=r"`teacher` has dtype torch.float16 but `student` has torch.float32"):
        ops.masked_feature_mse(s, s.half(), w)


def test_icd_checks_chooses_where_value_checks_run(monkeypatch):
    """Values are checked on CPU tensors by default, nowhere with off, never without data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from icd.ops.validation import value_checks

    q, k, _ = qkv()
    bad = -torch.ones(N, K)
    monkeypatch.setenv("ICD_CHECKS", "off")
    assert not value_checks(bad)
    ops.instance_value_mask(q, k, bad, backend="reference")  # unchecked
    for mode in ("cpu", "full", ""):
        monkeypatch.setenv("ICD_CHECKS", mode)
        assert value_checks(bad)
        with pytest.raises(ValueError, match="negative entries"):
            ops.instance_value_mask(q, k, bad, backend="reference")
    monkeypatch.setenv("ICD_CHECKS", "full")
    assert not value_checks(bad.to("meta"))
    with FakeTensorMode() as mode:
        assert not value_checks(mode.from_tensor(bad))
    monkeypatch.setenv("ICD_CHECKS", "cuda")
    with pytest.raises(ValueError, match="ICD_CHECKS = 'cuda'; expected one of cpu, full, off"):
        value_checks(bad)


def test_errors_come_before_any_kernel(monkeypatch):
    from dataclasses import replace

    from icd.ops.backends import BACKEND_TABLE

    def fail():
        raise AssertionError("a kernel was reached")

    for name, described in list(BACKEND_TABLE.items()):
        if described.load_kernels is not None:
            monkeypatch.setitem(BACKEND_TABLE, name, replace(described, load_kernels=fail))
    for backend in ops.available_backends():
        if backend in ("reference", "cuda") or (backend == "triton" and not torch.cuda.is_available()):
            continue
        with pytest.raises(ValueError):
            ops.instance_attention(*qkv(v=torch.randn(N, H, S + 1, D)), backend=backend)
        with pytest.raises(ValueError):
            ops.masked_feature_mse(torch.randn(N, H, S, D), torch.randn(N, H, S, D), -torch.rand(N, H, S),
                                   backend=backend)
