"""PKD: Pearson-correlation distillation (Cao et al., NeurIPS 2022)."""

from typing import Dict

from torch import Tensor

from detectron2.config import configurable

from .common import AlignedFeatureLoss
from .registry import DISTILL_METHOD_REGISTRY, family_setting

__all__ = ["PKD", "standardize_channels"]

# The authors' weight per student family; segmentation has no config of theirs and takes the
# one-stage detectors' value.
_AUTHORS = {
    "RetinaNet": {"WEIGHT": 10.0},
    "FCOS": {"WEIGHT": 10.0},
    "RepPoints": {"WEIGHT": 10.0},
    "GeneralizedRCNN": {"WEIGHT": 6.0},
    "SemanticSegmentor": {"WEIGHT": 10.0},
}


def standardize_channels(x: Tensor, eps: float = 1e-6) -> Tensor:
    """
    Args:
        x (Tensor): (B, C, H, W).
        eps (float): added to the standard deviation.

    Returns:
        Tensor: (B, C, H, W), each channel shifted and scaled over the whole batch (all B*H*W
        values of it) to zero mean and unit (unbiased) standard deviation.
    """
    flat = x.transpose(0, 1).flatten(1)  # (C, B*H*W)
    mean = flat.mean(dim=1).view(1, -1, 1, 1)
    std = flat.std(dim=1).view(1, -1, 1, 1)
    return (x - mean) / (std + eps)


@DISTILL_METHOD_REGISTRY.register("PKD")
class PKD(AlignedFeatureLoss):
    """
    ``L = w * mean_(n,c,h,w) (z(f_align(S)) - z(T))^2 / 2`` as ``loss_pkd``, with ``z`` the
    per-channel standardisation over the batch (:func:`standardize_channels`): about
    ``w * (1 - r)`` averaged over channels, r their Pearson correlation. ``f_align`` is a 1x1
    conv only where the widths differ. The authors distil p3-p6 (p2-p5 for Faster R-CNN):
    MODEL.ACAMKD.IN_FEATURES chooses the levels.
    """

    @configurable
    def __init__(self, *, teacher_channels: int, student_channels: int, weight: float = 10.0):
        """
        Args:
            teacher_channels (int): Ct.
            student_channels (int): Cs.
            weight (float): w.
        """
        super().__init__(teacher_channels, student_channels, align_always=False)
        self.weight = weight

    @classmethod
    def from_config(cls, cfg, teacher_channels: int, student_channels: int) -> Dict:
        return {
            "teacher_channels": teacher_channels,
            "student_channels": student_channels,
            "weight": family_setting(cfg, "PKD", "WEIGHT", _AUTHORS),
        }

    def level_losses(self, teacher, aligned):
        diff = standardize_channels(aligned) - standardize_channels(teacher)
        return {"loss_pkd": self.weight * diff.square().mean() / 2}, {}
