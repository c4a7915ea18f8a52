"""Speed and peak memory of ``icd.ops.masked_feature_mse`` (``norm="ln"``, ``per_head``;
forward, forward+backward into the student features) per icd backend, as ratios to the
reference. The op does not depend on K: it is measured once per S (K blank in its rows).

    python benchmarks/bench_feature_mse.py --quick        # P3-P7 800x1333 only

Takes the flags of run_attention.py (which runs every op); see benchmarks/README.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from op_sweep import OpBenchmark, Target
from torch import Tensor
from workload import Inputs, Workload, grads

import icd.ops


def build_call(backend: str, pass_: str, x: Inputs, w: Workload) -> Callable[[], tuple[Tensor, ...]]:
    """fwd returns (loss,); fwd+bwd backpropagates the loss and returns (d student,)."""
    teacher = x.heads(x.teacher_base)

    def loss() -> Tensor:
        return icd.ops.masked_feature_mse(x.heads(x.student_base), teacher, x.mse_weight, backend=backend)

    def forward() -> tuple[Tensor, ...]:
        return (loss().detach(),)

    def forward_backward() -> tuple[Tensor, ...]:
        loss().backward()
        return grads(x.student_base)

    return forward if pass_ == "fwd" else forward_backward


FEATURE_MSE = OpBenchmark(
    name="feature_mse",
    passes=("fwd", "fwd+bwd"),
    build_call=build_call,
    per_k=False,
    targets=(Target("fwd+bwd", "reference", "time", 1.0, strict=True), Target("fwd+bwd", "reference", "mem", 1 / 2)),
)

if __name__ == "__main__":
    from op_sweep import main

    raise SystemExit(main(sys.argv[1:], [FEATURE_MSE], script=__file__, description=__doc__))
