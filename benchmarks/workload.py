"""The sizes and inputs of the op benchmarks: FPN levels of ICD training, padded batches.

N=2 images, h=8 heads, D=32, K instance slots, S tokens of the FPN levels P3-P7 (RetinaNet,
FCOS) or P2-P6 (Faster R-CNN) of an 800x1333-shaped input; the second image of the batch is
smaller, so ~20% of all keys are padding. See benchmarks/README.md ("Sizes").
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import icd.ops

LEVEL_SETS = {"p3-p7": (3, 4, 5, 6, 7), "p2-p6": (2, 3, 4, 5, 6)}
SIZE_DIVISIBILITY = 32  # detectron2 / torchvision pad each batch to a multiple of 32
INPUTS = ((512, 853), (800, 1333), (1333, 2222))  # 800x1333 aspect at three scales
SECOND_IMAGE_SCALE = 0.6**0.5  # image 1 covers 60% of the padded area: ~20% keys masked
REAL_INSTANCES = (7, 12)  # ground-truth boxes per image (COCO averages ~7), weight 1
LAYOUTS = ("tokens", "sequence", "heads")

def level_shapes(height: int, width: int, levels: Sequence[int]) -> list[tuple[int, int]]:
    """(H_l, W_l) of FPN levels ``levels`` (2 = stride 4 ... 7 = stride 128) of an input.

    The batch is padded to a multiple of 32; levels up to P5 are the padded size divided by
    the stride, P6 and P7 come from stride-2 layers on the level below (ceil of half).
    """
    hp = math.ceil(height / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    wp = math.ceil(width / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    shapes = {}
    for level in range(2, max(levels) + 1):
        if level <= 5:
            shapes[level] = (hp >> level, wp >> level)
        else:
            below = shapes[level - 1]
            shapes[level] = (math.ceil(below[0] / 2), math.ceil(below[1] / 2))
    return [shapes[level] for level in levels]


@dataclass(frozen=True)
class Workload:
    """One benchmark size: levels, input size and instance slots; N, h, D fixed."""

    levels: str
    height: int
    width: int
    k: int
    n: int = 2
    heads: int = 8
    head_dim: int = 32

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return level_shapes(self.height, self.width, LEVEL_SETS[self.levels])

    @property
    def padded(self) -> tuple[int, int]:
        div = SIZE_DIVISIBILITY
        return math.ceil(self.height / div) * div, math.ceil(self.width / div) * div

    @property
    def s(self) -> int:
        return sum(h * w for h, w in self.shapes)

    @property
    def name(self) -> str:
        return f"{self.levels.upper()} {self.height}x{self.width} K={self.k} (S={self.s:,})"

    def image_sizes(self) -> list[tuple[int, int]]:
        """Even images fill the input; odd ones are smaller, padded on the right and bottom."""
        second = (round(self.height * SECOND_IMAGE_SCALE), round(self.width * SECOND_IMAGE_SCALE))
        return [second if i % 2 else (self.height, self.width) for i in range(self.n)]

    def key_padding_mask(self) -> Tensor:
        """bool [N, S], True = padding (icd.ops.padding_mask of the image sizes)."""
        return icd.ops.padding_mask(self.image_sizes(), self.shapes, self.padded)


# The size of the project's targets (N=2, h=8, K=300, S=22,400): always measured.
TARGET = Workload("p3-p7", 800, 1333, 300)


def parse_inputs(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        h, _, w = item.strip().lower().partition("x")
        if not (h.isdigit() and w.isdigit()):
            raise argparse.ArgumentTypeError(f"input size {item!r}; expected HxW, e.g. 800x1333")
        sizes.append((int(h), int(w)))
    return sizes


# --- inputs ----------------------------------------------------------------------------------


@dataclass
class Inputs:
    """The tensors of one workload, made once, outside every measured region.

    ``*_base`` tensors are the leaves that receive gradients. Layout "tokens": bases are
    [N, S, h, D] (how a [N, S, C] projection splits into heads) and the ops get the
    [N, h, S, D] transpose, a strided view; layout "sequence": bases are [S, N, h, D] (a
    sequence-first [S, N, C] projection, as in nn.MultiheadAttention without batch_first)
    viewed as [N, h, S, D] by permute; layout "heads": bases are contiguous [N, h, S, D].
    """

    q_base: Tensor
    k_base: Tensor
    v_base: Tensor
    grad_out: Tensor  # [N, h, K, D], the upstream gradient of the attention output
    mask: Tensor  # bool [N, S], True = padding
    weight: Tensor  # [N, K], 1 for real instances
    student_base: Tensor
    teacher_base: Tensor
    mse_weight: Tensor  # [N, h, S] >= 0, 0 on padding
    layout: str

    def heads(self, base: Tensor) -> Tensor:
        if self.layout == "tokens":
            return base.transpose(1, 2)
        if self.layout == "sequence":
            return base.permute(1, 2, 0, 3)
        return base

    def leaves(self) -> tuple[Tensor, ...]:
        return self.q_base, self.k_base, self.v_base, self.student_base

    def clear_grads(self) -> None:
        for t in self.leaves():
            t.grad = None

    @property
    def masked_frac(self) -> float:
        return self.mask.float().mean().item()


def make_inputs(
    w: Workload, device: torch.device, dtype: torch.dtype, layout: str, seed: int = 0
) -> Inputs:
    """Random q, k, v, features and gradients; weights shaped like ICD's (see module doc)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(tokens: int) -> Tensor:
        n, h, d = w.n, w.heads, w.head_dim
        shapes = {"tokens": (n, tokens, h, d), "sequence": (tokens, n, h, d), "heads": (n, h, tokens, d)}
        shape = shapes[layout]
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    mask = w.key_padding_mask().to(device)
    weight = torch.zeros(w.n, w.k)
    real = [REAL_INSTANCES[i % len(REAL_INSTANCES)] for i in range(w.n)]
    for i, count in enumerate(real):
        weight[i, :count] = 1.0
    # a value mask sums to the number of real instances over S: mean count / S per token
    mse_weight = torch.rand(w.n, w.heads, w.s, generator=gen) * (2 * sum(real) / w.n / w.s)
    mse_weight = mse_weight.to(device).masked_fill(mask[:, None, :], 0.0)
    grad_out = torch.randn(w.n, w.heads, w.k, w.head_dim, generator=gen).to(
        device=device, dtype=dtype
    )
    return Inputs(
        q_base=rand(w.k).requires_grad_(),
        k_base=rand(w.s).requires_grad_(),
        v_base=rand(w.s).requires_grad_(),
        grad_out=grad_out,
        mask=mask,
        weight=weight.to(device),
        student_base=rand(w.s).requires_grad_(),
        teacher_base=rand(w.s),
        mse_weight=mse_weight,
        layout=layout,
    )


def grads(*leaves: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.grad for t in leaves)


def relative_error(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    """max |got - want| / max |want| over the tensors both sides return."""
    worst = 0.0
    for a, b in zip(got, want, strict=False):
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30))
    return worst

