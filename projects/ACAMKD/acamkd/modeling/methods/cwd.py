"""CWD: channel-wise distillation (Shu et al., ICCV 2021)."""

from typing import Dict

import torch.nn.functional as F

from detectron2.config import configurable

from .common import AlignedFeatureLoss
from .registry import DISTILL_METHOD_REGISTRY, family_setting

__all__ = ["CWD", "channel_wise_kl"]

# The authors' settings per student family: tau 1, weight 5 on FPN features (their RetinaNet
# config); tau 4, weight 3 on segmentation logits (their Cityscapes code).
_DETECTION = {"TAU": 1.0, "WEIGHT": 5.0}
_AUTHORS = {
    "RetinaNet": _DETECTION,
    "GeneralizedRCNN": _DETECTION,
    "FCOS": _DETECTION,
    "RepPoints": _DETECTION,
    "SemanticSegmentor": {"TAU": 4.0, "WEIGHT": 3.0},
}


def channel_wise_kl(teacher, student, tau: float):
    """
    ``tau^2 / (B*C) * sum_(n,c) KL(softmax_hw(T/tau) || softmax_hw(S/tau))``.

    Args:
        teacher (Tensor): (B, C, H, W), detached.
        student (Tensor): (B, C, H, W).
        tau (float): temperature.

    Returns:
        Tensor: 0-dim loss.
    """
    b, c = teacher.shape[:2]
    log_p_t = F.log_softmax(teacher.flatten(2) / tau, dim=-1)
    log_p_s = F.log_softmax(student.flatten(2) / tau, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * tau**2 / (b * c)


@DISTILL_METHOD_REGISTRY.register("CWD")
class CWD(AlignedFeatureLoss):
    """
    Each channel's map becomes a distribution over positions, ``softmax_hw(x / tau)``;
    ``L = w * tau^2 / (B*C) * sum_(n,c) KL(p_T || p_S)`` as ``loss_cwd``. ``f_align`` is a 1x1
    conv only where the widths differ.
    """

    @configurable
    def __init__(
        self, *, teacher_channels: int, student_channels: int, tau: float = 1.0, weight: float = 5.0
    ) -> None:
        """
        Args:
            teacher_channels (int): Ct.
            student_channels (int): Cs.
            tau (float): temperature (> 0).
            weight (float): w.
        """
        if tau <= 0:
            raise ValueError(f"MODEL.ACAMKD.CWD.TAU must be > 0, got {tau}")
        super().__init__(teacher_channels, student_channels, align_always=False)
        self.tau = tau
        self.weight = weight

    @classmethod
    def from_config(cls, cfg, teacher_channels: int, student_channels: int) -> Dict:
        return {
            "teacher_channels": teacher_channels,
            "student_channels": student_channels,
            "tau": family_setting(cfg, "CWD", "TAU", _AUTHORS),
            "weight": family_setting(cfg, "CWD", "WEIGHT", _AUTHORS),
        }

    def level_losses(self, teacher, aligned):
        return {"loss_cwd": self.weight * channel_wise_kl(teacher, aligned, self.tau)}, {}
