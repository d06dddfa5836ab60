"""
Faster R-CNN R50-FPN alone, 2x: the student baseline of the ACAM-KD Faster R-CNN pairs (paper:
38.4 COCO mAP, mmdetection).

detectron2's LazyConfig pieces (``common/models/mask_rcnn_fpn.py`` without its mask branch,
``common/data/coco.py``, SGD lr 0.02) with the model-zoo YAML defaults the pieces leave out
(ImageNet R-50 init, res2 and the stem frozen) and the 2x schedule: 180k iterations at batch
16, LR x0.1 at 120k and 160k, 1000 warm-up iterations.
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from acamkd.lazy import build_dataset_evaluator

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
train = model_zoo.get_config("common/train.py").train
# This project's key beside detectron2's train.*: iterations between TensorBoard figures of a
# distiller's masks (VIS_PERIOD in a YAML config); 0: none.
train.vis_period = 0
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_2x

# Faster R-CNN is Mask R-CNN without the mask branch (StandardROIHeads' mask_in_features=None).
del model.roi_heads.mask_in_features
del model.roi_heads.mask_pooler
del model.roi_heads.mask_head
dataloader.train.mapper.use_instance_mask = False
model.backbone.bottom_up.freeze_at = 2

train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 180000
dataloader.evaluator = L(build_dataset_evaluator)(
    dataset_name="${..test.dataset.names}", output_dir="${...train.output_dir}"
)
