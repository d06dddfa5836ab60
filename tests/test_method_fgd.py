"""FGD (focal and global distillation) as a method: the loss against the formula of
docs/RIVALS.md computed by hand, gradients, the authors' settings per family, the errors, and a
distiller training step per detector family."""

import math
from fractions import Fraction

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from acamkd.config import get_acamkd_cfg
from acamkd.modeling.methods import FGD, LevelContext, build_distill_method
from acamkd.modeling.methods.fgd import fgd_box_masks

from test_seg_distill import _pair_cfg
from tiny_models import batched_inputs, distill_cfg

# Tiny models: one thread is as fast, and far faster when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")

FGD_KEYS = {"loss_fgd_fg", "loss_fgd_bg", "loss_fgd_attention", "loss_fgd_global"}

# Three images on a (5, 7) grid of a 40 x 56 padded batch (stride 8).
PADDED_HW = (40, 56)
GRID_HW = (5, 7)
IMAGE_SIZES = [(40, 50), (24, 56), (40, 56)]
BOXES = [
    [
        [3.0, 4.0, 20.0, 17.0],
        [10.0, 8.0, 30.0, 25.0],  # overlaps the first
        [45.0, 30.0, 70.0, 60.0],  # partly outside the image and the grid
        [60.0, 45.0, 80.0, 70.0],  # wholly outside
        [16.0, 16.0, 16.0, 16.0],  # a point on a cell boundary
    ],
    [[0.0, 0.0, 56.0, 24.0], [8.0, 8.0, 16.0, 16.0]],  # the whole image; a stride-8 cell
    [],  # no boxes: all background
]


def _context(boxes=BOXES, dtype=torch.float64) -> LevelContext:
    return LevelContext(
        padded_hw=PADDED_HW,
        image_sizes=list(IMAGE_SIZES),
        gt_boxes=[torch.tensor(b, dtype=dtype).reshape(-1, 4) for b in boxes],
    )


def _reference_masks(mapping: str):
    """M_fg and M_bg with explicit loops over boxes and positions, in exact arithmetic."""
    gh, gw = GRID_HW
    fgs, bgs = [], []
    for (ih, iw), boxes in zip(IMAGE_SIZES, BOXES):
        dh, dw = (ih, iw) if mapping == "unpadded" else PADDED_HW
        fg = [[0.0] * gw for _ in range(gh)]
        for x1, y1, x2, y2 in boxes:
            wmin = math.floor(Fraction(x1) * gw / dw)
            wmax = math.ceil(Fraction(x2) * gw / dw)
            hmin = math.floor(Fraction(y1) * gh / dh)
            hmax = math.ceil(Fraction(y2) * gh / dh)
            area = 1.0 / ((hmax - hmin + 1) * (wmax - wmin + 1))
            for i in range(gh):
                for j in range(gw):
                    if hmin <= i <= hmax and wmin <= j <= wmax:
                        fg[i][j] = max(fg[i][j], area)
        num_bg = sum(v == 0 for row in fg for v in row)
        bg = [[(1.0 / num_bg if v == 0 else 0.0) for v in row] for row in fg]
        fgs.append(fg)
        bgs.append(bg)
    return torch.tensor(fgs, dtype=torch.float64), torch.tensor(bgs, dtype=torch.float64)


def _attention(f, temp):
    n, c, h, w = f.shape
    spatial = torch.softmax(f.abs().mean(1).reshape(n, -1) / temp, dim=1).reshape(n, h, w) * h * w
    channel = torch.softmax(f.abs().mean((2, 3)) / temp, dim=1) * c
    return spatial, channel


def _global(f, g):
    """G(F) = F + transform(context(F)) from the module's weights, written out."""
    n, c, h, w = f.shape
    logits = torch.einsum("oc,nchw->nohw", g.context.weight[:, :, 0, 0], f) + g.context.bias.view(
        1, -1, 1, 1
    )
    p = torch.softmax(logits.reshape(n, h * w), dim=1)
    pooled = torch.einsum("nck,nk->nc", f.reshape(n, c, h * w), p)
    conv1, norm, _, conv2 = g.transform
    hidden = pooled @ conv1.weight[:, :, 0, 0].T + conv1.bias
    mean = hidden.mean(1, keepdim=True)
    var = hidden.var(1, unbiased=False, keepdim=True)
    hidden = (hidden - mean) / torch.sqrt(var + norm.eps)
    hidden = hidden * norm.weight[:, 0, 0] + norm.bias[:, 0, 0]
    out = hidden.clamp(min=0) @ conv2.weight[:, :, 0, 0].T + conv2.bias
    return f + out[:, :, None, None]


