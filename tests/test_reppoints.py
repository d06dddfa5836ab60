"""RepPoints: the moment transform and both assignments against cases worked by hand, sampling
of the deformable convolution at the points, a training step (losses, gradients of every head
parameter), inference's Instances, a short training run on generated images, distillation
with an R-18 student, inheritance, export, and the YAML/LazyConfig twins."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from acamkd import DistillationCheckpointer, get_acamkd_cfg
from acamkd.modeling.meta_arch.reppoints import (
    RepPoints,
    RepPointsHead,
    point_assignment,
    points_to_boxes,
)
from acamkd.training.export import export_student

from tiny_models import REPO, assert_same_network, batched_inputs, distill_cfg, plain_cfg

LOSSES = {"loss_cls", "loss_pts_init", "loss_pts_refine"}
# The tiny FPNs are 32 (student) and 64 (teacher) wide; so are their point convolutions.
STUDENT_POINTS = ["MODEL.REPPOINTS.POINT_FEAT_CHANNELS", "32"]
TEACHER_POINTS = ["MODEL.REPPOINTS.POINT_FEAT_CHANNELS", "64"]
# Makes any ResNet teacher a plain ResNet-50 (X101 included), to keep the twin builds fast.
TEACHER_R50 = ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.NUM_GROUPS", "1"]
TEACHER_R50 += ["MODEL.RESNETS.WIDTH_PER_GROUP", "64"]


# Tiny models: one thread is as fast, and far faster when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(num_classes: int = 2):
    cfg = plain_cfg("RepPoints", num_classes=num_classes)
    cfg.merge_from_list(STUDENT_POINTS)
    return cfg


def tiny_distill_cfg(**kwargs):
    cfg = distill_cfg("RepPoints", **kwargs)
    cfg.merge_from_list(STUDENT_POINTS)
    cfg.MODEL.ACAMKD.TEACHER.OPTS += TEACHER_POINTS
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


# --- the moment transform ---------------------------------------------------------------------


def test_moment_transform_by_hand():
    # x = 0, 2, 4: mean 2, unbiased std 2; y = 1, 1, 4: mean 2, unbiased std sqrt(3).
    points = torch.tensor([[[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]]])
    r3 = math.sqrt(3)
    expected = torch.tensor([[0.0, 2 - r3, 4.0, 2 + r3]])
    assert torch.allclose(points_to_boxes(points, "moment"), expected, atol=1e-5)
    # The learned scale multiplies the half width by exp(log 2) = 2; the height keeps 1.
    scale = torch.tensor([math.log(2.0), 0.0])
    expected = torch.tensor([[-2.0, 2 - r3, 6.0, 2 + r3]])
    assert torch.allclose(points_to_boxes(points, "moment", scale), expected, atol=1e-5)
    assert torch.equal(points_to_boxes(points, "minmax"), torch.tensor([[0.0, 1.0, 4.0, 4.0]]))
    # partial_minmax looks at the first 4 points only.
    five = torch.tensor([[[0.0, 1.0], [2.0, 1.0], [4.0, 4.0], [1.0, 0.0], [50.0, 50.0]]])
    assert torch.equal(
        points_to_boxes(five, "partial_minmax"), torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    )
    # A set whose points coincide is a point with finite gradients.
    same = torch.ones(1, 9, 2, requires_grad=True)
    box = points_to_boxes(same, "moment")
    box.sum().backward()
    assert torch.allclose(box, torch.ones(1, 4), atol=1e-5) and torch.isfinite(same.grad).all()
    with pytest.raises(ValueError, match="Unknown point set transform"):
        points_to_boxes(points, "corners")


def test_moment_scale_is_learned_at_moment_mul_of_its_gradient():
    head = RepPointsHead(
        input_shape=[ShapeSpec(channels=8)],
        num_classes=1,
        conv_dims=[],
        point_feat_channels=8,
        moment_mul=0.01,
    )
    with torch.no_grad():
        head.moment_transfer.copy_(torch.tensor([0.3, -0.2]))
    points = torch.randn(5, 9, 2, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    (head.boxes(points) * weights).sum().backward()
    scale = head.moment_transfer.detach().clone().requires_grad_(True)
    boxes = points_to_boxes(points, "moment", scale)
    (boxes * weights).sum().backward()
    assert torch.allclose(head.boxes(points), boxes)
    assert torch.allclose(head.moment_transfer.grad, 0.01 * scale.grad)


# --- the two assignments ----------------------------------------------------------------------

# Level 3 (stride 8): (0, 0), (8, 0), (16, 0), (24, 0); level 4 (stride 16): (0, 0), (16, 0),
# (32, 0).
POINTS = torch.tensor([[0, 0], [8, 0], [16, 0], [24, 0], [0, 0], [16, 0], [32, 0]]).float()
LEVELS = torch.tensor([3, 3, 3, 3, 4, 4, 4])
# 32 x 32 centred at (19, 0): level log2(32 / 4) = 3, nearest (16, 0) (3/32), then (24, 0).
BOX_A = [3.0, -16.0, 35.0, 16.0]
# 64 x 64 centred at (32, 0): level 4, (32, 0) itself.
BOX_B = [0.0, -32.0, 64.0, 32.0]
# 4 x 4 centred at (8, 0): level log2(1) = 0, clamped to 3: (8, 0).
BOX_C = [6.0, -2.0, 10.0, 2.0]
# 8 x 8 centred at (16, 0): level 3, (16, 0) at distance 0, closer than for BOX_A.
BOX_D = [12.0, -4.0, 20.0, 4.0]


def test_point_assignment_by_hand():
    gt = torch.tensor([BOX_A, BOX_B, BOX_C])
    assert point_assignment(POINTS, LEVELS, gt).tolist() == [-1, 2, 0, -1, -1, -1, 1]
    # Two per ground truth: BOX_A also takes (24, 0); BOX_B the next of level 4, (16, 0).
    two = point_assignment(POINTS, LEVELS, gt, pos_num=2).tolist()
    assert two == [-1, 2, 0, 0, -1, 1, 1]
    # A huge box goes to the coarsest level (log2(500 / 4) = 6, clamped to 4).
    huge = torch.tensor([[-200.0, -200.0, 300.0, 300.0]])
    assert point_assignment(POINTS, LEVELS, huge).tolist() == [-1, -1, -1, -1, -1, -1, 0]
    # The scale moves the level: with scale 8, BOX_B (64 px) belongs to level 3.
    assert point_assignment(POINTS, LEVELS, gt[1:2], scale=8).tolist()[:4] == [-1, -1, -1, 0]
    assert point_assignment(POINTS, LEVELS, torch.zeros(0, 4)).tolist() == [-1] * 7


def test_point_assignment_conflict_keeps_the_closest_in_either_order():
    # (16, 0) is BOX_A's nearest (3/32) and BOX_D's (0): BOX_D keeps it, BOX_A gets none.
    gt = torch.tensor([BOX_A, BOX_D])
    assert point_assignment(POINTS, LEVELS, gt).tolist() == [-1, -1, 1, -1, -1, -1, -1]
    gt = torch.tensor([BOX_D, BOX_A])
    assert point_assignment(POINTS, LEVELS, gt).tolist() == [-1, -1, 0, -1, -1, -1, -1]


def test_refined_stage_max_iou_assignment_by_hand(model):
    # Initial boxes against gt 0 = [0, 0, 10, 10] (class 1), gt 1 = [100, 100, 110, 110]
    # (class 0) and gt 2 = [200, 200, 210, 210] (class 1), which no box overlaps.
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1 with gt 0: positive
            [0.0, 0.0, 10.0, 8.0],  # IoU 0.8: positive
            [0.0, 0.0, 10.0, 4.5],  # IoU 0.45, in [0.4, 0.5): ignored
            [0.0, 0.0, 10.0, 2.0],  # IoU 0.2: background
            [50.0, 50.0, 60.0, 60.0],  # overlaps nothing: background, never gt 2's "best"
            [100.0, 100.0, 110.0, 103.0],  # IoU 0.3, gt 1's best box: positive (low quality)
        ]
    )
    inst = Instances((256, 256))
    inst.gt_boxes = Boxes(
        torch.tensor([[0.0, 0, 10, 10], [100, 100, 110, 110], [200, 200, 210, 210]])
    )
    inst.gt_classes = torch.tensor([1, 0, 1])
    centers = torch.zeros(6, 2)
    strides = torch.full((6,), 8.0)
    _, _, classes, gt_boxes = model.label_points(centers, strides, boxes[None], [inst])
    background = model.num_classes
    assert classes[0].tolist() == [1, 1, -1, background, background, 0]
    assert torch.equal(gt_boxes[0, [0, 1]], inst.gt_boxes.tensor[[0, 0]])
    assert torch.equal(gt_boxes[0, 5], inst.gt_boxes.tensor[1])
    # An image without ground truth: every location is background in both stages.
    empty = Instances((256, 256), gt_boxes=Boxes(torch.zeros(0, 4)))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    init_idxs, _, classes, _ = model.label_points(centers, strides, boxes[None], [empty])
    assert (init_idxs == -1).all() and (classes == background).all()


# --- the head ---------------------------------------------------------------------------------


def test_deformable_convolution_samples_at_the_points(model):
    """Points on the 3x3 grid stretched 2x horizontally: the deformable convolution must equal a
    convolution dilated (1, 2), which checks the (dy, dx) layout and the grid subtraction."""
    head = model.head
    x = torch.randn(1, 32, 6, 9, generator=torch.Generator().manual_seed(0))
    grid = head.kernel_grid.view(9, 2)  # (dy, dx) per kernel position
    points = (grid * torch.tensor([1.0, 2.0])).reshape(1, 18, 1, 1).expand(1, 18, 6, 9)
    with torch.no_grad():
        sampled = head.cls_dcn(x, points - head.kernel_grid)
        dilated = F.conv2d(x, head.cls_dcn.weight, padding=(1, 2), dilation=(1, 2))
    assert torch.allclose(sampled, dilated, atol=1e-5)


def test_offsets_become_image_points(model):
    # Point 0 at (dy, dx) = (1, 3) strides from the location (x, y) = (8, 16), stride 8.
    offsets = torch.zeros(1, 18)
    offsets[0, :2] = torch.tensor([1.0, 3.0])
    points = model.offsets_to_points(offsets, torch.tensor([[8.0, 16.0]]), torch.tensor([8.0]))
    assert points.shape == (1, 9, 2)
    assert points[0, 0].tolist() == [32.0, 24.0] and points[0, 1].tolist() == [8.0, 16.0]


def test_num_points_must_be_an_odd_square():
    cfg = tiny_cfg()
    cfg.MODEL.REPPOINTS.NUM_POINTS = 4
    with pytest.raises(ValueError, match="square of an odd number"):
        build_model(cfg)


# --- training and inference -------------------------------------------------------------------


def test_training_step_losses_and_gradients(model):
    model.train()
    model.zero_grad(set_to_none=True)
    with EventStorage() as storage:
        losses = model(batched_inputs())
        sum(losses.values()).backward()
    assert set(losses) == LOSSES
    assert all(v.dim() == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    logged = storage.latest()
    assert logged["num_pos_init"][0] > 0 and logged["num_pos_refine"][0] > 0
    for name, p in model.head.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.head.moment_transfer.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_inference_returns_detectron2_instances(model):
    model.eval()
    model.test_score_thresh = 0.0  # keep every (random) detection
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batched_inputs()]
    inputs[1].update(height=128, width=192)  # detectron2 rescales to the requested size
    try:
        with torch.no_grad():
            outputs = model(inputs)
    finally:
        model.test_score_thresh = 0.05
    assert len(outputs) == 2
    for out, size in zip(outputs, [(64, 96), (128, 192)]):
        assert set(out) == {"instances"}
        inst = out["instances"]
        assert isinstance(inst, Instances) and inst.image_size == size
        assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
        assert isinstance(inst.pred_boxes, Boxes)
        assert 0 < len(inst) <= model.max_detections_per_image
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < model.num_classes)).all()
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= size[1]).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= size[0]).all()


def _generated_images(num_images: int = 4):
    """Noise with a red and a green rectangle per image, at positions that vary."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(num_images):
        image = rng.integers(0, 256, (3, 64, 96), dtype=np.uint8)
        x0, y0 = 4 + 6 * i, 6 + 2 * i
        boxes = [[x0, y0, x0 + 30, y0 + 32], [x0 + 40, 10, x0 + 70, 50]]
        image[:, y0 : y0 + 32, x0 : x0 + 30] = np.array([0, 0, 255])[:, None, None]
        image[:, 10:50, x0 + 40 : x0 + 70] = np.array([0, 255, 0])[:, None, None]
        inst = Instances((64, 96))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.tensor([0, 1])
        out.append({"image": torch.from_numpy(image), "instances": inst, "height": 64, "width": 96})
    return out


