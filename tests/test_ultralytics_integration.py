"""icd.integrations.ultralytics: ICD inside ultralytics' YOLO trainer, on a tiny YOLO-format set.

Seconds-long runs: 8 training images of 64 px trained at imgsz 32, one or two epochs, CPU,
no workers, no plots, offline. The teacher is a YOLOv8s trained for one epoch (its widths
differ from the YOLOv8n student's on every level).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported: no network checks
ultralytics = pytest.importorskip("ultralytics")

from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils import SETTINGS  # noqa: E402

from icd.data.shapes import generate  # noqa: E402
from icd.data.yolo import export_yolo  # noqa: E402
from icd.integrations.ultralytics import ICDDetectionModel, ICDTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data.yaml, teacher.pt, run folder) shared by the module's tests."""
    SETTINGS.update(sync=False)
    root = tmp_path_factory.mktemp("yolo")
    paths = generate(str(root / "shapes"), num_train=8, num_val=4, image_size=64, seed=0)
    data = export_yolo(paths, {s: str(root / "shapes" / s) for s in paths}, str(root / "yolo"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    YOLO("yolov8s.yaml").train(epochs=1, name="teacher", **_args(data, root / "runs"))
    torch.set_num_threads(threads)
    return data, str(root / "runs" / "teacher" / "weights" / "last.pt"), root / "runs"


def _args(data, project, **overrides):
    args = dict(
        data=data, imgsz=32, batch=4, workers=0, device="cpu", plots=False, amp=False, val=False,
        project=str(project), exist_ok=True, verbose=False, seed=0, deterministic=True,
    )
    args.update(overrides)
    return args


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_short_icd_run_trains_and_keeps_the_student_alone_in_the_weights(tiny):
    data, teacher, runs = tiny
    model = YOLO("yolov8n.yaml")
    seen = {}

    def on_train_batch_end(trainer):
        seen.setdefault("items", {k: float(v.sum()) for k, v in trainer.loss_items.items()})
        seen["ema"] = trainer.ema.ema

    model.add_callback("on_train_batch_end", on_train_batch_end)
    model.train(trainer=ICDTrainer.configure(teacher, warmup_iters=0), epochs=1, name="icd", **_args(data, runs))
    trainer = model.trainer
    assert isinstance(trainer.model, ICDDetectionModel)
    assert {"icd", "aux"} <= set(seen["items"]) and all(torch.isfinite(torch.tensor(v)) for v in seen["items"].values())
    assert seen["items"]["icd"] > 0 and seen["items"]["aux"] > 0
    assert int(trainer.distiller.num_steps) >= 1
    # the teacher widths (YOLOv8s) differ from the student's (YOLOv8n) on every level
    assert trainer.distiller.teacher_channels != trainer.distiller.student_channels
    # the EMA holds the student (and no teacher, no distiller)
    ema = seen["ema"]
    assert ema.teacher_model is None and "icd" not in ema.__dict__
    assert not any(k.startswith(("teacher", "icd")) for k in ema.state_dict())
    # the final weights are the student alone: a plain DetectionModel loadable without icd
    final = torch.load(trainer.best, map_location="cpu", weights_only=False)
    assert type(final["model"]) is DetectionModel and final["optimizer"] is None
    # the distiller's student-side projections are in the YOLO optimiser, its teacher side is not
    in_yolo = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in trainer.distiller.student_side_parameters()} <= in_yolo
    assert not {id(p) for p in trainer.distiller.teacher_side_parameters()} & in_yolo
    in_icd = {id(p) for g in trainer.icd_optimizer.param_groups for p in g["params"]}
    assert in_icd == {id(p) for p in trainer.distiller.teacher_side_parameters()}


@pytest.mark.parametrize("student", ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"])
def test_gradients_reach_the_student_and_both_distiller_sides_but_never_the_teacher(tiny, student):
    data, teacher, runs = tiny
    trainer_class = ICDTrainer.configure(teacher, warmup_iters=0)
    trainer = trainer_class(overrides={"model": student, **_args(data, runs, name="grads", epochs=1)})
    trainer._setup_train()
    trainer.model.train()
    batch = trainer.preprocess_batch(next(iter(trainer.train_loader)))
    loss, items = trainer.model(batch)
    loss.sum().backward()
    model = trainer.model
    assert all(p.grad is None for p in model.teacher_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student_model.parameters())
    for side in (trainer.distiller.teacher_side_parameters(), trainer.distiller.student_side_parameters()):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in side)

    # in the warm-up the distill loss reaches the student's projections but not the student
    trainer.model.zero_grad()
    for p in trainer.distiller.parameters():
        p.grad = None
    trainer.distiller.warmup_iters = 10**6
    n_losses = len(items) - 2
    trainer.model.student_model.loss = lambda batch, preds: (torch.zeros(n_losses), {})  # ICD terms alone
    loss, _ = trainer.model(batch)
    loss.sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.student_model.parameters())
    assert all(p.grad is not None for p in trainer.distiller.student_side_parameters())


