"""
ACAM-KD on Cityscapes: DeepLabV3-R101 -> PSPNet-R18 (output stride 8), 40k iterations.
Paper: 72.55 -> 75.99 mIoU.

acamkd_deeplabv3_R_18_OS8_from_deeplabv3_R_101_OS8_40k.py with another student.
"""

from .acamkd_deeplabv3_R_18_OS8_from_deeplabv3_R_101_OS8_40k import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.student.config = "configs/Cityscapes-SemanticSegmentation/pspnet_R_18_OS8.yaml"
