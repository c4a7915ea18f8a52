"""ICDDistiller: the whole ICD method as one module any trainer can call (docs/method.md 4.4, 5).

Teacher side (trained by the auxiliary task only, with its own optimiser): the instance
encoder, the conditional decoder, the auxiliary head and, for per-level teacher widths, one
Linear(C_l, C) per level. Student side (trained with the student detector): one value
projection Linear(C_student, C) per decoder layer (one per level and layer for per-level
student widths). The teacher detector's features are detached here; the student's are
detached during warm-up.

    losses = distiller(teacher_feats, student_feats, boxes, labels, image_sizes, padded_size)
    # {"distill": ..., "aux_conf": ..., "aux_reg": ...}: sum them with the detector's losses
    distiller.step()  # once per iteration, for the warm-up counter

``static_shapes=True`` fixes K = max_labels instance slots, so every shape of a step is fixed
by the feature maps and max_labels: with boxes padded by ``icd.nn.pad_instances`` (e.g. in the
data loader) the forward pass compiles with ``torch.compile(distiller, fullgraph=True)`` into
one graph that box counts never recompile, reads no value on the host, and can be captured in
a CUDA graph. The dynamic layout (the default) sizes K by the batch: less work when images
have few boxes, which is what eager execution prefers (see docs/nn.md for measurements).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import icd.ops as ops
from icd.nn.aux_task import AuxiliaryTask
from icd.nn.decoder import ConditionalDecoder, DecoderLayerOutput, attention_value_mask, split_heads
from icd.nn.encoder import InstanceEncoder
from icd.nn.prior import ClassPrior
from icd.nn.projection import LevelProjection, as_level_widths
from icd.nn.sampler import InstanceBatch, InstanceSampler, unpad_instances
from icd.nn.validation import (
    check_feature_levels,
    check_padded_size,
    check_padded_size_fits_levels,
    check_valid_regions,
)
from icd.ops.validation import NORMS, REDUCTIONS, check_number

LOSS_NAMES = ("distill", "aux_conf", "aux_reg")


class ICDDistiller(nn.Module):
    """Instance-Conditional Knowledge Distillation losses from teacher and student FPN features.

    Args:
        num_classes: classes of the dataset (labels 0..num_classes-1).
        teacher_channels: channels of the teacher's FPN maps: an int (every level; the
            decoder works at this width C) or one width per level (each level then gets a
            Linear(C_l, C) trained by the auxiliary task).
        student_channels: channels of the student's FPN maps: an int (may differ from C) or
            one width per level (the value projections are then per level).
        heads: h attention heads (C % h == 0).
        loss_weight: lambda of the distillation loss (8 for RetinaNet/FCOS, 3 for R-CNNs).
        warmup_iters: iterations (``step()`` calls) during which the student's tokens are
            detached, so only the student's value projection learns from the distill loss.
        neg_ratio: fake instances per real one.
        max_labels: cap of real + fake instances per image (300 one-stage, 100 two-stage).
        prior: ClassPrior, a COCO-format annotation file (path or loaded dict) to compute it
            from, or None for the uniform prior.
        num_layers: decoder layers; the distill loss is averaged over them, and so are the
            auxiliary losses (the head is shared by the layers).
        sample_range: jitter amplitude of the instance centres (training mode only).
        clamp_fakes: clip fake instance boxes to their image (the published code does).
        norm: normalisation of masked_feature_mse ("ln", "tln", "none").
        reduction: reduction of masked_feature_mse ("per_head", "global").
        backend: icd.ops backend of every op call (None: the per-device default).
        decoder_channels: C, the decoder width; default: teacher_channels when an int, else
            the largest teacher width.
        static_shapes: K = max_labels instance slots in every batch (see the module
            docstring): for torch.compile and CUDA graphs. An image may then have at most
            max_labels boxes.
        mask_temperature: temperature of the softmax that gives the distillation weights (the
            value mask); 1 (the paper) uses the attention's own. Above 1 spreads each
            instance's weight over more tokens without changing the attention itself (a
            pre-trained teacher side puts a third of a head's weight on one token).
        strides: the stride of each FPN level in input pixels (2**l for P_l), for the padding
            mask, the position embedding and the attention statistics' cell centres; None
            infers each level's stride from the padded size and the map's size, which is
            exact only when the padded size is a multiple of every stride (see
            ``icd.ops.level_strides``: a 192-px batch's P7 would get stride 96, not 128).
        position_scale: s, how many periods the finest frequency of the position embeddings
            makes over an image, in the queries' centre descriptor and the keys' sine
            embedding alike: 1 (the paper) gives one period per image, too coarse to tell apart
            neighbours a few pixels apart in dense scenes of small objects.
    """

    num_steps: Tensor

    def __init__(
        self,
        num_classes: int,
        teacher_channels: int | Sequence[int] = 256,
        student_channels: int | Sequence[int] = 256,
        heads: int = 8,
        loss_weight: float = 8.0,
        warmup_iters: int = 1000,
        neg_ratio: float = 5.0,
        max_labels: int = 300,
        prior: ClassPrior | str | os.PathLike[str] | Mapping[str, Any] | None = None,
        *,
        num_layers: int = 1,
        sample_range: float = 0.3,
        clamp_fakes: bool = False,
        norm: str = "ln",
        reduction: str = "per_head",
        backend: str | None = None,
        decoder_channels: int | None = None,
        static_shapes: bool = False,
        mask_temperature: float = 1.0,
        strides: Sequence[float] | None = None,
        position_scale: float = 1.0,
    ) -> None:
        super().__init__()
        op = "ICDDistiller"
        for name, value in (("num_classes", num_classes), ("heads", heads), ("max_labels", max_labels),
                            ("num_layers", num_layers)):  # fmt: skip
            check_number(value, name, op, integer=True, minimum=1)
        check_number(warmup_iters, "warmup_iters", op, integer=True, minimum=0)
        for name, value in (("loss_weight", loss_weight), ("neg_ratio", neg_ratio), ("sample_range", sample_range)):
            check_number(value, name, op, minimum=0.0)
        check_number(mask_temperature, "mask_temperature", op, above=0.0)
        check_number(position_scale, "position_scale", op, above=0.0)
        if strides is not None:
            for i, r in enumerate(strides):
                check_number(r, f"strides[{i}]", op, above=0.0)
        teacher_widths = as_level_widths(teacher_channels, "ICDDistiller: teacher_channels")
        student_widths = as_level_widths(student_channels, "ICDDistiller: student_channels")
        if teacher_widths and student_widths and len(teacher_widths) != len(student_widths):
            raise ValueError(
                f"ICDDistiller: teacher_channels = {list(teacher_widths)} and student_channels = "
                f"{list(student_widths)} give different numbers of levels; expected one width per level"
            )
        if decoder_channels is None:
            decoder_channels = teacher_channels if teacher_widths is None else max(teacher_widths)
        channels = int(decoder_channels)
        name = "teacher_channels" if teacher_widths is None else "decoder_channels"
        if channels < 1 or channels % heads != 0:
            raise ValueError(
                f"ICDDistiller: {name} = {channels}; expected a multiple of heads = {heads}"
            )
        if channels % 4 != 0:
            raise ValueError(
                f"ICDDistiller: {name} = {channels}; expected a multiple of 4 "
                "(the 2-D sine position embedding uses C / 2 features per axis, an even number)"
            )
        if teacher_widths is None and decoder_channels != teacher_channels:
            raise ValueError(
                f"ICDDistiller: decoder_channels = {decoder_channels} with teacher_channels = "
                f"{teacher_channels} (an int); expected them equal, or teacher_channels as one "
                "width per level (which adds the per-level projections to decoder_channels)"
            )
        if norm not in NORMS:
            raise ValueError(f"ICDDistiller: norm = {norm!r}; expected one of {', '.join(NORMS)}")
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"ICDDistiller: reduction = {reduction!r}; expected one of {', '.join(REDUCTIONS)}"
            )
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(
                f"ICDDistiller: backend = {backend!r}; "
                f"expected None or one of {', '.join(ops.BACKENDS)}"
            )
        prior = _as_prior(prior, num_classes)

        self.num_classes = num_classes
        self.teacher_channels = teacher_channels if teacher_widths is None else teacher_widths
        self.student_channels = student_channels if student_widths is None else student_widths
        self.channels = channels
        self.heads = heads
        self.loss_weight = float(loss_weight)
        self._step_count = 0  # host-side copy of num_steps (see in_warmup)
        self.warmup_iters = int(warmup_iters)
        self.norm = norm
        self.reduction = reduction
        self.backend = backend
        self.static_shapes = bool(static_shapes)
        self.mask_temperature = float(mask_temperature)
        self.strides = None if strides is None else [float(r) for r in strides]
        self.position_scale = float(position_scale)

        self.sampler = InstanceSampler(
            prior, neg_ratio, max_labels, sample_range, clamp_fakes, static_shapes=self.static_shapes
        )
        self.encoder = InstanceEncoder(num_classes, channels, self.position_scale)
        self.decoder = ConditionalDecoder(channels, heads, num_layers, backend)
        self.aux_task = AuxiliaryTask(channels)
        self.teacher_projection = (
            None if teacher_widths is None else LevelProjection(teacher_widths, channels)
        )
        self.student_projections = nn.ModuleList(
            nn.Linear(student_channels, channels)
            if student_widths is None
            else LevelProjection(student_widths, channels)
            for _ in range(num_layers)
        )
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        # host-side copies of num_steps, so that neither step() nor forward reads the buffer
        # (a sync on an accelerator); refreshed from the buffer by load_state_dict
        self.register_load_state_dict_post_hook(_refresh_step_count)

    # --- optimiser groups and warm-up ---------------------------------------------------------

    def teacher_side_parameters(self) -> list[nn.Parameter]:
        """Encoder, decoder, auxiliary head and the per-level teacher projections (if any):
        trained by the auxiliary losses (AdamW). A new list on each call, so it can be handed to
        an optimiser and again to ``clip_grad_norm_``."""
        modules = (self.encoder, self.decoder, self.aux_task, self.teacher_projection)
        return [p for m in modules if m is not None for p in m.parameters()]

    def student_side_parameters(self) -> list[nn.Parameter]:
        """The student's value projections (per level, for per-level student widths): trained
        with the student (its optimiser); a list."""
        return list(self.student_projections.parameters())

    def step(self) -> int:
        """Count one training iteration (for the warm-up); returns the new count."""
        self.num_steps += 1
        self._set_step_count(self._step_count + 1)
        return self._step_count

    @property
    def in_warmup(self) -> bool:
        """True while step() was called fewer than warmup_iters times.

        A Python bool kept next to the buffer ``num_steps`` (by step() and load_state_dict),
        so a compiled forward guards on it: one recompilation when the warm-up ends.
        """
        return self._warming_up

    def _set_step_count(self, count: int) -> None:
        self._step_count = count
        self._warming_up = count < self._warmup_iters

    @property
    def warmup_iters(self) -> int:
        """Iterations with the student's tokens detached; setting it re-derives in_warmup."""
        return self._warmup_iters

    @warmup_iters.setter
    def warmup_iters(self, value: int) -> None:
        self._warmup_iters = int(value)
        self._set_step_count(self._step_count)

    # --- losses ---------------------------------------------------------------------------------

    def forward(
        self,
        teacher_features: Sequence[Tensor],
        student_features: Sequence[Tensor],
        boxes: Sequence[Tensor] | Tensor,
        labels: Sequence[Tensor] | Tensor,
        image_sizes: Tensor | Sequence[Sequence[float]],
        padded_size: Sequence[int],
    ) -> dict[str, Tensor]:
        """The ICD losses of a batch.

        Args:
            teacher_features: L teacher FPN maps [N, C_l, H_l, W_l] (detached here).
            student_features: L student FPN maps [N, C_student_l, H_l, W_l], same levels and
                spatial sizes as the teacher's.
            boxes: N float tensors [n_i, 4], (x1, y1, x2, y2) in input pixels of the padded
                batch, or one tensor [N, M, 4] padded by ``icd.nn.pad_instances`` (the input
                that keeps a compiled static forward to one graph); boxes slightly outside
                their image's valid region are clipped, far outside raise.
            labels: N int64 tensors [n_i], 0 <= label < num_classes, or [N, M] with -1 in
                the empty rows of padded boxes.
            image_sizes: the valid region of each image: [N, 2] valid (h, w) of images placed
                top-left, or [N, 4] valid boxes (x1, y1, x2, y2) in padded-input pixels
                (letterboxed images); padding outside it is masked out of the attention.
            padded_size: (Hp, Wp) of the padded batch.

        Returns:
            {"distill", "aux_conf", "aux_reg"}: 0-dim float32 losses; distill already
            includes loss_weight. A batch without any ground-truth box gives three zeros
            that are still connected to the parameters (backward and DDP work).
        """
        padded, regions, instances, empty = self._sample(
            teacher_features, student_features, boxes, labels, image_sizes, padded_size
        )
        if empty:
            return self._zero_losses()

        teacher_tokens, _, mask, pos = self._teacher_tokens(teacher_features, regions, padded)
        layers = self._decode(teacher_tokens, mask, pos, instances)

        student_features = list(student_features)
        if self.in_warmup:
            student_features = [f.detach() for f in student_features]
        student_tokens = None
        distill = []
        for layer, projection in zip(layers, self.student_projections, strict=True):
            if isinstance(projection, LevelProjection):
                projected = projection(student_features)
            else:
                if student_tokens is None:
                    student_tokens, _, _ = ops.flatten_levels(student_features)
                projected = projection(student_tokens)
            student_values = split_heads(projected, self.heads)
            teacher_values = layer.values.detach().to(student_values.dtype)
            distill.append(
                ops.masked_feature_mse(
                    student_values,
                    teacher_values,
                    layer.value_mask,
                    norm=self.norm,
                    reduction=self.reduction,
                    backend=self.backend,
                )
            )
        losses = {"distill": self.loss_weight * torch.stack(distill).mean(), **self._aux_losses(layers, instances)}
        return self._gate_empty_batch(losses, instances)

    def auxiliary_losses(
        self,
        teacher_features: Sequence[Tensor],
        boxes: Sequence[Tensor] | Tensor,
        labels: Sequence[Tensor] | Tensor,
        image_sizes: Tensor | Sequence[Sequence[float]],
        padded_size: Sequence[int],
    ) -> dict[str, Tensor]:
        """The teacher side's own losses, without a student: what teacher-side pre-training
        minimises. Arguments as in ``forward``; returns {"aux_conf", "aux_reg"} (zeros still
        connected to the parameters for a batch without boxes)."""
        padded, regions, instances, empty = self._sample(
            teacher_features, None, boxes, labels, image_sizes, padded_size
        )
        if empty:
            zeros = self._zero_losses()
            return {"aux_conf": zeros["aux_conf"], "aux_reg": zeros["aux_reg"]}
        tokens, _, mask, pos = self._teacher_tokens(teacher_features, regions, padded)
        layers = self._decode(tokens, mask, pos, instances, with_value_mask=False)
        return self._gate_empty_batch(self._aux_losses(layers, instances), instances)

    @torch.no_grad()
    def auxiliary_slot_losses(
        self,
        teacher_features: Sequence[Tensor],
        boxes: Sequence[Tensor] | Tensor,
        labels: Sequence[Tensor] | Tensor,
        image_sizes: Tensor | Sequence[Sequence[float]],
        padded_size: Sequence[int],
        generator: torch.Generator | None = None,
    ) -> tuple[InstanceBatch, Tensor, Tensor, Tensor]:
        """What the auxiliary task makes of each instance: real and fake slots sampled and
        jittered as in training (``generator``: on the prior's device, for repeatable draws),
        decoded by the last layer. Always the dynamic slot layout. Arguments as in ``forward``.

        Returns:
            the instances, and per slot (fp32 [N, K]) the real/fake logit, its BCE and the
            box error (``AuxiliaryTask.slot_losses``).
        """
        padded, regions = self._teacher_regions(teacher_features, image_sizes, padded_size)
        instances = self.sampler(boxes, labels, regions, jitter=True, generator=generator, static_shapes=False)
        tokens, _, mask, pos = self._teacher_tokens(teacher_features, regions, padded)
        last = self._decode(tokens, mask, pos, instances, with_value_mask=False)[-1]
        return (instances, *self.aux_task.slot_losses(last.features, instances))

    def _sample(
        self,
        teacher_features: Sequence[Tensor],
        student_features: Sequence[Tensor] | None,
        boxes: Sequence[Tensor] | Tensor,
        labels: Sequence[Tensor] | Tensor,
        image_sizes: Tensor | Sequence[Sequence[float]],
        padded_size: Sequence[int],
    ) -> tuple[tuple[int, int], Tensor, InstanceBatch, bool]:
        """Checked arguments of forward / auxiliary_losses: (padded size, valid regions, the
        sampled instances, whether a dynamic-layout batch has no box at all)."""
        padded = self._check_features(teacher_features, student_features, padded_size)
        device = teacher_features[0].device
        regions = check_valid_regions(image_sizes, teacher_features[0].shape[0], padded, device)
        if not self.static_shapes and isinstance(boxes, Tensor):
            boxes, labels = unpad_instances(boxes, labels)
        instances = self.sampler(boxes, labels, regions)
        empty = not self.static_shapes and sum(int(b.shape[0]) for b in boxes) == 0
        return padded, regions, instances, empty

    def _gate_empty_batch(self, losses: dict[str, Tensor], instances: InstanceBatch) -> dict[str, Tensor]:
        """Static layout: zeros for a batch without any box, without reading the count."""
        if not self.static_shapes:
            return losses
        any_real = instances.is_real.any().to(torch.float32)
        return {name: loss * any_real for name, loss in losses.items()}

    @torch.no_grad()
    def instance_attention_maps(
        self,
        teacher_features: Sequence[Tensor],
        boxes: Sequence[Tensor] | Tensor,
        labels: Sequence[Tensor] | Tensor,
        image_sizes: Tensor | Sequence[Sequence[float]],
        padded_size: Sequence[int],
        *,
        temperature: float = 1.0,
        per_head: bool = False,
    ) -> tuple[list[Tensor], Tensor]:
        """Where each real instance looks: its last-layer attention, averaged over heads.

        ``temperature``: the softmax's (``mask_temperature`` gives the distillation weights);
        ``per_head``: one map per head instead of their mean.

        Deterministic: real instances only (no fakes) and no jitter, in any mode. Queries do
        not attend to each other, so the maps equal those of the training forward pass
        (without its jitter). Always the dynamic slot layout (it reads counts on the host).

        Returns:
            maps: per image a float32 [n_i, S] tensor ([n_i, h, S] with ``per_head``); each
                row sums to 1 over the image's valid tokens.
                ``icd.ops.unflatten_levels(maps[i], spatial_shapes)`` splits them into per-level
                heat maps [n_i, H_l, W_l].
            spatial_shapes: int64 [L, 2] on the CPU, (H_l, W_l) of each level.
        """
        padded, regions = self._teacher_regions(teacher_features, image_sizes, padded_size)
        device = teacher_features[0].device
        instances = self.sampler(
            boxes, labels, regions, with_fakes=False, jitter=False, static_shapes=False
        )
        teacher_tokens, spatial_shapes, mask, pos = self._teacher_tokens(
            teacher_features, regions, padded
        )
        last = self._decode(teacher_tokens, mask, pos, instances, with_value_mask=False)[-1]
        one = torch.ones(1, 1, device=device)
        maps = []
        for i, n_real in enumerate(instances.is_real.sum(dim=1).tolist()):  # host sync: fine here
            rows = [
                attention_value_mask(
                    last.queries[i : i + 1, :, j : j + 1],
                    last.keys[i : i + 1],
                    one,
                    mask[i : i + 1],
                    last.lse[i : i + 1, :, j : j + 1],
                    temperature,
                    self.backend,
                )
                for j in range(n_real)
            ]  # each [1, h, S]
            image_maps = torch.cat(rows) if rows else torch.zeros(0, self.heads, mask.shape[1], device=device)
            maps.append(image_maps if per_head else image_maps.mean(dim=1))
        return maps, spatial_shapes

    # --- helpers ------------------------------------------------------------------------------

    def _teacher_regions(
        self,
        teacher_features: Sequence[Tensor],
        image_sizes: Tensor | Sequence[Sequence[float]],
        padded_size: Sequence[int],
    ) -> tuple[tuple[int, int], Tensor]:
        """The checked (Hp, Wp) and valid boxes [N, 4] of a call with the teacher's maps alone."""
        padded = self._check_features(teacher_features, None, padded_size)
        device = teacher_features[0].device
        return padded, check_valid_regions(image_sizes, teacher_features[0].shape[0], padded, device)

    def _check_features(
        self,
        teacher_features: Sequence[Tensor],
        student_features: Sequence[Tensor] | None,
        padded_size: Sequence[int],
    ) -> tuple[int, int]:
        """Check the FPN lists (the teacher's alone when student_features is None) and
        padded_size against their sizes; return (Hp, Wp)."""
        if student_features is None:
            check_feature_levels(
                teacher_features, teacher_features, self.teacher_channels, self.teacher_channels
            )
        else:
            check_feature_levels(
                teacher_features, student_features, self.teacher_channels, self.student_channels
            )
        padded = check_padded_size(padded_size)
        shapes = [tuple(f.shape[-2:]) for f in teacher_features]
        check_padded_size_fits_levels(padded, shapes, self.strides)
        return padded

    def _teacher_tokens(
        self, teacher_features: Sequence[Tensor], regions: Tensor, padded: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Teacher tokens [N, S, C] (of the detached features, through the per-level
        projections if any), spatial shapes int64 [L, 2] on the CPU, key padding mask bool
        [N, S] and position embedding [N, S, C]. ``regions``: valid boxes [N, 4] (x1, y1, x2,
        y2) on the features' device; the mask is built there without a host sync."""
        features = [f.detach() for f in teacher_features]
        if self.teacher_projection is None:
            tokens, spatial_shapes, _ = ops.flatten_levels(features)
        else:
            tokens = self.teacher_projection(features)
            spatial_shapes = torch.tensor([list(f.shape[-2:]) for f in features], dtype=torch.long)
        shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]  # host ints
        mask = ops.padding_mask(regions, shapes, padded, self.strides)
        level_masks = ops.unflatten_levels(mask, shapes)
        pos = ops.sine_position_embedding(
            level_masks, num_feats=self.channels // 2, scale=2 * math.pi * self.position_scale
        )
        return tokens, spatial_shapes, mask, pos

    def _decode(
        self,
        tokens: Tensor,
        mask: Tensor,
        pos: Tensor,
        instances: InstanceBatch,
        with_value_mask: bool = True,
    ) -> list[DecoderLayerOutput]:
        queries = self.encoder(instances)
        weight = instances.is_real.float() if with_value_mask else None
        return self.decoder(queries, tokens, pos, mask, weight, self.mask_temperature)

    def _aux_losses(
        self, layers: Sequence[DecoderLayerOutput], instances: InstanceBatch
    ) -> dict[str, Tensor]:
        """aux_conf and aux_reg averaged over the decoder layers (one shared head)."""
        aux = [self.aux_task(layer.features, instances) for layer in layers]
        return {
            "aux_conf": torch.stack([a["aux_conf"] for a in aux]).mean(),
            "aux_reg": torch.stack([a["aux_reg"] for a in aux]).mean(),
        }

    def _zero_losses(self) -> dict[str, Tensor]:
        """Zeros that still reach every parameter, so backward and DDP see them all used."""
        teacher = sum(p.sum() for p in self.teacher_side_parameters()) * 0.0
        student = sum(p.sum() for p in self.student_side_parameters()) * 0.0
        return {
            "distill": student.float(),
            "aux_conf": teacher.float(),
            "aux_reg": teacher.float().clone(),
        }

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, teacher_channels={self.teacher_channels}, "
            f"student_channels={self.student_channels}, channels={self.channels}, heads={self.heads}, "
            f"loss_weight={self.loss_weight}, "
            f"warmup_iters={self.warmup_iters}, norm={self.norm!r}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}, static_shapes={self.static_shapes}, "
            f"mask_temperature={self.mask_temperature}, strides={self.strides}, "
            f"position_scale={self.position_scale}"
        )


def _refresh_step_count(module: nn.Module, incompatible_keys: Any) -> None:
    """load_state_dict post-hook: read the loaded step counter once into Python."""
    module._set_step_count(int(module.num_steps))


def _as_prior(
    prior: ClassPrior | str | os.PathLike[str] | Mapping[str, Any] | None, num_classes: int
) -> ClassPrior:
    if prior is None:
        return ClassPrior.uniform(num_classes)
    if not isinstance(prior, ClassPrior):
        prior = ClassPrior.from_coco(prior, num_classes)
    if prior.num_classes != num_classes:
        raise ValueError(
            f"ICDDistiller: the prior has {prior.num_classes} classes; "
            f"expected num_classes = {num_classes}"
        )
    return prior
