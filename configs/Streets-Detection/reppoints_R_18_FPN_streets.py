"""
RepPoints R-18-FPN on the generated street scenes, the LazyConfig twin of
reppoints_R_18_FPN_streets.yaml: the data, optimizer, schedule and seed of the RetinaNet
student baseline retinanet_R_18_FPN_streets.py (320x160 images, 5 classes, from scratch on the
CPU, BatchNorm in the ResNet, a 64-wide FPN, lr 0.03 with per-tensor gradient clipping) with
RepPoints' GroupNorm FPN and head.
"""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.matcher import Matcher

from acamkd.modeling.meta_arch.reppoints import LastLevelP6P7Norm, RepPoints, RepPointsHead

from .retinanet_R_18_FPN_streets import dataloader, lr_multiplier, optimizer, train  # noqa: F401

model = L(RepPoints)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
            stages=L(ResNet.make_default_stages)(depth=18, norm="BN"),
            out_features=["res3", "res4", "res5"],
            freeze_at=0,
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=64,
        norm="GN",
        top_block=L(LastLevelP6P7Norm)(
            in_channels=512, out_channels="${..out_channels}", norm="GN"
        ),
    ),
    head=L(RepPointsHead)(
        input_shape=[ShapeSpec(channels=64)] * 5,
        num_classes="${..num_classes}",
        conv_dims=[64, 64],
        point_feat_channels=64,
        num_points=9,
        gradient_mul=0.1,
        transform="moment",
        moment_mul=0.01,
        norm="GN",
        prior_prob=0.01,
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    refine_matcher=L(Matcher)(
        thresholds=[0.4, 0.5], labels=[0, -1, 1], allow_low_quality_matches=True
    ),
    num_classes=5,
    point_base_scale=4,
    point_pos_num=1,
    smooth_l1_beta=0.11,
    loss_init_weight=0.5,
    loss_refine_weight=1.0,
    test_score_thresh=0.05,
    test_nms_thresh=0.5,
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
)

train.output_dir = "./output/streets/reppoints_R_18_FPN"
