"""What a careless or unlucky user can feed icd, one family at a time: nothing loses their data,
nothing trains silently wrong, every mistake is one line naming the flag, file or argument.

Families: output folders (other runs' files, two runs at once, killed writers), resume, flags and
the environment, configs, COCO files, YOLO labels, images, checkpoints (with a fuzz of the
loader), signals, disk limits, the library API. Runs are tiny (64 px, ResNet-18 + FPN 32, no
epoch snapshots unless a test needs them).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import TINY
from user_errors import RUN, error_line, parse_error

import icd.engine.loop as loop_module
import icd.engine.trainer as trainer_module
from icd.cli import build_parser, main
from icd.data.coco import BadDataError, CocoDetection
from icd.data.images import to_rgb
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import load_checkpoint, save_atomic
from icd.engine.output_dir import claim_output_dir
from icd.errors import ArgumentError, CheckpointError, DataFileError, NonFiniteError, OutputDirError
from icd.nn import ClassPrior, ICDDistiller

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _contents(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


# -- output folders: another run's files are never touched ------------------------------------------
def test_two_runs_cannot_hold_one_folder_and_a_killed_holder_frees_it(tmp_path):
    out = str(tmp_path / "run")
    first = claim_output_dir(out, None, False)
    with pytest.raises(OutputDirError, match=r"run: is in use by another live icd run \(icd train, pid"):
        claim_output_dir(out, None, False)  # the lock, not a file check: no timing can pass it
    first.release()
    claim_output_dir(out, None, False).release()
    # a holder killed with SIGKILL leaves no lock behind (the kernel drops it)
    code = f"from icd.engine.output_dir import claim_output_dir; c = claim_output_dir({out!r}, None, False); " \
           "print('held', flush=True); import time; time.sleep(60)"  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirError, match="in use by another live icd run"):
            claim_output_dir(out, None, False)
    finally:
        holder.kill()
        holder.wait()
    claim_output_dir(out, None, False).release()


def test_stray_tmp_files_of_a_killed_writer_are_removed_at_the_next_start(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth.tmp").write_bytes(b"")
    (out / "model_3.pth.tmp").write_bytes(b"half")
    (out / "notes.tmp").write_text("the user's")  # not a writer's: stays
    claim_output_dir(str(out), None, False).release()
    assert sorted(os.listdir(out)) == [".icd_lock", "icd_run.json", "notes.tmp"]
    assert "checkpoint.pth.tmp, left by a writer that was interrupted" in caplog.text


def test_pretrain_never_writes_into_a_teachers_or_another_pretrains_folder(data, finished_run, tmp_path, capsys):
    before = _contents(finished_run)
    teacher = os.path.join(finished_run, "checkpoint.pth")
    argv = f"pretrain --data-path {data} --teacher {teacher} --iters 1 --workers 0 --device cpu"
    assert main(f"{argv} --output-dir {finished_run}".split()) == 2
    line = error_line(capsys)
    assert f"--output-dir {finished_run}: holds an `icd train` run (checkpoint.pth, metrics.jsonl)" in line
    assert _contents(finished_run) == before
    other = tmp_path / "pretrained"
    other.mkdir()
    (other / "teacher_side.pth").write_bytes(b"another pre-training's")
    assert main(f"{argv} --output-dir {other}".split()) == 2
    assert "holds another run (teacher_side.pth); pass --overwrite" in error_line(capsys)
    assert (other / "teacher_side.pth").read_bytes() == b"another pre-training's"


def test_resume_into_another_runs_folder_is_refused(data, finished_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    (other / "icd_run.json").write_text(json.dumps({"run_id": "another", "command": "train"}))
    before = _contents(other)
    ckpt = os.path.join(finished_run, "checkpoint.pth")
    assert main(f"train --data-path {data} {RUN} --iters 2 --resume {ckpt} --output-dir {other}".split()) == 2
    line = error_line(capsys)
    assert f"--output-dir {other}: holds another run" in line and f"give --output-dir {finished_run}" in line
    assert _contents(other) == before


def test_demo_never_replaces_a_run_it_did_not_create(finished_run, tmp_path, capsys):
    out = tmp_path / "runs"
    shutil.copytree(finished_run, out / "teacher")  # the README's layout: runs/teacher is an icd train run
    before = _contents(out / "teacher")
    assert main(["demo", "--tiny", "--out", str(out), "--no-progress"]) == 2
    assert f"{out / 'teacher'} holds files the demo did not create (.icd_lock, checkpoint.pth" in error_line(capsys)
    assert _contents(out / "teacher") == before and not (out / "data").exists()


def test_shapes_never_overwrite_a_dataset(data, tmp_path, capsys):
    out = tmp_path / "d"
    shutil.copytree(data, out)
    before = (out / "annotations" / "instances_train.json").read_bytes()
    argv = f"data shapes --out {out} --num-train 2 --num-val 1 --image-size 64 --seed 9"
    assert main(argv.split()) == 2
    assert "holds a dataset (annotations/instances_train.json, train/" in error_line(capsys)
    assert (out / "annotations" / "instances_train.json").read_bytes() == before
    assert main([*argv.split(), "--overwrite"]) == 0


class _Killed(BaseException):
    """Stands for SIGKILL: nothing of the run's own error handling runs."""


