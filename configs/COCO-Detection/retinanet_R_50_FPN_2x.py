"""
RetinaNet R50-FPN alone, 2x: the student baseline of the ACAM-KD RetinaNet pairs (paper: 37.4
COCO mAP, mmdetection).

detectron2's model-zoo ``COCO-Detection/retinanet_R_50_FPN_1x.py`` (ImageNet R-50 init, res2
and the stem frozen, SGD lr 0.01) with the 2x schedule: 180k iterations at batch 16, LR x0.1 at
120k and 160k, 1000 warm-up iterations, as ``SOLVER`` in the YAML configs; and the evaluator
chosen by the dataset's evaluator_type, as in ``train_net.py``'s YAML path.
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from acamkd.lazy import build_dataset_evaluator

_base = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
model = _base.model
dataloader = _base.dataloader
optimizer = _base.optimizer
train = _base.train
# This project's key beside detectron2's train.*: iterations between TensorBoard figures of a
# distiller's masks (VIS_PERIOD in a YAML config); 0: none.
train.vis_period = 0

lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_2x
train.max_iter = 180000
dataloader.evaluator = L(build_dataset_evaluator)(
    dataset_name="${..test.dataset.names}", output_dir="${...train.output_dir}"
)
