"""Pieces every distillation method shares: the student's alignment and the input checks."""

from torch import Tensor, nn

__all__ = ["alignment", "check_level_inputs"]


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
