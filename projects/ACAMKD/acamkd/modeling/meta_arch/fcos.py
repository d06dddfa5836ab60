"""detectron2's FCOS, buildable from a YAML config.

detectron2 ships FCOS for LazyConfig only. This subclass adds ``from_config`` (reading the
``MODEL.RETINANET`` keys, as FCOS is a RetinaNet variant) and registers it, so FCOS can be a
teacher or a student in YAML configs. Parameter names are detectron2's, so a checkpoint loads
into ``detectron2.modeling.meta_arch.fcos.FCOS`` built from a LazyConfig unchanged.
"""

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import FPN, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.meta_arch.fcos import FCOS as _FCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead

from .dense_config import dense_detector_kwargs

__all__ = ["FCOS", "build_fcos_resnet_fpn_backbone"]


@META_ARCH_REGISTRY.register()
class FCOS(_FCOS):
    """detectron2's :class:`~detectron2.modeling.meta_arch.fcos.FCOS` with ``from_config``."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        in_features = cfg.MODEL.RETINANET.IN_FEATURES
        head = FCOSHead(
            input_shape=[shapes[f] for f in in_features],
            conv_dims=[shapes[in_features[0]].channels] * cfg.MODEL.RETINANET.NUM_CONVS,
            num_classes=cfg.MODEL.RETINANET.NUM_CLASSES,
            norm=cfg.MODEL.RETINANET.NORM,
            prior_prob=cfg.MODEL.RETINANET.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": in_features,
            **dense_detector_kwargs(cfg),
        }


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    ResNet-FPN whose P6/P7 are computed from P5 (FCOS, Sec 2.2 of arXiv:2006.09214), unlike
    RetinaNet's from C5; the same as detectron2's LazyConfig FCOS backbone.
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
