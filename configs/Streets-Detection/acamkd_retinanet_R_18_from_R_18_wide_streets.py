"""
ACAM-KD student of the RetinaNet benchmark: RetinaNet R-18-FPN distilled from the wide
R-18-FPN teacher (retinanet_R_18_FPN_wide_streets.yaml, trained into output/retinanet_teacher),
with the schedule and seed of the baseline retinanet_R_18_FPN_streets.py; the LazyConfig twin of
acamkd_retinanet_R_18_from_R_18_wide_streets.yaml.

    python train_net.py \
        --config-file configs/Streets-Detection/acamkd_retinanet_R_18_from_R_18_wide_streets.py \
        model.teacher.weights=output/retinanet_teacher/model_final.pth
"""

from detectron2.config import LazyCall as L

from acamkd.lazy import build_acam_levels, build_lazy_teacher
from acamkd.modeling import ACAMDistiller

from .retinanet_R_18_FPN_streets import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model = L(ACAMDistiller)(
    student=model,
    teacher=L(build_lazy_teacher)(
        config="configs/Streets-Detection/retinanet_R_18_FPN_wide_streets.yaml", weights=""
    ),
    acam=L(build_acam_levels)(
        levels="${..student.head_in_features}",
        teacher_channels=128,  # the teacher's FPN width (retinanet_R_18_FPN_wide_streets.yaml)
        student_channels="${..student.backbone.out_channels}",
        num_masks=6,
    ),
    distill_target="fpn",
    student_input_format="${..dataloader.train.mapper.image_format}",
    teacher_input_format="BGR",
)

train.output_dir = "./output/streets/acamkd_retinanet_R_18_from_R_18_wide"
