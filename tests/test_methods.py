"""
The distillation methods behind MODEL.ACAMKD.METHOD: plain MSE, MGD, CWD and PKD against
float64 references written from their papers' formulas, their authors' settings per family,
and one distiller training step per detector family and on the segmentation leg.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from acamkd.config import get_acamkd_cfg
from acamkd.lazy import build_acam_levels
from acamkd.modeling.methods import (
    CWD,
    DISTILL_METHOD_REGISTRY,
    MGD,
    PKD,
    FeatureMSE,
    LevelOutput,
    build_distill_method,
)
from acamkd.modeling.methods.common import AlignedFeatureLoss

from test_seg_distill import _batch as seg_batch
from test_seg_distill import _pair_cfg as seg_pair_cfg
from tiny_models import batched_inputs, distill_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_KEY = {"MSE": "loss_mse", "MGD": "loss_mgd", "CWD": "loss_cwd", "PKD": "loss_pkd"}
LOSS_KEY.update({"FGD": "loss_fgd_fg", "MasKD": "loss_maskd"})


def _features(b=2, c=5, h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    student = torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * 1.5 + 0.3
    return teacher, student.requires_grad_(True)


# ---- references, from the formulas (explicit loops, float64) ----


def _ref_cwd(t, s, tau, w):
    b, c = t.shape[:2]
    total = 0.0
    for n in range(b):
        for k in range(c):
            zt = [float(v) / tau for v in t[n, k].flatten()]
            zs = [float(v) / tau for v in s[n, k].flatten()]
            norm_t = sum(math.exp(v) for v in zt)
            norm_s = sum(math.exp(v) for v in zs)
            for a, d in zip(zt, zs):
                p_t = math.exp(a) / norm_t
                p_s = math.exp(d) / norm_s
                total += p_t * (math.log(p_t) - math.log(p_s))
    return w * tau**2 * total / (b * c)


def _ref_pkd(t, s, w):
    b, c, h, wd = t.shape

    def standardized(x):
        out = torch.empty_like(x)
        for k in range(c):
            values = [float(v) for v in x[:, k].flatten()]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            out[:, k] = (x[:, k] - mean) / (std + 1e-6)
        return out

    zs, zt = standardized(s.detach()), standardized(t)
    total = sum(float(v) ** 2 for v in (zs - zt).flatten())
    return w * total / (b * c * h * wd) / 2


def test_mse_matches_its_formula():
    t, s = _features()
    method = FeatureMSE(teacher_channels=5, student_channels=5, align="when_needed").double()
    loss = method(t, s).losses["loss_mse"]
    b, c, h, w = t.shape
    s = s.detach()
    ref = sum(float(((t[n] - s[n]) ** 2).sum()) / (c * h * w) for n in range(b)) / b
    assert float(loss) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("tau,w", [(1.0, 5.0), (4.0, 3.0)])
def test_cwd_matches_its_formula(tau, w):
    t, s = _features()
    method = CWD(teacher_channels=5, student_channels=5, tau=tau, weight=w).double()
    loss = method(t, s).losses["loss_cwd"]
    assert float(loss) == pytest.approx(_ref_cwd(t, s.detach(), tau, w), rel=1e-10)
    assert float(method(t, t.clone()).losses["loss_cwd"]) == pytest.approx(0.0, abs=1e-12)


def test_pkd_matches_its_formula_and_ignores_a_channels_scale_and_shift():
    t, s = _features()
    method = PKD(teacher_channels=5, student_channels=5, weight=10.0).double()
    loss = method(t, s).losses["loss_pkd"]
    assert float(loss) == pytest.approx(_ref_pkd(t, s, 10.0), rel=1e-9)
    scale = torch.rand(1, 5, 1, 1, dtype=torch.float64) + 0.5
    shift = torch.randn(1, 5, 1, 1, dtype=torch.float64)
    moved = method(t, s.detach() * scale + shift).losses["loss_pkd"]
    assert float(moved) == pytest.approx(float(loss), rel=1e-6)


def test_mgd_matches_its_formula_with_the_same_random_mask():
    t, s = _features(c=4, h=5, w=7)
    method = MGD(teacher_channels=4, student_channels=4, alpha=2e-5, mask_ratio=0.65).double()
    torch.manual_seed(3)
    loss = method(t, s).losses["loss_mgd"]
    # The authors' draw: uniform per image and position, dropped where it exceeds 1 - ratio.
    torch.manual_seed(3)
    draw = torch.rand(2, 1, 5, 7)
    keep = torch.where(draw > 1 - 0.65, 0.0, 1.0).double()
    conv1, conv2 = method.generation[0], method.generation[2]
    hidden = F.relu(F.conv2d(s.detach() * keep, conv1.weight, conv1.bias, padding=1))
    generated = F.conv2d(hidden, conv2.weight, conv2.bias, padding=1)
    ref = 2e-5 * float(((generated - t) ** 2).sum()) / 2
    assert float(loss) == pytest.approx(ref, rel=1e-10)
    dropped = 1 - float(keep.mean())
    assert 0.3 < dropped < 0.95  # about 0.65 of 70 positions


@pytest.mark.parametrize("cls", [FeatureMSE, MGD, CWD, PKD])
def test_student_gets_gradient_teacher_does_not_and_widths_align(cls):
    teacher = torch.randn(2, 8, 4, 4, requires_grad=True)
    student = torch.randn(2, 4, 4, 4, requires_grad=True)
    method = cls(teacher_channels=8, student_channels=4)
    assert isinstance(method.align, nn.Conv2d) and method.align.weight.shape[:2] == (8, 4)
    out = method(teacher, student, return_masks=True)
    assert isinstance(out, LevelOutput)
    (loss,) = out.losses.values()
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert out.masks["discrepancy"].shape == (2, 4, 4)


@pytest.mark.parametrize("cls", [MGD, CWD, PKD])
def test_rivals_align_only_where_widths_differ(cls):
    assert isinstance(cls(teacher_channels=8, student_channels=8).align, nn.Identity)


def _cfg(method: str, family: str, extra=()):
    cfg = get_acamkd_cfg()
    cfg.merge_from_list(
        ["MODEL.ACAMKD.METHOD", method, "MODEL.ACAMKD.STUDENT_META_ARCHITECTURE", family]
        + list(extra)
    )
    return cfg


@pytest.mark.parametrize(
    "method,family,attrs",
    [
        ("MGD", "RetinaNet", {"alpha": 2e-5, "mask_ratio": 0.65}),
        ("MGD", "GeneralizedRCNN", {"alpha": 5e-7, "mask_ratio": 0.45}),
        ("MGD", "SemanticSegmentor", {"alpha": 2e-5, "mask_ratio": 0.75}),
        ("CWD", "FCOS", {"tau": 1.0, "weight": 5.0}),
        ("CWD", "SemanticSegmentor", {"tau": 4.0, "weight": 3.0}),
        ("PKD", "GeneralizedRCNN", {"weight": 6.0}),
        ("PKD", "RepPoints", {"weight": 10.0}),
    ],
)
def test_authors_settings_per_family(method, family, attrs):
    module = build_distill_method(_cfg(method, family), teacher_channels=8, student_channels=8)
    assert {k: getattr(module, k) for k in attrs} == attrs


def test_an_explicit_key_overrides_the_authors_setting():
    cfg = _cfg("CWD", "RetinaNet", ["MODEL.ACAMKD.CWD.TAU", "2.0"])
    module = build_distill_method(cfg, teacher_channels=8, student_channels=8)
    assert (module.tau, module.weight) == (2.0, 5.0)


def test_unknown_method_and_family_are_explained():
    with pytest.raises(ValueError, match=r"METHOD='KDX'.*\['ACAMKD', .*'CWD'"):
        build_distill_method(_cfg("KDX", "RetinaNet"), teacher_channels=8, student_channels=8)
    with pytest.raises(ValueError, match=r"MODEL.ACAMKD.PKD.WEIGHT is not set.*PanopticFPN"):
        build_distill_method(_cfg("PKD", "PanopticFPN"), teacher_channels=8, student_channels=8)
    cfg = _cfg("MSE", "RetinaNet")
    cfg.MODEL.ACAMKD.ALIGN = "sometimes"
    with pytest.raises(ValueError, match=r"MODEL.ACAMKD.ALIGN must be one of .*'when_needed'"):
        build_distill_method(cfg, teacher_channels=8, student_channels=8)


class _UserL1(AlignedFeatureLoss):
    """A user's method: L1 between the features."""

    def __init__(self, cfg=None, *, teacher_channels, student_channels):
        super().__init__(teacher_channels, student_channels, align_always=False)

    def level_losses(self, teacher, aligned):
        return {"loss_user_l1": (teacher - aligned).abs().mean()}, {}


