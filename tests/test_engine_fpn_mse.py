"""FpnMseDistiller: normalised (per channel, per location) and raw FPN feature imitation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icd.engine.distill import FPN_MSE_LOSS_WEIGHT, FPN_MSE_NORMS, FpnMseDistiller, build_distiller

# three levels of a 64 x 96 padded batch: strides 8, 16, 32 (awkward, non-square sizes)
PADDED = (64, 96)
SHAPES = [(8, 12), (4, 6), (2, 3)]


def _maps(channels: int, n: int = 2, scale: float = 1.0, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, channels, h, w, generator=g) * scale + 0.3).to(dtype) for h, w in SHAPES]


def _distiller(norm: str, c_s: int = 6, c_t: int = 10, seed: int = 0, **kwargs) -> FpnMseDistiller:
    torch.manual_seed(seed)
    return FpnMseDistiller(c_s, c_t, len(SHAPES), norm=norm, **kwargs)


def _loss(distiller, teacher, student, sizes=None) -> torch.Tensor:
    padded = None if sizes is None else PADDED
    return distiller(teacher, student, None, None, sizes, padded)["distill"]


def _reference(distiller, teacher, student, norm) -> torch.Tensor:
    """The loss written out level by level, without padding."""
    losses = []
    for adapter, t, s in zip(distiller.adapters, teacher, student, strict=True):
        a = adapter(s)
        if norm == "channel":
            a = (a - a.mean((2, 3), keepdim=True)) / torch.sqrt(a.var((2, 3), unbiased=False, keepdim=True) + 1e-5)
            t = (t - t.mean((2, 3), keepdim=True)) / torch.sqrt(t.var((2, 3), unbiased=False, keepdim=True) + 1e-5)
        elif norm == "layer":
            a = (a - a.mean(1, keepdim=True)) / torch.sqrt(a.var(1, unbiased=False, keepdim=True) + 1e-5)
            t = (t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, unbiased=False, keepdim=True) + 1e-5)
        losses.append(nn.functional.mse_loss(a, t))
    return distiller.loss_weight * torch.stack(losses).mean()


@pytest.mark.parametrize("norm", FPN_MSE_NORMS)
def test_matches_the_written_out_loss(norm):
    distiller = _distiller(norm, loss_weight=1.5)
    teacher, student = _maps(10, seed=1), _maps(6, seed=2)
    full = torch.tensor([list(PADDED)] * 2)  # no padding: image_sizes change nothing
    expected = _reference(distiller, teacher, student, norm)
    torch.testing.assert_close(_loss(distiller, teacher, student), expected)
    torch.testing.assert_close(_loss(distiller, teacher, student, full), expected)


@pytest.mark.parametrize("norm", FPN_MSE_NORMS)
def test_padding_is_left_out(norm):
    """Image 1 fills 40 x 50 of the 64 x 96 batch: what lies in its padding changes nothing, gets no
    gradient, and the loss equals that of the image cropped to its valid locations alone."""
    distiller = _distiller(norm)
    teacher, student = _maps(10, seed=3), _maps(6, seed=4)
    sizes = torch.tensor([[64, 96], [40, 50]])
    valid = [(5, 7), (3, 4), (2, 2)]  # ceil(40 / stride), ceil(50 / stride) per level
    garbage_t, garbage_s = [t.clone() for t in teacher], [s.clone() for s in student]
    for t, s, (h, w) in zip(garbage_t, garbage_s, valid, strict=True):
        t[1, :, h:], t[1, :, :, w:] = 1e6, -1e6
        s[1, :, h:], s[1, :, :, w:] = 3e5, 7.0
    for s in garbage_s:
        s.requires_grad_(True)
    loss = _loss(distiller, garbage_t, garbage_s, sizes)
    torch.testing.assert_close(loss, _loss(distiller, teacher, student, sizes))
    loss.backward()
    for s, (h, w) in zip(garbage_s, valid, strict=True):
        assert torch.all(s.grad[1, :, h:] == 0) and torch.all(s.grad[1, :, :, w:] == 0)
        assert s.grad[1, :, :h, :w].abs().sum() > 0

    # batch of image 1 alone, cropped: per level the same mean over its valid locations
    one = FpnMseDistiller(6, 10, 1, norm=norm)
    for level, (h, w) in enumerate(valid):
        one.adapters[0].load_state_dict(distiller.adapters[level].state_dict())
        crop_t = teacher[level][1:, :, :h, :w]
        crop_s = student[level][1:, :, :h, :w]
        alone = one([crop_t], [crop_s])["distill"]
        batch_level = FpnMseDistiller(6, 10, 1, norm=norm)
        batch_level.adapters[0].load_state_dict(distiller.adapters[level].state_dict())
        sizes_one = torch.tensor([[40, 50]])
        got = batch_level([teacher[level][1:]], [student[level][1:]], None, None, sizes_one, PADDED)["distill"]
        torch.testing.assert_close(got, alone)


def test_normalised_loss_does_not_depend_on_the_teachers_scale():
    """The raw loss grows with the square of the teacher's scale; the normalised ones do not."""
    teacher, student = _maps(10, seed=5), _maps(6, seed=6)
    scaled = [t * 1e4 - 50.0 for t in teacher]
    for norm in ("channel", "layer"):
        distiller = _distiller(norm)
        torch.testing.assert_close(_loss(distiller, scaled, student), _loss(distiller, teacher, student),
                                   rtol=1e-4, atol=1e-5)
        assert 0 < float(_loss(distiller, scaled, student).detach()) < 4 * distiller.loss_weight
    raw = _distiller("none")
    assert float(_loss(raw, scaled, student)) > 1e6 * float(_loss(raw, teacher, student))