def test_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    net = build_model(tiny_cfg())
    net.train()
    data = _generated_images()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)

    def total_loss():
        with torch.no_grad(), EventStorage():
            return float(sum(net(data).values()))

    before = total_loss()
    with EventStorage() as storage:
        for step in range(20):
            storage.iter = step
            batch = [data[(2 * step) % 4], data[(2 * step + 1) % 4]]
            loss = sum(net(batch).values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            optimizer.step()
    after = total_loss()
    assert math.isfinite(after) and after < 0.7 * before, (before, after)


# --- distillation -----------------------------------------------------------------------------


def test_distillation_step_with_r18_student_and_r50_teacher():
    torch.manual_seed(0)
    model = build_model(tiny_distill_cfg())
    assert (
        type(model.student).__name__ == "RepPoints" and type(model.teacher).__name__ == "RepPoints"
    )
    assert list(model.acam.keys()) == ["p3", "p4", "p5", "p6", "p7"]
    model.train()
    with EventStorage() as storage:
        losses = model(batched_inputs())
        sum(losses.values()).backward()
    assert LOSSES <= set(losses)
    acam_losses = set(losses) - LOSSES
    assert acam_losses and all(k.startswith("loss_acam_") for k in acam_losses)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert any(k.startswith("acam/p3/") for k in storage.latest())
    assert all(p.grad is not None for p in model.acam.parameters())
    for name, p in model.student.head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    # Eval: exactly the student's outputs.
    model.eval()
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batched_inputs()]
    with torch.no_grad():
        ours, theirs = model(inputs), model.student(inputs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)


