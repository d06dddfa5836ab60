"""
ACAM-KD: FCOS X101-32x8d-FPN -> R50-FPN, 2x.

acamkd_fcos_R_50_from_R_101_FPN_2x.py with another teacher. No model-zoo checkpoint exists:
train fcos_X_101_32x8d_FPN_3x.yaml first and pass it with model.teacher.weights=/path/to/it.
"""

from .acamkd_fcos_R_50_from_R_101_FPN_2x import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.teacher.config = "configs/COCO-Detection/fcos_X_101_32x8d_FPN_3x.yaml"
