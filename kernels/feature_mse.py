"""Fused masked feature MSE (docs/method.md 3.3): LayerNorm per head, weighted error, its gradient.

Forward: one pass over student and teacher; each program normalises its [BLOCK_S, D] tiles in
registers and accumulates sum_s w * sum_d e and sum_s w for its (image, head); a one-program
kernel reduces those per-program sums to the loss, in a fixed order. Backward: the loss
depends on the weight sums only through one scalar per (image, head) ("per_head") or one
overall ("global"): a first kernel sums the weights into [N h, P] partials (P programs per
head, enough to fill the device: a bandwidth-bound pass, not N h programs each walking a
whole row), and a second adds them up in a fixed order, recomputes the LayerNorms and
writes the student gradient, scaled by grad_loss / denominator. Rows of weight 0 (padding,
and whatever the value mask zeroes) are never read: they add nothing to the loss and get a
gradient of exact zeros without a load. No normalised copy of either tensor and no
un-scaled gradient is ever stored. Two launches each way (docs/gpu-kernels.md).

Shapes: student, teacher [N, h, S, D] (any strides, one float dtype); weight [N, h, S]
float32 contiguous; loss 0-dim float32; grad_student [N, h, S, D] in the student's dtype and
layout (``torch.empty_like(student)``).
norm: "ln" (both), "tln" (teacher only), "none".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning
from .launch import launcher
from .tiles import head_base, load_tile, store_tile

_NORMALISED = {"ln": (True, True), "tln": (False, True), "none": (False, False)}
MSE_KEY = ["BLOCK_D", "S_CLASS"]  # coarse: see tuning.py


@triton.jit
def layer_norm_rows(x, dims, head_dim, eps):
    """(normalised x, 1 / std) of each row of x [BLOCK_S, BLOCK_D] over its first D columns."""
    dim_ok = dims[None, :] < head_dim
    mean = tl.sum(x, 1) / head_dim
    centred = tl.where(dim_ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / head_dim + eps)
    return centred * rstd[:, None], rstd


@triton.jit
def normalised_pair(s_base, t_base, rows, row_ok, dims, stride_ss, stride_sd, stride_ts, stride_td,
                    head_dim, eps, NORM_STUDENT: tl.constexpr, NORM_TEACHER: tl.constexpr):
    """(a, b, rstd of the student): the (normalised) student and teacher tiles in float32;
    rows where ``row_ok`` is False are not read (0)."""
    a = load_tile(s_base, rows, dims, stride_ss, stride_sd, row_ok, head_dim).to(tl.float32)
    b = load_tile(t_base, rows, dims, stride_ts, stride_td, row_ok, head_dim).to(tl.float32)
    rstd = tl.zeros([a.shape[0]], tl.float32)
    if NORM_STUDENT:
        a, rstd = layer_norm_rows(a, dims, head_dim, eps)
    if NORM_TEACHER:
        b, _ = layer_norm_rows(b, dims, head_dim, eps)
    return a, b, rstd


@tuning.autotune("mse", key=[*MSE_KEY, "NORM_STUDENT", "NORM_TEACHER"], tensor_arg="s_ptr")
@triton.jit
def _mse_forward_kernel(
    s_ptr, t_ptr, w_ptr, part_err_ptr, part_w_ptr,
    stride_sn, stride_sh, stride_ss, stride_sd,
    stride_tn, stride_th, stride_ts, stride_td,
    heads, num_rows, head_dim, eps, programs_per_head,
    S_CLASS,
    NORM_STUDENT: tl.constexpr, NORM_TEACHER: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per program (tiles pid_s, pid_s + P, ... of one head): sum w * sum_d e and sum w."""
    pid_s = tl.program_id(0)
    pid_nh = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    s_base = head_base(s_ptr, pid_nh, heads, stride_sn, stride_sh)
    t_base = head_base(t_ptr, pid_nh, heads, stride_tn, stride_th)
    err_acc = tl.zeros([BLOCK_S], tl.float32)
    w_acc = tl.zeros([BLOCK_S], tl.float32)
    for tile in range(pid_s, tl.cdiv(num_rows, BLOCK_S), programs_per_head):
        rows = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        w = tl.load(w_ptr + pid_nh.to(tl.int64) * num_rows + rows, mask=rows < num_rows, other=0.0)
        # a location of weight 0 is not read and adds exactly nothing, whatever it holds
        used = w > 0
        a, b, _ = normalised_pair(s_base, t_base, rows, used, dims, stride_ss, stride_sd, stride_ts,
                                  stride_td, head_dim, eps, NORM_STUDENT, NORM_TEACHER)
        diff = a - b  # 0 in the padded columns and unread rows: both tiles are 0 there
        err_acc += tl.where(used, tl.sum(diff * diff, 1) * w, 0.0)
        w_acc += w
    slot = pid_nh * programs_per_head + pid_s
    tl.store(part_err_ptr + slot, tl.sum(err_acc, 0))
    tl.store(part_w_ptr + slot, tl.sum(w_acc, 0))