def _reference_losses(module, teacher, student, mapping):
    m = module
    n = teacher.shape[0]
    s = torch.einsum("oc,nchw->nohw", m.align.weight[:, :, 0, 0], student) + m.align.bias.view(
        1, -1, 1, 1
    )
    t = teacher
    fg, bg = _reference_masks(mapping)
    spatial_t, channel_t = _attention(t, m.temp)
    spatial_s, channel_s = _attention(s, m.temp)
    sq = (s - t) ** 2
    weight = spatial_t[:, None] * channel_t[:, :, None, None]
    l_fg = (fg[:, None] * weight * sq).sum() / n
    l_bg = (bg[:, None] * weight * sq).sum() / n
    l_att = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / n
    l_glb = ((_global(s, m.global_s) - _global(t, m.global_t)) ** 2).sum() / n
    return {
        "loss_fgd_fg": m.alpha * l_fg,
        "loss_fgd_bg": m.beta * l_bg,
        "loss_fgd_attention": m.gamma * l_att,
        "loss_fgd_global": m.lambda_ * l_glb,
    }


def _random_module(mapping: str, teacher_channels: int = 6, student_channels: int = 4) -> FGD:
    torch.manual_seed(1)
    module = FGD(
        teacher_channels=teacher_channels,
        student_channels=student_channels,
        temp=0.7,
        alpha=1.3,
        beta=0.7,
        gamma=0.4,
        lambda_=0.2,
        box_mapping=mapping,
    ).double()
    with torch.no_grad():
        for p in module.parameters():  # the zero-initialised last conv too: L_glb exercised
            p.normal_(0.0, 0.5)
    return module


def _features(teacher_channels=6, student_channels=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    n, (h, w) = len(BOXES), GRID_HW
    teacher = torch.randn(n, teacher_channels, h, w, generator=g, dtype=torch.float64) * 2
    student = torch.randn(n, student_channels, h, w, generator=g, dtype=torch.float64)
    return teacher, student


@pytest.mark.parametrize("mapping", ["unpadded", "stride"])
def test_masks_match_the_formula(mapping):
    fg, bg = fgd_box_masks(_context(), GRID_HW, mapping, dtype=torch.float64)
    ref_fg, ref_bg = _reference_masks(mapping)
    torch.testing.assert_close(fg, ref_fg, rtol=0, atol=0)
    torch.testing.assert_close(bg, ref_bg, rtol=1e-15, atol=0)
    assert torch.all(bg[2] == 1.0 / (GRID_HW[0] * GRID_HW[1]))  # no boxes: all background
    # The two mappings differ where the image is padded: the authors' stretches boxes.
    assert fg[1].gt(0).all() == (mapping == "unpadded")


def test_masks_by_hand():
    """One box on a 4 x 4 grid of a 32 x 32 image: cells 0..1 x 0..1 (inclusive), weight 1/4."""
    context = LevelContext((32, 32), [(32, 32)], [torch.tensor([[0.0, 0.0, 8.0, 8.0]])])
    fg, bg = fgd_box_masks(context, (4, 4))
    expected = torch.zeros(1, 4, 4)
    expected[0, :2, :2] = 0.25
    assert torch.equal(fg, expected)
    assert torch.allclose(bg, (expected == 0).float() / 12)


@pytest.mark.parametrize("mapping", ["unpadded", "stride"])
def test_losses_match_the_formula(mapping):
    module = _random_module(mapping)
    teacher, student = _features()
    out = module(teacher, student, context=_context(), return_masks=True)
    expected = _reference_losses(module, teacher, student, mapping)
    assert set(out.losses) == FGD_KEYS
    for key, value in expected.items():
        assert out.losses[key].dim() == 0 and out.losses[key].dtype == torch.float64
        torch.testing.assert_close(out.losses[key], value, rtol=1e-10, atol=0, msg=key)
        assert value > 0
    fg, _ = _reference_masks(mapping)
    assert torch.equal(out.masks["foreground"], fg)
    assert out.stats["fg_fraction"] == (fg > 0).double().mean()
    assert set(out.masks) == {
        "teacher",
        "student",
        "discrepancy",
        "foreground",
        "spatial_attention",
    }
    assert out.masks["discrepancy"].shape == out.masks["spatial_attention"].shape == (3, 5, 7)
    assert out.masks["student"].shape == teacher.shape and not out.masks["student"].requires_grad
    torch.testing.assert_close(
        out.masks["spatial_attention"], _attention(teacher, module.temp)[0], rtol=1e-12, atol=0
    )


def test_fresh_module_same_width_has_no_alignment_and_identity_global():
    module = FGD(teacher_channels=6, student_channels=6).double()
    assert isinstance(module.align, torch.nn.Identity)
    assert (module.temp, module.alpha, module.beta, module.gamma, module.lambda_) == (
        0.5,
        1e-3,
        5e-4,
        5e-4,
        5e-6,
    )
    teacher, student = _features(6, 6)
    out = module(teacher, student, context=_context())
    # Last transform conv zero: L_glb is the summed squared difference over N.
    expected = 5e-6 * ((student - teacher) ** 2).sum() / 3
    torch.testing.assert_close(out.losses["loss_fgd_global"], expected, rtol=1e-12, atol=0)
    assert isinstance(FGD(teacher_channels=6, student_channels=4).align, torch.nn.Conv2d)


def test_student_gets_gradients_teacher_none():
    module = _random_module("unpadded")
    teacher, student = _features()
    student.requires_grad_(True)
    out = module(teacher, student, context=_context())
    sum(out.losses.values()).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.global_s.parameters())
    assert all(p.grad is not None for p in module.global_t.parameters())
    # Each term alone reaches the student.
    for key in FGD_KEYS:
        student.grad = None
        module(teacher, student, context=_context()).losses[key].backward()
        assert student.grad.abs().sum() > 0, key
    # A teacher that requires grad is detached.
    teacher.requires_grad_(True)
    sum(module(teacher, student, context=_context()).losses.values()).backward()
    assert teacher.grad is None


