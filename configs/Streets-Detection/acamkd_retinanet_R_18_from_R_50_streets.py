"""
RetinaNet R-18-FPN student distilled from the R-50-FPN teacher (retinanet_R_50_FPN_streets.yaml),
with the schedule and seed of the baseline retinanet_R_18_FPN_streets.py; the LazyConfig twin of
acamkd_retinanet_R_18_from_R_50_streets.yaml. The RetinaNet benchmark's pair (wide R-18 teacher)
with only the teacher changed (both FPNs are 128 wide).

    python train_net.py \
        --config-file configs/Streets-Detection/acamkd_retinanet_R_18_from_R_50_streets.py \
        model.teacher.weights=output/streets/retinanet_R_50_FPN/model_final.pth
"""

from .acamkd_retinanet_R_18_from_R_18_wide_streets import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.teacher.config = "configs/Streets-Detection/retinanet_R_50_FPN_streets.yaml"
train.output_dir = "./output/streets/acamkd_retinanet_R_18_from_R_50"
