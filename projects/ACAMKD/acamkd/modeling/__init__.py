"""Models: the ACAM module, the distillation meta-architecture and the parts detectron2 lacks."""

# Importing the submodules registers their classes in detectron2's registries.
# get_acamkd_cfg lives in acamkd.config; it is also exported here, as it always was.
from ..config import get_acamkd_cfg
from .acam import ACAMLevel, ACAMOutput
from .backbone import (
    MobileNetV2Backbone,
    build_mobilenetv2_backbone,
    build_resnet_basic_deeplab_backbone,
)
from .heads import PSPHead
from .meta_arch import FCOS, ACAMDistiller, DistillOutput, RepPoints, build_student_cfg
from .methods import DISTILL_METHOD_REGISTRY, LevelContext, LevelOutput, build_distill_method
from .teacher import build_frozen_teacher, build_teacher_cfg

__all__ = [
    "ACAMLevel",
    "ACAMOutput",
    "ACAMDistiller",
    "DISTILL_METHOD_REGISTRY",
    "DistillOutput",
    "LevelContext",
    "LevelOutput",
    "build_distill_method",
    "FCOS",
    "MobileNetV2Backbone",
    "PSPHead",
    "RepPoints",
    "build_mobilenetv2_backbone",
    "build_resnet_basic_deeplab_backbone",
    "build_student_cfg",
    "build_frozen_teacher",
    "build_teacher_cfg",
    "get_acamkd_cfg",
]
