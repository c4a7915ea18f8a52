"""ICD in a plain PyTorch loop: a torchvision RetinaNet R50 teacher, a smaller R18 student (docs/nn.md).

Nothing is downloaded: both detectors are built with ``weights=None``; pass your trained teacher
as a local state dict with ``--teacher-weights``. The batches are generated here (random images,
one to three boxes each) so the script runs anywhere; put your data loader in ``batches()``.

    python examples/torchvision_loop.py --iters 100 --checkpoint icd.pth
    python examples/torchvision_loop.py --iters 200 --checkpoint icd.pth --resume        # continue
    python examples/torchvision_loop.py --amp --device cuda --teacher-weights teacher.pth
    torchrun --nproc_per_node 2 examples/torchvision_loop.py --iters 100                 # DDP
    python examples/torchvision_loop.py --iters 3 --min-size 64 --max-size 64 --num-classes 3   # seconds
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from torch.nn.parallel import DistributedDataParallel
from torchvision.models import resnet18
from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from icd.detection import check_same_input_transform
from icd.engine.checkpoint import save_atomic
from icd.nn import ClassPrior, ICDDistiller


def build_teacher(num_classes: int, min_size: int, max_size: int, weights: str | None) -> RetinaNet:
    """RetinaNet R50-FPN (P3-P7, 256 channels), frozen; ``weights``: a local state dict file."""
    teacher = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes, min_size=min_size, max_size=max_size
    )
    if weights is not None:
        teacher.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def build_student(num_classes: int, min_size: int, max_size: int, channels: int = 128) -> RetinaNet:
    """RetinaNet R18-FPN with ``channels`` FPN channels: the teacher's levels P3-P7 and input transform."""
    backbone = BackboneWithFPN(
        resnet18(weights=None),
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},  # C3, C4, C5
        in_channels_list=[128, 256, 512],
        out_channels=channels,
        extra_blocks=LastLevelP6P7(channels, channels),  # P6, P7 from P5, as the teacher's
    )
    return RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size)