def test_a_users_method_registers_without_editing_the_distiller():
    if "UserL1ForTests" not in DISTILL_METHOD_REGISTRY:
        DISTILL_METHOD_REGISTRY.register("UserL1ForTests")(_UserL1)
    cfg = distill_cfg("RetinaNet", extra=["MODEL.ACAMKD.METHOD", "UserL1ForTests"])
    model = build_model(cfg)
    with EventStorage():
        losses = model(batched_inputs())
    assert "loss_user_l1" in losses and torch.isfinite(losses["loss_user_l1"])
    levels = build_acam_levels(["p3"], 8, 8, method="UserL1ForTests")
    assert isinstance(levels["p3"], _UserL1)


def test_lazy_builder_takes_a_method_and_its_keywords():
    levels = build_acam_levels(["p3", "p4"], 16, 8, method="CWD", tau=2.0, weight=1.0)
    assert all(isinstance(m, CWD) and m.tau == 2.0 for m in levels.values())
    with pytest.raises(ValueError, match="not a registered distillation method"):
        build_acam_levels(["p3"], 8, 8, method="nope")


def _step_and_check(model, batch, loss_key):
    """One SGD step: finite losses, student gradients, a frozen and unchanged teacher."""
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    with EventStorage() as storage:
        losses = model(batch)
        sum(losses.values()).backward()
    assert loss_key in losses and all(torch.isfinite(v) for v in losses.values())
    assert float(losses[loss_key]) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    optimizer.step()
    after = model.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)
    assert not model.teacher.training
    return storage.latest()


