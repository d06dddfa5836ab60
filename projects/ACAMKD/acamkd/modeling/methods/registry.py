"""The registry of distillation methods, what a method receives beside the two features, and
the authors' settings per detector family."""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from torch import Tensor, nn

from detectron2.config import CfgNode
from fvcore.common.registry import Registry

__all__ = [
    "DISTILL_METHOD_REGISTRY",
    "LevelContext",
    "LevelOutput",
    "build_distill_method",
    "family_setting",
    "method_names",
]


class _MethodRegistry(Registry):
    """fvcore's Registry whose ``register`` also takes the name to register under:
    ``@DISTILL_METHOD_REGISTRY.register("FGD")``; a bare ``@...register()`` uses the class name."""

    def register(self, obj=None):
        if isinstance(obj, str):
            name = obj
            return lambda cls: self._do_register(name, cls) or cls
        return super().register(obj)


DISTILL_METHOD_REGISTRY = _MethodRegistry("DISTILL_METHOD")
DISTILL_METHOD_REGISTRY.__doc__ = """
Distillation methods, one module per distilled level, chosen by ``MODEL.ACAMKD.METHOD``.

A method is an ``nn.Module`` registered under its name. Its ``from_config(cfg,
teacher_channels, student_channels)`` returns its constructor's keyword arguments (it is
``@configurable``), and its ``forward(teacher, student, context=None, return_masks=False)``
takes the (B, Ct, H, W) teacher and (B, Cs, H, W) student features of one level, on the same
grid, and returns an :class:`~acamkd.modeling.acam.ACAMOutput` whose losses are already
weighted and named ``loss_<method>_<term>``. A class attribute ``needs_boxes = True`` marks a
method that reads each image's ground-truth boxes (detection students only).
"""


@dataclass
class LevelContext:
    """
    What a method may read beside the two features of a level.

    Attributes:
        padded_hw (tuple[int, int]): the padded batch's image size, in input pixels.
        image_sizes (list[tuple[int, int]]): each image's (height, width) before padding.
        gt_boxes (list[Tensor] or None): each image's (K_i, 4) ground-truth boxes, XYXY in
            input pixels; None when the inputs carry no annotations.
    """

    padded_hw: Tuple[int, int]
    image_sizes: List[Tuple[int, int]]
    gt_boxes: Optional[List[Tensor]] = None


@dataclass
class LevelOutput:
    """
    What a method's level module returns.

    Attributes:
        losses (dict[str, Tensor]): already weighted 0-dim losses, ``loss_<method>_<term>``.
        stats (dict[str, Tensor]): detached 0-dim statistics, logged as
            ``acam/<level>/<name>`` (e.g. mask means); may be empty.
        masks (dict[str, Tensor] or None): only when asked for, detached maps for figures:
            "teacher" (B, C, H, W), "student" (B, C, H, W) the aligned student, "discrepancy"
            (B, H, W), and the method's own masks where it has any.
    """

    losses: Dict[str, Tensor]
    stats: Dict[str, Tensor]
    masks: Optional[Dict[str, Tensor]]


def method_names() -> List[str]:
    """The registered method names, sorted."""
    return sorted(name for name, _ in DISTILL_METHOD_REGISTRY)


def build_distill_method(cfg: CfgNode, teacher_channels: int, student_channels: int) -> nn.Module:
    """
    The module of ``MODEL.ACAMKD.METHOD`` for one level.

    Args:
        cfg (CfgNode): the distillation config.
        teacher_channels (int): Ct of the level's teacher feature.
        student_channels (int): Cs of the level's raw student feature.

    Returns:
        nn.Module: the method's level module.
    """
    name = cfg.MODEL.ACAMKD.METHOD
    if name not in DISTILL_METHOD_REGISTRY:
        raise ValueError(
            f"MODEL.ACAMKD.METHOD={name!r} is not a registered distillation method; the "
            f"registered ones are {method_names()}. A method of your own is registered with "
            "@DISTILL_METHOD_REGISTRY.register() in a module imported before the model is built."
        )
    return DISTILL_METHOD_REGISTRY.get(name)(
        cfg, teacher_channels=teacher_channels, student_channels=student_channels
    )


def family_setting(cfg: CfgNode, method: str, key: str, table: Mapping[str, Dict[str, float]]):
    """
    ``MODEL.ACAMKD.<method>.<key>``, or, where it is None (the default), the value the method's
    authors use for the student's family (``MODEL.ACAMKD.STUDENT_META_ARCHITECTURE``).

    Args:
        cfg (CfgNode): the distillation config.
        method (str): the method's config node, e.g. "FGD".
        key (str): the key under it, e.g. "ALPHA".
        table (dict[str, dict[str, float]]): family -> key -> the authors' value.

    Returns:
        the value.
    """
    value = cfg.MODEL.ACAMKD[method][key]
    if value is not None:
        return value
    family = cfg.MODEL.ACAMKD.STUDENT_META_ARCHITECTURE
    if family not in table:
        raise ValueError(
            f"MODEL.ACAMKD.{method}.{key} is not set and {method} has no setting of its "
            f"authors for a {family} student (it has for {sorted(table)}): set "
            f"MODEL.ACAMKD.{method}.{key}."
        )
    return table[family][key]
