"""
Gradient clipping for both engines: detectron2's ``SOLVER.CLIP_GRADIENTS`` types "value" and
"norm" (each parameter tensor on its own), and "full_model": the norm of all the gradients
together, clipped to ``CLIP_VALUE`` (``NORM_TYPE``), as mmcv's ``grad_clip=dict(max_norm=35)``
of the FGD, MGD and MasKD authors' configs and detectron2's DETR-style projects do.
"""

import itertools
from typing import Mapping

import torch
from torch import nn

from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = ["CLIP_TYPES", "add_gradient_clipping"]

CLIP_TYPES = ("value", "norm", "full_model")


def _clip_whole_model(optimizer_type: type, max_norm: float, norm_type: float) -> type:
    """A subclass of ``optimizer_type`` whose ``step`` first clips the norm of all gradients."""

    def step(self, closure=None):
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        return optimizer_type.step(self, closure)

    return type(
        optimizer_type.__name__ + "WithFullModelGradientClip", (optimizer_type,), {"step": step}
    )


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
        optimizer.__class__ = _clip_whole_model(
            type(optimizer), float(clip["CLIP_VALUE"]), float(clip["NORM_TYPE"])
        )
        return optimizer
    return maybe_add_gradient_clipping(
        CfgNode({"SOLVER": {"CLIP_GRADIENTS": dict(clip)}}), optimizer
    )
