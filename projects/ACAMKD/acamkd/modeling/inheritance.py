"""The paper's "inheritance strategy": the student starts from the teacher's FPN and head."""

import logging
from typing import List, Tuple

import torch
from torch import nn

__all__ = ["inherit_from_teacher"]

logger = logging.getLogger(__name__)

# Everything outside these prefixes (the FPN, the top block, the detection or segmentation
# heads) is a candidate; the bottom-up network and the normalisation buffers are the student's.
_NOT_INHERITED = ("backbone.bottom_up.", "pixel_mean", "pixel_std")


@torch.no_grad()
def inherit_from_teacher(student: nn.Module, teacher: nn.Module) -> Tuple[List[str], List[str]]:
    """
    Copy the teacher's FPN and head weights into the student wherever names and shapes match
    (as FGD's ``init_student``); log what was copied and what was skipped and why.

    Returns:
        tuple[list[str], list[str]]: names copied, and names skipped as "name (reason)".
    """
    student_state = student.state_dict()
    copied, skipped = [], []
    for name, value in teacher.state_dict().items():
        if name.startswith(_NOT_INHERITED):
            continue
        if name not in student_state:
            skipped.append(f"{name} (not in student)")
        elif student_state[name].shape != value.shape:
            skipped.append(
                f"{name} (shape {tuple(value.shape)} vs student {tuple(student_state[name].shape)})"
            )
        else:
            student_state[name].copy_(value)
            copied.append(name)
    logger.info(
        "Inheritance strategy: copied %d tensors from the teacher into the student:\n  %s",
        len(copied),
        "\n  ".join(copied) or "(none)",
    )
    if skipped:
        logger.info("Inheritance strategy: skipped %d:\n  %s", len(skipped), "\n  ".join(skipped))
    return copied, skipped
