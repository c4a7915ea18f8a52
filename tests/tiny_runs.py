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
