"""Speed and peak memory of ``icd.ops.instance_attention`` (forward, forward+backward) per
backend, next to torch's own attention: SDPA with the boolean key mask (CPU: the flash kernel
SDPA picks by default and the math kernel; CUDA: the memory-efficient and cuDNN kernels) and,
on CUDA, compiled FlexAttention with a mask_mod hiding the padded keys.

    python benchmarks/bench_attention.py --quick          # P3-P7 800x1333, K=300 only

Takes the flags of run_attention.py (which runs every op); see benchmarks/README.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from op_sweep import OpBenchmark, Target
from torch import Tensor
from workload import Inputs, Workload, grads

import icd.ops

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]  # (q, k, v) [N, h, *, D] -> out [N, h, K, D]


def _icd_attention(x: Inputs, backend: str) -> Attend:
    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return icd.ops.instance_attention(q, k, v, x.mask, backend=backend)[0]

    return attend


def _sdpa_attention(x: Inputs, kernel: Any) -> Attend:
    from torch.nn.attention import sdpa_kernel

    allowed = ~x.mask[:, None, None, :]  # SDPA's boolean mask: True = attend

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    return attend


def _flex_attention(x: Inputs, w: Workload) -> Attend:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    valid = ~x.mask

    def keep_valid_keys(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return valid[b, kv_idx]

    block_mask = create_block_mask(keep_valid_keys, w.n, None, w.k, w.s, device=x.mask.device)
    torch._dynamo.reset()  # one compiled graph per size: stay under the recompile limit
    compiled = torch.compile(flex_attention, dynamic=False)

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return compiled(q, k, v, block_mask=block_mask)

    return attend


def make_attend(backend: str, x: Inputs, w: Workload) -> Attend:
    """The attention of ``backend`` (an icd backend, ``sdpa_*`` or ``flex``) on ``x``'s mask.

    ``flex`` compiles FlexAttention for this size (after a dynamo reset): make it once per
    size and share it between passes (``call_of``)."""
    from torch.nn.attention import SDPBackend

    sdpa = {
        "sdpa_math": SDPBackend.MATH,
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    if backend in sdpa:
        return _sdpa_attention(x, sdpa[backend])
    if backend == "flex":
        return _flex_attention(x, w)
    return _icd_attention(x, backend)


def build_call(backend: str, pass_: str, x: Inputs, w: Workload) -> Callable[[], tuple[Tensor, ...]]:
    """fwd returns (out,); fwd+bwd backpropagates ``grad_out`` through out and returns (dq, dk, dv)."""
    return call_of(make_attend(backend, x, w), pass_, x)


def call_of(attend: Attend, pass_: str, x: Inputs) -> Callable[[], tuple[Tensor, ...]]:
    """The measured call of one pass of ``attend`` (see ``build_call``)."""

    def forward() -> tuple[Tensor, ...]:
        return (attend(x.heads(x.q_base), x.heads(x.k_base), x.heads(x.v_base)).detach(),)

    def forward_backward() -> tuple[Tensor, ...]:
        attend(x.heads(x.q_base), x.heads(x.k_base), x.heads(x.v_base)).backward(x.grad_out)
        return grads(x.q_base, x.k_base, x.v_base)

    return forward if pass_ == "fwd" else forward_backward


ATTENTION = OpBenchmark(
    name="attention",
    passes=("fwd", "fwd+bwd"),
    build_call=build_call,
    peers={"cpu": ("sdpa_flash", "sdpa_math"), "cuda": ("sdpa_efficient", "sdpa_cudnn", "flex")},
    # bytes per [N, h, K, S] element at the peak of a materialising backend (measured, rounded
    # up, at P3-P7 800x1333, K=300 on CPU)
    bytes_per_logit={"fwd": 13, "fwd+bwd": 26},
    targets=(Target("fwd+bwd", "sdpa", "time", 1.5), Target("fwd+bwd", "sdpa", "mem", 1.5)),
)

if __name__ == "__main__":
    from op_sweep import main

    raise SystemExit(main(sys.argv[1:], [ATTENTION], script=__file__, description=__doc__))
