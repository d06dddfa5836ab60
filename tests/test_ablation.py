"""The paper's ablation rows as switches: what each builds, returns and trains (CPU)."""

import pytest
import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from acamkd.modeling.acam import ACAMLevel

from tiny_models import REPO, batched_inputs, distill_cfg

# (MASKS, MASK_SOURCE) -> parameter groups built, ACAM losses returned.
ROWS = {
    ("spatial_channel", "fused"): (
        {"align", "fusion", "ascm.spatial_units", "ascm.channel_units"},
        {"loss_acam_channel", "loss_acam_spatial", "loss_acam_diversity"},
    ),
    ("spatial", "fused"): (
        {"align", "fusion", "ascm.spatial_units"},
        {"loss_acam_spatial", "loss_acam_diversity"},
    ),
    ("channel", "fused"): (
        {"align", "fusion", "ascm.channel_units"},
        {"loss_acam_channel", "loss_acam_diversity"},
    ),
    ("spatial_channel", "teacher"): (
        {"align", "ascm.spatial_units", "ascm.channel_units"},
        {"loss_acam_channel", "loss_acam_spatial", "loss_acam_diversity"},
    ),
    ("none", "fused"): ({"align"}, {"loss_acam_mse"}),
}


def _groups(module: torch.nn.Module) -> set:
    out = set()
    for name, _ in module.named_parameters():
        parts = name.split(".")
        out.add(".".join(parts[:2]) if parts[0] == "ascm" else parts[0])
    return out


def _level_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2, 16, 5, 6, generator=g)
    student = torch.randn(2, 8, 5, 6, generator=g).requires_grad_()
    return teacher, student


@pytest.mark.parametrize("masks,source", list(ROWS))
def test_each_row_builds_what_it_uses_and_trains_all_of_it(masks, source):
    torch.manual_seed(0)
    level = ACAMLevel(teacher_channels=16, student_channels=8, masks=masks, mask_source=source)
    groups, loss_keys = ROWS[(masks, source)]
    assert _groups(level) == groups
    teacher, student = _level_inputs()
    out = level(teacher, student)
    assert set(out.losses) == loss_keys
    sum(out.losses.values()).backward()
    # No idle parameter: everything built receives a gradient, and so does the student.
    for name, p in level.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert student.grad.abs().sum() > 0


def test_no_mask_row_is_the_plain_mse_of_the_aligned_student():
    torch.manual_seed(0)
    level = ACAMLevel(teacher_channels=16, student_channels=8, masks="none", loss_weight=2.0)
    teacher, student = _level_inputs()
    out = level(teacher, student)
    aligned = level.align(student)
    diff = teacher - aligned
    expected = 2.0 * (diff**2).sum(dim=(1, 2, 3)) / (16 * 5 * 6)
    torch.testing.assert_close(out.losses["loss_acam_mse"], expected.mean())
    assert out.stats == {}


def test_teacher_adaptive_masks_depend_on_the_teacher_only():
    torch.manual_seed(0)
    level = ACAMLevel(teacher_channels=16, student_channels=8, mask_source="teacher")
    teacher, student = _level_inputs()
    a = level(teacher, student, return_masks=True).masks
    b = level(teacher, torch.randn_like(student), return_masks=True).masks
    torch.testing.assert_close(a["spatial"], b["spatial"])
    torch.testing.assert_close(a["channel"], b["channel"])
    # ...whereas fused masks change with the student.
    torch.manual_seed(0)
    fused = ACAMLevel(teacher_channels=16, student_channels=8)
    c = fused(teacher, student, return_masks=True).masks
    d = fused(teacher, torch.randn_like(student), return_masks=True).masks
    assert not torch.allclose(c["spatial"], d["spatial"])


def test_single_kind_rows_report_only_their_statistics():
    teacher, student = _level_inputs()
    spatial = ACAMLevel(teacher_channels=16, student_channels=8, masks="spatial")
    channel = ACAMLevel(teacher_channels=16, student_channels=8, masks="channel")
    assert set(spatial(teacher, student).stats) == {
        "spatial_mask_mean",
        "spatial_mask_coverage",
        "spatial_mask_dice",
        "mask_discrepancy_corr",
    }
    assert set(channel(teacher, student).stats) == {
        "channel_mask_mean",
        "channel_mask_coverage",
        "channel_mask_dice",
    }


def test_bad_switch_values_name_the_key():
    with pytest.raises(ValueError, match="MODEL.ACAMKD.MASKS"):
        ACAMLevel(teacher_channels=4, student_channels=4, masks="both")
    with pytest.raises(ValueError, match="MODEL.ACAMKD.MASK_SOURCE"):
        ACAMLevel(teacher_channels=4, student_channels=4, mask_source="student")
    with pytest.raises(ValueError, match="DIVERSITY_TARGETS"):
        ACAMLevel(
            teacher_channels=4, student_channels=4, masks="channel", diversity_targets="spatial"
        )


@pytest.mark.parametrize(
    "opts,loss_keys,absent",
    [
        (["MODEL.ACAMKD.MASKS", "none"], {"loss_acam_mse"}, ("fusion", "ascm")),
        (
            ["MODEL.ACAMKD.MASK_SOURCE", "teacher"],
            {"loss_acam_channel", "loss_acam_spatial", "loss_acam_diversity"},
            ("fusion",),
        ),
    ],
)
def test_yaml_switches_reach_every_level_of_the_distiller(opts, loss_keys, absent):
    torch.manual_seed(0)
    model = build_model(distill_cfg("RetinaNet", extra=opts))
    model.train()
    for level in model.acam.values():
        names = {n.split(".")[0] for n, _ in level.named_parameters()}
        assert not names & set(absent)
    with EventStorage():
        losses = model(batched_inputs())
    assert set(losses) == {"loss_cls", "loss_box_reg"} | loss_keys
    assert all(torch.isfinite(v) for v in losses.values())


def test_lazy_config_switch_builds_the_no_mask_row():
    cfg = LazyConfig.load(
        f"{REPO}/configs/Streets-Detection/acamkd_retinanet_R_18_from_R_50_streets.py"
    )
    cfg = LazyConfig.apply_overrides(cfg, ["model.acam.masks=none"])
    acam = instantiate(cfg.model.acam)
    assert all(level.masks == "none" and level.ascm is None for level in acam.values())


def test_mask_figure_refuses_a_row_without_both_masks():
    from acamkd.pictures.mask_maps import _level_maps

    teacher, student = _level_inputs()
    level = ACAMLevel(teacher_channels=16, student_channels=8, masks="spatial")
    out = level(teacher, student, return_masks=True)
    with pytest.raises(ValueError, match="MODEL.ACAMKD.MASKS"):
        _level_maps(out, (5, 6), (1.0, 1.0))