@pytest.mark.parametrize("norm", FPN_MSE_NORMS)
def test_equal_maps_give_zero_and_a_student_can_be_fitted(norm):
    teacher = _maps(8, seed=7)
    distiller = FpnMseDistiller(8, 8, len(SHAPES), norm=norm)  # same width: no adapter
    assert all(isinstance(a, nn.Identity) for a in distiller.adapters) and not list(distiller.parameters())
    assert float(_loss(distiller, teacher, [t.clone() for t in teacher])) == 0.0


def test_raw_mse_diverges_where_the_normalised_ones_train():
    """SGD on the 1x1 adapters with lr 0.02 and momentum 0.9 (the demo's student recipe), student
    maps of scale 100, teacher maps a linear function of them: the raw MSE's curvature is far beyond
    what that lr tolerates and it blows up; the normalised losses fall."""
    student = _maps(6, scale=100.0, seed=9)
    mix = torch.randn(10, 6, generator=torch.Generator().manual_seed(8))
    teacher = [torch.einsum("ts,nshw->nthw", mix, s) for s in student]
    for norm in FPN_MSE_NORMS:
        distiller = _distiller(norm, seed=10)
        opt = torch.optim.SGD(distiller.parameters(), lr=0.02, momentum=0.9)
        losses = []
        for _ in range(30):
            loss = _loss(distiller, teacher, student)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        if norm == "none":
            assert not (losses[-1] < 1e6 * losses[0]), losses  # diverged (or non-finite)
        else:
            assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("norm", ["channel", "layer"])
def test_gradcheck_float64(norm):
    distiller = _distiller(norm, c_s=3, c_t=4).double()
    teacher = _maps(4, dtype=torch.float64, seed=11)
    student = [s.requires_grad_(True) for s in _maps(3, dtype=torch.float64, seed=12)]
    sizes = torch.tensor([[64, 96], [33, 70]])

    def fn(*maps):
        return _loss(distiller, teacher, list(maps), sizes)

    assert torch.autograd.gradcheck(fn, tuple(student), eps=1e-6, atol=1e-6, fast_mode=True)


def test_low_precision_student_maps():
    """bfloat16 maps (autocast on CPU) give a float32 loss close to the float32 one."""
    distiller = _distiller("channel")
    teacher, student = _maps(10, seed=13), _maps(6, seed=14)
    expected = _loss(distiller, teacher, student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss(distiller, [t.bfloat16() for t in teacher], [s.bfloat16() for s in student])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.02)


def test_defaults_and_bad_arguments():
    kwargs = dict(detector="fcos", num_classes=3, teacher_channels=8, student_channels=4, num_levels=3,
                  loss_weight=None, warmup_iters=0)
    built = build_distiller("fpn-mse", **kwargs)
    assert built.norm == "channel" and built.loss_weight == FPN_MSE_LOSS_WEIGHT["channel"]
    raw = build_distiller("fpn-mse", **{**kwargs, "loss_weight": 0.5}, norm="none")
    assert raw.norm == "none" and raw.loss_weight == 0.5
    with pytest.raises(ValueError, match="norm = 'batch'"):
        FpnMseDistiller(4, 8, 3, norm="batch")
    with pytest.raises(ValueError, match="distill method 'none': no distiller"):
        build_distiller("none", **kwargs)
    distiller = FpnMseDistiller(4, 8, 3)
    with pytest.raises(ValueError, match="got 2 teacher and 3 student levels"):
        distiller(_maps(8)[:2], _maps(4))
    with pytest.raises(ValueError, match="level sizes differ"):
        distiller(_maps(8), [m[..., :-1] for m in _maps(4)])


def test_explicit_strides_leave_out_the_coarse_cells_that_lie_in_padding():
    from icd.engine.distill import _valid_maps

    # a 96 x 120 image in a 96 x 192 batch: P6 (2 x 3 cells of 64 px) has its third column in padding
    maps = [torch.zeros(1, 1, h, w) for h, w in [(12, 24), (6, 12), (3, 6), (2, 3)]]
    sizes = torch.tensor([[96, 120]])
    explicit = _valid_maps(maps, sizes, (96, 192), [8, 16, 32, 64])
    inferred = _valid_maps(maps, sizes, (96, 192))
    assert explicit[3][0, 0, :, 2].sum() == 0 and inferred[3][0, 0, :, 2].sum() == 2
    assert explicit[0][0, 0].sum() == 12 * 15  # ceil(120 / 8) columns of P3
    distiller = FpnMseDistiller(4, 4, 4, strides=[8, 16, 32, 64])
    teacher = [torch.randn(1, 4, h, w) for h, w in [(12, 24), (6, 12), (3, 6), (2, 3)]]
    student = [t.clone().requires_grad_(True) for t in teacher]
    distiller(teacher, student, None, None, sizes, (96, 192))["distill"].backward()
    assert student[3].grad is not None and bool((student[3].grad[0, :, :, 2] == 0).all())
