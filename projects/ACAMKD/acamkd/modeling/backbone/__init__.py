"""Backbones detectron2 lacks for the segmentation students: a dilated ResNet-18/34 with the
DeepLab stem and a dilated timm MobileNetV2."""

# Importing the modules registers their builders in detectron2's BACKBONE_REGISTRY
# (resnet_deeplab also imports detectron2.projects.deeplab, registering DeepLab's teacher parts).
from .mobilenetv2 import MobileNetV2Backbone, build_mobilenetv2_backbone
from .resnet_deeplab import DilatedBasicBlock, build_resnet_basic_deeplab_backbone

__all__ = [
    "DilatedBasicBlock",
    "MobileNetV2Backbone",
    "build_mobilenetv2_backbone",
    "build_resnet_basic_deeplab_backbone",
]
