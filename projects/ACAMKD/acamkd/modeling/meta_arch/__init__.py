# Importing these modules registers ACAMDistiller, the YAML-buildable FCOS and RepPoints.
from .distiller import ACAMDistiller, DistillOutput, build_student_cfg
from .fcos import FCOS, build_fcos_resnet_fpn_backbone
from .reppoints import RepPoints, add_reppoints_config, build_reppoints_resnet_fpn_backbone

__all__ = [
    "ACAMDistiller",
    "DistillOutput",
    "build_student_cfg",
    "FCOS",
    "build_fcos_resnet_fpn_backbone",
    "RepPoints",
    "add_reppoints_config",
    "build_reppoints_resnet_fpn_backbone",
]