def _kill_on(monkeypatch, module, name, when):
    """Make ``module.name`` raise _Killed on the first call for which ``when(*args)`` holds."""
    real = getattr(module, name)
    fired = []

    def wrapper(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            fired.append(True)
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def _weights(path):
    return load_checkpoint(path)["model"]


def test_a_kill_between_the_epoch_writes_loses_no_snapshot(data, tmp_path, monkeypatch):
    argv = f"train --data-path {data} {TINY} --epochs 2 --batch-size 4 --trainable-backbone-layers 0 --no-eval " \
           "--checkpoint-every 1 --epoch-checkpoint-every 1"  # one batch per epoch, its snapshot
    out = tmp_path / "run"
    # killed at the end of epoch 0, after its snapshot and before checkpoint.pth
    _kill_on(monkeypatch, loop_module, "save_atomic",  # the loop writes the epoch end's checkpoints
             lambda obj, path: path.endswith("checkpoint.pth") and obj["epoch"] == 1 and obj["epoch_batches"] == 0)
    with pytest.raises(_Killed):
        main(f"{argv} --output-dir {out}".split())
    monkeypatch.undo()
    snapshot = load_checkpoint(out / "model_0.pth")
    assert snapshot["iteration"] == 1  # the snapshot was written first
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0  # the one of --checkpoint-every, before the end
    (out / "checkpoint.pth.tmp").write_bytes(b"")  # what a killed writer leaves
    assert main(f"{argv} --output-dir {out} --resume {out / 'checkpoint.pth'}".split()) == 0
    assert not (out / "checkpoint.pth.tmp").exists()
    rewritten = load_checkpoint(out / "model_0.pth")  # the resume redid epoch 0's end: the same state
    assert all(torch.equal(value, rewritten["model"][key]) for key, value in snapshot["model"].items())
    for name in ("model_1.pth", "checkpoint.pth"):
        assert load_checkpoint(out / name)["iteration"] == 2


def test_a_kill_during_an_evaluation_evaluates_on_resume(data, tmp_path, monkeypatch):
    argv = f"train --data-path {data} {TINY} --epochs 2 --batch-size 4 --trainable-backbone-layers 0 " \
           "--epoch-checkpoint-every 0"
    out = tmp_path / "run"
    _kill_on(monkeypatch, trainer_module, "evaluate", lambda *a, **k: True)  # the first evaluation
    with pytest.raises(_Killed):
        main(f"{argv} --output-dir {out}".split())
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pth")["pending_evaluation"] == 0
    assert main(f"{argv} --output-dir {out} --resume {out / 'checkpoint.pth'}".split()) == 0
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert [(e["epoch"], e["iter"]) for e in evals] == [(0, 1), (1, 2)]  # the interrupted one, done on resume
    best = max(evals, key=lambda e: (e["AP"], -e["epoch"]))  # the first of the highest
    kept = load_checkpoint(out / "model_best.pth")
    assert (kept["best"]["epoch"], kept["iteration"]) == (best["epoch"], best["iter"])
    assert "pending_evaluation" not in load_checkpoint(out / "checkpoint.pth")


# -- resume: what changes the schedule or the data position is refused unless asked for -------------
def test_resume_with_another_schedule_or_batch_size_is_refused_unless_allowed(data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = f"train --data-path {data} {TINY} --epochs 2 --no-eval --epoch-checkpoint-every 0 --lr 0.01"
    assert main(f"{argv} --stop-after-iters 1 --batch-size 1 --output-dir {out}".split()) == 0
    resume = f"{argv} --output-dir {out} --resume {out / 'checkpoint.pth'}"
    assert main(f"{resume} --batch-size 2 --lr 0.02".split()) == 2
    line = error_line(capsys)
    assert "--lr 0.01 there, 0.02 here" in line and "--batch-size 1 there, 2 here" in line
    assert "--allow-resume-changes" in line
    args = build_parser().parse_args(f"{resume} --lr 0.02 --allow-resume-changes".split())
    trainer = trainer_module.Trainer(args)
    try:  # the new lr is the one in force (warm-up factor of iteration 1 of 4 applied)
        factor = trainer.lr_scheduler.lr_lambdas[0](1)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * factor)
    finally:
        trainer.close()
    args = build_parser().parse_args(f"{resume} --batch-size 2 --allow-resume-changes".split())
    trainer = trainer_module.Trainer(args)
    try:  # 1 image of epoch 0 read: no whole batch of 2 yet, so the epoch goes on from its start
        assert (trainer.batches.epoch, trainer.batches.position) == (0, 0)
    finally:
        trainer.close()


# -- flags and the environment: refused at parse or plan time, one line ----------------------------
@pytest.mark.parametrize("flags", ["--jobs 0", "--threads -1", "--num-train 0", "--lr nan", "--image-size 8"])
def test_demo_flags_are_checked_at_parse(flags, capsys):
    line = parse_error(["demo", "--tiny", *flags.split()], capsys)
    assert f"argument {flags.split()[0]}" in line and "expected" in line


def test_a_misspelt_environment_variable_is_one_line_and_help_still_works(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ICD_BACKEND", "trition")
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    capsys.readouterr()
    assert main(f"train --data-path {data} {RUN} --output-dir {tmp_path / 'r'}".split()) == 2
    assert "ICD_BACKEND = 'trition'; expected one of" in error_line(capsys)
    monkeypatch.delenv("ICD_BACKEND")
    monkeypatch.setenv("ICD_CHECKS", "ful")
    assert main(f"train --data-path {data} {RUN} --output-dir {tmp_path / 'r'}".split()) == 2
    assert "ICD_CHECKS = 'ful'; expected one of cpu, full, off" in error_line(capsys)


def test_model_flags_that_cannot_build_are_refused_before_any_data(finished_run, tmp_path, capsys):
    nothing = tmp_path / "nothing"  # no data: the flags are refused first
    teacher = os.path.join(finished_run, "checkpoint.pth")
    argv = f"train --data-path {nothing} {RUN} --output-dir {tmp_path / 'r'}"
    assert main(f"{argv} --detector fcos --fpn-channels 16".split()) == 2
    assert "--fpn-channels 16: fcos's head normalises with GroupNorm(32)" in error_line(capsys)
    assert main(f"{argv} --teacher {teacher} --icd-backend cuda --device cpu".split()) == 2
    assert "--icd-backend cuda: " in error_line(capsys)


def test_icd_heads_that_do_not_split_the_teachers_width_are_refused_before_training(data, finished_run, tmp_path,
                                                                                    capsys, monkeypatch):
    monkeypatch.setattr(trainer_module.Trainer, "train", lambda *a: pytest.fail("trained"))
    teacher = os.path.join(finished_run, "checkpoint.pth")
    argv = f"train --data-path {data} {RUN} --teacher {teacher} --icd-heads 7 --output-dir {tmp_path / 'r'}"
    assert main(argv.split()) == 2
    assert f"--icd-heads 7: ICD's attention works at the teacher's width, 32 FPN channels (--teacher {teacher})" \
        in error_line(capsys)  # fmt: skip


def test_plot_wants_a_picture_and_metrics_with_iterations(finished_run, tmp_path, capsys):
    line = parse_error(["plot", finished_run, "--out", str(tmp_path / "curves.pth")], capsys)
    assert "curves.pth: expected a picture file (.png" in line
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text('{"loss": 1.0}\n[1, 2]\n')
    assert main(["plot", str(foreign), "--out", str(tmp_path / "c.png")]) == 2
    assert "metrics.jsonl: no line is a JSON object with an 'iter'" in error_line(capsys)
    assert main(["plot", str(tmp_path / "none"), "--out", str(tmp_path / "c.png")]) == 2
    assert "none: no metrics.jsonl" in error_line(capsys)


# -- configs --------------------------------------------------------------------------------------
def test_a_config_that_is_not_utf8_names_the_file(tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_bytes(b"lr = 0.01\n\xff\xfe = 1\n")
    line = parse_error(["train", "--config", str(preset), "--data-path", "d"], capsys)
    assert f"preset {preset}: not UTF-8 text" in line


# -- COCO files -----------------------------------------------------------------------------------
def _coco_split(tmp_path, annotations):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(image_dir / "1.png")
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.png", "width": 32, "height": 24}],
                                "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}))  # fmt: skip
    return str(image_dir), str(path)


def test_ids_of_the_wrong_type_are_skipped_and_a_missing_image_id_is_a_bad_file(tmp_path, caplog):
    good = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8]}
    listed = [{**good, "id": 2, "image_id": [1]}, {**good, "id": 3, "category_id": [1]}]
    image_dir, path = _coco_split(tmp_path, [good, *listed])
    with pytest.raises(BadDataError, match=r"annotations\[1\] .*'image_id' \[1\] is not an integer"):
        CocoDetection(image_dir, path)
    assert CocoDetection(image_dir, path, on_bad_data="skip").num_annotations == 1
    assert "'category_id' [1] is not an integer" in caplog.text
    no_image = {k: v for k, v in good.items() if k != "image_id"}
    (tmp_path / "b").mkdir()
    image_dir, path = _coco_split(tmp_path / "b", [good, no_image])
    for mode in ("error", "skip"):  # no image to leave out with it: the file is malformed
        with pytest.raises(BadDataError, match=r"annotations\[1\] has no 'image_id'; the file is malformed"):
            CocoDetection(image_dir, path, on_bad_data=mode)


# -- YOLO labels ----------------------------------------------------------------------------------
def _labels(tmp_path, text: str | bytes) -> str:
    folder = tmp_path / "labels"
    folder.mkdir(exist_ok=True)
    path = folder / "a.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 320 240 64 48\n", r"a.txt:1: coordinates 320 240 64 48 outside \[0, 1\]"),  # pixels
        ("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 -0.1 0.2\n", r"a.txt:2: a box of width -0.1"),
        ("nan 0.5 0.5 0.2 0.2\n", r"a.txt:1: .* has a non-finite value"),
        ("0 0.5 0.5 0.2\n", r"a.txt:1: 4 fields; expected 'class cx cy w h'"),
        ("0 0.1 0.1 0.3 0.1 0.2 0.4\n0 0.5 0.5 0.2 0.2\n", r"a.txt:2: 5 fields in a file of polygons"),
        (b"0 0.5 0.5 0.2 0.2\n\x89PNG\xff\xd8\n", r"a.txt:2: not UTF-8 text"),
        ("7 0.5 0.5 0.2 0.2\n", r"a.txt:1: class id 7; expected an integer 0 <= class < num_classes = 3"),
    ],
)
def test_bad_yolo_labels_name_file_and_line(tmp_path, text, message):
    path = _labels(tmp_path, text)
    with pytest.raises(DataFileError, match=message) as err:
        ClassPrior.from_yolo_labels(os.path.dirname(path), 3)
    assert str(err.value).startswith(path)


