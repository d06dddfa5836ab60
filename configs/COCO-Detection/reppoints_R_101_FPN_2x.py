"""
RepPoints R101-FPN (GN neck and head), 2x: the teacher of the R101 -> R50 pair, the LazyConfig
twin of reppoints_R_101_FPN_2x.yaml (mmdetection: 40.5 COCO AP). reppoints_R_50_FPN_2x.py with
a deeper ResNet and its ImageNet init; no RepPoints checkpoint exists: train this first.
"""

from .reppoints_R_50_FPN_2x import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
