"""ACAM-KD core: STCA-FF, ASCM, the masked losses and one ACAM level (CPU, synthetic data)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from detectron2.config import get_cfg

from acamkd.config import add_acamkd_config
from acamkd.modeling.acam import ACAMLevel, ACAMOutput
from acamkd.modeling.acam_losses import (
    dice_diversity_loss,
    mask_discrepancy_correlation,
    masked_channel_loss,
    masked_spatial_loss,
    pairwise_dice,
    reverse_gradient,
)
from acamkd.modeling.ascm import AdaptiveSpatialChannelMasks, sigmoid_with_budget
from acamkd.modeling.stca_ff import STCAFusion

LOSS_KEYS = {"loss_acam_channel", "loss_acam_spatial", "loss_acam_diversity"}
STAT_KEYS = {
    "spatial_mask_mean",
    "spatial_mask_coverage",
    "spatial_mask_dice",
    "channel_mask_mean",
    "channel_mask_coverage",
    "channel_mask_dice",
    "mask_discrepancy_corr",
}


def _inputs(b, ct, cs, h, w, dtype=torch.float32):
    teacher = torch.randn(b, ct, h, w, dtype=dtype)
    student = torch.randn(b, cs, h, w, dtype=dtype)
    return teacher, student


def _total(out: ACAMOutput) -> torch.Tensor:
    return sum(out.losses.values())


def _naive_fusion(fusion: STCAFusion, teacher, student):
    """Reference STCA-FF with the explicit N x N softmax, from the module's own projections."""
    query_src, kv_src = (
        (teacher, student) if fusion.query_source == "teacher" else (student, teacher)
    )
    b, c, h, w = teacher.shape
    q = fusion.query_proj(query_src).flatten(2)  # (B, C_q, N)
    k = fusion.key_proj(kv_src).flatten(2)  # (B, C_q, N)
    v = fusion.value_proj(kv_src).flatten(2)  # (B, C, N)
    attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(q.shape[1]), dim=-1)  # (B, N, N)
    return (v @ attn.transpose(1, 2)).reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------
# Shapes and output contract
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "b,ct,cs,h,w",
    [(2, 8, 8, 5, 7), (1, 19, 19, 4, 4), (3, 16, 24, 6, 3), (1, 19, 7, 3, 9)],
)
def test_output_shapes_and_keys(b, ct, cs, h, w):
    level = ACAMLevel(teacher_channels=ct, student_channels=cs, num_masks=4)
    teacher, student = _inputs(b, ct, cs, h, w)
    out = level(teacher, student, return_masks=True)

    assert set(out.losses) == LOSS_KEYS
    for value in out.losses.values():
        assert value.dim() == 0 and torch.isfinite(value) and value.dtype == torch.float32
    assert set(out.stats) == STAT_KEYS
    for value in out.stats.values():
        assert value.dim() == 0 and not value.requires_grad
    assert out.masks["spatial"].shape == (b, 4, h, w)
    assert out.masks["channel"].shape == (b, 4, ct)
    assert out.masks["fused"].shape == (b, ct, h, w)
    assert out.masks["discrepancy"].shape == (b, h, w)
    assert not any(m.requires_grad for m in out.masks.values())
    assert level(teacher, student).masks is None


def test_mismatched_inputs_raise():
    level = ACAMLevel(teacher_channels=8, student_channels=4)
    with pytest.raises(ValueError, match="grid"):
        level(torch.randn(1, 8, 4, 5), torch.randn(1, 4, 4, 6))
    with pytest.raises(ValueError, match="grid"):
        level(torch.randn(2, 8, 4, 5), torch.randn(1, 4, 4, 5))
    with pytest.raises(ValueError, match="channels"):
        level(torch.randn(1, 8, 4, 5), torch.randn(1, 5, 4, 5))