def test_yolo_segment_lines_are_read_as_ultralytics_reads_them(tmp_path):
    _labels(tmp_path, "1 0.1 0.2 0.5 0.2 0.3 0.6\n1 0.2 0.2 0.4 0.2 0.4 0.3 0.2 0.3\n")
    prior = ClassPrior.from_yolo_labels(tmp_path / "labels", 2)
    # the boxes of the polygons: (0.4 x 0.4) and (0.2 x 0.1)
    assert prior.size_mean[1].tolist() == pytest.approx([0.3, 0.25])
    assert prior.class_freq.tolist() == [0.0, 1.0]


# -- images ---------------------------------------------------------------------------------------
def test_images_of_every_mode_are_scaled_to_their_range():
    grey16 = np.array([[0, 1000, 65535]], dtype=np.uint16)
    got = to_rgb(Image.fromarray(grey16))  # mode I;16, as a 16-bit PNG opens
    assert got.shape == (3, 1, 3) and got[0, 0].tolist() == pytest.approx([0, 1000 / 65535, 1.0])
    assert to_rgb(Image.fromarray(grey16.astype(np.int32)))[1, 0, 1] == pytest.approx(1000 / 65535)  # mode I
    assert to_rgb(Image.fromarray(np.array([[0.25]], np.float32))).flatten().tolist() == [0.25] * 3  # mode F
    la = Image.fromarray(np.array([[[200, 255], [200, 0]]], np.uint8))  # mode LA: opaque, transparent
    assert la.mode == "LA"
    assert torch.allclose(to_rgb(la)[:, 0], torch.tensor([[200 / 255, 0.0]] * 3))  # over black
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    assert to_rgb(palette)[:, 0].tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    for mode in ("1", "L", "CMYK", "YCbCr", "RGB"):
        image = Image.new(mode, (2, 2))
        assert to_rgb(image).shape == (3, 2, 2)
    with pytest.raises(ValueError, match=r"mode I pixels range over -5\.\.70000; expected 0\.\.65535"):
        to_rgb(Image.fromarray(np.array([[-5, 70000]], np.int32)))
    with pytest.raises(ValueError, match=r"mode F .* range over 0\.\.255"):
        to_rgb(Image.fromarray(np.array([[0, 255]], np.float32)))


