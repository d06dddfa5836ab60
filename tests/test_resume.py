"""Nothing lost on a crash: atomic checkpoints, resume from the newest readable one, and
train_net.py killed (SIGKILL, a real process) after a checkpoint or while writing one, then
resumed with --resume to MAX_ITER, for a YAML and a LazyConfig distiller."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from detectron2.data import DatasetCatalog

from acamkd.training.checkpoint_files import is_readable_checkpoint
from acamkd.training.checkpointer import DistillationCheckpointer

from tiny_models import REPO, distill_cfg, register_tiny_dataset
from troubleshooting import assert_documented

KILLABLE = os.path.join(REPO, "tests", "killable_train_net.py")
LAZY_DEMO = os.path.join(
    REPO, "configs", "Streets-Detection", "acamkd_retinanet_R_18_from_R_50_streets.py"
)


# ---- the checkpointer, in-process ----


class _Counter:
    """A checkpointable with a state, like the trainer."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def _checkpointer(tmp_path):
    model = nn.Linear(3, 2)
    counter = _Counter()
    return DistillationCheckpointer(model, str(tmp_path), counter=counter), model, counter


def _save_three(tmp_path):
    ckpt, model, counter = _checkpointer(tmp_path)
    weights = {}
    for i, name in enumerate(("model_0000001", "model_0000003", "model_0000005")):
        with torch.no_grad():
            model.weight.fill_(float(i))
        counter.n = i
        ckpt.save(name, iteration=i)
        weights[name] = model.weight.detach().clone()
        time.sleep(0.01)  # distinct modification times
    return weights


def _truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_save_is_atomic_and_leaves_no_partial_file(tmp_path):
    _save_three(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000001.pth",
        "model_0000003.pth",
        "model_0000005.pth",
    ]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000005.pth"
    assert all(is_readable_checkpoint(str(p)) for p in tmp_path.glob("*.pth"))


def test_is_readable_checkpoint(tmp_path):
    _save_three(tmp_path)
    path = str(tmp_path / "model_0000005.pth")
    assert is_readable_checkpoint(path)
    _truncate(path)
    assert not is_readable_checkpoint(path)
    (tmp_path / "empty.pth").write_bytes(b"")
    assert not is_readable_checkpoint(str(tmp_path / "empty.pth"))
    assert not is_readable_checkpoint(str(tmp_path / "missing.pth"))


@pytest.fixture
def warnings_of_checkpoint(log_records):
    """The checkpointer's warnings."""
    return log_records("acamkd.training.checkpointer", logging.WARNING)


def test_resume_skips_a_truncated_last_checkpoint_with_a_warning(tmp_path, warnings_of_checkpoint):
    weights = _save_three(tmp_path)
    _truncate(str(tmp_path / "model_0000005.pth"))
    (tmp_path / "model_0000009.pth.partial").write_bytes(b"half a checkpoint")
    ckpt, model, counter = _checkpointer(tmp_path)
    extra = ckpt.resume_or_load("", resume=True)
    assert extra["iteration"] == 1 and counter.n == 1
    assert torch.equal(model.weight, weights["model_0000003"])
    assert not (tmp_path / "model_0000009.pth.partial").exists()  # removed, and said so
    assert_documented("truncated-checkpoint", "\n".join(warnings_of_checkpoint))


def test_resume_when_last_checkpoint_names_a_missing_file(tmp_path, warnings_of_checkpoint):
    weights = _save_three(tmp_path)
    os.remove(tmp_path / "model_0000005.pth")
    ckpt, model, counter = _checkpointer(tmp_path)
    ckpt.resume_or_load("", resume=True)
    assert counter.n == 1 and torch.equal(model.weight, weights["model_0000003"])
    assert "model_0000005.pth cannot be read (no such file)" in warnings_of_checkpoint[0]