# ---------------------------------------------------------------------------------------------
# STCA-FF
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("query_source", ["teacher", "student"])
@pytest.mark.parametrize("channels,ratio", [(8, 0.5), (19, 0.5), (6, 1.5)])
def test_fusion_matches_naive_attention(query_source, channels, ratio):
    fusion = STCAFusion(channels, query_channel_ratio=ratio, query_source=query_source).double()
    assert fusion.query_channels == max(1, int(channels * ratio))
    teacher, student = _inputs(2, channels, channels, 3, 5, dtype=torch.float64)
    # Scale the inputs up so the softmax is far from uniform and the check is not trivial.
    teacher, student = 3 * teacher, 3 * student
    fused = fusion(teacher, student)
    expected = _naive_fusion(fusion, teacher, student)
    assert fused.shape == (2, channels, 3, 5)
    torch.testing.assert_close(fused, expected, atol=1e-10, rtol=1e-8)


def test_fusion_query_source_changes_result():
    torch.manual_seed(1)
    a = STCAFusion(8, query_source="teacher")
    b = STCAFusion(8, query_source="student")
    b.load_state_dict(a.state_dict())
    teacher, student = _inputs(1, 8, 8, 4, 4)
    assert not torch.allclose(a(teacher, student), b(teacher, student))