def test_a_16_bit_png_trains_as_what_it_shows(tmp_path):
    image_dir, path = _coco_split(tmp_path, [])
    Image.fromarray(np.full((24, 32), 30000, np.uint16)).save(os.path.join(image_dir, "1.png"))  # 16-bit PNG
    image, _ = CocoDetection(image_dir, path)[0]
    assert float(image.min()) == float(image.max()) == pytest.approx(30000 / 65535)  # not clipped to 1


# -- checkpoints ----------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _fuzz_inputs(real: bytes) -> list[bytes]:
    """A few hundred short files a user might pass as a checkpoint: random bytes, prefixes of a real
    checkpoint (truncated copies), text, 0-2 bytes, a zip without torch's layout."""
    rng = random.Random(1234)
    inputs = [b"", b"\x80", b"PK", b"not a checkpoint\n", b'{"model": {}}', b"\x80\x02}q\x00."]
    inputs += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))) for _ in range(150)]
    inputs += [b"\x80\x04" + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40))) for _ in range(50)]
    inputs += [real[: rng.randint(1, len(real) - 1)] for _ in range(80)]
    return inputs


def test_the_checkpoint_loader_turns_any_file_into_one_line(tmp_path, recwarn):
    real_path = tmp_path / "real.pth"
    torch.save({"model": {"w": torch.ones(3)}, "iteration": 1}, real_path)
    real = real_path.read_bytes()
    path = str(tmp_path / "c.pth")
    for i, content in enumerate(_fuzz_inputs(real)):
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path, "--teacher")
        message = str(err.value)
        assert message.startswith(f"--teacher {path}: ") and "\n" not in message, (i, content[:20], message)
    assert not [str(w.message) for w in recwarn], "the error is the one line: no warning of torch's beside it"
    zip_path = tmp_path / "z.pth"
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("readme.txt", "hello")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    torch.save({"x": _Evil()}, tmp_path / "evil.pth")
    for name, message in (("z.pth", "not a readable torch checkpoint"), ("list.pth", "holds a list; expected"),
                          ("evil.pth", "holds Python objects other than tensors")):  # fmt: skip
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(str(tmp_path / name), "--icd-init")
    with pytest.raises(FileNotFoundError, match="--resume .*missing.pth: no checkpoint file"):
        load_checkpoint(str(tmp_path / "missing.pth"), "--resume")