def test_resume_restores_the_distiller_and_its_optimiser_exactly(tiny):
    data, teacher, runs = tiny
    saved = {}

    class Stop(Exception):
        pass

    def stop_after_first_save(trainer):
        saved.update(trainer.icd_state_dict())
        raise Stop

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_model_save", stop_after_first_save)
    with pytest.raises(Stop):
        model.train(trainer=ICDTrainer.configure(teacher, warmup_iters=1), epochs=2, name="resume", **_args(data, runs))
    last = runs / "resume" / "weights" / "last.pt"
    restored = {}

    def on_train_start(trainer):
        assert isinstance(trainer.model, ICDDetectionModel)
        restored.update(trainer.icd_state_dict())

    resumed = YOLO(str(last))
    resumed.add_callback("on_train_start", on_train_start)
    resumed.train(resume=True, trainer=ICDTrainer.configure(teacher, warmup_iters=1))
    assert saved["distiller"].keys() == restored["distiller"].keys()
    for k, v in saved["distiller"].items():
        assert torch.equal(v, restored["distiller"][k]), k
    assert int(saved["distiller"]["num_steps"]) >= 1
    assert saved["scheduler"] == restored["scheduler"]
    s_opt, r_opt = saved["optimizer"], restored["optimizer"]
    assert s_opt["param_groups"] == r_opt["param_groups"]
    for i, state in s_opt["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(r_opt["state"][i][k])), (i, k)
    assert resumed.trainer.epoch == 1  # the second epoch ran


def test_bad_teachers_and_labels_raise_before_training(tiny, tmp_path):
    data, teacher, runs = tiny
    with pytest.raises(FileNotFoundError, match="teacher"):
        ICDTrainer.configure(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="configure"):
        ICDTrainer(overrides={"model": "yolov8n.yaml", **_args(data, runs)})

    four_levels = YOLO("yolov8n-p2.yaml")  # strides 4, 8, 16, 32: one level more than the student
    four_levels.model.nc = 7
    path = tmp_path / "p2.pt"
    torch.save({"model": four_levels.model, "train_args": {}}, path)
    with pytest.raises(ValueError, match="teacher = .*p2.pt"):
        YOLO("yolov8n.yaml").train(trainer=ICDTrainer.configure(path), epochs=1, name="bad", **_args(data, runs))

    # a label with a class id beyond the dataset's names
    bad_root = tmp_path / "bad"
    shutil.copytree(os.path.dirname(data), bad_root, ignore=shutil.ignore_patterns("*.cache"))
    for name in os.listdir(bad_root / "labels" / "train"):
        (bad_root / "labels" / "train" / name).write_text("9 0.5 0.5 0.2 0.2\n")
    bad_yaml = bad_root / "data.yaml"
    bad_yaml.write_text(open(data).read().replace(os.path.dirname(data), str(bad_root)))
    with pytest.raises(ValueError, match="class id 9.*num_classes = 7"):
        YOLO("yolov8n.yaml").train(
            trainer=ICDTrainer.configure(teacher), epochs=1, name="bad_labels", **_args(str(bad_yaml), runs)
        )


def test_logs_say_the_frozen_teacher_once_and_results_have_no_always_zero_val_columns(tiny):
    import logging

    from ultralytics.utils import LOGGER

    data, teacher, runs = tiny
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    level = LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        args = _args(data, runs, val=True, name="quiet")
        YOLO("yolov8n.yaml").train(trainer=ICDTrainer.configure(teacher, warmup_iters=0), epochs=1, **args)
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
    assert not [line for line in lines if line.startswith("Freezing layer 'teacher_model.")]
    (frozen,) = [line for line in lines if "the teacher is frozen" in line]
    assert "tensors of teacher_model" in frozen
    assert [line for line in lines if line.startswith("Freezing layer 'student_model.")]  # the student's own, kept
    with open(runs / "quiet" / "results.csv") as f:
        columns = [c.strip() for c in f.readline().split(",")]
    assert {"train/icd", "train/aux", "val/box_loss", "metrics/mAP50-95(B)"} <= set(columns), columns
    assert not {"val/icd", "val/aux"} & set(columns)


def test_the_yolo_adapter_says_layout_and_batch_frame_through_icds_detector_interface():
    from types import SimpleNamespace

    from icd.errors import ConfigError
    from icd.integrations.ultralytics import YoloAdapter, YoloSpec

    adapter = YoloAdapter(SimpleNamespace(feats_idx=[15, 18, 21, 22]))  # three neck maps, then Detect
    assert adapter.num_levels == 3
    layout = adapter.feature_layout(YoloSpec(7, (8.0, 16.0, 32.0), (64, 128, 256)))
    assert (layout.levels, layout.names, layout.width) == ((3, 4, 5), ["P3", "P4", "P5"], [64, 128, 256])
    batch = {"img": torch.zeros(2, 3, 32, 64), "bboxes": torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.25, 0.5, 0.5, 0.5]]),
             "cls": torch.tensor([[3.0], [1.0]]), "batch_idx": torch.tensor([1.0, 1.0])}  # fmt: skip
    frame = adapter.frame_of_batch(batch)
    assert frame.padded_size == (32, 64) and frame.image_sizes.tolist() == [[32, 64], [32, 64]]
    assert frame.valid_regions().tolist() == [[0.0, 0.0, 64.0, 32.0]] * 2
    assert [b.tolist() for b in frame.boxes] == [[], [[16.0, 12.0, 48.0, 20.0], [0.0, 8.0, 32.0, 24.0]]]
    assert [lab.tolist() for lab in frame.labels] == [[], [3, 1]]
    with pytest.raises(ConfigError, match="ICDTrainer"):
        adapter.build(YoloSpec(7, (8.0,), (64,)))
