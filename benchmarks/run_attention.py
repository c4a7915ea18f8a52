"""Speed and peak memory of the icd ops per backend, over the FPN sizes of ICD training.

Runs every op benchmark in one sweep: ``icd.ops.instance_attention`` (forward,
forward+backward; bench_attention.py, next to torch's SDPA and, on CUDA, FlexAttention),
``instance_value_mask`` (forward; bench_value_mask.py) and ``masked_feature_mse`` (forward,
forward+backward; bench_feature_mse.py), each on every backend built for the device.

Sizes: N=2 images, h=8 heads, D=32, K instance slots, S tokens of the FPN levels P3-P7
(RetinaNet, FCOS) or P2-P6 (Faster R-CNN) of an 800x1333-shaped input at 512, 800 and
1333 px; the second image of the batch is smaller, so ~20% of all keys are padding.

    python benchmarks/run_attention.py --quick              # one size, < 2 min on 2 cores
    python benchmarks/run_attention.py --device cuda        # full sweep on the GPU

Prints a table per size with ratios to the reference backend and to SDPA, then writes
``attention_<device>-<model>.csv`` and ``.png`` under ``--out``. See benchmarks/README.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from bench_attention import ATTENTION
from bench_feature_mse import FEATURE_MSE
from bench_value_mask import VALUE_MASK
from op_sweep import main as run_sweep

BENCHMARKS = (ATTENTION, VALUE_MASK, FEATURE_MSE)


def main(argv: Sequence[str] | None = None) -> int:
    return run_sweep(argv, BENCHMARKS, script=__file__, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
