"""ACAM: one level of ACAM-KD (alignment, STCA-FF, ASCM and the masked losses)."""

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from detectron2.config import configurable

from .acam_losses import (
    NORMALIZERS,
    dice_diversity_loss,
    feature_mse_loss,
    mask_discrepancy_correlation,
    mask_statistics,
    masked_channel_loss,
    masked_spatial_loss,
    reverse_gradient,
)
from .ascm import AdaptiveSpatialChannelMasks
from .methods.common import alignment, check_choice, check_level_inputs
from .methods.registry import DISTILL_METHOD_REGISTRY, LevelContext, LevelOutput
from .stca_ff import ATTENTION_IMPLS, STCAFusion

__all__ = ["ACAMLevel", "ACAMOutput", "MASK_KINDS", "MASK_SOURCES"]

# MODEL.ACAMKD.MASKS: which masks weight the feature loss. "none" is the paper's "no mask" row
# (plain MSE on D, no STCA-FF or ASCM parameters, no diversity loss).
MASK_KINDS = ("spatial_channel", "spatial", "channel", "none")
# MODEL.ACAMKD.MASK_SOURCE: what ASCM reads. "fused" is ACAM-KD (the STCA-FF output);
# "teacher" is the paper's "teacher adaptive" row (the teacher feature, no STCA-FF).
MASK_SOURCES = ("fused", "teacher")


# What ACAMLevel returns. losses: already weighted 0-dim "loss_acam_channel" (alpha * Lc),
# "loss_acam_spatial" (alpha * Ls) and "loss_acam_diversity" (lambda * L_div), each only for the
# masks that exist; with no masks only "loss_acam_mse" (alpha * ||D||^2 / (C*H*W)). stats:
# "spatial_mask_{mean,coverage,dice}" and "mask_discrepancy_corr" (with spatial masks),
# "channel_mask_{mean,coverage,dice}" (with channel masks). masks, when asked for: "spatial"
# (B, M, H, W), "channel" (B, M, C), "fused" (B, C, H, W) what ASCM read, "teacher", "student"
# (the aligned f_align(S)) and "discrepancy" (B, H, W), the per-position sum_c D^2.
ACAMOutput = LevelOutput