@pytest.mark.parametrize("content", [b"\x8b\x13random", "list", "evil"])
def test_backbone_weights_of_any_kind_are_one_line(data, tmp_path, capsys, content):
    path = tmp_path / "weights.pth"
    if content == "list":
        torch.save([1, 2], path)
    elif content == "evil":
        torch.save(_Evil(), path)
    else:
        path.write_bytes(content)
    argv = f"train --data-path {data} {RUN} --backbone-weights {path} --output-dir {tmp_path / 'r'}"
    assert main(argv.split()) == 2
    assert f"--backbone-weights {path}: " in error_line(capsys)


def test_good_backbone_weights_still_load_through_the_one_loader(data, tmp_path):
    from torchvision.models import resnet18

    body = resnet18(weights=None)
    torch.nn.init.constant_(body.layer1[0].conv1.weight, 0.125)
    path = tmp_path / "r18.pth"
    torch.save(body.state_dict(), path)
    argv = f"train --data-path {data} {RUN} --backbone-weights {path} --norm frozen_bn --output-dir {tmp_path / 'r'}"
    args = build_parser().parse_args(argv.split())
    trainer = trainer_module.Trainer(args)
    try:
        assert torch.all(trainer.model.backbone.body.layer1[0].conv1.weight == 0.125)
    finally:
        trainer.close()