@pytest.mark.parametrize("arch", ["RetinaNet", "GeneralizedRCNN", "FCOS", "RepPoints"])
@pytest.mark.parametrize("method", ["MSE", "MGD", "CWD", "PKD"])
def test_one_training_step_per_detector_family(arch, method):
    torch.manual_seed(0)
    model = build_model(distill_cfg(arch, extra=["MODEL.ACAMKD.METHOD", method]))
    logged = _step_and_check(model, batched_inputs(), LOSS_KEY[method])
    level = next(iter(model.acam))
    assert f"acam/{level}/{LOSS_KEY[method]}" in logged


@pytest.mark.parametrize("method", ["FGD", "MasKD"])
def test_one_training_step_of_a_reppoints_student(method):
    torch.manual_seed(0)
    model = build_model(distill_cfg("RepPoints", extra=["MODEL.ACAMKD.METHOD", method]))
    _step_and_check(model, batched_inputs(), LOSS_KEY[method])


@pytest.mark.parametrize("method", ["MSE", "MGD", "CWD", "PKD"])
def test_one_training_step_on_the_segmentation_logits(method):
    torch.manual_seed(0)
    model = build_model(seg_pair_cfg("deeplabv3_R_18", extra=["MODEL.ACAMKD.METHOD", method]))
    _step_and_check(model, seg_batch(), LOSS_KEY[method])
    assert list(model.acam) == ["logits"]


@pytest.mark.parametrize("method", ["FGD", "MGD"])
def test_a_rivals_checkpoint_leaves_the_teacher_out_resumes_and_exports(tmp_path, method):
    from acamkd.training.export import export_student

    from test_teacherless_checkpoint import _assert_same, _built, _cfg, _teacher_file, _trained

    cfg = _cfg(_teacher_file(tmp_path))
    cfg.merge_from_list(["MODEL.ACAMKD.METHOD", method])
    model, _, checkpointer = _trained(cfg, str(tmp_path / "out"))
    with torch.no_grad():  # the method's own trainable modules, changed from their init
        for p in model.acam.parameters():
            p.add_(0.5)
    checkpointer.save("model_final", iteration=1)
    final = str(tmp_path / "out" / "model_final.pth")
    saved = torch.load(final, map_location="cpu")["model"]
    assert not any(k.startswith("teacher.") for k in saved)
    assert any(k.startswith("acam.") for k in saved)

    resumed, _, resumed_checkpointer = _built(cfg, str(tmp_path / "out"), seed=5)
    resumed_checkpointer.resume_or_load("", resume=True)
    _assert_same(resumed.state_dict(), model.state_dict())  # the teacher reloaded from its file
    weights, _ = export_student(cfg, final, str(tmp_path / "export"))
    _assert_same(torch.load(weights, map_location="cpu")["model"], model.student.state_dict())
