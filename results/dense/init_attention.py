"""Where the attention of a freshly initialised ICD teacher side goes on the dense val split: what
an `icd train --distill icd` run (the paper's recipe) starts from, and, since that recipe's
AdamW at lr 1e-4 with a 0.01 norm clip barely moves it in a short run, what it distils with.

    python results/dense/init_attention.py STUDY/teacher/model_best.pth STUDY/data [--seeds 0 1 2]

One row per variant and seed (seed: the teacher side's initialisation, as --seed gives it):
the paper's settings; the level strides inferred from the padded size instead of 2^l (the old
geometry: identical here, 128 px is a multiple of every stride); finer position embeddings
(--icd-position-scale 4, 16).
"""

import argparse
import json

import torch

from icd.data.coco import CocoDetection, split_paths
from icd.engine.attention import attention_statistics
from icd.engine.distill import build_distiller
from icd.engine.feature_cache import TeacherFeatureCache
from icd.engine.run_spec import distiller_kwargs, load_frozen_teacher

KEYS = ["lift", "lift_P3", "lift_P4", "lift_P5", "distinctness", "mass_own", "mass_others", "mass_background",
        "mass_border", "mass_padding", "mass_P3", "mass_P4", "mass_P5", "mass_P6", "mass_P7"]  # fmt: skip
VARIANTS = {
    "paper": {},
    "inferred strides": {"strides": None},
    "position scale 4": {"position_scale": 4.0},
    "position scale 16": {"position_scale": 16.0},
}


def main(teacher_path: str, data: str, seeds: list[int]) -> None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    image_dir, ann = split_paths(data, "val")
    dataset = CocoDetection(image_dir, ann)
    teacher, spec = load_frozen_teacher(teacher_path, dataset.num_classes, device)
    cache = TeacherFeatureCache(2 << 30)
    levels = [f"P{lvl}" for lvl in spec.levels]
    print("| variant | seed | " + " | ".join(KEYS) + " |")
    print("| --- | ---: |" + " ---: |" * len(KEYS))
    for name, change in VARIANTS.items():
        for seed in seeds:
            torch.manual_seed(seed)
            kwargs = {**distiller_kwargs({"distill": "icd"}, spec, dataset.num_classes), **change}
            distiller = build_distiller(**kwargs, warmup_iters=0).eval()
            stats = attention_statistics(distiller, teacher, dataset, levels, feature_cache=cache, detailed=True)
            print(f"| {name} | {seed} | " + " | ".join(f"{stats.get(k, float('nan')):.3f}" for k in KEYS) + " |",
                  flush=True)  # fmt: skip
            with open("init_attention.jsonl", "a") as f:
                f.write(json.dumps({"variant": name, "seed": seed, **stats}) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher")
    parser.add_argument("data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    main(args.teacher, args.data, args.seeds)
