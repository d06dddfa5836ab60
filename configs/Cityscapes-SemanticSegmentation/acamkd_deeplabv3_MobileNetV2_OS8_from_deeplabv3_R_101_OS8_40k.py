"""
ACAM-KD on Cityscapes: DeepLabV3-R101 -> DeepLabV3-MobileNetV2 (output stride 8), 40k
iterations. Paper: 73.12 -> 76.21 mIoU.

acamkd_deeplabv3_R_18_OS8_from_deeplabv3_R_101_OS8_40k.py with another student. Its ImageNet
weights: MODEL.ACAMKD.MOBILENETV2.WEIGHTS in the student's YAML, e.g.
model.student.overrides=[MODEL.ACAMKD.MOBILENETV2.WEIGHTS,/path/to/mobilenetv2_100.pth].
"""

from .acamkd_deeplabv3_R_18_OS8_from_deeplabv3_R_101_OS8_40k import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.student.config = "configs/Cityscapes-SemanticSegmentation/deeplabv3_MobileNetV2_OS8.yaml"