@triton.jit
def _mse_reduce_kernel(
    part_err_ptr, part_w_ptr, loss_ptr, num_heads_total, programs_per_head, head_dim, floor,
    PER_HEAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """loss = mean_(n,h) E / max(W, floor) / D ("per_head") or sum E / D / max(sum W, floor)."""
    programs = tl.arange(0, BLOCK_P)
    total = tl.zeros([BLOCK_H], tl.float32)
    total_w = tl.zeros([BLOCK_H], tl.float32)
    for head_start in range(0, num_heads_total, BLOCK_H):
        heads = head_start + tl.arange(0, BLOCK_H)
        ok = (heads[:, None] < num_heads_total) & (programs[None, :] < programs_per_head)
        slots = heads[:, None] * programs_per_head + programs[None, :]
        err = tl.sum(tl.load(part_err_ptr + slots, mask=ok, other=0.0), 1)
        w = tl.sum(tl.load(part_w_ptr + slots, mask=ok, other=0.0), 1)
        if PER_HEAD:
            total += err / tl.maximum(w, floor)
        else:
            total += err
            total_w += w
    if PER_HEAD:
        loss = tl.sum(total, 0) / (num_heads_total * head_dim)
    else:
        loss = tl.sum(total, 0) / head_dim / tl.maximum(tl.sum(total_w, 0), floor)
    tl.store(loss_ptr, loss)


@tuning.autotune("mse", key=["S_CLASS"], tensor_arg="w_ptr")
@triton.jit
def _weight_sum_kernel(w_ptr, part_w_ptr, num_rows, programs_per_head, S_CLASS, BLOCK_S: tl.constexpr):
    """part_w[nh, p] = the sum of the weights of tiles p, p + P, ... of (image, head) nh: P
    partial sums per head, which the backward adds up in a fixed order."""
    pid_s = tl.program_id(0)
    pid_nh = tl.program_id(1)
    acc = tl.zeros([BLOCK_S], tl.float32)
    for tile in range(pid_s, tl.cdiv(num_rows, BLOCK_S), programs_per_head):
        rows = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        acc += tl.load(w_ptr + pid_nh.to(tl.int64) * num_rows + rows, mask=rows < num_rows, other=0.0)
    tl.store(part_w_ptr + pid_nh * programs_per_head + pid_s, tl.sum(acc, 0))


@tuning.autotune("mse", key=[*MSE_KEY, "NORM_STUDENT", "NORM_TEACHER"], tensor_arg="s_ptr")
@triton.jit
def _mse_backward_kernel(
    s_ptr, t_ptr, w_ptr, part_w_ptr, grad_loss_ptr, grad_ptr,
    stride_sn, stride_sh, stride_ss, stride_sd,
    stride_tn, stride_th, stride_ts, stride_td,
    stride_gn, stride_gh, stride_gs, stride_gd,
    heads, num_heads_total, num_rows, head_dim, eps, floor, programs_per_head,
    S_CLASS,
    PER_HEAD: tl.constexpr, NORM_STUDENT: tl.constexpr, NORM_TEACHER: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_student = LayerNorm backward of 2 (a - b) * w * grad_loss / denominator, the
    denominator added up from the weight partials in a fixed order."""
    pid_s = tl.program_id(0)
    pid_nh = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    grad_loss = tl.load(grad_loss_ptr).to(tl.float32)
    if PER_HEAD:
        first = pid_nh * programs_per_head
        last = first + programs_per_head
    else:
        first = 0
        last = num_heads_total * programs_per_head
    total = tl.zeros([BLOCK_P], tl.float32)
    for start in range(first, last, BLOCK_P):
        slots = start + tl.arange(0, BLOCK_P)
        total += tl.load(part_w_ptr + slots, mask=slots < last, other=0.0)
    if PER_HEAD:
        denominator = tl.maximum(tl.sum(total, 0), floor) * num_heads_total * head_dim
    else:
        denominator = tl.maximum(tl.sum(total, 0), floor) * head_dim
    factor = 2.0 * grad_loss / denominator

    s_base = head_base(s_ptr, pid_nh, heads, stride_sn, stride_sh)
    t_base = head_base(t_ptr, pid_nh, heads, stride_tn, stride_th)
    g_base = head_base(grad_ptr, pid_nh, heads, stride_gn, stride_gh)
    for tile in range(pid_s, tl.cdiv(num_rows, BLOCK_S), programs_per_head):
        rows = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        w = tl.load(w_ptr + pid_nh.to(tl.int64) * num_rows + rows, mask=rows < num_rows, other=0.0)
        used = w > 0  # rows of weight 0 are not read: their gradient is exactly 0
        a, b, rstd = normalised_pair(s_base, t_base, rows, used, dims, stride_ss, stride_sd, stride_ts,
                                     stride_td, head_dim, eps, NORM_STUDENT, NORM_TEACHER)
        grad = (a - b) * (w * factor)[:, None]
        if NORM_STUDENT:
            # d LN(x) / dx applied to grad: rstd (g - mean_d g - a mean_d(g a))
            mean_g = tl.sum(grad, 1) / head_dim
            mean_ga = tl.sum(grad * a, 1) / head_dim
            grad = rstd[:, None] * (grad - mean_g[:, None] - a * mean_ga[:, None])
        grad = tl.where(used[:, None], grad, 0.0)
        store_tile(g_base, rows, dims, stride_gs, stride_gd, rows < num_rows, head_dim, grad)


def _programs_per_head(student: Tensor) -> int:
    """Programs per (image, head): enough to fill the device, each with several row tiles. The
    kernels are bandwidth-bound and small (<= 48 registers per thread at D = 32 on sm_90: 10
    or more programs of 4 warps fit a multiprocessor), so the grid aims at MSE_PROGRAMS_PER_SM,
    twice the dot kernels' count, to keep more loads in flight."""
    n, heads, num_rows, _ = student.shape
    wanted = triton.cdiv(tuning.target_programs(student.device, tuning.MSE_PROGRAMS_PER_SM), n * heads)
    return max(1, min(wanted, triton.cdiv(num_rows, 256 if not tuning.INTERPRETED else 16)))


def feature_mse_forward(
    student: Tensor, teacher: Tensor, weight: Tensor, norm: str, eps: float, reduction: str,
    floor: float = 1e-6,
) -> Tensor:
    """0-dim float32 loss; ``floor`` is the lower bound of the weight-sum denominators."""
    n, heads, num_rows, head_dim = student.shape
    nh = n * heads
    norm_student, norm_teacher = _NORMALISED[norm]
    programs = _programs_per_head(student)
    weight = weight.to(torch.float32).contiguous()
    f32 = dict(device=student.device, dtype=torch.float32)
    part_err = torch.empty((nh, programs), **f32)
    part_w = torch.empty((nh, programs), **f32)
    launcher(_mse_forward_kernel)[(programs, nh)](
        student, teacher, weight, part_err, part_w,
        *student.stride(), *teacher.stride(),
        heads, num_rows, head_dim, float(eps), programs, tuning.size_class(num_rows),
        NORM_STUDENT=norm_student, NORM_TEACHER=norm_teacher, BLOCK_D=tuning.block_d(head_dim),
    )
    loss = torch.empty((), **f32)
    block_p = triton.next_power_of_2(programs)
    block_h = max(1, min(triton.next_power_of_2(nh), 4096 // block_p))
    launcher(_mse_reduce_kernel)[(1,)](
        part_err, part_w, loss, nh, programs, head_dim, float(floor),
        PER_HEAD=reduction == "per_head", BLOCK_H=block_h,
        BLOCK_P=block_p,
    )
    return loss


def feature_mse_backward(
    grad_loss: Tensor,
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    norm: str,
    eps: float,
    reduction: str,
    floor: float = 1e-6,
) -> Tensor:
    """Gradient of the loss for ``student``: [N, h, S, D], ``torch.empty_like(student)``.

    ``grad_loss`` is the 0-dim incoming gradient, read on the device (no host sync).
    """
    n, heads, num_rows, head_dim = student.shape
    nh = n * heads
    norm_student, norm_teacher = _NORMALISED[norm]
    weight = weight.to(torch.float32).contiguous()
    programs = _programs_per_head(student)
    s_class = tuning.size_class(num_rows)
    part_w = torch.empty((nh, programs), device=student.device, dtype=torch.float32)
    launcher(_weight_sum_kernel)[(programs, nh)](weight, part_w, num_rows, programs, s_class)
    grad = torch.empty_like(student)  # the student's layout: autograd passes it on without a copy
    launcher(_mse_backward_kernel)[(programs, nh)](
        student, teacher, weight, part_w, grad_loss, grad,
        *student.stride(), *teacher.stride(), *grad.stride(),
        heads, nh, num_rows, head_dim, float(eps), float(floor), programs, s_class,
        PER_HEAD=reduction == "per_head", NORM_STUDENT=norm_student, NORM_TEACHER=norm_teacher,
        BLOCK_D=tuning.block_d(head_dim), BLOCK_P=min(triton.next_power_of_2(programs * nh), 1024),
    )
    return grad