def batches(num_classes: int, batch_size: int, size: int, seed: int):
    """Endless (images, targets): images [3, H, W] in [0, 1]; targets {"boxes" [n, 4], "labels" [n]}."""
    g = torch.Generator().manual_seed(seed)
    while True:
        images, targets = [], []
        for _ in range(batch_size):
            h, w = (int(v) for v in torch.randint(size // 2, size + 1, (2,), generator=g))
            n = int(torch.randint(1, 4, (), generator=g))
            xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.6
            wh = (0.1 + 0.3 * torch.rand(n, 2, generator=g)) * torch.tensor([w, h])
            images.append(torch.rand(3, h, w, generator=g))
            targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                            "labels": torch.randint(0, num_classes, (n,), generator=g)})
        yield images, targets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20, help="iterations to train up to (counted across resumes)")
    p.add_argument("--total-iters", type=int, default=90_000, help="length of the schedule (cosine decay)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--student-channels", type=int, default=128)
    p.add_argument("--teacher-weights", default=None, help="local state dict of the trained teacher")
    p.add_argument("--annotations", default=None, help="COCO-format training annotations for the class prior")
    p.add_argument("--warmup-iters", type=int, default=1000, help="ICD warm-up (student features detached)")
    p.add_argument("--amp", action="store_true", help="float16 + GradScaler on CUDA, bfloat16 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", default=None, help="write the training state here after the last iteration")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    # DDP: torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; one process per device.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(args.device)
    if distributed:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    rank = torch.distributed.get_rank() if distributed else 0
    torch.manual_seed(0)  # the same initial weights in every process

    num_classes = args.num_classes  # contiguous labels 0..num_classes-1
    teacher = build_teacher(num_classes, args.min_size, args.max_size, args.teacher_weights).to(device)
    student = build_student(num_classes, args.min_size, args.max_size, args.student_channels).to(device).train()
    check_same_input_transform(teacher, student)  # the teacher will see the student's batch

    prior = ClassPrior.from_coco(args.annotations, num_classes) if args.annotations else None  # None: uniform
    distiller = ICDDistiller(
        num_classes,
        teacher_channels=teacher.backbone.out_channels,   # 256
        student_channels=student.backbone.out_channels,   # 128: a narrower student is fine
        heads=8, loss_weight=8.0,                         # lambda: 8 one-stage, 3 Faster/Mask R-CNN
        warmup_iters=args.warmup_iters, neg_ratio=5.0, max_labels=300,   # max_labels 100 for two-stage
        prior=prior,
    ).to(device).train()

    # Two optimisers: the student's recipe for the student and its value projection ...
    student_opt = torch.optim.SGD(
        [*student.parameters(), *distiller.student_side_parameters()],
        lr=0.01, momentum=0.9, weight_decay=1e-4)
    # ... and AdamW with cosine decay and 10 warm-up iterations for the teacher side.
    teacher_side = distiller.teacher_side_parameters()   # a list: reused by clip_grad_norm_ below
    teacher_opt = torch.optim.AdamW(teacher_side, lr=1e-4, weight_decay=1e-4)
    teacher_sched = torch.optim.lr_scheduler.LambdaLR(
        teacher_opt,
        lambda it: min(1.0, (it + 1) / 10) * 0.5 * (1 + math.cos(math.pi * it / args.total_iters)))

    # Forward hooks: the student's FPN maps and its batch exactly as the detector saw it.
    seen = {}
    student.transform.register_forward_hook(lambda m, inp, out: seen.update(batch=out))
    student.backbone.register_forward_hook(lambda m, inp, out: seen.update(features=list(out.values())))

    # AMP: autocast around the forward passes; a GradScaler for float16 (CUDA) only.
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    # DDP: wrap the student and the distiller, each in its own DistributedDataParallel (after the
    # hooks are on the inner modules); every distiller parameter is used in every forward.
    student_ddp, distiller_ddp = student, distiller
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        student_ddp = DistributedDataParallel(student, device_ids=ids)
        distiller_ddp = DistributedDataParallel(distiller, device_ids=ids)

    def train_step(images, targets):
        """images: list of [3, H, W]; targets: list of {"boxes": [n, 4], "labels": [n]}."""
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            detection_losses = student_ddp(images, targets)     # the student's own losses
            image_list, resized_targets = seen["batch"]         # padded batch, boxes in its frame
            with torch.no_grad():
                teacher_features = list(teacher.backbone(image_list.tensors).values())
            icd_losses = distiller_ddp(
                teacher_features,                               # L maps [N, 256, H_l, W_l]
                seen["features"],                               # L maps [N, C_s, H_l, W_l]
                [t["boxes"] for t in resized_targets],          # x1, y1, x2, y2 in input pixels
                [t["labels"] for t in resized_targets],         # int64, 0..num_classes-1
                torch.tensor(image_list.image_sizes),           # [N, 2] valid (h, w)
                tuple(image_list.tensors.shape[-2:]),           # (Hp, Wp)
            )
        loss = sum(detection_losses.values()) + sum(icd_losses.values())

        student_opt.zero_grad()
        teacher_opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(teacher_opt)                            # clip the true gradients
        torch.nn.utils.clip_grad_norm_(teacher_side, 0.01)
        scaler.step(student_opt)
        scaler.step(teacher_opt)
        scaler.update()
        teacher_sched.step()
        distiller.step()                                        # counts iterations for the warm-up
        return {k: float(v.detach()) for k, v in {**detection_losses, **icd_losses}.items()}

    # Checkpoint: everything that trains, written atomically; loaded with weights_only=True.
    def training_state(iteration: int) -> dict:
        return {"student": student.state_dict(), "distiller": distiller.state_dict(),
                "student_opt": student_opt.state_dict(), "teacher_opt": teacher_opt.state_dict(),
                "teacher_sched": teacher_sched.state_dict(), "scaler": scaler.state_dict(),
                "iteration": iteration}

    start = 0
    if args.resume:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        student.load_state_dict(state["student"])
        distiller.load_state_dict(state["distiller"])   # also the warm-up counter and the class prior
        student_opt.load_state_dict(state["student_opt"])
        teacher_opt.load_state_dict(state["teacher_opt"])
        teacher_sched.load_state_dict(state["teacher_sched"])
        scaler.load_state_dict(state["scaler"])
        start = state["iteration"]

    data = batches(num_classes, args.batch_size, args.min_size, seed=1000 * rank + start)
    losses, done = {}, start
    for iteration in range(start, args.iters):
        images, targets = next(data)
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = train_step(images, targets)
        if rank == 0:
            print(f"iter {iteration + 1} " + " ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
        done = iteration + 1
    if args.checkpoint and rank == 0:
        save_atomic(training_state(done), args.checkpoint)
    if distributed:
        torch.distributed.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