def test_float32_and_boxes_on_another_dtype():
    module = FGD(teacher_channels=6, student_channels=4)
    teacher, student = _features()
    out = module(teacher.float(), student.float(), context=_context(dtype=torch.float32))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())


def test_family_defaults_from_cfg():
    cfg = get_acamkd_cfg()
    cfg.MODEL.ACAMKD.METHOD = "FGD"
    cfg.MODEL.ACAMKD.STUDENT_META_ARCHITECTURE = "FCOS"
    module = build_distill_method(cfg, teacher_channels=8, student_channels=8)
    assert isinstance(module, FGD)
    assert (module.temp, module.alpha, module.beta, module.gamma, module.lambda_) == (
        0.8,
        1.6e-3,
        8e-4,
        8e-4,
        8e-6,
    )
    assert module.box_mapping == "unpadded"
    cfg.MODEL.ACAMKD.STUDENT_META_ARCHITECTURE = "GeneralizedRCNN"
    module = build_distill_method(cfg, teacher_channels=8, student_channels=8)
    assert (module.alpha, module.beta, module.gamma, module.lambda_) == (5e-5, 2.5e-5, 5e-5, 5e-7)
    # An explicit key overrides the family's value; the others keep theirs.
    cfg.MODEL.ACAMKD.STUDENT_META_ARCHITECTURE = "FCOS"
    cfg.MODEL.ACAMKD.FGD.ALPHA = 0.25
    cfg.MODEL.ACAMKD.FGD.BOX_MAPPING = "stride"
    module = build_distill_method(cfg, teacher_channels=8, student_channels=8)
    assert (module.alpha, module.temp, module.box_mapping) == (0.25, 0.8, "stride")
    cfg.MODEL.ACAMKD.FGD.BOX_MAPPING = "grid"
    with pytest.raises(ValueError, match="BOX_MAPPING"):
        build_distill_method(cfg, teacher_channels=8, student_channels=8)


def test_without_boxes_is_refused():
    module = FGD(teacher_channels=6, student_channels=4).double()
    teacher, student = _features()
    for context in (None, LevelContext(PADDED_HW, list(IMAGE_SIZES), None)):
        with pytest.raises(ValueError, match="FGD needs the images' ground-truth 'instances'"):
            module(teacher, student, context=context)


@pytest.mark.parametrize("arch", ["RetinaNet", "GeneralizedRCNN", "FCOS"])
def test_distiller_training_step(arch):
    torch.manual_seed(0)
    cfg = distill_cfg(arch, extra=["MODEL.ACAMKD.METHOD", "FGD"])
    model = build_model(cfg)
    assert all(isinstance(m, FGD) for m in model.acam.values())
    assert model.acam["p3"].align.weight.shape[:2] == (64, 32)  # teacher 64, student 32 wide
    model.train()
    teacher_state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    with EventStorage() as storage:
        losses = model(batched_inputs())
        assert FGD_KEYS <= set(losses)
        assert not any(k.startswith("loss_acam") for k in losses)
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
        assert all(losses[k] > 0 for k in FGD_KEYS)
        logged = storage.latest()
        level = next(iter(model.acam))
        assert 0 < logged[f"acam/{level}/fg_fraction"][0] < 1
        # The FGD losses alone reach the student.
        sum(losses[k] for k in FGD_KEYS).backward(retain_graph=True)
        assert any(
            p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters()
        )
        sum(v for k, v in losses.items() if k not in FGD_KEYS).backward()
    assert all(p.grad is not None for p in model.acam.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-4
    )
    student_before = [p.detach().clone() for p in model.student.parameters()]
    optimizer.step()
    after = model.teacher.state_dict()
    assert teacher_state.keys() == after.keys()
    assert all(torch.equal(teacher_state[k], after[k]) for k in teacher_state)
    assert any(not torch.equal(a, b) for a, b in zip(student_before, model.student.parameters()))


def test_segmentation_distiller_is_refused():
    cfg = _pair_cfg("deeplabv3_R_18", extra=["MODEL.ACAMKD.METHOD", "FGD"])
    with pytest.raises(ValueError, match="(?s)FGD.*segmentation"):
        build_model(cfg)
