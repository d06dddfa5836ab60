"""
ACAM-KD: RetinaNet X101-32x8d-FPN -> R50-FPN, 2x. Paper: 41.5 mAP.

acamkd_retinanet_R_50_from_R_101_FPN_2x.py with another teacher. detectron2's model zoo has
no such RetinaNet checkpoint: train retinanet_X_101_32x8d_FPN_3x.yaml first and pass it with
model.teacher.weights=/path/to/model_final.pth.
"""

from .acamkd_retinanet_R_50_from_R_101_FPN_2x import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.teacher.config = "configs/COCO-Detection/retinanet_X_101_32x8d_FPN_3x.yaml"
model.teacher.weights = ""
