"""Speed and peak memory of ``icd.ops.instance_value_mask`` (forward; it is not
differentiable) per icd backend, as ratios to the reference.

    python benchmarks/bench_value_mask.py --quick         # P3-P7 800x1333, K=300 only

Takes the flags of run_attention.py (which runs every op); see benchmarks/README.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from op_sweep import OpBenchmark, Target
from torch import Tensor
from workload import Inputs, Workload

import icd.ops


def build_call(backend: str, pass_: str, x: Inputs, w: Workload) -> Callable[[], tuple[Tensor, ...]]:
    """Returns (value mask [N, h, S],) of q [N, h, K, D] and k [N, h, S, D] without gradients."""
    q, k = x.heads(x.q_base).detach(), x.heads(x.k_base).detach()
    return lambda: (icd.ops.instance_value_mask(q, k, x.weight, x.mask, backend=backend),)


VALUE_MASK = OpBenchmark(
    name="value_mask",
    passes=("fwd",),
    build_call=build_call,
    bytes_per_logit={"fwd": 13},  # the reference's peak per [N, h, K, S] element
    targets=(Target("fwd", "reference", "time", 1.0, strict=True), Target("fwd", "reference", "mem", 1 / 8)),
)

if __name__ == "__main__":
    from op_sweep import main

    raise SystemExit(main(sys.argv[1:], [VALUE_MASK], script=__file__, description=__doc__))