def test_resume_with_no_readable_checkpoint_stops(tmp_path):
    _save_three(tmp_path)
    for p in tmp_path.glob("*.pth"):
        _truncate(str(p))
    ckpt, _, _ = _checkpointer(tmp_path)
    with pytest.raises(RuntimeError) as e:
        ckpt.resume_or_load("", resume=True)
    assert_documented("no-readable-checkpoint", str(e.value))


# ---- train_net.py in a subprocess, killed and resumed ----


def _write_coco_json(root) -> str:
    """The tiny dataset of tiny_models as a COCO json (4 images of 64 x 96, 2 classes)."""
    register_tiny_dataset("resume_tiny_tmp", str(root))
    images, annotations = [], []
    for r in DatasetCatalog.get("resume_tiny_tmp"):
        images.append(
            dict(id=r["image_id"], file_name=os.path.basename(r["file_name"]), height=64, width=96)
        )
        for a in r["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            box = [x0, y0, x1 - x0, y1 - y0]
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=r["image_id"],
                    bbox=box,
                    area=box[2] * box[3],
                    iscrowd=0,
                    category_id=a["category_id"] + 1,
                )
            )
    DatasetCatalog.remove("resume_tiny_tmp")
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    path = os.path.join(str(root), "instances.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    return str(root), _write_coco_json(root)


MAX_ITER = 8  # checkpoints after iterations 1, 3, 5 and 7 (period 2), and model_final


def _yaml_command(tmp_path, coco_data):
    root, json_file = coco_data
    cfg = distill_cfg("RetinaNet", teacher_depth=18, teacher_fpn=32)
    cfg.merge_from_list(
        ["DATASETS.TRAIN", ("resume_train",), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2]
        + ["SOLVER.BASE_LR", 0.01, "SOLVER.STEPS", (5,), "SOLVER.WARMUP_ITERS", 1]
        + ["SOLVER.MAX_ITER", MAX_ITER, "SOLVER.CHECKPOINT_PERIOD", 2, "SEED", 1]
        # Unclipped, this tiny distiller diverges within 8 iterations under the default sum_sq
        # normaliser, whose masked losses start at twice sum's (docs/METHOD.md); the test is
        # about resuming, not the loss scale.
        + ["MODEL.ACAMKD.NORMALIZER", "sum"]
    )
    config = str(tmp_path / "config.yaml")
    with open(config, "w") as f:
        f.write(cfg.dump())
    return [
        "--config-file",
        config,
        "--register-coco",
        "resume_train",
        json_file,
        root,
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    ]


def _lazy_command(tmp_path, coco_data):
    root, json_file = coco_data
    overrides = [
        "dataloader.train.dataset.names=resume_train",
        "dataloader.test.dataset.names=resume_train",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
        "dataloader.train.mapper.augmentations.0.max_size=96",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "dataloader.test.mapper.augmentations.0.max_size=96",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "model.student.num_classes=2",
        "model.teacher.allow_random_init=True",
        "model.teacher.overrides=[MODEL.RESNETS.DEPTH,18,MODEL.RESNETS.RES2_OUT_CHANNELS,64,"
        "MODEL.RESNETS.NORM,GN]",
        "model.acam.num_masks=3",
        f"train.max_iter={MAX_ITER}",
        "train.checkpointer.period=2",
        "train.eval_period=0",
        f"train.output_dir={tmp_path / 'out'}",
    ]
    return ["--config-file", LAZY_DEMO, "--register-coco", "resume_train", json_file, root] + (
        overrides
    )


def _resuming(args):
    """The same command with --resume (before the trailing config overrides)."""
    return args[:2] + ["--resume"] + args[2:]


def _run(args, tmp_path, env=None, pause=False):
    """train_net.py (through the probes) in a subprocess; with ``pause``, SIGKILL it at the
    probe's marker. Returns its log."""
    marker = str(tmp_path / "paused.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", PAUSE_MARKER=marker, **(env or {}))
    log = open(tmp_path / "log.txt", "a")
    proc = subprocess.Popen(
        [sys.executable, KILLABLE] + args, stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
        deadline = time.time() + 600  # a safety net for a machine under heavy load
        while pause and not os.path.exists(marker):
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-4000:]
            assert time.time() < deadline, "the probe never paused"
            time.sleep(0.2)
        if pause:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "log.txt").read_text()
    if pause:
        assert proc.returncode == -signal.SIGKILL
        os.remove(marker)
    else:
        assert proc.returncode == 0, text[-4000:]
    return text


