"""Command-line flags of the seconds-long training runs that the engine and CLI tests launch."""

# ResNet-18 + FPN 32 with GroupNorm (needs no pretrained weights) on 64 px images
TINY_MODEL = "--backbone resnet18 --fpn-channels 32 --norm gn --min-size 64 --max-size 64"
# P3-P5 only, where a test does not need the detector's default levels
THREE_LEVELS = "--min-level 3 --max-level 5"
ON_CPU = "--workers 0 --device cpu --no-progress"
# no model_{epoch}.pth snapshots (90 MB each at this size; a test that needs them asks again later
# on its command line, which wins)
NO_SNAPSHOTS = "--epoch-checkpoint-every 0"
TINY = f"{TINY_MODEL} {ON_CPU} {NO_SNAPSHOTS}"


def fewer_rois(monkeypatch) -> None:
    """Two-stage detectors that icd builds (``icd.detection.models``) sample 64 RoIs per training image
    instead of torchvision's 512 and keep 10 detections per image instead of 100. On tiny images with an
    untrained RPN nearly every proposal overlaps an object, so Mask R-CNN's four 256-channel mask-head
    convolutions ran on 128 positive RoIs per image (and on 100 detections per image at evaluation):
    most of a test's time. These are not weights nor saved: checkpoints and flags are unchanged."""
    from functools import partial

    import icd.detection.models as models

    light = {"box_batch_size_per_image": 64, "box_detections_per_img": 10}
    monkeypatch.setattr(models, "MaskRCNN", partial(models.MaskRCNN, **light))
    monkeypatch.setattr(models, "FasterRCNN", partial(models.FasterRCNN, **light))
