"""
ACAM-KD: RepPoints X101-32x8d-FPN -> R50-FPN, 2x (paper: 42.8 COCO AP).

acamkd_reppoints_R_50_from_R_101_FPN_2x.py with another teacher. No checkpoint exists: train
reppoints_X_101_32x8d_FPN_2x.yaml first and pass it with model.teacher.weights=/path/to/it.
"""

from .acamkd_reppoints_R_50_from_R_101_FPN_2x import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.teacher.config = "configs/COCO-Detection/reppoints_X_101_32x8d_FPN_2x.yaml"
