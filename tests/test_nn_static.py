"""The static slot layout of ICDDistiller: fixed shapes, torch.compile, no host reads, CUDA graphs.

The CUDA tests (sync debug mode, graph capture) skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import icd.ops as ops
from icd.nn import LOSS_NAMES, ClassPrior, ICDDistiller, InstanceSampler, instance_count, pad_instances
from icd.ops.backends import native_backends

NUM_CLASSES = 3
PADDED = (32, 40)
LEVELS = [(8, 10), (4, 5), (2, 3)]
SIZES = torch.tensor([[32, 40], [24, 29]])
SLOTS = 10


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _boxes(counts, generator=None, device=None):
    """Random boxes inside the images of SIZES and random labels, ``counts[i]`` per image."""
    boxes, labels = [], []
    for n, (h, w) in zip(counts, SIZES.tolist(), strict=True):
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([w / 2, h / 2])
        wh = 2 + torch.rand(n, 2, generator=generator) * torch.tensor([w / 2 - 2, h / 2 - 2])
        boxes.append(torch.cat([xy, xy + wh], dim=1).to(device))
        labels.append(torch.randint(0, NUM_CLASSES, (n,), generator=generator).to(device))
    return boxes, labels


def _features(device=None, requires_grad=True):
    teacher = [torch.randn(2, 16, h, w, device=device) for h, w in LEVELS]
    student = [torch.randn(2, 12, h, w, device=device, requires_grad=requires_grad) for h, w in LEVELS]
    return teacher, student


def _distiller(static=True, seed=1, **kwargs):
    torch.manual_seed(seed)
    defaults = dict(heads=2, neg_ratio=2, max_labels=SLOTS, warmup_iters=0, static_shapes=static)
    defaults.update(kwargs)
    return ICDDistiller(NUM_CLASSES, 16, 12, **defaults)


# --- the layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [(0, 0), (1, 0), (3, 7), (10, 2)])
def test_static_layout_has_max_labels_slots_and_the_spec_counts(counts):
    sampler = InstanceSampler(ClassPrior.uniform(NUM_CLASSES), neg_ratio=2, max_labels=SLOTS, static_shapes=True)
    boxes, labels = _boxes(counts)
    batch = sampler(boxes, labels, SIZES)
    assert batch.num_slots == SLOTS and batch.boxes.shape == (2, SLOTS, 4)
    for i, n_gt in enumerate(counts):
        n_eff = instance_count(n_gt, 2, SLOTS)
        assert batch.is_real[i].tolist() == [True] * n_gt + [False] * (SLOTS - n_gt)
        assert batch.is_valid[i].tolist() == [True] * n_eff + [False] * (SLOTS - n_eff)
        torch.testing.assert_close(batch.boxes[i, :n_gt], boxes[i])
        assert torch.equal(batch.labels[i, :n_gt], labels[i])
        assert torch.all((batch.labels[i, n_gt:n_eff] >= 0) & (batch.labels[i, n_gt:n_eff] < NUM_CLASSES))
        assert torch.all(batch.labels[i, n_eff:] == -1) and torch.all(batch.boxes[i, n_eff:] == 0)
        assert torch.all(batch.centers[i, n_eff:] == 0)
        fakes = batch.boxes[i, n_gt:n_eff]
        assert torch.all(fakes[:, 2:] >= fakes[:, :2])
    # the device-side count equals the host-side one
    n_gt = torch.tensor(counts)
    assert instance_count(n_gt, 2, SLOTS).tolist() == [instance_count(n, 2, SLOTS) for n in counts]


def test_static_layout_takes_lists_or_padded_tensors_and_rejects_overflow():
    sampler = InstanceSampler(ClassPrior.uniform(NUM_CLASSES), neg_ratio=2, max_labels=SLOTS, static_shapes=True)
    boxes, labels = _boxes((4, 1))
    padded_boxes, padded_labels = pad_instances(boxes, labels, 6)  # M = 6 < K = 10 is fine
    results = []
    for args in ((boxes, labels), (padded_boxes, padded_labels)):
        gen = torch.Generator().manual_seed(3)
        results.append(sampler(*args, SIZES, generator=gen))
    for name in ("boxes", "labels", "centers", "is_real", "is_valid"):
        assert torch.equal(getattr(results[0], name), getattr(results[1], name)), name
    # a padded row with a label < 0 is empty, wherever it is
    holes = padded_labels.clone()
    holes[0, 1] = -1
    batch = sampler(padded_boxes, holes, SIZES, jitter=False)
    assert batch.is_real[0].tolist()[:4] == [True, False, True, True] and batch.is_valid[0, 1]
    too_many, too_many_labels = _boxes((SLOTS + 1, 0))
    with pytest.raises(ValueError, match=r"n_i <= 10 slots"):
        sampler(too_many, too_many_labels, SIZES)
    with pytest.raises(ValueError, match=r"at most max_labels = 10 boxes per image"):
        sampler(*pad_instances(too_many, too_many_labels, SLOTS + 1), SIZES)
    with pytest.raises(ValueError, match=r"`labels` has shape \[2, 5\]; expected \[N, M\] = \[2, 6\]"):
        sampler(padded_boxes, padded_labels[:, :5], SIZES)
    bad = padded_labels.clone()
    bad[1, 0] = NUM_CLASSES
    with pytest.raises(ValueError, match=r"labels\[1\].*num_classes = 3"):
        sampler(padded_boxes, bad, SIZES)


def test_static_fake_classes_follow_the_prior_and_skip_empty_classes():
    freq = torch.tensor([0.6, 0.0, 0.4, 0.0])
    prior = ClassPrior(freq, torch.full((4, 2), 0.2), torch.full((4, 2), 0.1))
    sampler = InstanceSampler(prior, neg_ratio=3999, max_labels=4000, static_shapes=True).eval()
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])] * 2
    batch = sampler(boxes, [torch.tensor([0])] * 2, SIZES, generator=torch.Generator().manual_seed(0))
    fake = batch.is_valid & ~batch.is_real
    assert int(fake.sum()) == 2 * 3999
    observed = torch.bincount(batch.labels[fake], minlength=4).float() / fake.sum()
    assert observed[1] == 0 and observed[3] == 0
    torch.testing.assert_close(observed, freq, atol=0.02, rtol=0)


def test_static_and_dynamic_layouts_give_the_same_losses_without_randomness():
    """No fakes (neg_ratio 0) and no jitter (eval): the padding slots change nothing."""
    teacher, student = _features()
    boxes, labels = _boxes((3, 1), torch.Generator().manual_seed(0))
    results = []
    for static in (False, True):
        distiller = _distiller(static, neg_ratio=0).eval()
        losses = distiller(teacher, student, boxes, labels, SIZES, PADDED)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in distiller.named_parameters()}
        grads["student"] = student[0].grad.clone()
        student[0].grad = None
        results.append((losses, grads))
    (dynamic, dynamic_grads), (static, static_grads) = results
    for name in LOSS_NAMES:
        torch.testing.assert_close(static[name], dynamic[name], msg=name)
    for name, grad in dynamic_grads.items():
        torch.testing.assert_close(static_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_static_batch_without_instances_gives_connected_zeros():
    distiller = _distiller()
    teacher, student = _features()
    boxes, labels = _boxes((0, 0))
    losses = distiller(teacher, student, *pad_instances(boxes, labels, SLOTS), SIZES, PADDED)
    assert all(losses[name].item() == 0 for name in LOSS_NAMES)
    sum(losses.values()).backward()
    for name, p in distiller.named_parameters():
        assert p.grad is not None and torch.all(p.grad == 0), name


# --- no data read on the host ------------------------------------------------------------------


def test_static_forward_and_backward_read_no_data_on_the_host():
    """Under FakeTensorMode every tensor is data-less: any bool(), item(), tolist(), nonzero or
    boolean indexing raises. Value checks skip tensors without data by design."""
    distiller = _distiller()
    teacher, student = _features()
    boxes, labels = pad_instances(*_boxes((3, 0)), SLOTS)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor
        with pytest.raises(Exception, match="data-dependent|DataDependent|aten._local_scalar_dense"):
            bool(fake(SIZES).sum() > 0)  # the harness does catch a host read
        losses = distiller(
            [fake(t) for t in teacher],
            [fake(s) for s in student],
            fake(boxes),
            fake(labels),
            fake(SIZES),
            PADDED,
        )
        assert sorted(losses) == sorted(LOSS_NAMES)
        sum(losses.values()).backward()
    assert all(p.grad is not None for p in distiller.parameters())


# --- torch.compile -----------------------------------------------------------------------------


class TinyStudent(torch.nn.Module):
    """A stride-4 conv body and torchvision's FeaturePyramidNetwork: 3 levels of 12 channels."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.stem = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.down1 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.down2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fpn = FeaturePyramidNetwork([8, 8, 8], 12)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        c3 = torch.relu(self.stem(images))
        c4 = torch.relu(self.down1(c3))
        c5 = torch.relu(self.down2(c4))
        return list(self.fpn({"c3": c3, "c4": c4, "c5": c5}).values())


