"""
ACAM-KD: RetinaNet R101-FPN (model zoo, 3x) -> R50-FPN, 2x. Paper: 37.4 -> 41.2 mAP.

The LazyConfig twin of acamkd_retinanet_R_50_from_R_101_FPN_2x.yaml (same model, data and
schedule): the student, data, optimizer and schedule of retinanet_R_50_FPN_2x.py, a frozen
teacher given as a config name plus a checkpoint, and one ACAM module per FPN level of the
student's head (p3-p7), starting from the teacher's FPN and head (the paper's inheritance).

    python train_net.py --num-gpus 8 \
        --config-file configs/COCO-Detection/acamkd_retinanet_R_50_from_R_101_FPN_2x.py \
        model.acam.num_masks=6 model.teacher.weights=/path/to/model_final_971ab9.pkl
"""

from detectron2.config import LazyCall as L

from acamkd.lazy import build_acam_levels, build_lazy_teacher
from acamkd.modeling import ACAMDistiller

from .retinanet_R_50_FPN_2x import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model = L(ACAMDistiller)(
    student=model,
    teacher=L(build_lazy_teacher)(
        config="COCO-Detection/retinanet_R_101_FPN_3x.yaml",
        weights="detectron2://COCO-Detection/retinanet_R_101_FPN_3x/190397697/"
        "model_final_971ab9.pkl",
    ),
    # Every other ACAMLevel keyword (query_source, mask_objective, loss_weight, ...) can be
    # added here or on the command line; the defaults are MODEL.ACAMKD's.
    acam=L(build_acam_levels)(
        levels="${..student.head_in_features}",
        teacher_channels=256,  # the teacher's FPN width
        student_channels="${..student.backbone.out_channels}",
        num_masks=6,
    ),
    distill_target="fpn",
    # The student sees the images in the data loader's format; the teacher's is its own.
    student_input_format="${..dataloader.train.mapper.image_format}",
    teacher_input_format="BGR",
    inherit_teacher=True,
)
