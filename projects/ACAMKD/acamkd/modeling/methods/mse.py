"""Plain feature MSE: the paper's "no mask" row as a method of its own."""

from typing import Dict

from detectron2.config import configurable

from ..acam_losses import feature_mse_loss
from .common import AlignedFeatureLoss, check_choice
from .registry import DISTILL_METHOD_REGISTRY

__all__ = ["FeatureMSE"]


@DISTILL_METHOD_REGISTRY.register("MSE")
class FeatureMSE(AlignedFeatureLoss):
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
        check_choice("ALIGN", align, ("always", "when_needed"))
        super().__init__(teacher_channels, student_channels, align_always=align == "always")
        self.loss_weight = loss_weight

    @classmethod
    def from_config(cls, cfg, teacher_channels: int, student_channels: int) -> Dict:
        return {
            "teacher_channels": teacher_channels,
            "student_channels": student_channels,
            "loss_weight": cfg.MODEL.ACAMKD.LOSS_WEIGHT,
            "align": cfg.MODEL.ACAMKD.ALIGN,
        }

    def level_losses(self, teacher, aligned):
        return {"loss_mse": self.loss_weight * feature_mse_loss(teacher - aligned)}, {}
