"""icd.nn.ClassPrior: COCO statistics keyed by contiguous label, uniform prior, state_dict."""

from __future__ import annotations

import json

import pytest
import torch

from icd.nn import ClassPrior, ICDDistiller

# Category ids out of order and with gaps; as strings "10" < "3" < "7", as ints 3 < 7 < 10.
CATEGORIES = [{"id": 10, "name": "ten"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
IMAGES = [
    {"id": 1, "width": 200, "height": 100, "file_name": "a.jpg"},
    {"id": 2, "width": 400, "height": 50, "file_name": "b.jpg"},
]
ANNOTATIONS = [
    # category 3 -> label 0: fractions (w, h) = (0.1, 0.2) and (0.05, 0.8)
    {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
    {"id": 2, "image_id": 2, "category_id": 3, "bbox": [5, 5, 20, 40], "area": 800, "iscrowd": 0},
    # category 10 -> label 2: one box (0.5, 0.5), plus a crowd box that must be ignored
    {
        "id": 3,
        "image_id": 1,
        "category_id": 10,
        "bbox": [0, 0, 100, 50],
        "area": 5000,
        "iscrowd": 0,
    },
    {
        "id": 4,
        "image_id": 2,
        "category_id": 10,
        "bbox": [0, 0, 400, 50],
        "area": 20000,
        "iscrowd": 1,
    },
    # category 7 -> label 1: no boxes at all
]


def _dataset() -> dict:
    return {"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES}


def test_from_coco_uses_sorted_integer_ids_and_ignores_crowd(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_dataset()))
    prior = ClassPrior.from_coco(path)
    assert prior.num_classes == 3
    torch.testing.assert_close(prior.class_freq, torch.tensor([2 / 3, 0.0, 1 / 3]))
    torch.testing.assert_close(prior.size_mean[0], torch.tensor([0.075, 0.5]))
    torch.testing.assert_close(prior.size_std[0], torch.tensor([0.025, 0.3]))  # population std
    torch.testing.assert_close(prior.size_mean[2], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(prior.size_std[2], torch.tensor([0.0, 0.0]))
    # a class without boxes keeps the default statistics
    torch.testing.assert_close(prior.size_mean[1], torch.tensor([0.2, 0.2]))
    torch.testing.assert_close(prior.size_std[1], torch.tensor([0.2, 0.2]))
    # the loaded dict gives the same prior as the file
    from_dict = ClassPrior.from_coco(_dataset())
    for name, buf in prior.named_buffers():
        torch.testing.assert_close(dict(from_dict.named_buffers())[name], buf)


def test_from_coco_checks_num_classes_and_image_sizes():
    with pytest.raises(ValueError, match="num_classes = 80.*3 categories"):
        ClassPrior.from_coco(_dataset(), num_classes=80)
    no_size = _dataset()
    no_size["images"] = [{"id": 1, "file_name": "a.jpg"}, IMAGES[1]]
    with pytest.raises(ValueError, match="width/height"):
        ClassPrior.from_coco(no_size)


def test_file_without_boxes_gives_uniform_frequencies():
    empty = {"images": IMAGES, "annotations": [], "categories": CATEGORIES}
    prior = ClassPrior.from_coco(empty)
    torch.testing.assert_close(prior.class_freq, torch.full((3,), 1 / 3))


def test_uniform_prior():
    prior = ClassPrior.uniform(7)
    torch.testing.assert_close(prior.class_freq, torch.full((7,), 1 / 7))
    assert torch.all(prior.size_mean == 0.2) and torch.all(prior.size_std == 0.2)
    assert prior.size_mean.shape == (7, 2)
    with pytest.raises(ValueError, match="num_classes"):
        ClassPrior.uniform(0)


def test_constructor_rejects_bad_statistics():
    with pytest.raises(ValueError, match="size_mean"):
        ClassPrior(torch.ones(3), torch.ones(3, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="size_std"):
        ClassPrior(torch.ones(3), torch.ones(3, 2), -torch.ones(3, 2))
    with pytest.raises(ValueError, match="class_freq"):
        ClassPrior(torch.zeros(3), torch.ones(3, 2), torch.ones(3, 2))


def test_prior_round_trips_through_the_distillers_state_dict():
    prior = ClassPrior.from_coco(_dataset())
    source = ICDDistiller(3, 16, 16, heads=2, prior=prior)
    state = source.state_dict()
    assert "sampler.prior.class_freq" in state
    target = ICDDistiller(3, 16, 16, heads=2)  # uniform prior until loaded
    assert not torch.equal(target.sampler.prior.class_freq, prior.class_freq)
    target.load_state_dict(state)
    for name in ("class_freq", "size_mean", "size_std"):
        assert torch.equal(getattr(target.sampler.prior, name), getattr(prior, name))


def test_distiller_accepts_an_annotation_file(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_dataset()))
    distiller = ICDDistiller(3, 16, 16, heads=2, prior=str(path))
    torch.testing.assert_close(
        distiller.sampler.prior.class_freq, torch.tensor([2 / 3, 0.0, 1 / 3])
    )
    with pytest.raises(ValueError, match="num_classes"):
        ICDDistiller(4, 16, 16, heads=2, prior=ClassPrior.from_coco(_dataset()))
