"""MGD: masked generative distillation (Yang et al., ECCV 2022)."""

from typing import Dict

import torch
from torch import Tensor, nn

from detectron2.config import configurable

from .common import AlignedFeatureLoss
from .registry import DISTILL_METHOD_REGISTRY, family_setting

__all__ = ["MGD", "random_position_mask"]

# The authors' settings per student family (alpha_mgd, lambda_mgd). FCOS has no config of
# theirs: it takes the one-stage detectors' values.
_AUTHORS = {
    "RetinaNet": {"ALPHA": 2e-5, "MASK_RATIO": 0.65},
    "RepPoints": {"ALPHA": 2e-5, "MASK_RATIO": 0.65},
    "FCOS": {"ALPHA": 2e-5, "MASK_RATIO": 0.65},
    "GeneralizedRCNN": {"ALPHA": 5e-7, "MASK_RATIO": 0.45},
    "SemanticSegmentor": {"ALPHA": 2e-5, "MASK_RATIO": 0.75},
}


def random_position_mask(like: Tensor, ratio: float) -> Tensor:
    """
    Args:
        like (Tensor): (B, C, H, W) the feature to mask.
        ratio (float): the probability that a position is dropped.

    Returns:
        Tensor: (B, 1, H, W) of 0 (dropped, probability ``ratio``) and 1, drawn per image and
        position from the global RNG, shared by all channels.
    """
    b, _, h, w = like.shape
    draw = torch.rand((b, 1, h, w), device=like.device)
    return (draw <= 1 - ratio).to(like.dtype)


@DISTILL_METHOD_REGISTRY.register("MGD")
class MGD(AlignedFeatureLoss):
    """
    ``L = alpha * sum_(n,c,h,w) (G(f_align(S) * M) - T)^2 / B`` as ``loss_mgd``, where M zeroes a
    random fraction ``mask_ratio`` of the positions (redrawn every step) and the generation block
    ``G`` is Conv3x3 -> ReLU -> Conv3x3 at the teacher's width. ``f_align`` is a 1x1 conv only
    where the widths differ.
    """

    @configurable
    def __init__(
        self,
        *,
        teacher_channels: int,
        student_channels: int,
        alpha: float = 2e-5,
        mask_ratio: float = 0.65,
    ) -> None:
        """
        Args:
            teacher_channels (int): Ct.
            student_channels (int): Cs.
            alpha (float): loss weight (authors' RetinaNet value by default).
            mask_ratio (float): fraction of positions dropped, in [0, 1).
        """
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"MODEL.ACAMKD.MGD.MASK_RATIO must be in [0, 1), got {mask_ratio}")
        super().__init__(teacher_channels, student_channels, align_always=False)
        self.alpha = alpha
        self.mask_ratio = mask_ratio
        c = teacher_channels
        self.generation = nn.Sequential(
            nn.Conv2d(c, c, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
        )

    @classmethod
    def from_config(cls, cfg, teacher_channels: int, student_channels: int) -> Dict:
        return {
            "teacher_channels": teacher_channels,
            "student_channels": student_channels,
            "alpha": family_setting(cfg, "MGD", "ALPHA", _AUTHORS),
            "mask_ratio": family_setting(cfg, "MGD", "MASK_RATIO", _AUTHORS),
        }

    def level_losses(self, teacher, aligned):
        mask = random_position_mask(aligned, self.mask_ratio) if self.training else 1.0
        generated = self.generation(aligned * mask)
        loss = (generated - teacher).square().sum() / teacher.shape[0]
        return {"loss_mgd": self.alpha * loss}, {}