def test_fused_kernel_runs_without_math_fallback():
    # Under FLASH_ATTENTION alone the math path (which builds the N x N matrix) is excluded, so
    # unequal q/v widths must fail there: this shows the context really forbids the fallback.
    q = torch.randn(1, 1, 16, 4)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, q, torch.randn(1, 1, 16, 8))

    # N = 3072 positions, odd C: forward and backward of a whole level on the fused kernel
    # (the CPU default is the chunked attention, which calls no SDPA).
    level = ACAMLevel(teacher_channels=19, student_channels=12, attention="sdpa")
    teacher, student = _inputs(1, 19, 12, 48, 64)
    student.requires_grad_(True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = level(teacher, student)
        _total(out).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert level.fusion.query_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# ASCM
# ---------------------------------------------------------------------------------------------
def test_masks_strictly_inside_unit_interval():
    level = ACAMLevel(teacher_channels=8, student_channels=8, mask_init_std=1.0)
    teacher, student = _inputs(2, 8, 8, 6, 5)
    masks = level(5 * teacher, 5 * student, return_masks=True).masks
    for name in ("spatial", "channel"):
        assert (masks[name] > 0).all() and (masks[name] < 1).all()
        assert masks[name].std() > 0.01  # not all at 0.5: the check is not trivial


def test_default_masks_start_near_half():
    level = ACAMLevel(teacher_channels=8, student_channels=8)
    out = level(*_inputs(2, 8, 8, 4, 4))
    assert abs(out.stats["spatial_mask_mean"] - 0.5) < 0.05
    assert abs(out.stats["channel_mask_mean"] - 0.5) < 0.05


def test_ascm_hand_computed_masks():
    fused = torch.tensor([[1.0, 3.0], [2.0, -2.0]]).reshape(1, 2, 1, 2)  # v = (2, 0)
    sig = torch.sigmoid

    scalar = AdaptiveSpatialChannelMasks(2, num_masks=2, channel_mask_form="scalar")
    with torch.no_grad():
        scalar.spatial_units.copy_(torch.tensor([[1.0, 0.0], [0.5, -1.0]]))
        scalar.channel_units.copy_(torch.tensor([[1.0], [-0.5]]))
    spatial, channel = scalar(fused)
    # Ms[m, p] = sigmoid(sum_c m_s[m, c] F[c, p])
    expected_spatial = sig(torch.tensor([[1.0, 3.0], [0.5 - 2.0, 1.5 + 2.0]]))
    torch.testing.assert_close(spatial.reshape(2, 2), expected_spatial)
    # Scalar form: Mc = sigmoid(m_c v^T) = sigmoid([[2, 0], [-1, 0]])
    torch.testing.assert_close(channel[0], sig(torch.tensor([[2.0, 0.0], [-1.0, 0.0]])))

    per_channel = AdaptiveSpatialChannelMasks(2, num_masks=2, channel_mask_form="per_channel")
    assert per_channel.channel_units.shape == (2, 2)
    with torch.no_grad():
        per_channel.channel_units.copy_(torch.tensor([[1.0, 5.0], [-1.0, 0.5]]))
    _, channel = per_channel(fused)
    # Per-channel form: Mc[m, k] = sigmoid(m_c[m, k] v[k]) = sigmoid([[2, 0], [-2, 0]])
    torch.testing.assert_close(channel[0], sig(torch.tensor([[2.0, 0.0], [-2.0, 0.0]])))


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def test_feature_losses_zero_iff_student_equals_teacher():
    level = ACAMLevel(teacher_channels=8, student_channels=8, align="when_needed")
    assert isinstance(level.align, nn.Identity)
    assert isinstance(ACAMLevel(teacher_channels=8, student_channels=8).align, nn.Conv2d)
    assert isinstance(
        ACAMLevel(teacher_channels=8, student_channels=4, align="when_needed").align, nn.Conv2d
    )
    teacher, student = _inputs(2, 8, 8, 4, 5)
    same = level(teacher, teacher.clone())
    assert same.losses["loss_acam_channel"] == 0 and same.losses["loss_acam_spatial"] == 0
    differ = level(teacher, student)
    assert differ.losses["loss_acam_channel"] > 0 and differ.losses["loss_acam_spatial"] > 0


def test_masked_losses_hand_computed():
    # D (C=2, N=2) = [[1, 2], [3, 0]]: per position sum_c D^2 = (10, 4); per channel (5, 9).
    diff = torch.tensor([[1.0, 2.0], [3.0, 0.0]]).reshape(1, 2, 1, 2)
    mask = torch.tensor([0.5, 1.0])
    spatial = mask.reshape(1, 1, 1, 2)
    channel = mask.reshape(1, 1, 2)
    # Ls numerator 0.25 * 10 + 1 * 4 = 6.5, over C * sum(M) = 3 or C * sum(M^2) = 2.5
    assert masked_spatial_loss(diff, spatial, "sum").item() == pytest.approx(6.5 / 3)
    assert masked_spatial_loss(diff, spatial, "sum_sq").item() == pytest.approx(6.5 / 2.5)
    # Lc numerator 0.25 * 5 + 1 * 9 = 10.25, over H*W * sum(M) = 3 or H*W * sum(M^2) = 2.5
    assert masked_channel_loss(diff, channel, "sum").item() == pytest.approx(10.25 / 3)
    assert masked_channel_loss(diff, channel, "sum_sq").item() == pytest.approx(10.25 / 2.5)

    # Two masks average; two images average.
    ones = torch.ones(1, 1, 1, 2)
    two_masks = torch.cat([spatial, ones], dim=1)  # second mask: 14 / (2 * 2)
    two = masked_spatial_loss(diff, two_masks, "sum")
    assert two.item() == pytest.approx((6.5 / 3 + 3.5) / 2)
    batch = masked_spatial_loss(torch.cat([diff, 2 * diff]), torch.cat([spatial, spatial]), "sum")
    assert batch.item() == pytest.approx((6.5 / 3 + 4 * 6.5 / 3) / 2)


def test_sum_sq_starts_at_twice_the_sum_loss():
    # With masks near 0.5 (the default init), sum_k M^2 D^2 / sum_k M^2 is about twice
    # sum_k M^2 D^2 / sum_k M: switching the normaliser doubles the effective LOSS_WEIGHT at the
    # start of training (docs/METHOD.md, "What this project has measured").
    teacher, student = _inputs(2, 8, 8, 6, 6)
    losses = {}
    for normalizer in ("sum", "sum_sq"):
        torch.manual_seed(0)
        level = ACAMLevel(teacher_channels=8, student_channels=8, normalizer=normalizer)
        losses[normalizer] = level(teacher, student).losses
    for name in ("loss_acam_channel", "loss_acam_spatial"):
        ratio = (losses["sum_sq"][name] / losses["sum"][name]).item()
        assert ratio == pytest.approx(2.0, rel=0.05)
    torch.testing.assert_close(
        losses["sum_sq"]["loss_acam_diversity"], losses["sum"]["loss_acam_diversity"]
    )


@pytest.mark.parametrize("normalizer", ["sum", "sum_sq"])
@pytest.mark.parametrize("form", ["scalar", "per_channel"])
def test_level_losses_match_literal_formulas(normalizer, form):
    m = 3
    level = ACAMLevel(
        teacher_channels=5,
        student_channels=5,
        num_masks=m,
        align="when_needed",
        normalizer=normalizer,
        channel_mask_form=form,
        loss_weight=0.7,
        diversity_weight=0.3,
        mask_init_std=0.5,
    )
    teacher, student = _inputs(2, 5, 5, 3, 4)
    out = level(teacher, student, return_masks=True)
    ms, mc = out.masks["spatial"], out.masks["channel"]
    d = (teacher - student).unsqueeze(1)  # (B, 1, C, H, W)
    norm = (lambda x: x.sum(-1)) if normalizer == "sum" else (lambda x: x.square().sum(-1))
    # The literal ||M_m * D||^2 with the mask broadcast over the axes it lacks.
    lc = (mc[..., None, None] * d).square().sum((2, 3, 4)) / (12 * norm(mc))
    ls = (ms[:, :, None] * d).square().sum((2, 3, 4)) / (5 * norm(ms.flatten(2)))
    expected_channel = 0.7 * lc.mean()
    expected_spatial = 0.7 * ls.mean()
    torch.testing.assert_close(out.losses["loss_acam_channel"], expected_channel)
    torch.testing.assert_close(out.losses["loss_acam_spatial"], expected_spatial)

    def dice(x):
        x = x.flatten(2)
        vals = [
            2 * (x[:, i] * x[:, j]).sum(-1) / (x[:, i].square().sum(-1) + x[:, j].square().sum(-1))
            for i in range(m)
            for j in range(m)
            if i != j
        ]
        return torch.stack(vals, 1).mean()

    torch.testing.assert_close(out.losses["loss_acam_diversity"], 0.3 * (dice(ms) + dice(mc)))


def test_diversity_targets_spatial_only():
    kwargs = dict(teacher_channels=6, student_channels=6, mask_init_std=0.5)
    torch.manual_seed(3)
    both = ACAMLevel(**kwargs)
    spatial_only = ACAMLevel(diversity_targets="spatial", **kwargs)
    spatial_only.load_state_dict(both.state_dict())
    inputs = _inputs(1, 6, 6, 4, 4)
    out_both, out_spatial = both(*inputs), spatial_only(*inputs)
    torch.testing.assert_close(
        out_spatial.losses["loss_acam_diversity"], out_spatial.stats["spatial_mask_dice"]
    )
    torch.testing.assert_close(
        out_both.losses["loss_acam_diversity"],
        out_both.stats["spatial_mask_dice"] + out_both.stats["channel_mask_dice"],
    )


def test_pairwise_dice_values():
    disjoint = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    assert dice_diversity_loss(disjoint).item() == 0
    identical = torch.rand(2, 3, 4, 5) + 0.1
    identical[:, 1:] = identical[:, :1]
    assert dice_diversity_loss(identical).item() == pytest.approx(1.0, abs=1e-5)
    # 2 <(1,1,0), (1,0,0)> / (2 + 1) = 2/3 for both ordered pairs.
    pair = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    assert pairwise_dice(pair, eps=0.0).item() == pytest.approx(2 / 3)
    assert pairwise_dice(torch.rand(3, 1, 5)).tolist() == [0.0, 0.0, 0.0]  # no pair


def test_mask_discrepancy_correlation():
    disc = torch.rand(2, 4, 5)
    masks = torch.stack([0.1 + 0.5 * disc, 0.9 - 0.5 * disc], dim=1)  # (B, 2, H, W)
    assert mask_discrepancy_correlation(masks[:, :1], disc).item() == pytest.approx(1.0, abs=1e-5)
    assert mask_discrepancy_correlation(masks[:, 1:], disc).item() == pytest.approx(-1.0, abs=1e-5)
    assert mask_discrepancy_correlation(masks, disc).item() == pytest.approx(0.0, abs=1e-5)
    # No defined correlation with a constant discrepancy: reported as 0, not NaN.
    assert mask_discrepancy_correlation(masks, torch.ones(2, 4, 5)).item() == 0


def test_float32_losses_under_autocast():
    level = ACAMLevel(teacher_channels=8, student_channels=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = level(*_inputs(1, 8, 8, 4, 4), return_masks=True)
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    assert out.masks["spatial"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("query_source", ["teacher", "student"])
@pytest.mark.parametrize("form", ["scalar", "per_channel"])
def test_gradients_reach_student_and_parameters_not_teacher(query_source, form):
    level = ACAMLevel(
        teacher_channels=8, student_channels=6, query_source=query_source, channel_mask_form=form
    )
    teacher, student = _inputs(2, 8, 6, 4, 5)
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    _total(level(teacher, student)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None or (teacher.grad == 0).all()
    for name, param in level.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def _grads(level, teacher, student, params=None):
    student = student.clone().requires_grad_(True)
    level.zero_grad(set_to_none=True)
    _total(level(teacher, student)).backward()
    named = dict(level.named_parameters())
    return student.grad, {n: named[n].grad.clone() for n in (params or named)}


def test_detach_student_in_masks_leaves_only_the_difference_gradient():
    kwargs = dict(teacher_channels=8, student_channels=6, mask_init_std=0.5)
    torch.manual_seed(5)
    detached = ACAMLevel(detach_student_in_masks=True, **kwargs)
    attached = ACAMLevel(**kwargs)
    attached.load_state_dict(detached.state_dict())
    teacher, student = _inputs(2, 8, 6, 4, 5)

    grad_detached, _ = _grads(detached, teacher, student)
    # Reference: the masks are constants, the gradient flows through D = T - f_align(S) only.
    masks = detached(teacher, student, return_masks=True).masks
    s_ref = student.clone().requires_grad_(True)
    diff = teacher - detached.align(s_ref)
    ref_loss = masked_channel_loss(diff, masks["channel"]) + masked_spatial_loss(
        diff, masks["spatial"]
    )
    (grad_ref,) = torch.autograd.grad(ref_loss, s_ref)
    torch.testing.assert_close(grad_detached, grad_ref)

    grad_attached, _ = _grads(attached, teacher, student)
    assert not torch.allclose(grad_attached, grad_ref, atol=1e-6)


@pytest.mark.parametrize("detach", [True, False])
def test_ascend_reverses_mask_generator_gradient_only(detach):
    kwargs = dict(
        teacher_channels=8,
        student_channels=6,
        diversity_weight=0.0,
        detach_student_in_masks=detach,
        mask_init_std=0.5,
    )
    torch.manual_seed(7)
    descend = ACAMLevel(**kwargs)
    ascend = ACAMLevel(mask_objective="ascend", **kwargs)
    ascend.load_state_dict(descend.state_dict())
    teacher, student = _inputs(2, 8, 6, 4, 5)
    generator = [n for n, _ in descend.named_parameters() if n.startswith(("fusion.", "ascm."))]
    assert len(generator) == 7  # W_q (weight, bias), W_k (weight), W_v (weight, bias), m_s, m_c

    for key, value in descend(teacher, student).losses.items():
        torch.testing.assert_close(ascend(teacher, student).losses[key], value)
    s_desc, g_desc = _grads(descend, teacher, student, generator)
    s_asc, g_asc = _grads(ascend, teacher, student, generator)
    for name in generator:
        assert g_desc[name].abs().sum() > 0, name
        torch.testing.assert_close(g_asc[name], -g_desc[name])
    if detach:
        torch.testing.assert_close(s_asc, s_desc)
    else:
        # The student also feeds the mask generator: only that part of its gradient flips, so
        # the mean of the two is the gradient through D alone (the detached level's).
        reference = ACAMLevel(**{**kwargs, "detach_student_in_masks": True})
        reference.load_state_dict(descend.state_dict())
        s_diff_only, _ = _grads(reference, teacher, student)
        torch.testing.assert_close((s_asc + s_desc) / 2, s_diff_only)
        assert not torch.allclose(s_asc, s_desc)


def test_gradient_reversal_function():
    x = torch.randn(4, requires_grad=True)
    y = reverse_gradient(x)
    assert torch.equal(y, x)
    (y * torch.arange(4.0)).sum().backward()
    assert torch.equal(x.grad, -torch.arange(4.0))


# ---------------------------------------------------------------------------------------------
# Config and determinism
# ---------------------------------------------------------------------------------------------
def _cfg():
    cfg = get_cfg()
    add_acamkd_config(cfg)
    return cfg


def test_from_config_defaults():
    level = ACAMLevel(_cfg(), teacher_channels=16, student_channels=8)
    assert level.ascm.spatial_units.shape == (6, 16)
    assert level.ascm.channel_units.shape == (6, 1)
    assert level.fusion.query_source == "teacher" and level.fusion.query_channels == 8
    assert isinstance(level.align, nn.Conv2d) and level.align.in_channels == 8
    assert level.mask_objective == "descend" and level.normalizer == "sum_sq"
    assert level.diversity_targets == "both" and not level.detach_student_in_masks
    assert level.loss_weight == 1.0 and level.diversity_weight == 1.0 and level.dice_eps == 1e-6
    # Equal widths still align with a conv by default.
    assert isinstance(ACAMLevel(_cfg(), 8, 8).align, nn.Conv2d)


def test_from_config_reads_overrides():
    cfg = _cfg()
    cfg.MODEL.ACAMKD.NUM_MASKS = 19
    cfg.MODEL.ACAMKD.CHANNEL_MASK_FORM = "per_channel"
    cfg.MODEL.ACAMKD.ALIGN = "when_needed"
    cfg.MODEL.ACAMKD.QUERY_CHANNEL_RATIO = 0.25
    cfg.MODEL.ACAMKD.LOSS_WEIGHT = 2.0
    level = ACAMLevel(cfg, teacher_channels=19, student_channels=19)
    assert level.ascm.channel_units.shape == (19, 19)
    assert isinstance(level.align, nn.Identity)
    assert level.fusion.query_channels == 4 and level.loss_weight == 2.0


@pytest.mark.parametrize(
    "key",
    [
        "QUERY_SOURCE",
        "CHANNEL_MASK_FORM",
        "MASK_OBJECTIVE",
        "NORMALIZER",
        "DIVERSITY_TARGETS",
        "ALIGN",
    ],
)
def test_bad_switch_raises_naming_the_key(key):
    cfg = _cfg()
    cfg.MODEL.ACAMKD[key] = "bogus"
    with pytest.raises(ValueError, match=f"MODEL.ACAMKD.{key}.*'bogus'"):
        ACAMLevel(cfg, teacher_channels=8, student_channels=8)


def test_same_seed_same_outputs():
    def run():
        torch.manual_seed(11)
        level = ACAMLevel(teacher_channels=8, student_channels=6)
        teacher, student = _inputs(2, 8, 6, 5, 4)
        student.requires_grad_(True)
        out = level(teacher, student, return_masks=True)
        _total(out).backward()
        return out, student.grad

    (out_a, grad_a), (out_b, grad_b) = run(), run()
    for key in LOSS_KEYS:
        assert torch.equal(out_a.losses[key], out_b.losses[key])
    for key in out_a.masks:
        assert torch.equal(out_a.masks[key], out_b.masks[key])
    assert torch.equal(grad_a, grad_b)


# ---------------------------------------------------------------------------------------------
# This project's "budget" reading (MASK_BUDGET)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.05, 0.25, 0.8])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_budget_masks_average_the_budget_and_keep_the_order(budget, scale):
    torch.manual_seed(0)
    logits = scale * torch.randn(3, 4, 50)
    masks = sigmoid_with_budget(logits, budget)
    torch.testing.assert_close(masks.mean(dim=-1), torch.full((3, 4), budget), atol=1e-4, rtol=0)
    assert masks.min() >= 0 and masks.max() <= 1
    # A shift per row: in the logits' order the masks never fall (saturated values tie).
    in_order = masks.gather(-1, logits.argsort(dim=-1))
    assert (in_order.diff(dim=-1) >= 0).all()


def test_budget_gradient_moves_mass_and_keeps_the_mean():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 40, requires_grad=True)
    sigmoid_with_budget(logits, 0.3).sum().backward()
    # The sum of a mask is fixed by the budget, so its gradient is zero ...
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), atol=1e-5, rtol=0)
    # ... while a weighted sum has a gradient that sums to zero per mask: mass moves.
    logits.grad = None
    weights = torch.rand(40)
    (sigmoid_with_budget(logits, 0.3) * weights).sum().backward()
    assert logits.grad.abs().max() > 1e-3
    torch.testing.assert_close(logits.grad.sum(dim=-1), torch.zeros(2, 3), atol=1e-5, rtol=0)


def test_budget_masks_that_climb_a_weighted_sum_cover_the_largest_weights():
    """The toy of docs/METHOD.md ("Known risk"), ascended under a budget: no vanishing, no
    saturation, and the budget ends on the largest discrepancies."""
    torch.manual_seed(2)
    discrepancy = torch.rand(100)
    logits = (0.01 * torch.randn(100)).requires_grad_(True)
    optimizer = torch.optim.SGD([logits], lr=50.0)
    for _ in range(200):
        optimizer.zero_grad()
        masks = sigmoid_with_budget(logits, 0.2)
        (-(masks.square() * discrepancy).sum() / masks.sum()).backward()
        optimizer.step()
    masks = sigmoid_with_budget(logits.detach(), 0.2)
    assert abs(masks.mean().item() - 0.2) < 1e-4
    top, bottom = discrepancy.argsort()[-10:], discrepancy.argsort()[:10]
    assert masks[top].mean() > 0.9 and masks[bottom].mean() < 0.1
    assert torch.corrcoef(torch.stack([masks, discrepancy]))[0, 1] > 0.6


@pytest.mark.parametrize("masks_kind", ["spatial_channel", "channel"])
def test_level_with_budget_holds_every_mask_at_the_budget(masks_kind):
    cfg = _cfg()
    cfg.MODEL.ACAMKD.MASK_BUDGET = 0.25
    cfg.MODEL.ACAMKD.MASK_OBJECTIVE = "ascend"
    cfg.MODEL.ACAMKD.MASKS = masks_kind
    torch.manual_seed(3)
    level = ACAMLevel(cfg, teacher_channels=8, student_channels=6)
    teacher, student = _inputs(2, 8, 6, 5, 4)
    student.requires_grad_(True)
    out = level(teacher, student, return_masks=True)
    _total(out).backward()
    torch.testing.assert_close(out.masks["channel"].mean(dim=-1), torch.full((2, 6), 0.25))
    assert out.stats["channel_mask_mean"] == pytest.approx(0.25, abs=1e-4)
    if masks_kind == "spatial_channel":
        spatial = out.masks["spatial"].flatten(2).mean(dim=-1)
        torch.testing.assert_close(spatial, torch.full((2, 6), 0.25))
    assert level.ascm.channel_units.grad is not None and student.grad is not None


def test_budget_zero_is_the_sigmoid():
    torch.manual_seed(4)
    paper = AdaptiveSpatialChannelMasks(8, num_masks=3)
    off = AdaptiveSpatialChannelMasks(8, num_masks=3, budget=0.0)
    off.load_state_dict(paper.state_dict())
    fused = torch.randn(2, 8, 5, 4)
    for a, b in zip(paper(fused), off(fused)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("budget", [-0.1, 1.0, 1.5])
def test_bad_budget_raises_naming_the_key(budget):
    cfg = _cfg()
    cfg.MODEL.ACAMKD.MASK_BUDGET = budget
    with pytest.raises(ValueError, match="MODEL.ACAMKD.MASK_BUDGET"):
        ACAMLevel(cfg, teacher_channels=8, student_channels=8)
