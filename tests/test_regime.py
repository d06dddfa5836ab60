"""The paper's regime on the FCOS benchmark: the R-34 -> R-18 pair whose student starts from a
pretrained backbone and inherits every FPN and head tensor of its teacher, and the study's rows
for it."""

import os

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from acamkd import get_acamkd_cfg
from acamkd.data import STREETS_THING_CLASSES
from acamkd.experiments.pretrain import CropClassifier, save_backbone_pkl
from acamkd.experiments.study import VARIANT_SETS, StudySpec, make_stage
from acamkd.training.checkpointer import DistillationCheckpointer

from tiny_models import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

DET = os.path.join(REPO, "configs/Streets-Detection")
PAIR = os.path.join(DET, "acamkd_fcos_R_18_from_fcos_R_34_pretrained_streets.yaml")
TEACHER = os.path.join(DET, "fcos_R_34_FPN_pretrained_streets.yaml")
STUDENT = os.path.join(DET, "fcos_R_18_FPN_pretrained_streets.yaml")
SEG = os.path.join(REPO, "configs/Streets-SemanticSegmentation")
SEG_PAIR = os.path.join(
    SEG, "acamkd_deeplabv3_R_18_OS8_from_deeplabv3_R_34_half_OS8_pretrained_streets.yaml"
)
SEG_TEACHER = os.path.join(SEG, "deeplabv3_R_34_half_OS8_pretrained_streets.yaml")
SEG_STUDENT = os.path.join(SEG, "deeplabv3_R_18_OS8_pretrained_streets.yaml")


def _cfg(path, *opts):
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def test_pair_student_starts_from_its_backbone_and_the_teachers_fpn_and_head(tmp_path):
    torch.manual_seed(0)
    teacher = build_model(_cfg(TEACHER, "MODEL.WEIGHTS", ""))
    DetectionCheckpointer(teacher, str(tmp_path)).save("teacher")
    pretrained = CropClassifier(_cfg(STUDENT, "MODEL.WEIGHTS", ""), len(STREETS_THING_CLASSES) + 1)
    backbone = save_backbone_pkl(pretrained, str(tmp_path / "backbone.pkl"))

    cfg = _cfg(PAIR, "MODEL.WEIGHTS", backbone)
    cfg.merge_from_list(["MODEL.ACAMKD.TEACHER.WEIGHTS", str(tmp_path / "teacher.pth")])
    model = build_model(cfg)
    DistillationCheckpointer(model, str(tmp_path)).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)

    student, saved = model.student.state_dict(), teacher.state_dict()
    for k, v in pretrained.bottom_up.state_dict().items():
        assert torch.equal(student[f"backbone.bottom_up.{k}"], v), k
    # Every FPN and head tensor of the student is the teacher's: none is left out by shape.
    rest = [k for k in saved if not k.startswith(("backbone.bottom_up.", "pixel_"))]
    assert sorted(rest) == sorted(
        k for k in student if not k.startswith(("backbone.bottom_up.", "pixel_"))
    )
    assert any(k.startswith("head.") for k in rest) and any("fpn_lateral" in k for k in rest)
    for k in rest:
        assert torch.equal(student[k], saved[k]), k
    for k, v in model.teacher.state_dict().items():  # and the teacher is its file
        assert torch.equal(v, saved[k]), k
    # Deeper: R-34 has blocks the R-18 student lacks.
    assert "backbone.bottom_up.res4.5.conv1.weight" in saved
    assert "backbone.bottom_up.res4.5.conv1.weight" not in student


def test_segmentation_pair_student_starts_from_its_backbone_and_inherits_nothing(tmp_path):
    torch.manual_seed(0)
    teacher = build_model(_cfg(SEG_TEACHER, "MODEL.WEIGHTS", ""))
    DetectionCheckpointer(teacher, str(tmp_path)).save("teacher")
    pretrained = CropClassifier(_cfg(SEG_STUDENT, "MODEL.WEIGHTS", ""), 6)
    backbone = save_backbone_pkl(pretrained, str(tmp_path / "backbone.pkl"))
    cfg = _cfg(SEG_PAIR, "MODEL.WEIGHTS", backbone)
    cfg.merge_from_list(["MODEL.ACAMKD.TEACHER.WEIGHTS", str(tmp_path / "teacher.pth")])
    model = build_model(cfg)
    fresh_head = {k: v.clone() for k, v in model.student.sem_seg_head.state_dict().items()}
    DistillationCheckpointer(model, str(tmp_path)).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    student = model.student.backbone.state_dict()
    for k, v in pretrained.bottom_up.state_dict().items():
        assert torch.equal(student[k], v), k
    head = model.student.sem_seg_head.state_dict()
    assert all(torch.equal(head[k], v) for k, v in fresh_head.items())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher.state_dict()[k]), k


def test_regime_rows_train_what_their_names_say():
    rows = {v.name: v for v in VARIANT_SETS["regime"]}
    assert list(rows) == [
        "baseline", "inherit_only", "mse", "cwd", "acamkd", "acamkd_teacher_adaptive",
    ]  # fmt: skip
    spec = StudySpec(
        config=PAIR,
        variants=list(rows.values()),
        seeds=[0],
        teacher_weights="/tmp/teacher.pth",
        teacher_config=TEACHER,
        baseline_config=STUDENT,
    )
    baseline = make_stage(spec, rows["baseline"], 0)
    assert baseline.config == STUDENT  # the pretrained student alone, nothing inherited
    cfg = _cfg(PAIR, *make_stage(spec, rows["inherit_only"], 0).opts)
    assert cfg.MODEL.ACAMKD.METHOD == "MSE" and cfg.MODEL.ACAMKD.LOSS_WEIGHT == 0.0
    assert cfg.MODEL.ACAMKD.INHERIT_TEACHER
    assert _cfg(PAIR, *make_stage(spec, rows["cwd"], 0).opts).MODEL.ACAMKD.METHOD == "CWD"
    assert len({make_stage(spec, v, 0).name for v in rows.values()}) == len(rows)


def test_inheritance_row_is_left_out_where_the_student_inherits_nothing():
    from acamkd.experiments.study import applicable_variants

    rows = list(VARIANT_SETS["regime"])
    det = StudySpec(PAIR, rows, [0], "/tmp/t.pth", TEACHER, baseline_config=STUDENT)
    assert [v.name for v in applicable_variants(det)] == [v.name for v in rows]
    seg = StudySpec(SEG_PAIR, rows, [0], "/tmp/t.pth", SEG_TEACHER, baseline_config=SEG_STUDENT)
    assert [v.name for v in applicable_variants(seg)] == [
        v.name for v in rows if v.name != "inherit_only"
    ]
