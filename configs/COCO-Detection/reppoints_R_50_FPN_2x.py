"""
RepPoints R50-FPN (GN neck and head) alone, 2x: the student baseline of the ACAM-KD RepPoints
pairs, the LazyConfig twin of reppoints_R_50_FPN_2x.yaml (mmdetection's
reppoints_moment_r50_fpn_gn-neck+head_2x_coco: 38.6 COCO AP).

detectron2 has no RepPoints LazyConfig; this one is written out: ImageNet R-50 init (res2 and
the stem frozen), P6/P7 from C5, GroupNorm on every FPN and head convolution, 9 points, the
moment transform, single-scale 800 training, SGD lr 0.01, 180k iterations at batch 16 with LR
x0.1 at 120k and 160k and 500 warm-up iterations from a third of the LR.
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.matcher import Matcher
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from acamkd.lazy import build_dataset_evaluator
from acamkd.modeling.meta_arch.reppoints import LastLevelP6P7Norm, RepPoints, RepPointsHead

model = L(RepPoints)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
            out_features=["res3", "res4", "res5"],
            freeze_at=2,
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        norm="GN",
        top_block=L(LastLevelP6P7Norm)(
            in_channels=2048, out_channels="${..out_channels}", norm="GN"
        ),
    ),
    head=L(RepPointsHead)(
        input_shape=[ShapeSpec(channels=256)] * 5,
        num_classes="${..num_classes}",
        conv_dims=[256, 256, 256],
        point_feat_channels=256,
        num_points=9,
        gradient_mul=0.1,
        transform="moment",
        moment_mul=0.01,
        norm="GN",
        prior_prob=0.01,
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    # Refined stage: IoU with the initial point sets' boxes; [0.4, 0.5) ignored.
    refine_matcher=L(Matcher)(
        thresholds=[0.4, 0.5], labels=[0, -1, 1], allow_low_quality_matches=True
    ),
    num_classes=80,
    point_base_scale=4,
    point_pos_num=1,
    smooth_l1_beta=0.11,
    loss_init_weight=0.5,
    loss_refine_weight=1.0,
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.5,
    max_detections_per_image=100,
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
)

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False
dataloader.train.mapper.augmentations[0].short_edge_length = (800,)
dataloader.evaluator = L(build_dataset_evaluator)(
    dataset_name="${..test.dataset.names}", output_dir="${...train.output_dir}"
)

optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.lr = 0.01

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[120000, 160000, 180000]
    ),
    warmup_length=500 / 180000,
    warmup_method="linear",
    warmup_factor=1.0 / 3,
)

train = model_zoo.get_config("common/train.py").train
# This project's key beside detectron2's train.*: iterations between TensorBoard figures of a
# distiller's masks (VIS_PERIOD in a YAML config); 0: none.
train.vis_period = 0
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 180000