def test_inheritance_copies_the_teachers_neck_and_head():
    cfg = tiny_distill_cfg(teacher_fpn=32, extra=["MODEL.ACAMKD.INHERIT_TEACHER", "True"])
    cfg.MODEL.ACAMKD.TEACHER.OPTS += STUDENT_POINTS
    model = build_model(cfg)
    DistillationCheckpointer(model).load("")  # the teacher's weights (random here), then this
    t, s = model.teacher.state_dict(), model.student.state_dict()
    head = [k for k in t if k.startswith("head.")]
    assert "head.moment_transfer" in head and "head.cls_dcn.weight" in head
    for k in head + ["backbone.fpn_output3.weight", "backbone.top_block.p7.weight"]:
        assert torch.equal(s[k], t[k]), k
    # C5 widths differ (R-50 vs R-18): P6 and the laterals stay the student's.
    assert s["backbone.top_block.p6.weight"].shape != t["backbone.top_block.p6.weight"].shape
    stem = "backbone.bottom_up.stem.conv1.weight"
    assert not torch.equal(s[stem], t[stem])


def test_export_gives_a_student_that_loads_with_acamkd(tmp_path):
    cfg = tiny_distill_cfg(extra=["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"])
    model = build_model(cfg)
    DistillationCheckpointer(model, save_dir=str(tmp_path)).save("distilled")
    weights, config = export_student(cfg, str(tmp_path / "distilled.pth"), str(tmp_path / "out"))

    scfg = get_acamkd_cfg()
    scfg.merge_from_file(config)
    assert scfg.MODEL.META_ARCHITECTURE == "RepPoints" and "ACAMKD" not in open(config).read()
    student = build_model(scfg)
    saved = torch.load(weights, weights_only=False)["model"]
    assert set(saved) == set(student.state_dict())
    DetectionCheckpointer(student).load(scfg.MODEL.WEIGHTS)
    for k, v in model.student.state_dict().items():
        assert torch.equal(student.state_dict()[k], v), k
    model.eval()
    student.eval()
    # Two images: GroupNorm of 32 groups on a 32-wide 1x1 P7 needs more than one value.
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batched_inputs(2)]
    with torch.no_grad():
        ours, theirs = model(inputs)[0]["instances"], student(inputs)[0]["instances"]
    assert len(ours) > 0
    assert torch.equal(ours.pred_boxes.tensor, theirs.pred_boxes.tensor)
    assert torch.equal(ours.scores, theirs.scores)


