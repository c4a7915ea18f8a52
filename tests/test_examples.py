"""The examples run, and the code the docs show is the code that runs (examples/, README.md, docs/nn.md)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOP = os.path.join(ROOT, "examples", "torchvision_loop.py")
TINY_LOOP = ["--min-size", "64", "--max-size", "64", "--num-classes", "3", "--device", "cpu"]


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _python_blocks(markdown: str, section: str) -> list[str]:
    """The ```python blocks under the heading ``section`` (up to the next heading of its level or above;
    ``#`` lines inside code blocks are code, not headings)."""
    lines, level, in_fence, body = markdown.splitlines(keepends=True), None, False, []
    for line in lines:
        if line.startswith("```"):
            in_fence = not in_fence
        heading = None if in_fence else re.match(r"(#+) (.*)", line)
        if level is None:
            if heading and heading.group(2).strip() == section:
                level = len(heading.group(1))
            continue
        if heading and len(heading.group(1)) <= level:
            break
        body.append(line)
    assert level is not None, f"no section {section!r}"
    return re.findall(r"```python\n(.*?)```", "".join(body), re.S)


def _load(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loop():
    return _load(LOOP)


def test_nn_md_shows_the_code_of_the_example():
    blocks = _python_blocks(_read("docs", "nn.md"), "Drop-in example")
    assert len(blocks) >= 4
    source = _read("examples", "torchvision_loop.py")
    for block in blocks:  # at the file's top level, or inside main() (indented once)
        assert block in source or textwrap.indent(block, "    ") in source, block[:200]


@pytest.mark.serial  # torchrun: several processes
def test_torchvision_loop_trains_resumes_under_torchrun_with_amp(loop, tmp_path):
    # a local teacher file (nothing is downloaded), a few iterations, a checkpoint
    torch.manual_seed(3)
    teacher_file = tmp_path / "teacher.pth"
    torch.save(loop.build_teacher(3, 64, 64, None).state_dict(), teacher_file)
    checkpoint = tmp_path / "icd.pth"
    argv = [*TINY_LOOP, "--iters", "2", "--warmup-iters", "1", "--teacher-weights", str(teacher_file)]
    losses = loop.main([*argv, "--checkpoint", str(checkpoint)])
    assert set(losses) == {"classification", "bbox_regression", "distill", "aux_conf", "aux_reg"}
    assert all(torch.isfinite(torch.tensor(v)) and v > 0 for v in losses.values())
    state = torch.load(checkpoint, weights_only=True)
    assert state["iteration"] == 2 and int(state["distiller"]["num_steps"]) == 2

    # continue to iteration 3: two gloo processes (DDP), mixed precision (bfloat16 on CPU)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", LOOP,
               *argv, "--iters", "3", "--checkpoint", str(checkpoint), "--resume", "--amp"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    # seconds on an idle 2-core machine; minutes when it is shared
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = [line for line in out.stdout.splitlines() if line.startswith("iter ")]
    assert len(printed) == 1 and printed[0].startswith("iter 3 ")  # rank 0 prints; resumed after 2
    resumed = torch.load(checkpoint, weights_only=True)
    assert resumed["iteration"] == 3 and int(resumed["distiller"]["num_steps"]) == 3
    moved = [not torch.equal(resumed["student"][k], state["student"][k]) for k in state["student"]]
    assert any(moved)


def test_teacher_and_student_must_see_one_input_frame(loop):
    from icd.detection import check_same_input_transform

    teacher, student = loop.build_teacher(3, 64, 64, None), loop.build_student(3, 64, 64, channels=32)
    check_same_input_transform(teacher, student)  # the example's pair agrees
    with pytest.raises(ValueError, match=r"teacher.transform.min_size = \(96,\) but student.transform.min_size"):
        check_same_input_transform(loop.build_teacher(3, 96, 64, None), student)
    student.transform.image_mean = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="image_mean"):
        check_same_input_transform(teacher, student)
    with pytest.raises(TypeError, match="expected a torchvision detector"):
        check_same_input_transform(teacher, torch.nn.Linear(2, 2))


def test_readme_ops_example_runs(tmp_path):
    (block,) = _python_blocks(_read("README.md"), "Using the ops in your own training loop")
    sizes = "N, h, K, S, D = 2, 8, 300, 22400, 32"
    assert sizes in block  # the README's sizes (ICD's at 800x1333); smaller here to keep the test fast
    scope: dict = {}
    exec(compile(block.replace(sizes, "N, h, K, S, D = 2, 2, 5, 37, 4"), "README.md", "exec"), scope)
    assert scope["out"].shape == (2, 2, 5, 4) and scope["weight"].shape == (2, 2, 37)
    assert torch.isfinite(scope["loss"]) and scope["q"].grad is not None and scope["student"].grad is not None


def test_ops_demo_runs_every_cpu_backend():
    command = [sys.executable, os.path.join(ROOT, "examples", "ops_demo.py"), "--k", "6", "--input", "64x96",
               "--repeats", "1"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "K=6" in out.stdout and "S=129" in out.stdout
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith(("reference ", "cpu "))}
    assert set(rows) == {"reference", "cpu"}
    diffs = [float(x) for x in re.findall(r"(?:out|lse|value mask|mse|dq|dk|d student) ([0-9.e+-]+)", rows["cpu"])]
    assert len(diffs) == 7 and max(diffs) < 1e-4


@pytest.mark.parametrize("detector", ["fcos", "fasterrcnn"])
def test_nn_md_fcos_and_faster_rcnn_builders_train_a_distilled_step(detector):
    from icd.detection import check_same_input_transform
    from icd.nn import ICDDistiller

    scope: dict = {}
    for block in _python_blocks(_read("docs", "nn.md"), "Other detectors: FCOS and Faster R-CNN"):
        exec(compile(block, "docs/nn.md", "exec"), scope)
    torch.manual_seed(0)
    teacher, student = scope[f"build_{detector}_pair"](3, 64, 64, channels=32)
    teacher.eval()
    student.train()
    check_same_input_transform(teacher, student)
    offset = scope["LABEL_OFFSET"][detector]
    seen = {}
    student.transform.register_forward_hook(lambda m, inp, out: seen.update(batch=out))
    student.backbone.register_forward_hook(lambda m, inp, out: seen.update(features=list(out.values())))
    distiller = ICDDistiller(3, teacher_channels=teacher.backbone.out_channels, student_channels=32, heads=4,
                             warmup_iters=0, **scope["ICD_SETTINGS"][detector])  # fmt: skip
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]  # the dataset's 0..C-1
    targets = [{"boxes": torch.tensor([[4.0, 4, 30, 40], [20, 10, 60, 50]]), "labels": labels[0] + offset},
               {"boxes": torch.tensor([[8.0, 8, 40, 30]]), "labels": labels[1] + offset}]  # fmt: skip
    detection = student(images, targets)
    image_list, resized = seen["batch"]
    with torch.no_grad():
        teacher_features = list(teacher.backbone(image_list.tensors).values())
    assert len(teacher_features) == len(seen["features"]) == 5  # P3-P7 / P2-P6
    given = [t["labels"] - offset for t in resized]
    assert all(torch.equal(a, b) for a, b in zip(given, labels, strict=True))
    losses = distiller(teacher_features, seen["features"], [t["boxes"] for t in resized], given,
                       torch.tensor(image_list.image_sizes), tuple(image_list.tensors.shape[-2:]))  # fmt: skip
    total = sum(detection.values()) + sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and losses["distill"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
