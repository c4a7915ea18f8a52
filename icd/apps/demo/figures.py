"""The demo's pictures: loss and AP curves of its runs, and ICD's attention maps on validation images."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from icd.apps.demo.plan import Run
from icd.apps.demo.settings import DemoConfig


def draw_figures(runs: Sequence[Run], cfg: DemoConfig) -> dict[str, str]:
    """``curves.png`` (``icd plot`` of every run) and ``attention_maps.png`` (the icd run's teacher side)."""
    from icd.engine.metrics import plot_runs

    return {
        "curves": plot_runs([cfg.run_dir(r.name) for r in runs], os.path.join(cfg.out_dir, "curves.png")),
        "attention": attention_maps_figure(
            os.path.join(cfg.run_dir("teacher"), "checkpoint.pth"),
            os.path.join(cfg.run_dir("icd"), "checkpoint.pth"),  # started from the pre-trained side
            cfg.data_dir,
            os.path.join(cfg.out_dir, "attention_maps.png"),
            cfg.attention_images,
            title="ICD attention of the icd run's teacher side",
        ),
    }


@torch.no_grad()
def attention_maps_figure(
    teacher_path: str, source: str | None, data_dir: str, out_path: str, num_images: int, title: str = ""
) -> str:
    """Validation images with each real instance's box and its ICD attention, as one PNG.

    One row per image, one panel per instance (at most 4): the image, the instance's box, and
    the attention of an ICD teacher side over the frozen teacher's FPN maps as a heat map.
    ``source`` is an ``icd train --distill icd`` checkpoint or ``icd pretrain``'s
    teacher_side.pth; None shows the untrained (freshly initialised) teacher side. Each
    level's [H_l, W_l] map is spread over its cells (mass / cell area) and the levels are
    summed, so the heat map is a density over the image; the panel title gives the share of
    the attention on each level.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from icd.data.coco import CocoDetection, split_paths
    from icd.detection.adapters import family_of
    from icd.engine.checkpoint import load_checkpoint
    from icd.engine.run_spec import distiller_of_run, load_detector
    from icd.ops import unflatten_levels

    image_dir, ann = split_paths(data_dir, "val")
    dataset = CocoDetection(image_dir, ann)
    teacher, teacher_spec = load_detector(teacher_path, dataset.num_classes, what="teacher")
    teacher.eval()
    blob = load_checkpoint(source) if source else {}
    distiller = distiller_of_run(blob.get("args", {}), teacher_spec, dataset.num_classes)
    if source:
        state = blob.get("distiller", blob.get("teacher_side"))
        distiller.load_state_dict(state, strict="distiller" in blob)
    distiller.eval()

    # the images with the most instances show the most; ties by index keep it deterministic
    counts = [(-len(dataset[i][1]["boxes"]), i) for i in range(len(dataset))]
    chosen = [i for _, i in sorted(counts)[:num_images]]
    max_cols = 4
    fig, axes = plt.subplots(
        len(chosen), max_cols, figsize=(3.2 * max_cols, 3.4 * len(chosen)), squeeze=False
    )
    family = family_of(teacher_spec.detector)
    level_names = family.feature_layout(teacher_spec).names
    for row, index in enumerate(chosen):
        image, target = dataset[index]
        frame = family.frame(teacher, teacher_spec, [image])
        features = family.features(teacher, teacher_spec, frame.images)
        resized_h, resized_w = frame.image_sizes[0].tolist()
        height, width = image.shape[-2:]
        scale = torch.tensor([resized_w / width, resized_h / height] * 2)
        boxes = target["boxes"] * scale
        labels = target["labels"]
        maps, shapes = distiller.instance_attention_maps(
            features,
            [boxes],
            [labels],
            torch.tensor([[resized_h, resized_w]]),
            frame.padded_size,
        )
        per_level = unflatten_levels(maps[0], shapes)  # L x [n, H_l, W_l]
        padded = frame.padded_size
        shown = image.permute(1, 2, 0).numpy()
        for col in range(max_cols):
            ax = axes[row, col]
            ax.axis("off")
            if col >= len(boxes):
                continue
            density = torch.zeros(padded)
            shares = []
            for level_map in per_level:
                cell = level_map[col]
                shares.append(float(cell.sum()))
                h_l, w_l = cell.shape
                area = (padded[0] / h_l) * (padded[1] / w_l)
                density += torch.nn.functional.interpolate(
                    cell[None, None] / area, size=tuple(padded), mode="nearest"
                )[0, 0]
            density = density[:resized_h, :resized_w]
            ax.imshow(shown, extent=(0, width, height, 0))
            ax.imshow(
                density.numpy(), cmap="inferno", alpha=0.6, extent=(0, width, height, 0),
                interpolation="bilinear",
            )  # fmt: skip
            x1, y1, x2, y2 = target["boxes"][col].tolist()
            ax.add_patch(
                Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="cyan", linewidth=1.5)
            )
            name = dataset.category_names[int(labels[col])]
            levels = " ".join(f"{n} {s:.0%}" for n, s in zip(level_names, shares, strict=True))
            ax.set_title(f"val {index}: {name}\n{levels}", fontsize=7)
    fig.suptitle(
        (title or "ICD instance attention") + " over the frozen teacher's FPN levels; cyan: the instance's box",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out_path, dpi=72)
    plt.close(fig)
    return out_path