def test_a_teacher_missing_a_tensor_names_the_file_and_the_key(data, finished_run, tmp_path, capsys):
    ckpt = load_checkpoint(os.path.join(finished_run, "checkpoint.pth"))
    ckpt = {"model": ckpt["model"], "detector_spec": ckpt["detector_spec"]}
    del ckpt["model"]["head.classification_head.cls_logits.bias"]
    teacher = str(tmp_path / "teacher.pth")
    save_atomic(ckpt, teacher)
    assert main(f"train --data-path {data} {RUN} --teacher {teacher} --output-dir {tmp_path / 'r'}".split()) == 2
    line = error_line(capsys)
    assert f"--teacher {teacher}: its weights do not match the teacher detector" in line
    assert "missing keys ['head.classification_head.cls_logits.bias']" in line


# -- the teacher's features: the error blames the teacher ------------------------------------------
@pytest.mark.parametrize("value", [1e37, float("nan")])
def test_unusable_teacher_features_blame_the_teacher(data, finished_run, tmp_path, value):
    teacher = os.path.join(finished_run, "checkpoint.pth")
    args = build_parser().parse_args(
        f"train --data-path {data} {RUN} --teacher {teacher} --output-dir {tmp_path / 'r'}".split())
    trainer = trainer_module.Trainer(args)
    try:
        forward = trainer.teacher.backbone.forward
        trainer.teacher.backbone.forward = lambda images: {k: v * value for k, v in forward(images).items()}
        images, targets = zip(*(trainer.train_set[i] for i in range(2)), strict=True)
        with pytest.raises(NonFiniteError, match=rf"iteration 1: the teacher's FPN outputs are .*--teacher {teacher}\)"
                                                 r": the teacher, not the student, is at fault"):  # fmt: skip
            trainer.train_step(list(images), list(targets))
    finally:
        trainer.close()


