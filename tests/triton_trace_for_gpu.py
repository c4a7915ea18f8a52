"""``python tests/triton_trace_for_gpu.py``: trace the Triton backend's ops as torch.compile's
AOTAutograd does, for an sm_90 GPU, on a machine without one; print one JSON line.

What a GPU would run is the traced graph: torch.library.triton_op decomposes each op into its
torch allocations and ``triton_kernel_wrapper_functional`` launches (Inductor compiles those
Triton kernels itself). Tracing needs no device: the tensors are fake CUDA tensors, Triton
compiles for an offline sm_90 target (icd.kernels.offline; torch's mutation analysis compiles
every launched kernel to Triton IR, so a kernel that does not compile for the GPU shows up
here, not only on the GPU). Device queries the host path makes are answered as an H100's
would be; the backward's occupancy comes from tuning.resident_programs on a GPU and is
pinned to 1 here. Run by tests/test_triton_traced.py, in its own process because the Triton
interpreter must be off.
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

N, H, K, S, D = 2, 8, 300, 22_400, 32


def _pretend_h100() -> None:
    from icd.kernels import instance_attention, tuning

    torch.cuda.current_device = lambda: 0
    tuning.shared_memory_limit = lambda device: 232_448
    tuning.multiprocessor_count = lambda device: 132
    instance_attention._backward_residency = lambda device, specialisation, config: 1


def main() -> int:
    from functorch.compile import aot_function
    from icd.kernels.offline import offline_target

    from icd.ops import library

    _pretend_h100()
    graphs: list[str] = []

    def keep(gm, inputs):
        graphs.append(gm.code)
        return gm

    with offline_target(90):
        ops = library.traceable_ops("triton")

        def step(q, k, v, mask, weight, student, teacher):
            out, lse = ops.attention_forward(q, k, v, mask, 0.17)
            value_mask = ops.value_mask(q, k, weight, mask, None, 0.17, 2.0)
            loss = ops.feature_mse_forward(student, teacher, value_mask, "ln", 1e-5, "per_head")
            dq, dk, dv = ops.attention_backward(out, lse, q, k, v, mask, out, lse, 0.17)
            grad_student = ops.feature_mse_backward(loss, student, teacher, value_mask, "ln", 1e-5, "per_head")
            return out, lse, value_mask, loss, dq, dk, dv, grad_student

        with FakeTensorMode():
            q = torch.empty(N, H, K, D, device="cuda", dtype=torch.bfloat16)
            k, v, student = (torch.empty(S, N, H, D, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3)
                             for _ in range(3))
            teacher = torch.empty(N, H, S, D, device="cuda", dtype=torch.bfloat16)
            mask = torch.zeros(N, S, device="cuda", dtype=torch.bool)
            weight = torch.zeros(N, K, device="cuda")
            aot_function(step, fw_compiler=keep)(q, k, v, mask, weight, student, teacher)
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    def name(index: str) -> str:
        kernel = kernel_side_table.get_kernel(int(index))
        return getattr(kernel, "fn", kernel).__name__

    code = graphs[0]
    print(json.dumps({
        "kernels": [name(i) for i in re.findall(r"triton_kernel_wrapper_functional\(kernel_idx = (\d+)", code)],
        "icd_ops": re.findall(r"torch\.ops\.icd\.\w+", code),
        "grids": re.findall(r"grid = (\[[^]]*\])", code),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
