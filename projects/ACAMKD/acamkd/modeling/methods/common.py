"""Pieces the distillation methods share: the student's alignment, the input checks and the
frame of a loss on the teacher feature and the aligned student."""

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from detectron2.utils.events import get_event_storage

from .registry import LevelContext, LevelOutput

__all__ = [
    "AlignedFeatureLoss",
    "alignment",
    "check_choice",
    "check_level_inputs",
    "current_storage",
    "full_precision",
]


def alignment(student_channels: int, teacher_channels: int, always: bool) -> nn.Module:
    """
    The student's alignment ``f_align``: a 1x1 conv with bias, Cs -> Ct.

    Args:
        student_channels (int): Cs.
        teacher_channels (int): Ct.
        always (bool): build the conv even when Cs == Ct (ACAM-KD, MasKD); otherwise it is
            built only where the widths differ (FGD, MGD, CWD, PKD) and is the identity else.

    Returns:
        nn.Module: the conv, or ``nn.Identity``.
    """
    if always or student_channels != teacher_channels:
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
    return nn.Identity()


def check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
    """Raise a ValueError naming ``MODEL.ACAMKD.<key>`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"MODEL.ACAMKD.{key} must be one of {tuple(allowed)}, got {value!r}")


def check_level_inputs(
    name: str, teacher: Tensor, student: Tensor, teacher_channels: int, student_channels: int
) -> None:
    """
    Raise a ValueError unless ``teacher`` is (B, Ct, H, W) and ``student`` (B, Cs, H, W).

    Args:
        name (str): the module, for the message.
    """
    if teacher.dim() != 4 or student.dim() != 4:
        raise ValueError(
            f"{name}: teacher and student must be (B, C, H, W), got "
            f"{tuple(teacher.shape)} and {tuple(student.shape)}"
        )
    tb, tc, th, tw = teacher.shape
    sb, sc, sh, sw = student.shape
    if (tb, th, tw) != (sb, sh, sw):
        raise ValueError(
            f"{name}: teacher and student must share batch size and grid (B, H, W), got "
            f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)}"
        )
    if tc != teacher_channels or sc != student_channels:
        raise ValueError(
            f"{name}: expected {teacher_channels} teacher and {student_channels} student "
            f"channels, got {tc} and {sc}"
        )


def full_precision(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it is (losses are computed so, also under autocast)."""
    return x if x.dtype == torch.float64 else x.float()


def current_storage():
    """detectron2's open event storage, or None outside a trainer (e.g. a forward in a test)."""
    try:
        return get_event_storage()
    except AssertionError:
        return None


class AlignedFeatureLoss(nn.Module):
    """
    The frame of a method whose loss reads only the teacher feature and the aligned student:
    checks the inputs, detaches the teacher, aligns the student, computes :meth:`level_losses`
    in float32 (also under autocast) and, if asked for, the maps a figure shows
    (:meth:`level_maps`, computed before the losses). Subclasses implement
    :meth:`level_losses`; one that has maps of its own extends :meth:`level_maps`.
    """

    def __init__(self, teacher_channels: int, student_channels: int, align_always: bool):
        super().__init__()
        if teacher_channels < 1 or student_channels < 1:
            raise ValueError(
                f"{type(self).__name__}: teacher_channels and student_channels must be >= 1, "
                f"got {teacher_channels} and {student_channels}"
            )
        self.teacher_channels = teacher_channels
        self.student_channels = student_channels
        self.align = alignment(student_channels, teacher_channels, align_always)

    def level_losses(self, teacher: Tensor, aligned: Tensor) -> Tuple[Dict[str, Tensor], Dict]:
        """
        Args:
            teacher (Tensor): (B, C, H, W) float32 (or float64), detached.
            aligned (Tensor): (B, C, H, W) the aligned student, same dtype.

        Returns:
            tuple: (weighted 0-dim losses by name, detached 0-dim statistics by name).
        """
        raise NotImplementedError

    def level_maps(self, teacher: Tensor, aligned: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            teacher (Tensor): (B, C, H, W) float32 (or float64), detached.
            aligned (Tensor): (B, C, H, W) the aligned student, same dtype, detached.

        Returns:
            dict[str, Tensor]: "teacher", "student" (aligned) and "discrepancy", the
            per-position ``sum_c (T - f_align(S))^2`` (B, H, W).
        """
        return {
            "teacher": teacher,
            "student": aligned,
            "discrepancy": (teacher - aligned).square().sum(dim=1),
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
            student (Tensor): (B, Cs, H, W) raw student feature on the teacher's grid.
            context (LevelContext): unused.
            return_masks (bool): also return the maps of :meth:`level_maps`.

        Returns:
            LevelOutput: the method's losses and statistics.
        """
        name = type(self).__name__
        check_level_inputs(name, teacher, student, self.teacher_channels, self.student_channels)
        aligned = self.align(student)
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            t, s = full_precision(teacher.detach()), full_precision(aligned)
            maps = self.level_maps(t, s.detach()) if return_masks else None
            losses, stats = self.level_losses(t, s)
        return LevelOutput(losses=losses, stats=stats, masks=maps)
