"""
ACAM-KD: Faster R-CNN X101-32x8d-FPN (model zoo, 3x) -> R50-FPN, 2x. Paper: 42.6 mAP.

acamkd_faster_rcnn_R_50_from_R_101_FPN_2x.py with detectron2's X101-32x8d teacher.
"""

from .acamkd_faster_rcnn_R_50_from_R_101_FPN_2x import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.teacher.config = "COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml"
model.teacher.weights = (
    "detectron2://COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x/139173657/model_final_68b088.pkl"
)
