"""
Gradient clipping for both engines: detectron2's ``SOLVER.CLIP_GRADIENTS`` types "value" and
"norm" (each parameter tensor on its own), and "full_model": the norm of all the gradients
together, clipped to ``CLIP_VALUE`` (``NORM_TYPE``), as mmcv's ``grad_clip=dict(max_norm=35)``
of the FGD, MGD and MasKD authors' configs and detectron2's DETR-style projects do.
"""

from functools import partial
from typing import Mapping

import torch
from torch import nn

from detectron2.config import CfgNode
from detectron2.solver.build import (
    _generate_optimizer_class_with_gradient_clipping,
    maybe_add_gradient_clipping,
)

__all__ = ["CLIP_TYPES", "add_gradient_clipping"]

CLIP_TYPES = ("value", "norm", "full_model")


def add_gradient_clipping(
    optimizer: torch.optim.Optimizer, clip: Mapping, key: str = "SOLVER.CLIP_GRADIENTS"
) -> torch.optim.Optimizer:
    """
    Make ``optimizer`` clip its gradients before each step, as ``clip`` says.

    Args:
        optimizer (Optimizer): an instantiated optimizer; its class is replaced by a subclass
            that clips (detectron2 does the same).
        clip (Mapping): ``SOLVER.CLIP_GRADIENTS`` (ENABLED, CLIP_TYPE, CLIP_VALUE, NORM_TYPE).
        key (str): where ``clip`` comes from, for the error message.

    Returns:
        Optimizer: ``optimizer``.
    """
    if not clip["ENABLED"]:
        return optimizer
    if clip["CLIP_TYPE"] not in CLIP_TYPES:
        raise ValueError(
            f"{key}.CLIP_TYPE {clip['CLIP_TYPE']!r} is not one of {CLIP_TYPES}: 'value' and "
            "'norm' clip each parameter tensor on its own (detectron2), 'full_model' the norm of "
            "all gradients together (the FGD/MGD/MasKD authors' max_norm 35)."
        )
    if clip["CLIP_TYPE"] == "full_model":
        # detectron2's own optimizer subclass, with its global clipper (meant for DETR).
        clip_all = partial(
            nn.utils.clip_grad_norm_,
            max_norm=float(clip["CLIP_VALUE"]),
            norm_type=float(clip["NORM_TYPE"]),
        )
        optimizer.__class__ = _generate_optimizer_class_with_gradient_clipping(
            type(optimizer), global_clipper=clip_all
        )
        return optimizer
    return maybe_add_gradient_clipping(
        CfgNode({"SOLVER": {"CLIP_GRADIENTS": dict(clip)}}), optimizer
    )
