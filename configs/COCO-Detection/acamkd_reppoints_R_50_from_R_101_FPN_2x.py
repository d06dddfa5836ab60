"""
ACAM-KD: RepPoints R101-FPN -> R50-FPN, 2x (paper: 38.6 -> 42.5 COCO AP).

The LazyConfig twin of acamkd_reppoints_R_50_from_R_101_FPN_2x.yaml: the student, data,
optimizer and schedule of reppoints_R_50_FPN_2x.py, one ACAM module per FPN level of the
student's head (p3-p7) and the paper's inheritance strategy. No RepPoints checkpoint exists:
train reppoints_R_101_FPN_2x.yaml first and pass it with model.teacher.weights=/path/to/it.
"""

from detectron2.config import LazyCall as L

from acamkd.lazy import build_acam_levels, build_lazy_teacher
from acamkd.modeling import ACAMDistiller

from .reppoints_R_50_FPN_2x import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model = L(ACAMDistiller)(
    student=model,
    teacher=L(build_lazy_teacher)(
        config="configs/COCO-Detection/reppoints_R_101_FPN_2x.yaml", weights=""
    ),
    acam=L(build_acam_levels)(
        levels="${..student.head_in_features}",
        teacher_channels=256,  # the teacher's FPN width
        student_channels="${..student.backbone.out_channels}",
        num_masks=6,
    ),
    distill_target="fpn",
    student_input_format="${..dataloader.train.mapper.image_format}",
    teacher_input_format="BGR",
    inherit_teacher=True,
)