def _assert_state_equal(a, b, where="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_state_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _assert_resumed_from(out, name: str, state_file: str):
    saved = torch.load(os.path.join(out, name), map_location="cpu", weights_only=False)
    resumed = torch.load(state_file, weights_only=False)
    assert resumed["start_iter"] == saved["iteration"] + 1
    state, trainer = dict(resumed["state"]), dict(saved["trainer"])
    # TrainerBase.train sets the iteration to start_iter; the rest is exactly what was saved:
    # the optimizer (momentum buffers, learning rates) and the LR scheduler's state.
    assert state.pop("iteration") == trainer.pop("iteration") + 1
    optimizer = state["optimizer"] if "optimizer" in state else state["_trainer"]["optimizer"]
    assert optimizer["state"] and "LRScheduler" in state["hooks"]  # momentum buffers, schedule
    _assert_state_equal(state, trainer)
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu")
    assert final["iteration"] == MAX_ITER - 1  # and training reached MAX_ITER


def test_yaml_distiller_killed_after_its_second_checkpoint_resumes_there(tmp_path, coco_data):
    args = _yaml_command(tmp_path, coco_data)
    out = str(tmp_path / "out")
    _run(args, tmp_path, env={"PAUSE_AFTER_SAVE": "2"}, pause=True)
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_0000003.pth"
    state_file = str(tmp_path / "resumed.pt")
    log = _run(_resuming(args), tmp_path, env={"RESUME_STATE": state_file})
    assert_documented("killed-between-checkpoints", log)
    assert "Starting training from iteration 4" in log
    _assert_resumed_from(out, "model_0000003.pth", state_file)
    # The learning rate followed the schedule across the kill: SOLVER.STEPS (5,) applied.
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    assert metrics[-1]["iteration"] == MAX_ITER - 1
    assert metrics[-1]["lr"] == pytest.approx(0.001)


def test_yaml_distiller_killed_while_writing_a_checkpoint_resumes_from_the_last_complete(
    tmp_path, coco_data
):
    args = _yaml_command(tmp_path, coco_data)
    out = str(tmp_path / "out")
    _run(args, tmp_path, env={"PAUSE_IN_SAVE": "3"}, pause=True)
    # Killed half-way through model_0000005: only its partial file exists, and
    # last_checkpoint still names the last complete checkpoint.
    assert os.path.exists(os.path.join(out, "model_0000005.pth.partial"))
    assert not os.path.exists(os.path.join(out, "model_0000005.pth"))
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_0000003.pth"
    state_file = str(tmp_path / "resumed.pt")
    log = _run(_resuming(args), tmp_path, env={"RESUME_STATE": state_file})
    assert_documented("killed-while-saving", log)
    _assert_resumed_from(out, "model_0000003.pth", state_file)
    assert not any(f.endswith(".partial") for f in os.listdir(out))


def test_lazy_distiller_killed_with_a_truncated_newest_checkpoint_resumes_from_the_one_before(
    tmp_path, coco_data
):
    args = _lazy_command(tmp_path, coco_data)
    out = str(tmp_path / "out")
    _run(args, tmp_path, env={"PAUSE_AFTER_SAVE": "2"}, pause=True)
    # As if the newest checkpoint had been cut short (a full disk, or written before saving
    # was atomic): resuming skips it, says so, and goes on from the one before.
    _truncate(os.path.join(out, "model_0000003.pth"))
    state_file = str(tmp_path / "resumed.pt")
    log = _run(_resuming(args), tmp_path, env={"RESUME_STATE": state_file})
    assert_documented("truncated-checkpoint", log)
    assert "Starting training from iteration 2" in log
    _assert_resumed_from(out, "model_0000001.pth", state_file)
