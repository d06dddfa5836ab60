"""
FGD: RetinaNet R101-FPN (model zoo, 3x) -> R50-FPN, 2x, with the authors' RetinaNet settings.

The LazyConfig twin of fgd_retinanet_R_50_from_R_101_FPN_2x.yaml: the ACAM-KD pair's student,
teacher, data and schedule with FGD's level modules in place of ACAM's (any registered method
is chosen the same way, with its own keywords) and the authors' gradient clipping.

    python train_net.py --num-gpus 8 \
        --config-file configs/COCO-Detection/fgd_retinanet_R_50_from_R_101_FPN_2x.py
"""

from detectron2.config import LazyCall as L

from acamkd.lazy import build_acam_levels

from .acamkd_retinanet_R_50_from_R_101_FPN_2x import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.acam = L(build_acam_levels)(
    levels="${..student.head_in_features}",
    teacher_channels=256,
    student_channels="${..student.backbone.out_channels}",
    method="FGD",
    temp=0.5,
    alpha=1e-3,
    beta=5e-4,
    gamma=5e-4,
    lambda_=5e-6,
    box_mapping="unpadded",
)
# The authors' grad_clip=dict(max_norm=35): the norm of all gradients together.
train.clip_gradients = dict(enabled=True, clip_type="full_model", clip_value=35.0, norm_type=2.0)
