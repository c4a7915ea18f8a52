"""How concentrated ICD's distillation weights are, per head: init vs a pre-trained teacher side.

For the first IMAGES val images of the study's data, each real instance's value mask (its
attention softmax at --temperature, one row per head) is reduced to its largest weight (peak)
and its effective number of locations exp(entropy); printed as the mean over instances, per
head, beside the image's number of valid locations. (`icd eval --attention-stats` reports the
mean peak at a run's own mask temperature.)

    python results/study/head_concentration.py DATA TEACHER TEACHER_SIDE.pth [--init] [--temperature T]
"""

import argparse

import torch

from icd.data.coco import CocoDetection
from icd.engine.run_spec import distiller_of_run, load_frozen_teacher
from icd.ops import padding_mask

parser = argparse.ArgumentParser()
parser.add_argument("data")
parser.add_argument("teacher")
parser.add_argument("teacher_side")
parser.add_argument("--init", action="store_true", help="the untrained teacher side (seed 0)")
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--images", type=int, default=32)
args = parser.parse_args()

dataset = CocoDetection(f"{args.data}/val", f"{args.data}/annotations/instances_val.json")
blob = torch.load(args.teacher_side, weights_only=True)
teacher, spec = load_frozen_teacher(args.teacher, dataset.num_classes, torch.device("cpu"))
torch.manual_seed(0)
distiller = distiller_of_run({**blob["args"], "distill": "icd"}, spec, dataset.num_classes).eval()
if not args.init:
    distiller.load_state_dict(blob["teacher_side"], strict=False)

items = [dataset[i] for i in range(args.images)]
targets = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in items]
with torch.no_grad():
    image_list, targets = teacher.transform([image for image, _ in items], targets)
    features = list(teacher.backbone(image_list.tensors).values())
    sizes = torch.tensor([list(s) for s in image_list.image_sizes])
    padded = tuple(image_list.tensors.shape[-2:])
    boxes, labels = [t["boxes"] for t in targets], [t["labels"] for t in targets]
    maps, shapes = distiller.instance_attention_maps(
        features, boxes, labels, sizes, padded, temperature=args.temperature, per_head=True
    )
weights = torch.cat(maps)  # [instances, h, S], each row sums to 1 over its image's valid tokens
peaks = weights.amax(dim=-1).mean(dim=0)
entropy = -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1)
effective = entropy.exp().mean(dim=0)
valid = (~padding_mask(sizes, shapes, padded)).sum(dim=1).float().mean().item()
print(f"{'init' if args.init else 'pre-trained'} T={args.temperature:g}: {len(items)} images, "
      f"{valid:.0f} valid locations per image")
print("  peak per head:     ", " ".join(f"{v:.3f}" for v in peaks.tolist()), f"(mean {peaks.mean():.3f})")
print("  locations per head:", " ".join(f"{v:.0f}" for v in effective.tolist()), f"(mean {effective.mean():.0f})")