# --- configs ----------------------------------------------------------------------------------


def _layout(model):
    params = {k: (tuple(v.shape), v.requires_grad) for k, v in model.named_parameters()}
    buffers = {k: tuple(v.shape) for k, v in model.named_buffers()}
    return params, buffers, [type(m).__name__ for m in model.modules()]


def _yaml_model(name: str, teacher_opts=()):
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", name + ".yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    if cfg.MODEL.META_ARCHITECTURE == "ACAMDistiller":
        cfg.MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT = True
        cfg.MODEL.ACAMKD.TEACHER.OPTS = list(teacher_opts)
    return build_model(cfg), cfg


@pytest.mark.parametrize(
    "name",
    ["COCO-Detection/reppoints_R_50_FPN_2x", "Streets-Detection/reppoints_R_18_FPN_streets"],
)
def test_yaml_and_lazy_twins_build_the_same_detector(name):
    from_yaml, cfg = _yaml_model(name)
    lcfg = LazyConfig.load(os.path.join(REPO, "configs", name + ".py"))
    from_lazy = instantiate(lcfg.model)
    assert isinstance(from_yaml, RepPoints) and isinstance(from_lazy, RepPoints)
    assert _layout(from_yaml) == _layout(from_lazy)
    for attr in ("num_classes", "point_base_scale", "smooth_l1_beta", "test_nms_thresh"):
        assert getattr(from_yaml, attr) == getattr(from_lazy, attr), attr
    assert from_yaml.head.transform == from_lazy.head.transform == "moment"
    assert from_yaml.refine_matcher.thresholds == from_lazy.refine_matcher.thresholds
    # The R101 twin differs from R50 only in depth.
    if name.startswith("COCO"):
        lcfg101 = LazyConfig.load(
            os.path.join(REPO, "configs", "COCO-Detection/reppoints_R_101_FPN_2x.py")
        )
        assert lcfg101.model.backbone.bottom_up.stages.depth == 101
        assert lcfg101.train.init_checkpoint.endswith("R-101.pkl")


def test_yaml_and_lazy_distillation_twins_build_the_same_model():
    name = "COCO-Detection/acamkd_reppoints_R_50_from_R_101_FPN_2x"
    from_yaml, cfg = _yaml_model(name, TEACHER_R50)
    assert cfg.MODEL.ACAMKD.STUDENT_META_ARCHITECTURE == "RepPoints"
    lcfg = LazyConfig.load(os.path.join(REPO, "configs", name + ".py"))
    lcfg.model.teacher.allow_random_init = True
    lcfg.model.teacher.overrides = list(TEACHER_R50)
    assert_same_network(from_yaml, instantiate(lcfg.model))
    x101 = LazyConfig.load(
        os.path.join(
            REPO, "configs", "COCO-Detection/acamkd_reppoints_R_50_from_X_101_32x8d_FPN_2x.py"
        )
    )
    assert x101.model.teacher.config.endswith("reppoints_X_101_32x8d_FPN_2x.yaml")
