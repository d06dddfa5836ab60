"""Plain feature MSE: the paper's "no mask" row as a method of its own."""

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from detectron2.config import configurable

from ..acam_losses import feature_mse_loss
from .common import alignment, check_level_inputs
from .registry import DISTILL_METHOD_REGISTRY, LevelContext, LevelOutput

__all__ = ["FeatureMSE"]


@DISTILL_METHOD_REGISTRY.register("MSE")
class FeatureMSE(nn.Module):
    """
    ``L = w * ||T - f_align(S)||^2 / (C*H*W)`` per image, then the batch mean, as
    ``loss_mse``: the same loss as ACAM-KD's ``MASKS none`` row.
    """

    @configurable
    def __init__(
        self,
        *,
        teacher_channels: int,
        student_channels: int,
        loss_weight: float = 1.0,
        align: str = "always",
    ) -> None:
        """
        Args:
            teacher_channels (int): Ct.
            student_channels (int): Cs.
            loss_weight (float): w.
            align (str): f_align is a 1x1 conv "always" or only "when_needed".
        """
        super().__init__()
        if align not in ("always", "when_needed"):
            raise ValueError(f"MODEL.ACAMKD.ALIGN must be 'always' or 'when_needed', got {align!r}")
        self.teacher_channels = teacher_channels
        self.student_channels = student_channels
        self.loss_weight = loss_weight
        self.align = alignment(student_channels, teacher_channels, align == "always")

    @classmethod
    def from_config(cls, cfg, teacher_channels: int, student_channels: int) -> Dict:
        return {
            "teacher_channels": teacher_channels,
            "student_channels": student_channels,
            "loss_weight": cfg.MODEL.ACAMKD.LOSS_WEIGHT,
            "align": cfg.MODEL.ACAMKD.ALIGN,
        }

    def forward(
        self,
        teacher: Tensor,
        student: Tensor,
        context: Optional[LevelContext] = None,
        return_masks: bool = False,
    ) -> LevelOutput:
        """
        Args:
            teacher (Tensor): (B, Ct, H, W), detached here.
            student (Tensor): (B, Cs, H, W) on the teacher's grid.
            context (LevelContext): unused.
            return_masks (bool): also return the features and the discrepancy (no masks).

        Returns:
            LevelOutput: ``loss_mse``, no statistics.
        """
        check_level_inputs(
            "FeatureMSE", teacher, student, self.teacher_channels, self.student_channels
        )
        teacher = teacher.detach()
        aligned = self.align(student)
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            diff = teacher.float() - aligned.float()
            losses = {"loss_mse": self.loss_weight * feature_mse_loss(diff)}
        maps = None
        if return_masks:
            maps = {
                "teacher": teacher,
                "student": aligned.detach(),
                "discrepancy": diff.detach().square().sum(dim=1),
            }
        return LevelOutput(losses=losses, stats={}, masks=maps)
