"""
Student baseline of the demo: RetinaNet R-18-FPN on the generated street scenes, the LazyConfig
twin of retinanet_R_18_FPN_streets.yaml (Base-Streets-RetinaNet.yaml): 320x160 images, 5
classes, from scratch on the CPU (no pretrained weights can be downloaded here), BatchNorm that
trains, a 64-wide FPN and a 2-conv GroupNorm head, anchors for small objects, 300 iterations at
batch 4, lr 0.03 with per-tensor gradient clipping (``train.clip_gradients``, read by this
project's LazyConfig engine), as in the YAML.

detectron2's model-zoo ``COCO-Detection/retinanet_R_50_FPN_1x.py`` made smaller by overrides.
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from acamkd.lazy import build_dataset_evaluator

_base = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
model = _base.model
dataloader = _base.dataloader
optimizer = _base.optimizer
train = _base.train
# This project's key beside detectron2's train.*: iterations between TensorBoard figures of a
# distiller's masks (VIS_PERIOD in a YAML config); 0: none.
train.vis_period = 0

# ResNet-18 (BasicBlock: no stride_in_1x1), BatchNorm, nothing frozen.
model.backbone.bottom_up.stages.depth = 18
del model.backbone.bottom_up.stages.stride_in_1x1
model.backbone.bottom_up.stages.norm = "BN"
model.backbone.bottom_up.stem.norm = "BN"
model.backbone.bottom_up.freeze_at = 0
model.backbone.top_block.in_channels = 512  # res5 of ResNet-18
model.backbone.out_channels = 64
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.head.conv_dims = [64, 64]
model.head.norm = "GN"
model.num_classes = 5
model.anchor_generator.sizes = [
    [12, 15, 19],
    [24, 30, 38],
    [48, 60, 76],
    [96, 121, 152],
    [192, 242, 305],
]

dataloader.train.dataset.names = "streets_coco_train"
dataloader.test.dataset.names = "streets_coco_val"
dataloader.train.mapper.augmentations[0].short_edge_length = (160,)
dataloader.train.mapper.augmentations[0].max_size = 320
dataloader.test.mapper.augmentations[0].short_edge_length = 160
dataloader.test.mapper.augmentations[0].max_size = 320
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.num_workers = 1
dataloader.evaluator = L(build_dataset_evaluator)(
    dataset_name="${..test.dataset.names}", output_dir="${...train.output_dir}"
)

# From scratch, lr 0.01 without clipping diverged (NaN at iteration 113 of an R-50 at batch 8);
# with per-tensor clipping lr 0.03 at batch 4 trains stably (Base-Streets-RetinaNet.yaml).
optimizer.lr = 0.03
train.clip_gradients = dict(enabled=True, clip_type="norm", clip_value=1.0)
# 300 iterations, LR x0.1 at 240, 100 linear warm-up iterations from 0.001 x LR.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[240, 300]),
    warmup_length=100 / 300,
    warmup_method="linear",
    warmup_factor=0.001,
)

train.init_checkpoint = ""
train.device = "cpu"
train.max_iter = 300
train.checkpointer.period = 100
train.eval_period = 0  # evaluate once, after training
train.seed = 42
train.output_dir = "./output/streets/retinanet_R_18_FPN"