# -- signals ---------------------------------------------------------------------------------------
def test_ctrl_c_stops_with_a_checkpoint_and_one_line(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_step = trainer_module.Trainer.step  # what the loop runs per iteration

    def step_then_ctrl_c(self, images, targets, **kwargs):
        real_step(self, images, targets, **kwargs)
        if self.iteration == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as the terminal sends it

    monkeypatch.setattr(trainer_module.Trainer, "step", step_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    argv = f"train --data-path {data} {TINY} --iters 3 --no-eval --epoch-checkpoint-every 0 --output-dir {out}"
    assert main(argv.split()) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"icd: error: interrupted (Ctrl-C) at iteration 1; checkpoint written: continue with "
                       f"--resume {out / 'checkpoint.pth'}")  # fmt: skip
    assert load_checkpoint(out / "checkpoint.pth")["iteration"] == 1
    assert signal.getsignal(signal.SIGINT) is handler  # given back
    monkeypatch.undo()
    assert main(f"{argv} --resume {out / 'checkpoint.pth'}".split()) == 0
    assert load_checkpoint(out / "checkpoint.pth")["iteration"] == 3


def test_ctrl_c_stops_a_pretraining_with_a_checkpoint(data, finished_run, tmp_path, capsys, monkeypatch):
    from icd.engine.pretrain import Pretrainer

    real_step = Pretrainer.step

    def step_then_ctrl_c(self, images, targets):
        record = real_step(self, images, targets)
        os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(Pretrainer, "step", step_then_ctrl_c)
    out = tmp_path / "pre"
    argv = (f"pretrain --data-path {data} --teacher {finished_run}/checkpoint.pth --iters 5 --eval-every 5 "
            f"--min-size 64 --max-size 64 --attention-images 1 --workers 0 --device cpu --no-progress "
            f"--output-dir {out}")  # fmt: skip
    assert main(argv.split()) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the notice of the Ctrl-C itself
    assert last == f"icd: error: interrupted (Ctrl-C) at iteration 1; checkpoint written: continue with " \
                   f"--resume {out / 'checkpoint.pth'}"  # the one loop's message, as icd train's
    assert load_checkpoint(out / "checkpoint.pth")["iteration"] == 1


# -- disk limits -----------------------------------------------------------------------------------
def test_a_file_size_limit_while_writing_a_checkpoint_is_one_line_and_keeps_the_old_one(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    save_atomic({"w": torch.ones(4)}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # Python ignores SIGXFSZ: writes fail
    try:
        with pytest.raises(OutputDirError, match=r"checkpoint.pth: could not be written \(File too large\)"):
            save_atomic({"w": torch.ones(1 << 20)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert os.listdir(tmp_path) == ["checkpoint.pth"] and torch.equal(load_checkpoint(path)["w"], torch.ones(4))


# -- the library API: arguments checked where they are given ---------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"loss_weight": float("nan")}, "loss_weight` = nan"), ({"loss_weight": -8.0}, "loss_weight` = -8.0"),
     ({"heads": 0}, "heads` = 0; expected an integer >= 1"), ({"neg_ratio": float("inf")}, "neg_ratio` = inf"),
     ({"max_labels": 2.5}, "max_labels` = 2.5; expected an integer")],  # fmt: skip
)
def test_distiller_arguments_are_checked(kwargs, message):
    with pytest.raises(ArgumentError, match=f"ICDDistiller: `{message}"):
        ICDDistiller(3, 16, 16, heads=kwargs.pop("heads", 2), **kwargs)


@pytest.mark.parametrize("eps", [float("inf"), float("nan"), 0.0, -1.0])
def test_masked_feature_mse_refuses_an_eps_that_is_not_finite_and_positive(eps):
    from icd import ops

    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(ArgumentError, match=f"masked_feature_mse: `eps` = {eps}; expected a finite number > 0"):
        ops.masked_feature_mse(x, x, torch.ones(1, 2, 3), eps=eps)


def test_fcos_takes_a_lone_image_whose_top_level_is_one_pixel():
    spec = DetectorSpec("fcos", "resnet18", num_classes=3, fpn_channels=32, norm="gn", min_size=(64,), max_size=64)
    model = build_detector(spec).eval()
    lone = model([torch.rand(3, 64, 64)])  # P7 is 1x1 with one channel per GroupNorm group
    pair = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)])
    assert len(lone) == 1 and len(pair) == 2
    model.train()
    assert model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[4.0, 4, 30, 30]]),
                                            "labels": torch.tensor([1])}])  # fmt: skip


def test_ids_of_the_wrong_type_with_the_classes_given(tmp_path, caplog):
    """drop_empty_categories / categories= (icd eval of a checkpoint with class names) look at the
    category ids before the annotation checks: a list there is still the checks' one line, not a TypeError."""
    good = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8]}
    image_dir, path = _coco_split(tmp_path, [good, {**good, "id": 3, "category_id": [1]}])
    for kwargs in ({"categories": [1]}, {"drop_empty_categories": True}):
        with pytest.raises(BadDataError, match=r"'category_id' \[1\] is not an integer"):
            CocoDetection(image_dir, path, **kwargs)
        assert CocoDetection(image_dir, path, on_bad_data="skip", **kwargs).num_annotations == 1
