"""TeacherFeatureCache: the frozen teacher's maps reused, equal to a fresh forward."""

from __future__ import annotations

import pytest
import torch

from icd.detection.adapters import get_family
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.feature_cache import TeacherFeatureCache


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    spec = DetectorSpec("fcos", "resnet18", num_classes=3, fpn_channels=32, norm="gn",
                        min_level=3, max_level=5, min_size=(64,), max_size=64)  # fmt: skip
    model = build_detector(spec).eval()
    calls = []
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    model.forward_calls = calls
    model.spec = spec
    return model


def _images(seed, sizes):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _features(cache, teacher, images):
    family = get_family("torchvision")
    with torch.no_grad():
        frame = family.frame(teacher, teacher.spec, images)
        return cache.features(lambda batch: family.features(teacher, teacher.spec, batch), images, frame), frame


def _close(got, want):
    # a map computed in another batch (of another size) differs in float rounding only
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _fresh(teacher, frame):
    with torch.no_grad():
        return list(teacher.backbone(frame.images).values())


def test_cached_maps_equal_a_fresh_forward_and_skip_the_teacher(teacher):
    cache = TeacherFeatureCache(2**30)
    first, second = _images(0, [(64, 64)] * 3), _images(1, [(64, 64)] * 2)
    _features(cache, teacher, first)
    _features(cache, teacher, second)
    assert len(cache.entries) == 5 and cache.bytes > 0
    teacher.forward_calls.clear()
    mixed = [second[1], first[0], first[2]]  # a batch never seen as such, all images cached
    maps, frame = _features(cache, teacher, mixed)
    assert teacher.forward_calls == []  # served from the cache
    for got, want in zip(maps, _fresh(teacher, frame), strict=True):
        _close(got, want)


def test_a_flipped_image_is_its_own_entry(teacher):
    cache = TeacherFeatureCache(2**30)
    image = _images(2, [(64, 64)])[0]
    _features(cache, teacher, [image])
    teacher.forward_calls.clear()
    maps, frame = _features(cache, teacher, [image.flip(-1)])
    assert teacher.forward_calls == [1] and len(cache.entries) == 2
    for got, want in zip(maps, _fresh(teacher, frame), strict=True):
        _close(got, want)


def test_padded_batches_are_recomputed_not_cached(teacher):
    cache = TeacherFeatureCache(2**30)
    images = _images(3, [(64, 64), (48, 64)])  # the second is padded to the first's size
    for _ in range(2):
        teacher.forward_calls.clear()
        maps, frame = _features(cache, teacher, images)
        assert teacher.forward_calls == [2]
    assert cache.entries == {} and cache.bytes == 0
    for got, want in zip(maps, _fresh(teacher, frame), strict=True):
        _close(got, want)


@pytest.mark.parametrize("entries", [0, 1, 2])
def test_the_budget_bounds_what_is_kept(teacher, entries):
    images = _images(4, [(64, 64)] * 3)
    probe = TeacherFeatureCache(2**30)
    _features(probe, teacher, images[:1])
    per_image = probe.bytes
    cache = TeacherFeatureCache(per_image * entries)
    _features(cache, teacher, images)
    assert len(cache.entries) == entries and cache.bytes == per_image * entries
    teacher.forward_calls.clear()
    maps, frame = _features(cache, teacher, images)
    assert teacher.forward_calls == [3]  # not every image cached: the whole batch runs again
    for got, want in zip(maps, _fresh(teacher, frame), strict=True):
        _close(got, want)


def test_a_partly_cached_batch_runs_whole(teacher):
    cache = TeacherFeatureCache(2**30)
    seen, new = _images(5, [(64, 64)] * 2), _images(6, [(64, 64)] * 2)
    _features(cache, teacher, seen)
    teacher.forward_calls.clear()
    maps, frame = _features(cache, teacher, [new[0], seen[1], new[1], seen[0]])
    assert teacher.forward_calls == [4] and len(cache.entries) == 4
    fresh = _fresh(teacher, frame)
    assert all(torch.equal(got, want) for got, want in zip(maps, fresh, strict=True))  # this batch's own maps