def test_static_distiller_compiles_to_one_graph_that_box_counts_never_recompile():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    student = TinyStudent()
    distiller = _distiller()
    compiled_student = torch.compile(student, backend="eager")  # the distiller is the subject
    compiled_distiller = torch.compile(distiller, backend="aot_eager", fullgraph=True)
    images = torch.randn(2, 3, *PADDED)
    teacher = _features(requires_grad=False)[0]
    gen = torch.Generator().manual_seed(0)
    counts = [(0, 0), (1, 0), (0, 1), (1, 1)] + [tuple(torch.randint(0, SLOTS + 1, (2,), generator=gen).tolist())
                                                for _ in range(16)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, count in enumerate(counts):
            boxes, labels = pad_instances(*_boxes(count, gen), SLOTS)
            torch.manual_seed(i)
            losses = compiled_distiller(teacher, compiled_student(images), boxes, labels, SIZES, PADDED)
            sum(losses.values()).backward()
            assert all(torch.isfinite(v) for v in losses.values())
            assert (losses["aux_reg"] > 0) == (sum(count) > 0)
    assert counters["stats"]["unique_graphs"] == 2  # the student's and the distiller's
    assert not counters["graph_break"], dict(counters["graph_break"])
    # the compiled losses are the eager ones (same random draws)
    torch.manual_seed(7)
    compiled = compiled_distiller(teacher, student(images), boxes, labels, SIZES, PADDED)
    torch.manual_seed(7)
    eager = distiller(teacher, student(images), boxes, labels, SIZES, PADDED)
    for name in LOSS_NAMES:
        torch.testing.assert_close(compiled[name], eager[name], msg=name)


def test_dynamic_distiller_runs_under_torch_compile():
    """The dynamic layout reads counts on the host: it runs, with graph breaks."""
    torch._dynamo.reset()
    distiller = _distiller(static=False)
    compiled = torch.compile(distiller, backend="eager")
    teacher, student = _features()
    for i, count in enumerate([(2, 1), (0, 0)]):
        boxes, labels = _boxes(count, torch.Generator().manual_seed(i))
        torch.manual_seed(i)
        losses = compiled(teacher, student, boxes, labels, SIZES, PADDED)
        torch.manual_seed(i)
        eager = distiller(teacher, student, boxes, labels, SIZES, PADDED)
        for name in LOSS_NAMES:
            torch.testing.assert_close(losses[name], eager[name], msg=name)
        sum(losses.values()).backward()


# --- on a GPU -----------------------------------------------------------------------------------

CUDA_BACKENDS = [name for name in native_backends("cuda") if name in ops.available_backends()]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_step_inputs(seed: int):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(seed)
    teacher, student = _features(device)
    boxes, labels = pad_instances(*_boxes((3, 1) if seed % 2 else (0, 5), gen, device), SLOTS)
    return teacher, student, boxes, labels, SIZES.to(device)


@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_a_training_step_makes_no_host_sync_on_cuda(backend):
    distiller = _distiller(backend=backend).cuda()
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.01)

    def step(seed):
        teacher, student, boxes, labels, sizes = _cuda_step_inputs(seed)
        losses = distiller(teacher, student, boxes, labels, sizes, PADDED)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    step(0)  # lazy initialisation, autotuning
    inputs = [_cuda_step_inputs(seed) for seed in (1, 2)]  # made before: their copies sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for teacher, student, boxes, labels, sizes in inputs:
            losses = distiller(teacher, student, boxes, labels, sizes, PADDED)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_a_step_captured_in_a_cuda_graph_replays_like_eager(backend):
    """Forward and backward captured once, replayed on new data: the losses and gradients of
    eager execution (eval mode and no fakes: no random draw)."""
    distiller = _distiller(backend=backend, neg_ratio=0).cuda().eval()
    static_inputs = _cuda_step_inputs(1)
    teacher, student, boxes, labels, sizes = static_inputs
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up on a side stream, as CUDA graphs require
            distiller.zero_grad(set_to_none=True)
            sum(distiller(teacher, student, boxes, labels, sizes, PADDED).values()).backward()
    torch.cuda.current_stream().wait_stream(side)
    distiller.zero_grad(set_to_none=True)
    for s in student:
        s.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_losses = distiller(teacher, student, boxes, labels, sizes, PADDED)
        sum(static_losses.values()).backward()
    for seed in (2, 3):
        new = _cuda_step_inputs(seed)
        for dst, src in zip(
            [*teacher, *student, boxes, labels, sizes], [*new[0], *new[1], *new[2:]], strict=True
        ):
            dst.detach().copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        replayed = {n: v.clone() for n, v in static_losses.items()}
        grads = {n: p.grad.clone() for n, p in distiller.named_parameters()}
        eager_student = [s.detach().clone().requires_grad_(True) for s in student]
        eager_distiller = distiller
        saved = {n: p.grad for n, p in distiller.named_parameters()}
        for p in distiller.parameters():
            p.grad = None
        eager = eager_distiller(teacher, eager_student, boxes, labels, sizes, PADDED)
        sum(eager.values()).backward()
        for name in LOSS_NAMES:
            torch.testing.assert_close(replayed[name], eager[name], atol=1e-5, rtol=1e-4, msg=name)
        for name, p in distiller.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-3, msg=name)
            p.grad = saved[name]  # the graph's static gradient buffers again
