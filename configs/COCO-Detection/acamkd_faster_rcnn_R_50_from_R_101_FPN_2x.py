"""
ACAM-KD: Faster R-CNN R101-FPN (model zoo, 3x) -> R50-FPN, 2x. Paper: 38.4 -> 41.4 mAP.

The LazyConfig twin of acamkd_faster_rcnn_R_50_from_R_101_FPN_2x.yaml: the student, data,
optimizer and schedule of faster_rcnn_R_50_FPN_2x.py, the frozen model-zoo teacher, one ACAM
module per FPN level the RPN reads (p2-p6), and the paper's inheritance strategy.
"""

from detectron2.config import LazyCall as L

from acamkd.lazy import build_acam_levels, build_lazy_teacher
from acamkd.modeling import ACAMDistiller

from .faster_rcnn_R_50_FPN_2x import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model = L(ACAMDistiller)(
    student=model,
    teacher=L(build_lazy_teacher)(
        config="COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml",
        weights="detectron2://COCO-Detection/faster_rcnn_R_101_FPN_3x/137851257/"
        "model_final_f6e8b1.pkl",
    ),
    acam=L(build_acam_levels)(
        levels="${..student.proposal_generator.in_features}",
        teacher_channels=256,  # the teacher's FPN width
        student_channels="${..student.backbone.out_channels}",
        num_masks=6,
    ),
    distill_target="fpn",
    student_input_format="${..dataloader.train.mapper.image_format}",
    teacher_input_format="BGR",
    inherit_teacher=True,
)