@DISTILL_METHOD_REGISTRY.register("ACAMKD")
class ACAMLevel(nn.Module):
    """
    ACAM-KD on one feature level: aligns the student to the teacher's width, fuses the two with
    STCA-FF, derives M spatial and M channel masks from the fused feature (ASCM), and returns the
    masked channel and spatial losses on ``D = T - f_align(S)`` and the Dice diversity loss of
    the masks.

    The teacher feature is always detached. The masked losses are computed in float32, also
    under autocast. ``masks`` and ``mask_source`` build the paper's ablation rows instead: fewer
    masks, none (plain MSE), or masks read from the teacher feature alone.
    """

    @configurable
    def __init__(
        self,
        *,
        teacher_channels: int,
        student_channels: int,
        num_masks: int = 6,
        query_source: str = "teacher",
        query_channel_ratio: float = 0.5,
        channel_mask_form: str = "scalar",
        detach_student_in_masks: bool = False,
        mask_objective: str = "descend",
        normalizer: str = "sum_sq",
        mask_budget: float = 0.0,
        diversity_targets: str = "both",
        align: str = "always",
        loss_weight: float = 1.0,
        diversity_weight: float = 1.0,
        mask_init_std: float = 0.01,
        dice_eps: float = 1e-6,
        masks: str = "spatial_channel",
        mask_source: str = "fused",
        attention: str = "auto",
    ) -> None:
        """
        Args:
            teacher_channels (int): Ct, channels of the teacher feature (and of the masks' C).
            student_channels (int): Cs, channels of the raw student feature.
            num_masks (int): M, number of spatial and of channel masks.
            query_source (str): STCA-FF query from "teacher" (K, V from the student) or
                "student" (K, V from the teacher).
            query_channel_ratio (float): C_q / C of the query and key projections.
            channel_mask_form (str): "scalar" (m_c in R^{M x 1}) or "per_channel" (R^{M x C}).
            detach_student_in_masks (bool): feed the aligned student to STCA-FF detached, so the
                student gets gradient only through D.
            mask_objective (str): "descend" (the mask generator minimises the masked losses) or
                "ascend" (gradient reversal on the masks in those losses; Dice is still
                minimised).
            normalizer (str): masked-loss normaliser, "sum" or "sum_sq" of the mask.
            mask_budget (float): 0 (the paper's sigmoid masks) or, in (0, 1), the mean every
                mask is held at (this project's "budget" reading, docs/METHOD.md).
            diversity_targets (str): "both": L_div is the sum of the mean pairwise Dice of the
                spatial masks and that of the channel masks; "spatial": the spatial term only.
            align (str): f_align is a 1x1 conv "always", or only "when_needed" (identity when
                Cs == Ct).
            loss_weight (float): alpha, weight of the channel and spatial losses.
            diversity_weight (float): lambda, weight of the Dice diversity loss.
            mask_init_std (float): std of the normal init of m_s and m_c.
            dice_eps (float): added to the Dice denominator.
            masks (str): the masks that weight the feature loss, one of :data:`MASK_KINDS`.
            mask_source (str): what ASCM reads, one of :data:`MASK_SOURCES`.
            attention (str): how STCA-FF computes the same attention, one of
                :data:`ATTENTION_IMPLS` ("auto", "chunked", "sdpa").
        """
        super().__init__()
        check_choice("QUERY_SOURCE", query_source, ("teacher", "student"))
        check_choice("CHANNEL_MASK_FORM", channel_mask_form, ("scalar", "per_channel"))
        check_choice("MASK_OBJECTIVE", mask_objective, ("descend", "ascend"))
        check_choice("NORMALIZER", normalizer, NORMALIZERS)
        check_choice("DIVERSITY_TARGETS", diversity_targets, ("both", "spatial"))
        check_choice("ALIGN", align, ("always", "when_needed"))
        check_choice("MASKS", masks, MASK_KINDS)
        check_choice("MASK_SOURCE", mask_source, MASK_SOURCES)
        check_choice("ATTENTION", attention, ATTENTION_IMPLS)
        if masks == "channel" and diversity_targets == "spatial":
            raise ValueError(
                "MODEL.ACAMKD.DIVERSITY_TARGETS 'spatial' needs spatial masks, but MASKS is "
                "'channel': set DIVERSITY_TARGETS 'both' (the Dice loss then acts on the channel "
                "masks) or MASKS 'spatial_channel'."
            )
        if not 0 <= mask_budget < 1:
            raise ValueError(
                f"MODEL.ACAMKD.MASK_BUDGET must be 0 (off) or in (0, 1), the mean each mask is "
                f"held at, got {mask_budget}"
            )
        if num_masks < 1:
            raise ValueError(f"MODEL.ACAMKD.NUM_MASKS must be >= 1, got {num_masks}")
        if query_channel_ratio <= 0:
            raise ValueError(
                f"MODEL.ACAMKD.QUERY_CHANNEL_RATIO must be > 0, got {query_channel_ratio}"
            )
        if teacher_channels < 1 or student_channels < 1:
            raise ValueError(
                "ACAMLevel: teacher_channels and student_channels must be >= 1, got "
                f"{teacher_channels} and {student_channels}"
            )

        self.teacher_channels = teacher_channels
        self.student_channels = student_channels
        self.detach_student_in_masks = detach_student_in_masks
        self.mask_objective = mask_objective
        self.normalizer = normalizer
        self.diversity_targets = diversity_targets
        self.loss_weight = loss_weight
        self.diversity_weight = diversity_weight
        self.dice_eps = dice_eps
        self.masks = masks
        self.mask_source = mask_source

        self.align = alignment(student_channels, teacher_channels, always=align == "always")
        # Only what the chosen row uses is built, so no parameter sits idle in the optimiser.
        self.fusion = self.ascm = None
        if masks != "none" and mask_source == "fused":
            self.fusion = STCAFusion(
                teacher_channels,
                query_channel_ratio=query_channel_ratio,
                query_source=query_source,
                attention=attention,
            )
        if masks != "none":
            self.ascm = AdaptiveSpatialChannelMasks(
                teacher_channels,
                num_masks=num_masks,
                channel_mask_form=channel_mask_form,
                init_std=mask_init_std,
                spatial=masks in ("spatial_channel", "spatial"),
                channel=masks in ("spatial_channel", "channel"),
                budget=mask_budget,
            )

    @classmethod
    def from_config(cls, cfg, teacher_channels: int, student_channels: int) -> Dict:
        acam = cfg.MODEL.ACAMKD
        return {
            "teacher_channels": teacher_channels,
            "student_channels": student_channels,
            "num_masks": acam.NUM_MASKS,
            "query_source": acam.QUERY_SOURCE,
            "query_channel_ratio": acam.QUERY_CHANNEL_RATIO,
            "channel_mask_form": acam.CHANNEL_MASK_FORM,
            "detach_student_in_masks": acam.DETACH_STUDENT_IN_MASKS,
            "mask_objective": acam.MASK_OBJECTIVE,
            "normalizer": acam.NORMALIZER,
            "mask_budget": acam.MASK_BUDGET,
            "diversity_targets": acam.DIVERSITY_TARGETS,
            "align": acam.ALIGN,
            "loss_weight": acam.LOSS_WEIGHT,
            "diversity_weight": acam.DIVERSITY_WEIGHT,
            "mask_init_std": acam.MASK_INIT_STD,
            "dice_eps": acam.DICE_EPS,
            "masks": acam.MASKS,
            "mask_source": acam.MASK_SOURCE,
            "attention": acam.ATTENTION,
        }

    def forward(
        self,
        teacher: Tensor,
        student: Tensor,
        context: Optional[LevelContext] = None,
        return_masks: bool = False,
    ) -> ACAMOutput:
        """
        Args:
            teacher (Tensor): (B, Ct, H, W) teacher feature (detached here).
            student (Tensor): (B, Cs, H, W) raw student feature on the teacher's grid.
            context (LevelContext): unused (ACAM-KD reads no boxes).
            return_masks (bool): also return the detached masks, the fused, teacher and aligned
                student features and the discrepancy.

        Returns:
            ACAMOutput: weighted losses, detached statistics and, if asked for, the masks.
        """
        check_level_inputs(
            "ACAMLevel", teacher, student, self.teacher_channels, self.student_channels
        )
        teacher = teacher.detach()
        aligned = self.align(student)
        if self.ascm is None:
            return self._forward_without_masks(teacher, aligned, return_masks)

        mask_input = aligned.detach() if self.detach_student_in_masks else aligned
        if self.fusion is None:  # "teacher adaptive": the masks read the teacher alone
            fused = teacher
        elif self.fusion.attention_impl(teacher.device) == "chunked":
            # ASCM reads F only through m_s F and F's spatial mean, which STCA-FF gives without
            # forming F (STCAFusion.project).
            fused = None
            spatial_logits, pooled = self.fusion.project(
                teacher, mask_input, self.ascm.spatial_units, self.ascm.channel_units is not None
            )
        else:
            fused = self.fusion(teacher, mask_input)

        # The masks and losses are cheap next to the attention; float32 keeps the sigmoid masks
        # near 0.5 and the squared differences exact under a float16/bfloat16 autocast.
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            if fused is None:
                spatial_masks, channel_masks = self.ascm.masks(spatial_logits, pooled)
            else:
                spatial_masks, channel_masks = self.ascm(fused.float())
            diff = teacher.float() - aligned.float()
            losses = {}
            loss_div = diff.new_zeros(())
            for kind, masks, masked_loss in (
                ("channel", channel_masks, masked_channel_loss),
                ("spatial", spatial_masks, masked_spatial_loss),
            ):
                if masks is None:
                    continue
                # "ascend": the mask generator maximises the masked discrepancy; the student
                # still minimises it through D, which the reversal does not touch.
                in_loss = reverse_gradient(masks) if self.mask_objective == "ascend" else masks
                losses[f"loss_acam_{kind}"] = self.loss_weight * masked_loss(
                    diff, in_loss, self.normalizer
                )
                if kind == "spatial" or self.diversity_targets == "both":
                    loss_div = loss_div + dice_diversity_loss(masks, self.dice_eps)
            losses["loss_acam_diversity"] = self.diversity_weight * loss_div

        with torch.no_grad():
            discrepancy = diff.detach().square().sum(dim=1)  # (B, H, W)
            stats = {}
            for name, masks in (("spatial", spatial_masks), ("channel", channel_masks)):
                if masks is None:
                    continue
                for key, value in mask_statistics(masks, self.dice_eps).items():
                    stats[f"{name}_mask_{key}"] = value
            if spatial_masks is not None:
                stats["mask_discrepancy_corr"] = mask_discrepancy_correlation(
                    spatial_masks, discrepancy
                )

        masks_out = None
        if return_masks:
            if fused is None:  # formed for the figures only, without gradient
                with torch.no_grad():
                    fused = self.fusion(teacher, mask_input)
            masks_out = {
                "fused": fused.detach(),
                "teacher": teacher,
                "student": aligned.detach(),
                "discrepancy": discrepancy,
            }
            for name, masks in (("spatial", spatial_masks), ("channel", channel_masks)):
                if masks is not None:
                    masks_out[name] = masks.detach()
        return ACAMOutput(losses=losses, stats=stats, masks=masks_out)

    def _forward_without_masks(
        self, teacher: Tensor, aligned: Tensor, return_masks: bool
    ) -> ACAMOutput:
        """The paper's "no mask" row: alpha * ||D||^2 / (C*H*W), no statistics."""
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            diff = teacher.float() - aligned.float()
            losses = {"loss_acam_mse": self.loss_weight * feature_mse_loss(diff)}
        masks_out = None
        if return_masks:
            masks_out = {
                "teacher": teacher,
                "student": aligned.detach(),
                "discrepancy": diff.detach().square().sum(dim=1),
            }
        return ACAMOutput(losses=losses, stats={}, masks=masks_out)
