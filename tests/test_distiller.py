"""The distillation meta-architecture: training step, frozen teacher, eval contract, errors."""

import copy
import types

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from acamkd import DistillationCheckpointer
from acamkd.modeling import ACAMOutput, DistillOutput
from acamkd.modeling.meta_arch.distiller import _check_levels
from acamkd.modeling.teacher import build_frozen_teacher, resolve_config_file

from tiny_models import batched_inputs, distill_cfg

ARCHS = ["RetinaNet", "GeneralizedRCNN", "FCOS"]
ACAM_KEYS = {"loss_acam_channel", "loss_acam_spatial", "loss_acam_diversity"}


@pytest.fixture(scope="module", params=ARCHS)
def distiller(request):
    torch.manual_seed(0)
    model = build_model(distill_cfg(request.param))
    return request.param, model


def test_training_step_returns_student_and_acam_losses(distiller):
    arch, model = distiller
    model.train()
    student_keys = {
        "RetinaNet": {"loss_cls", "loss_box_reg"},
        "FCOS": {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"},
        "GeneralizedRCNN": {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"},
    }[arch]
    with EventStorage() as storage:
        losses = model(batched_inputs())
        total = sum(losses.values())
        total.backward()
    assert set(losses) == student_keys | ACAM_KEYS
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert losses["loss_acam_channel"] > 0 and losses["loss_acam_spatial"] > 0
    # Teacher deeper and wider than the student: aligned per level.
    expected_levels = ["p2", "p3", "p4", "p5", "p6"] if arch == "GeneralizedRCNN" else None
    expected_levels = expected_levels or ["p3", "p4", "p5", "p6", "p7"]
    assert list(model.acam.keys()) == expected_levels
    assert model.acam["p3"].align.weight.shape[:2] == (64, 32)
    # Mask statistics go to the event storage, per level, never into the loss dict.
    logged = storage.latest()
    for level in expected_levels:
        assert f"acam/{level}/spatial_mask_coverage" in logged
        assert f"acam/{level}/loss_acam_spatial" in logged
    # Gradients: every ACAM parameter and the student; never the teacher.
    assert all(p.grad is not None for p in model.acam.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    model.zero_grad(set_to_none=True)


def test_distill_returns_the_students_output_and_each_levels_acam_output(distiller):
    arch, model = distiller
    model.train()
    inputs = batched_inputs()
    with EventStorage():
        torch.manual_seed(1)
        out = model.distill(inputs)
        torch.manual_seed(1)
        losses = model(inputs)
    assert isinstance(out, DistillOutput) and set(out.levels) == set(model.acam)
    assert all(isinstance(x, ACAMOutput) and x.masks is None for x in out.levels.values())
    # forward's losses are the student's plus each ACAM term summed over the levels (the
    # student's own values differ between the calls: RetinaNet's loss normaliser is a running
    # average, so they are compared within one output).
    total = out.total_losses()
    assert set(losses) == set(total) == set(out.student) | ACAM_KEYS
    for name in ACAM_KEYS:
        expected = sum(level.losses[name] for level in out.levels.values())
        torch.testing.assert_close(losses[name], expected)
        torch.testing.assert_close(total[name], expected)
    assert all(torch.equal(total[name], value) for name, value in out.student.items())
    # In eval the student's slot holds its predictions, and masks come back when asked for.
    model.eval()
    plain = [{k: v for k, v in x.items() if k != "instances"} for x in inputs]
    with torch.no_grad():
        evaluated = model.distill(plain, return_masks=True)
    assert len(evaluated.student) == len(plain) and "instances" in evaluated.student[0]
    assert all(level.masks is not None for level in evaluated.levels.values())


def test_teacher_stays_in_eval_mode(distiller):
    _, model = distiller
    model.train()
    assert model.student.training and model.acam.training
    assert not any(m.training for m in model.teacher.modules())


def test_eval_returns_the_students_outputs(distiller):
    _, model = distiller
    model.eval()
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batched_inputs()]
    with torch.no_grad():
        ours = model(inputs)
        theirs = model.student(inputs)
    assert len(ours) == len(inputs)
    for a, b in zip(ours, theirs):
        assert set(a) == {"instances"}
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        assert torch.equal(a["instances"].scores, b["instances"].scores)


def test_teacher_sees_its_own_normalisation_and_format():
    cfg = distill_cfg("RetinaNet")
    cfg.MODEL.ACAMKD.TEACHER.OPTS += ["INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN", [1.0, 2.0, 3.0]]
    model = build_model(cfg)
    assert model.teacher_input_format == "RGB" and model.student_input_format == "BGR"
    inputs = batched_inputs(1)
    images = model._teacher_images(inputs, (64, 96))
    bgr = inputs[0]["image"].float()
    expected = (bgr.flip(0) - torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)) / model.teacher.pixel_std
    assert torch.allclose(images[0], expected)


def test_inheritance_copies_matching_fpn_and_head_weights():
    cfg = distill_cfg(
        "RetinaNet", teacher_fpn=16, student_fpn=16, extra=["MODEL.ACAMKD.INHERIT_TEACHER", "True"]
    )
    model = build_model(cfg)
    DistillationCheckpointer(model).load("")  # the teacher's weights (random here), then this
    t, s = model.teacher.state_dict(), model.student.state_dict()
    # Same FPN width: the output convs and the head match; laterals see different C3 widths.
    assert torch.equal(s["backbone.fpn_output3.weight"], t["backbone.fpn_output3.weight"])
    assert torch.equal(s["head.cls_score.weight"], t["head.cls_score.weight"])
    assert s["backbone.fpn_lateral3.weight"].shape != t["backbone.fpn_lateral3.weight"].shape
    stem = "backbone.bottom_up.stem.conv1.weight"  # the bottom-up network stays the student's
    assert s[stem].shape == t[stem].shape and not torch.equal(s[stem], t[stem])


def test_empty_teacher_weights_are_refused():
    cfg = distill_cfg("RetinaNet", extra=["MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT", "False"])
    model = build_model(cfg)  # building reads no weights; the checkpointer refuses
    with pytest.raises(ValueError, match="MODEL.ACAMKD.TEACHER.WEIGHTS is empty"):
        DistillationCheckpointer(model).resume_or_load("", resume=False)


def test_unreadable_teacher_weights_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.pkl")
    cfg = distill_cfg("RetinaNet", extra=["MODEL.ACAMKD.TEACHER.WEIGHTS", missing])
    model = build_model(cfg)
    with pytest.raises(RuntimeError, match="nope.pkl.*MODEL.ACAMKD.TEACHER.WEIGHTS"):
        DistillationCheckpointer(model).resume_or_load("", resume=False)


def test_unknown_teacher_config_is_explained():
    with pytest.raises(FileNotFoundError, match="neither a file"):
        resolve_config_file("COCO-Detection/no_such_model.yaml")
    assert resolve_config_file("COCO-Detection/retinanet_R_101_FPN_3x.yaml").endswith(".yaml")


def test_level_missing_from_teacher_is_explained():
    cfg = distill_cfg("RetinaNet", extra=["MODEL.ACAMKD.IN_FEATURES", ["p2", "p3"]])
    with pytest.raises(ValueError, match="'p2'.*not an output of the teacher"):
        build_model(cfg)


def test_stride_mismatch_is_explained():
    def fake(strides):
        shapes = {k: ShapeSpec(channels=8, stride=s) for k, s in strides.items()}
        backbone = types.SimpleNamespace(output_shape=lambda: shapes)
        return types.SimpleNamespace(backbone=backbone)

    with pytest.raises(ValueError, match="'p3' has stride 16 in the teacher and 8"):
        _check_levels(fake({"p3": 8}), fake({"p3": 16}), ["p3"], "fpn")


def test_grid_mismatch_is_explained():
    model = build_model(distill_cfg("RetinaNet"))
    model.teacher.backbone._size_divisibility = 64  # the student pads 64x96 images to 64x96
    model.train()
    with EventStorage(), pytest.raises(ValueError, match="size_divisibility is 64"):
        model(batched_inputs())


def test_student_and_teacher_weights_load_separately(tmp_path):
    """MODEL.WEIGHTS reaches the student only, even though its keys also match the teacher."""
    model = build_model(distill_cfg("RetinaNet", teacher_depth=18, teacher_fpn=16))
    plain = copy.deepcopy(model.student)
    for p in plain.parameters():
        torch.nn.init.constant_(p, 0.5)
    path = str(tmp_path / "student.pth")
    torch.save({"model": plain.state_dict()}, path)
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    DistillationCheckpointer(model).load(path)
    for k, v in plain.state_dict().items():
        assert torch.equal(model.student.state_dict()[k], v), k
    for k, v in teacher_before.items():
        assert torch.equal(model.teacher.state_dict()[k], v), k


def test_build_frozen_teacher_has_no_trainable_parameters():
    cfg = distill_cfg("RetinaNet")
    from acamkd.modeling.teacher import build_teacher_cfg

    teacher = build_frozen_teacher(build_teacher_cfg(cfg))
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training
