"""How the Triton backend is registered with torch (icd.ops.library, docs/gpu-kernels.md).

In eager mode the ops run as autograd.Functions that launch the kernels directly (no custom
op on the host path); under torch.compile they are the ``icd::triton_*`` ops, which
torch.library.opcheck accepts (schema, fake kernel, autograd registration, AOT dispatch);
on a GPU those are torch.library.triton_op ops that AOTAutograd decomposes into the Triton
launches themselves, which tests/triton_trace_for_gpu.py checks for an sm_90 target without
a device. Under the interpreter the ops are custom ops whose fake kernel is the kernel
function itself (its launches skipped on tensors without data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import icd.ops as ops
from icd.ops import library
from icd.ops.dispatch import triton_interpreted

if not (torch.cuda.is_available() or triton_interpreted()) or "triton" not in ops.available_backends():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(requires_grad: bool = False):
    q = torch.randn(2, 2, 5, 8, device=DEVICE, requires_grad=requires_grad)
    k = torch.randn(2, 2, 21, 8, device=DEVICE, requires_grad=requires_grad)
    v = torch.randn(2, 2, 21, 8, device=DEVICE, requires_grad=requires_grad)
    mask = torch.rand(2, 21, device=DEVICE) < 0.3
    mask[0] = True
    return q, k, v, mask


def test_the_triton_ops_pass_opcheck():
    triton_ops = library.traceable_ops("triton")
    q, k, v, mask = _inputs(requires_grad=True)
    torch.library.opcheck(triton_ops.attention_forward, (q, k, v, mask, 0.3))
    q, k, v, mask = _inputs()
    out, lse = triton_ops.attention_forward(q, k, v, mask, 0.3)
    torch.library.opcheck(triton_ops.attention_backward, (torch.randn_like(out), None, q, k, v, mask, out, lse, 0.3))
    weight = torch.tensor([[1.0, 0, 0, 2.0, 0], [0, 0.5, 0, 0, 0]], device=DEVICE)
    torch.library.opcheck(triton_ops.value_mask, (q, k, weight, mask, None, 0.3, 0.7))
    student = torch.randn(2, 2, 21, 8, device=DEVICE, requires_grad=True)
    mse_weight = torch.rand(2, 2, 21, device=DEVICE)
    torch.library.opcheck(triton_ops.feature_mse_forward, (student, v, mse_weight, "ln", 1e-5, "per_head"))
    grad_loss = torch.tensor(0.5, device=DEVICE)
    torch.library.opcheck(triton_ops.feature_mse_backward,
                          (grad_loss, student.detach(), v, mse_weight, "ln", 1e-5, "global"))


def test_eager_calls_run_autograd_functions_not_custom_ops():
    q, k, v, mask = _inputs(requires_grad=True)
    out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
    assert type(out.grad_fn).__name__ == "InstanceAttentionBackward"
    student = torch.randn(2, 2, 21, 8, device=DEVICE, requires_grad=True)
    loss = ops.masked_feature_mse(student, v.detach(), torch.rand(2, 2, 21, device=DEVICE), backend="triton")
    assert type(loss.grad_fn).__name__ == "MaskedFeatureMseBackward"
    # and the formulas are the icd:: ops' own: the same gradients through both
    grads = torch.autograd.grad(out.square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum(), (q, k, v))
    out2, lse2 = torch.ops.icd.instance_attention(q, k, v, mask, q.shape[-1] ** -0.5, "triton")
    grads2 = torch.autograd.grad(out2.square().sum() + torch.where(torch.isfinite(lse2), lse2, 0.0).sum(), (q, k, v))
    for a, b in zip(grads, grads2, strict=True):
        assert torch.equal(a, b)


def test_torch_compile_calls_the_triton_ops():
    q, k, v, mask = _inputs(requires_grad=True)
    weight = torch.tensor([[1.0, 0, 0, 2.0, 0], [0, 0.5, 0, 0, 0]], device=DEVICE)
    student = torch.randn(2, 2, 21, 8, device=DEVICE, requires_grad=True)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def step(q, k, v, student):
        out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
        value_mask = ops.instance_value_mask(q, k, weight, mask, lse=lse, backend="triton")
        distill = ops.masked_feature_mse(student, v.detach(), value_mask, backend="triton")
        return out.square().mean() + distill

    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend=keep)(q, k, v, student)
    code = "\n".join(graphs)
    for name in ("triton_attention_forward", "triton_value_mask", "triton_feature_mse_forward"):
        assert f"icd.{name}" in code, name
    assert "icd.instance_attention" not in code and "icd.masked_feature_mse" not in code
    grads = torch.autograd.grad(loss, (q, k, v, student))
    eager_loss = step(q, k, v, student)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v, student))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_the_triton_ops_trace_into_their_kernels_for_a_gpu():
    """The AOTAutograd graph of the five ops for sm_90 (fake CUDA tensors, ICD shape): only
    allocations and the Triton launches, 10 of them; the backward's grid one wave of 128."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_trace_for_gpu.py")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CompilationError" not in done.stderr, done.stderr[-3000:]
    traced = json.loads(done.stdout.strip().splitlines()[-1])
    assert traced["icd_ops"] == []
    assert traced["kernels"] == [
        "_forward_split_kernel", "_forward_merge_kernel",  # attention forward
        "_forward_split_kernel", "_value_mask_kernel",  # value mask at T = 2: it merges the statistics
        "_mse_forward_kernel", "_mse_reduce_kernel",
        "_backward_kernel", "_backward_dq_merge_kernel",  # attention backward, delta fused
        "_weight_sum_kernel", "_mse_backward_kernel",
    ]
    backward_grid = traced["grids"][traced["kernels"].index("_backward_kernel")]
    assert backward_grid == "[(8, 16, 1)]"  # 8 key slices x 16 (image, head): 128 programs on 132 SMs
