"""A loss that turns NaN or infinite stops training with a message naming the loss, for an ACAM
loss its level, mask statistics and feature magnitudes, and the usual cures; the checkpoints
already written stay intact."""

import hashlib
import os
import re

import pytest
import torch
from torch import nn

from detectron2.engine import HookBase

from acamkd import DistillationTrainer
from acamkd.training.nonfinite import LAZY_CURES, FiniteSimpleTrainer, NonFiniteLossError

from tiny_models import distill_cfg, register_tiny_dataset
from troubleshooting import assert_documented


class _BlowUpTeacherLevel(HookBase):
    """Before iteration ``at``, scale the teacher's p4 output convolution by 1e30 (as a teacher
    checkpoint with broken weights would); remember the checkpoints' bytes at that moment."""

    def __init__(self, at: int, out_dir: str):
        self.at, self.out_dir, self.digests = at, out_dir, {}

    def before_step(self):
        if self.trainer.iter != self.at:
            return
        for f in sorted(os.listdir(self.out_dir)):
            if f.endswith(".pth") or f == "last_checkpoint":
                data = open(os.path.join(self.out_dir, f), "rb").read()
                self.digests[f] = hashlib.sha256(data).hexdigest()
        with torch.no_grad():
            self.trainer.model.teacher.backbone.fpn_output4.weight.mul_(1e30)


def test_non_finite_acam_loss_names_level_statistics_and_cures(tmp_path):
    register_tiny_dataset("nonfinite_train", str(tmp_path / "images"))
    cfg = distill_cfg("RetinaNet", teacher_depth=18, teacher_fpn=32)
    out = str(tmp_path / "out")
    cfg.merge_from_list(
        ["DATASETS.TRAIN", ("nonfinite_train",), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2]
        + ["SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2, "SOLVER.WARMUP_ITERS", 1]
        + ["OUTPUT_DIR", out, "SEED", 1]
    )
    trainer = DistillationTrainer(cfg)
    trainer.resume_or_load(resume=False)
    blow_up = _BlowUpTeacherLevel(3, out)
    trainer.register_hooks([blow_up])
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    message = str(e.value)
    assert isinstance(e.value, FloatingPointError)  # what detectron2 raises, made precise
    assert_documented("nonfinite-acam-loss", message)
    level_lines = [line for line in message.splitlines() if "Distilled level" in line]
    assert len(level_lines) == 1 and "Distilled level p4:" in level_lines[0]
    teacher_max = float(re.search(r"teacher ([0-9.e+]+), student", level_lines[0]).group(1))
    student_max = float(re.search(r"student ([0-9.e+]+)", level_lines[0]).group(1))
    assert teacher_max > 1e20 and student_max < 1e6
    assert "Levels whose distillation losses are finite: p3, p5, p6, p7." in message
    # The checkpoint written before the failure is untouched and nothing was written after it.
    assert blow_up.digests.keys() == {"model_0000001.pth", "last_checkpoint"}
    for f, digest in blow_up.digests.items():
        assert hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() == digest
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["model_0000001.pth"]


class _NaNClassifier(nn.Module):
    """A model whose classification loss is NaN from the second step on."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.steps = 0

    def forward(self, data):
        self.steps += 1
        bad = float("nan") if self.steps > 1 else 1.0
        return {"loss_cls": self.w.sum() * bad, "loss_box_reg": self.w.sum()}


def test_non_finite_task_loss_names_the_loss_and_the_lazy_settings():
    model = _NaNClassifier()
    trainer = FiniteSimpleTrainer(model, [[{}]] * 4, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.cures = LAZY_CURES
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train(0, 4)
    assert_documented("nonfinite-task-loss", str(e.value))
    assert "loss_box_reg" not in str(e.value) and "Distilled level" not in str(e.value)
    assert model.w.item() == pytest.approx(0.8)  # one step (gradient 2), none with the NaN


def test_non_finite_loss_of_a_rival_method_names_its_level():
    from detectron2.utils.events import EventStorage

    from acamkd.training.nonfinite import non_finite_loss_message

    with EventStorage(7) as storage:
        storage.put_scalars(
            **{"acam/p3/loss_cwd": 0.5, "acam/p4/loss_cwd": float("inf")},
            **{"acam/p4/teacher_feature_absmax": 3e30, "acam/p4/student_feature_absmax": 2.0},
        )
        message = non_finite_loss_message({"loss_cwd": float("inf")}, 7, storage)
    level_lines = [line for line in message.splitlines() if "Distilled level" in line]
    assert len(level_lines) == 1 and "Distilled level p4: loss_cwd = inf" in level_lines[0]
    assert "teacher 3e+30" in level_lines[0]
    assert "Levels whose distillation losses are finite: p3." in message
