# Importing these modules registers ACAMDistiller and the YAML-buildable FCOS.
from .distiller import ACAMDistiller, build_student_cfg
from .fcos import FCOS, build_fcos_resnet_fpn_backbone

__all__ = ["ACAMDistiller", "build_student_cfg", "FCOS", "build_fcos_resnet_fpn_backbone"]
