"""icd.nn.ICDDistiller: losses, backends, memory, warm-up, state_dict, bad input, toy training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from op_cases import backend_params

import icd.ops as ops
from icd.errors import ConfigError
from icd.nn import LOSS_NAMES, ClassPrior, ICDDistiller
from icd.profiling import profile_cpu_allocations

NUM_CLASSES = 3
PADDED = (32, 40)
LEVELS = [(8, 10), (4, 5), (2, 3)]  # strides 4, 8, 16 -> S = 80 + 20 + 6 = 106
SIZES = torch.tensor([[32, 40], [24, 29]])


def _batch(teacher_channels=16, student_channels=12, requires_grad=True, device=None):
    teacher = [torch.randn(2, teacher_channels, h, w, device=device) for h, w in LEVELS]
    student = [
        torch.randn(2, student_channels, h, w, device=device, requires_grad=requires_grad)
        for h, w in LEVELS
    ]
    boxes = [
        torch.tensor([[2.0, 3.0, 20.0, 30.0], [15.0, 1.0, 39.0, 12.0]], device=device),
        torch.tensor([[4.0, 4.0, 28.0, 20.0]], device=device),
    ]
    labels = [torch.tensor([0, 2], device=device), torch.tensor([1], device=device)]
    return teacher, student, boxes, labels


def _distiller(backend="reference", seed=1, **kwargs):
    torch.manual_seed(seed)
    defaults = dict(heads=2, neg_ratio=2, max_labels=10, warmup_iters=0, backend=backend)
    defaults.update(kwargs)
    return ICDDistiller(NUM_CLASSES, 16, 12, **defaults)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops run fastest on one thread, and do not stall when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- forward ----------------------------------------------------------------------------------


def test_forward_returns_three_finite_losses_and_reaches_the_right_parameters():
    distiller = _distiller()
    teacher, student, boxes, labels = _batch()
    for f in teacher:
        f.requires_grad_(True)
    losses = distiller(teacher, student, boxes, labels, SIZES, PADDED)
    assert set(losses) == set(LOSS_NAMES)
    for name, loss in losses.items():
        assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss), name
        assert loss.item() > 0, name
    losses["distill"].backward(retain_graph=True)
    # the distill loss trains the student side only (its projection and, after warm-up, the student)
    assert all(p.grad is None for p in distiller.teacher_side_parameters())
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student_side_parameters()
    )
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in student)
    (losses["aux_conf"] + losses["aux_reg"]).backward()
    assert all(p.grad is not None for p in distiller.teacher_side_parameters())
    assert all(f.grad is None for f in teacher)  # the teacher is frozen: detached inside


def test_parameter_groups_partition_the_parameters():
    distiller = _distiller(num_layers=2)
    teacher_side = {id(p) for p in distiller.teacher_side_parameters()}
    student_side = {id(p) for p in distiller.student_side_parameters()}
    assert not teacher_side & student_side
    assert teacher_side | student_side == {id(p) for p in distiller.parameters()}
    assert len(distiller.student_projections) == 2
    # lists, not generators: an optimiser consuming one leaves it whole for clip_grad_norm_
    groups = distiller.teacher_side_parameters()
    assert isinstance(groups, list) and isinstance(distiller.student_side_parameters(), list)
    torch.optim.AdamW(groups)
    assert len(groups) == len(teacher_side) > 0
    assert distiller.student_projections[0].in_features == 12
    assert distiller.student_projections[0].out_features == 16


def test_distill_loss_is_the_weighted_masked_mse_of_the_decoder():
    distiller = _distiller(loss_weight=3.0, num_layers=2, reduction="global", norm="tln")
    teacher, student, boxes, labels = _batch()
    torch.manual_seed(5)
    losses = distiller(teacher, student, boxes, labels, SIZES, PADDED)
    torch.manual_seed(5)
    instances = distiller.sampler(boxes, labels, SIZES)
    tokens, _, mask, pos = distiller._teacher_tokens(teacher, SIZES.float(), PADDED)
    layers = distiller.decoder(
        distiller.encoder(instances), tokens, pos, mask, instances.is_real.float()
    )
    student_tokens = ops.flatten_levels(student)[0]
    expected = []
    for layer, proj in zip(layers, distiller.student_projections, strict=True):
        v_s = proj(student_tokens).view(2, -1, 2, 8).transpose(1, 2)
        mse = ops.reference.masked_feature_mse(
            v_s, layer.values, layer.value_mask, "tln", 1e-5, "global"
        )
        expected.append(mse)
    torch.testing.assert_close(losses["distill"], 3.0 * torch.stack(expected).mean())
    aux = [distiller.aux_task(layer.features, instances) for layer in layers]
    torch.testing.assert_close(losses["aux_reg"], (aux[0]["aux_reg"] + aux[1]["aux_reg"]) / 2)


def test_mask_temperature_weights_the_loss_with_the_softened_attention():
    teacher, student, boxes, labels = _batch()
    losses = {}
    for temperature in (1.0, 4.0):
        distiller = _distiller(mask_temperature=temperature)
        torch.manual_seed(5)
        losses[temperature] = distiller(teacher, student, boxes, labels, SIZES, PADDED)["distill"]
    torch.manual_seed(5)
    instances = distiller.sampler(boxes, labels, SIZES)
    tokens, _, mask, pos = distiller._teacher_tokens(teacher, SIZES.float(), PADDED)
    layer = distiller.decoder(distiller.encoder(instances), tokens, pos, mask)[0]
    weight = ops.instance_value_mask(
        layer.queries, layer.keys, instances.is_real.float(), mask, temperature=4.0, backend="reference"
    )
    v_s = distiller.student_projections[0](ops.flatten_levels(student)[0]).view(2, -1, 2, 8).transpose(1, 2)
    expected = ops.reference.masked_feature_mse(v_s, layer.values, weight, "ln", 1e-5, "per_head")
    torch.testing.assert_close(losses[4.0], 8.0 * expected)
    assert not torch.allclose(losses[1.0], losses[4.0])


@pytest.mark.parametrize("backend, device", backend_params())
def test_every_backend_gives_the_same_losses_and_gradients(backend, device):
    results = {}
    for name in ("reference", backend):
        distiller = _distiller(backend=name, num_layers=2).to(device)
        torch.manual_seed(3)
        teacher, student, boxes, labels = _batch(device=device)
        losses = distiller(teacher, student, boxes, labels, SIZES, PADDED)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in distiller.named_parameters()}
        grads.update({f"student{i}": f.grad.clone() for i, f in enumerate(student)})
        maps, _ = distiller.instance_attention_maps(teacher, boxes, labels, SIZES, PADDED)
        results[name] = ({k: v.detach() for k, v in losses.items()}, grads, maps)
    (ref_losses, ref_grads, ref_maps), (losses, grads, maps) = (
        results["reference"],
        results[backend],
    )
    for name in LOSS_NAMES:
        torch.testing.assert_close(losses[name], ref_losses[name], atol=1e-5, rtol=1e-4, msg=name)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)
    for got, want in zip(maps, ref_maps, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def _largest_and_peak_allocation(fn) -> tuple[int, int]:
    """Largest single CPU allocation and peak of live allocated bytes while ``fn`` runs."""
    _, allocations = profile_cpu_allocations(fn)
    return allocations.largest_bytes, allocations.peak_bytes


@pytest.mark.skipif("cpu" not in ops.available_backends(), reason="the cpu backend is not built")
def test_cpu_backend_never_allocates_the_attention_logits():
    # K = 120 slots, S = 1280 tokens, h = 8: [N, h, K, S] fp32 is 9.8 MB; the tokens are 0.7 MB
    n, heads, channels, k = 2, 8, 64, 120
    levels = [(32, 32), (16, 16)]
    s = sum(h * w for h, w in levels)
    logits_bytes = n * heads * k * s * 4
    teacher = [torch.randn(n, channels, h, w) for h, w in levels]
    student = [torch.randn(n, channels, h, w, requires_grad=True) for h, w in levels]
    boxes = [torch.tensor([[8.0, 8.0, 100.0, 120.0]]).repeat(20, 1)] * n
    labels = [torch.zeros(20, dtype=torch.long)] * n
    results = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        distiller = ICDDistiller(4, channels, channels, heads=heads, max_labels=k, backend=backend)

        def step(distiller=distiller):
            losses = distiller(
                teacher, student, boxes, labels, [[256, 256], [200, 230]], (256, 256)
            )
            sum(losses.values()).backward()

        step()  # warm up lazy initialisation outside the measurement
        results[backend] = _largest_and_peak_allocation(step)
    # the measurement sees the logits when they exist ...
    assert results["reference"][0] >= logits_bytes
    # ... and the fused path has no allocation, nor live total, of that size
    largest, peak = results["cpu"]
    assert largest < logits_bytes / 4, results
    assert peak < logits_bytes, results


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_runs_in_low_precision(dtype):
    distiller = _distiller()
    teacher, student, boxes, labels = _batch()
    torch.manual_seed(2)
    full = distiller(teacher, student, boxes, labels, SIZES, PADDED)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=dtype):
        low = distiller(teacher, student, boxes, labels, SIZES, PADDED)
    sum(low.values()).backward()
    for name in LOSS_NAMES:
        assert low[name].dtype == torch.float32 and torch.isfinite(low[name])
        torch.testing.assert_close(low[name], full[name], atol=0.05, rtol=0.05)


# --- warm-up and state ------------------------------------------------------------------------


def test_warmup_detaches_the_student_tokens_until_the_step_count_is_reached():
    distiller = _distiller(warmup_iters=2)
    teacher, student, boxes, labels = _batch()
    for expected_detached in (True, True, False):
        for f in student:
            f.grad = None
        distiller(teacher, student, boxes, labels, SIZES, PADDED)["distill"].backward()
        assert distiller.in_warmup == expected_detached
        assert all((f.grad is None) == expected_detached for f in student)
        assert all(p.grad is not None for p in distiller.student_side_parameters())
        distiller.step()
    assert int(distiller.num_steps) == 3


def test_state_dict_round_trips():
    source = _distiller(warmup_iters=5, num_layers=2)
    for _ in range(7):
        source.step()
    target = _distiller(seed=9, warmup_iters=5, num_layers=2)
    assert target.in_warmup
    target.load_state_dict(source.state_dict())
    assert not target.in_warmup and int(target.num_steps) == 7
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    teacher, student, boxes, labels = _batch()
    results = []
    for module in (source, target):
        torch.manual_seed(4)
        results.append(module(teacher, student, boxes, labels, SIZES, PADDED))
    for name in LOSS_NAMES:
        assert torch.equal(results[0][name], results[1][name])
    clone = copy.deepcopy(source)
    assert int(clone.num_steps) == 7


# --- attention maps -----------------------------------------------------------------------------


def test_instance_attention_maps_are_the_head_averaged_softmax_of_real_instances():
    distiller = _distiller(num_layers=2).train()
    teacher, _, boxes, labels = _batch()
    boxes.append(torch.zeros(0, 4))  # a third image without instances
    labels.append(torch.zeros(0, dtype=torch.long))
    teacher = [torch.cat([f, f[:1]]) for f in teacher]
    sizes = torch.tensor([[32, 40], [24, 29], [16, 16]])
    maps, shapes = distiller.instance_attention_maps(teacher, boxes, labels, sizes, PADDED)
    assert shapes.tolist() == [list(s) for s in LEVELS]
    s = sum(h * w for h, w in LEVELS)
    assert [tuple(m.shape) for m in maps] == [(2, s), (1, s), (0, s)]
    # deterministic (no fakes, no jitter) even in training mode
    again, _ = distiller.instance_attention_maps(teacher, boxes, labels, sizes, PADDED)
    for a, b in zip(maps, again, strict=True):
        assert torch.equal(a, b)
    # by hand: real instances without jitter, last layer, softmax over keys, mean over heads
    instances = distiller.sampler(boxes, labels, sizes, with_fakes=False, jitter=False)
    tokens, _, mask, pos = distiller._teacher_tokens(teacher, sizes.float(), PADDED)
    last = distiller.decoder(distiller.encoder(instances), tokens, pos, mask)[-1]
    logits = (last.queries @ last.keys.transpose(-1, -2)) * last.queries.shape[-1] ** -0.5
    probs = logits.masked_fill(mask[:, None, None, :], float("-inf")).softmax(-1).mean(1)
    for i, m in enumerate(maps):
        torch.testing.assert_close(m, probs[i, : m.shape[0]].detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[0]))
        assert torch.all(m[:, mask[i]] == 0)
    # the maps split into per-level heat maps
    per_level = ops.unflatten_levels(maps[0], shapes)
    assert [tuple(p.shape) for p in per_level] == [(2, h, w) for h, w in LEVELS]
    # per head, and at a temperature: the softmax of logits / T, one map per head
    heads, _ = distiller.instance_attention_maps(teacher, boxes, labels, sizes, PADDED, per_head=True)
    hot, _ = distiller.instance_attention_maps(
        teacher, boxes, labels, sizes, PADDED, temperature=3.0, per_head=True
    )
    softened = (logits / 3.0).masked_fill(mask[:, None, None, :], float("-inf")).softmax(-1)
    for i, (m, h, t) in enumerate(zip(maps, heads, hot, strict=True)):
        assert h.shape == t.shape == (m.shape[0], 2, s)
        torch.testing.assert_close(h.mean(dim=1), m)
        torch.testing.assert_close(t, softened[i, :, : m.shape[0]].transpose(0, 1).detach(), atol=1e-6, rtol=1e-5)


# --- bad input ----------------------------------------------------------------------------------


def test_a_batch_without_instances_gives_connected_zeros():
    distiller = _distiller()
    teacher, student, _, _ = _batch()
    empty_boxes = [torch.zeros(0, 4), torch.zeros(0, 4)]
    empty_labels = [torch.zeros(0, dtype=torch.long)] * 2
    losses = distiller(teacher, student, empty_boxes, empty_labels, SIZES, PADDED)
    assert all(losses[name].item() == 0 for name in LOSS_NAMES)
    sum(losses.values()).backward()
    for name, p in distiller.named_parameters():
        assert p.grad is not None and torch.all(p.grad == 0), name


def test_an_image_without_instances_next_to_one_with_instances():
    distiller = _distiller()
    teacher, student, boxes, labels = _batch()
    boxes[1], labels[1] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    losses = distiller(teacher, student, boxes, labels, SIZES, PADDED)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in distiller.parameters())


@pytest.mark.parametrize(
    "change, error, match",
    [
        (
            lambda t, s, b, lab: (t, s[:2], b, lab),
            ValueError,
            r"student_features.*2 levels; expected 3",
        ),
        (
            lambda t, s, b, lab: (t, [s[0], s[2], s[1]], b, lab),
            ValueError,
            r"student_features\[1\].*\[N, H, W\]",
        ),
        (
            lambda t, s, b, lab: ([f[:, :8] for f in t], s, b, lab),
            ValueError,
            r"teacher_channels = 16",
        ),
        (
            lambda t, s, b, lab: (t, [f[:, :5] for f in s], b, lab),
            ValueError,
            r"student_channels = 12",
        ),
        (
            lambda t, s, b, lab: (t, s, b, [lab[0], torch.tensor([3])]),
            ValueError,
            r"labels\[1\].*num_classes = 3",
        ),
        (
            lambda t, s, b, lab: (t, s, [b[0], torch.tensor([[4.0, 4.0, 28.0, 40.0]])], lab),
            ValueError,
            r"boxes\[1\]\[0\].*outside image 1",
        ),
        (lambda t, s, b, lab: (t, s, b[:1], lab[:1]), ValueError, r"one per image"),
        (lambda t, s, b, lab: (t[0], s, b, lab), ValueError, r"teacher_features.*list"),
    ],
)
def test_bad_input_raises_a_clear_error(change, error, match):
    distiller = _distiller()
    args = change(*_batch())
    with pytest.raises(error, match=match):
        distiller(*args, SIZES, PADDED)


def test_bad_sizes_raise():
    distiller = _distiller()
    batch = _batch()
    with pytest.raises(ValueError, match=r"image_sizes.*padded_size"):
        distiller(*batch, torch.tensor([[33, 40], [24, 29]]), PADDED)
    with pytest.raises(ValueError, match=r"image_sizes.*\[N, 2\] = \[2, 2\]"):
        distiller(*batch, torch.tensor([[32, 40]]), PADDED)
    with pytest.raises(ValueError, match="padded_size"):
        distiller(*batch, SIZES, (32,))


def test_padded_size_must_fit_the_feature_maps_and_levels_must_not_be_empty():
    distiller = _distiller()
    batch = _batch()
    sizes = torch.tensor([[32, 32], [24, 29]])
    # (W, H) for (H, W): rows and columns of level 0 then need strides 5 and 3.2
    with pytest.raises(ValueError, match=r"`padded_size` = \(Hp, Wp\) = \(40, 32\) does not fit level 0"):
        distiller(*batch, sizes, (40, 32))
    # the padded size of another resolution (e.g. before resizing)
    with pytest.raises(ValueError, match=r"does not fit level 0 of \(H, W\) = \(8, 10\)"):
        distiller(*batch, sizes, (64, 40))
    with pytest.raises(ValueError, match=r"does not fit"):
        distiller.instance_attention_maps(batch[0], batch[2], batch[3], sizes, (40, 32))
    # one cell more or fewer than Hp / stride is rounding, not an error
    distiller(*batch, SIZES, (33, 41))
    teacher, student, boxes, labels = batch
    for n, h, w in ((2, 0, 3), (2, 2, 0), (0, 2, 3)):
        bad_t = [*teacher[:2], torch.randn(n, 16, h, w)]
        bad_s = [*student[:2], torch.randn(n, 12, h, w)]
        with pytest.raises(ValueError, match=r"`teacher_features\[2\]` has shape .*an empty level"):
            distiller(bad_t, bad_s, boxes, labels, SIZES, PADDED)


def test_boxes_slightly_outside_are_clipped_not_rejected():
    distiller = _distiller()
    teacher, student, boxes, labels = _batch()
    boxes[1] = torch.tensor([[-0.4, 4.0, 29.2, 24.1]])  # image 1 is (h, w) = (24, 29)
    losses = distiller(teacher, student, boxes, labels, SIZES, PADDED)
    assert all(torch.isfinite(v) for v in losses.values())


def test_constructor_checks():
    with pytest.raises(ValueError, match="heads"):
        ICDDistiller(3, 20, 12, heads=8)
    with pytest.raises(ValueError, match="norm"):
        ICDDistiller(3, 16, 12, heads=2, norm="bn")
    with pytest.raises(ValueError, match="reduction"):
        ICDDistiller(3, 16, 12, heads=2, reduction="sum")
    with pytest.raises(ValueError, match="backend"):
        ICDDistiller(3, 16, 12, heads=2, backend="tpu")
    for temperature in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="mask_temperature"):
            ICDDistiller(3, 16, 12, heads=2, mask_temperature=temperature)


# --- training -------------------------------------------------------------------------------------


def _train(steps: int) -> list[dict[str, float]]:
    """A seeded toy run with the optimisers of docs/method.md 5: fixed teacher maps, learnable student maps.

    The fakes are drawn larger than any real box (scale bin 1 vs 0), so real and fake are
    separable from the descriptor and a short run can learn more than the class balance.
    """
    torch.manual_seed(0)
    prior = ClassPrior(torch.ones(3), torch.full((3, 2), 0.6), torch.full((3, 2), 0.04))
    distiller = ICDDistiller(
        NUM_CLASSES,
        16,
        12,
        heads=2,
        neg_ratio=3,
        max_labels=12,
        warmup_iters=10,
        prior=prior,
        backend="reference",
    )
    levels, padded, sizes = [(16, 20), (8, 10), (4, 5)], (128, 160), [[128, 160], [100, 150]]
    teacher = [torch.randn(2, 16, h, w) for h, w in levels]
    student = [torch.nn.Parameter(torch.randn(2, 12, h, w)) for h, w in levels]
    boxes = [
        torch.tensor([[10.0, 12.0, 40.0, 50.0], [90.0, 20.0, 130.0, 44.0]]),
        torch.tensor([[30.0, 40.0, 70.0, 90.0]]),
    ]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    teacher_opt = torch.optim.AdamW(distiller.teacher_side_parameters(), lr=7e-3, weight_decay=1e-4)
    student_opt = torch.optim.Adam([*distiller.student_side_parameters(), *student], lr=3e-2)
    history = []
    for _ in range(steps):
        losses = distiller(teacher, student, boxes, labels, sizes, padded)
        teacher_opt.zero_grad()
        student_opt.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(distiller.teacher_side_parameters(), 0.01)
        teacher_opt.step()
        student_opt.step()
        distiller.step()
        history.append({k: v.item() for k, v in losses.items()})
    return history


def test_short_optimisation_lowers_every_loss_deterministically():
    history = _train(150)

    def mean(name: str, part: slice) -> float:
        values = [h[name] for h in history[part]]
        return sum(values) / len(values)

    first, last = slice(0, 10), slice(-10, None)
    assert mean("distill", last) < 0.2 * mean("distill", first)
    assert mean("aux_reg", last) < 0.3 * mean("aux_reg", first)
    # 3 real slots of 12: predicting the class balance alone gives BCE = H(0.25) = 0.56
    assert mean("aux_conf", last) < 0.25 < mean("aux_conf", first)
    assert _train(3) == history[:3]  # seeded: the same run gives the same numbers


def test_position_scale_sharpens_the_query_and_key_position_embeddings_alike():
    from icd.engine.pretrain import check_signature
    from icd.nn.encoder import centre_embedding

    coords = torch.tensor([0.1, 0.13])
    base, fine = centre_embedding(coords), centre_embedding(coords, position_scale=16.0)
    torch.testing.assert_close(fine, centre_embedding(coords * 16.0))
    # neighbours 3% of the image apart: far more distinct at 16 periods per image
    assert (fine[0] - fine[1]).norm() > 5 * (base[0] - base[1]).norm()
    masks = [torch.zeros(1, 4, 5, dtype=torch.bool)]
    default = ops.sine_position_embedding(masks, num_feats=8)
    torch.testing.assert_close(default, ops.sine_position_embedding(masks, num_feats=8, scale=2 * math.pi))
    assert not torch.allclose(default, ops.sine_position_embedding(masks, num_feats=8, scale=32 * math.pi))
    teacher, student, boxes, labels = _batch()
    paper, sharp = _distiller(), _distiller(position_scale=16.0)
    assert sharp.position_scale == 16.0 and "position_scale=16.0" in repr(sharp)
    _, _, _, pos_paper = paper._teacher_tokens(teacher, torch.tensor([[0.0, 0.0, 40.0, 32.0]] * 2), PADDED)
    _, _, _, pos_sharp = sharp._teacher_tokens(teacher, torch.tensor([[0.0, 0.0, 40.0, 32.0]] * 2), PADDED)
    assert not torch.allclose(pos_paper, pos_sharp)
    losses = sharp(teacher, student, boxes, labels, SIZES, PADDED)
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="position_scale"):
        _distiller(position_scale=0.0)
    # a pre-trained teacher side of an earlier version (no position_scale) fits the paper's 1 only
    check_signature({"teacher": "t"}, {"teacher": "t", "position_scale": 1.0}, "old.pth")
    with pytest.raises(ConfigError, match="position_scale 1.0 \\(this run: 16.0\\)"):
        check_signature({"teacher": "t"}, {"teacher": "t", "position_scale": 16.0}, "old.pth")


def test_auxiliary_slot_losses_are_the_terms_of_the_auxiliary_losses():
    """The per-slot statistics sample and score the instances as the training losses do: with
    the same random draws, the mean BCE over the real and fake slots is aux_conf and the mean
    box error over the real ones aux_reg; repeatable with a seeded generator."""
    distiller = _distiller()
    teacher, _, boxes, labels = _batch(requires_grad=False)
    torch.manual_seed(5)
    losses = distiller.auxiliary_losses(teacher, boxes, labels, SIZES, PADDED)
    torch.manual_seed(5)
    slots, logit, bce, error = distiller.auxiliary_slot_losses(teacher, boxes, labels, SIZES, PADDED)
    assert logit.shape == bce.shape == error.shape == slots.labels.shape
    assert slots.is_real.sum() == 3 and (slots.is_valid & ~slots.is_real).sum() == 6  # neg_ratio 2
    assert torch.allclose(bce[slots.is_valid].mean(), losses["aux_conf"])
    assert torch.allclose(error[slots.is_real].mean(), losses["aux_reg"])
    draws = [
        distiller.auxiliary_slot_losses(teacher, boxes, labels, SIZES, PADDED, torch.Generator().manual_seed(0))
        for _ in range(2)
    ]
    assert torch.equal(draws[0][0].boxes, draws[1][0].boxes) and torch.equal(draws[0][2], draws[1][2])
    state = torch.get_rng_state()
    distiller.auxiliary_slot_losses(teacher, boxes, labels, SIZES, PADDED, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # an evaluation leaves the training's draws alone
