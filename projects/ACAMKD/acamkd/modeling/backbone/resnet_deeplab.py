"""Dilated ResNet-18/34 with the DeepLab stem, for the DeepLabV3-R18 and PSPNet-R18 students.

detectron2's ``build_resnet_backbone`` refuses a dilated ResNet-18/34 (its ``BasicBlock`` has
no dilation) and DeepLab's ``build_resnet_deeplab_backbone`` only builds bottleneck ResNets.
This builder reuses their classes (``ResNet``, ``BasicBlock``, ``DeepLabStem``) and DeepLab's
config keys (``RES4_DILATION``, ``RES5_DILATION``, ``RES5_MULTI_GRID``, ``STEM_TYPE``).
"""

from typing import Union

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet
from detectron2.projects.deeplab.resnet import DeepLabStem

__all__ = ["DilatedBasicBlock", "build_resnet_basic_deeplab_backbone"]

_NUM_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


class DilatedBasicBlock(BasicBlock):
    """detectron2's ``BasicBlock`` with both 3x3 convolutions dilated by ``dilation``.

    Both convolutions get the dilation (as the single 3x3 of detectron2's ``BottleneckBlock``
    does); mmsegmentation dilates only the first one. Parameters and init are the
    ``BasicBlock``'s, so ImageNet ResNet-18 weights load unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        norm: Union[str, type] = "BN",
        dilation: int = 1,
    ):
        """
        Args:
            in_channels (int): input channels.
            out_channels (int): output channels.
            stride (int): stride of the first conv (and of the projection shortcut).
            norm (str or callable): normalisation of every conv, see ``layers.get_norm``.
            dilation (int): dilation of both 3x3 convs; padding follows so that the spatial
                size only changes by ``stride``.
        """
        super().__init__(in_channels, out_channels, stride=stride, norm=norm)
        # Conv2d passes self.padding/self.dilation to F.conv2d at every call, so setting them
        # after construction dilates the convs without re-implementing the block.
        for conv in (self.conv1, self.conv2):
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)


def _build_stem(cfg: CfgNode, input_shape: ShapeSpec) -> Union[BasicStem, DeepLabStem]:
    stem_type = cfg.MODEL.RESNETS.STEM_TYPE
    stem_class = {"basic": BasicStem, "deeplab": DeepLabStem}.get(stem_type)
    if stem_class is None:
        raise ValueError(f"MODEL.RESNETS.STEM_TYPE must be 'basic' or 'deeplab', got {stem_type!r}")
    return stem_class(
        in_channels=input_shape.channels,
        out_channels=cfg.MODEL.RESNETS.STEM_OUT_CHANNELS,
        norm=cfg.MODEL.RESNETS.NORM,
    )


@BACKBONE_REGISTRY.register()
def build_resnet_basic_deeplab_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """Build a dilated ResNet-18 or ResNet-34 (``BasicBlock`` stages) from ``cfg.MODEL.RESNETS``.

    Reads DEPTH (18 or 34), NORM, STEM_TYPE ("deeplab": three 3x3 convs, or "basic": one 7x7),
    STEM_OUT_CHANNELS, RES2_OUT_CHANNELS (64 for the standard widths), OUT_FEATURES,
    RES4_DILATION, RES5_DILATION, RES5_MULTI_GRID (one factor per res5 block, e.g. [1, 1])
    and MODEL.BACKBONE.FREEZE_AT. Output stride 8: RES4_DILATION 2, RES5_DILATION 4;
    output stride 16: RES4_DILATION 1, RES5_DILATION 2. A dilated stage keeps the resolution
    of the stage before it.

    Args:
        cfg (CfgNode): a config with ``add_deeplab_config`` applied.
        input_shape (ShapeSpec): the input image shape (its channels are used).

    Returns:
        ResNet: detectron2's ResNet; ``output_shape()`` gives the strides after dilation.
    """
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _NUM_BLOCKS_PER_STAGE:
        raise ValueError(
            f"build_resnet_basic_deeplab_backbone builds depth 18 or 34, not {r.DEPTH}"
        )
    if r.NUM_GROUPS != 1 or any(r.DEFORM_ON_PER_STAGE):
        raise ValueError("ResNet-18/34 has no groups or deformable convs: set NUM_GROUPS 1")
    # The same dilation combinations as DeepLab's build_resnet_deeplab_backbone.
    if r.RES4_DILATION not in (1, 2) or r.RES5_DILATION not in (1, 2, 4):
        raise ValueError(f"Unsupported dilations res4={r.RES4_DILATION}, res5={r.RES5_DILATION}")
    if r.RES4_DILATION == 2 and r.RES5_DILATION != 4:
        raise ValueError("RES4_DILATION 2 (output stride 8) needs RES5_DILATION 4")
    num_blocks_per_stage = _NUM_BLOCKS_PER_STAGE[r.DEPTH]
    multi_grid = list(r.RES5_MULTI_GRID)
    if len(multi_grid) != num_blocks_per_stage[3]:
        raise ValueError(
            f"MODEL.RESNETS.RES5_MULTI_GRID needs one factor per res5 block: ResNet-{r.DEPTH} has "
            f"{num_blocks_per_stage[3]}, got {multi_grid} (DeepLab's default [1, 2, 4] is for "
            f"three blocks; use e.g. [1, 1] for ResNet-18)"
        )

    stem = _build_stem(cfg, input_shape)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    # Build only up to the last requested stage, so that no parameter goes without gradient.
    max_stage = max({"res2": 2, "res3": 3, "res4": 4, "res5": 5}[f] for f in r.OUT_FEATURES)
    stages = []
    for idx, stage_idx in enumerate(range(2, max_stage + 1)):
        dilation = {4: r.RES4_DILATION, 5: r.RES5_DILATION}.get(stage_idx, 1)
        num_blocks = num_blocks_per_stage[idx]
        first_stride = 1 if idx == 0 or dilation > 1 else 2
        grid = multi_grid if stage_idx == 5 else [1] * num_blocks
        stages.append(
            ResNet.make_stage(
                DilatedBasicBlock,
                num_blocks,
                in_channels=in_channels,
                out_channels=out_channels,
                norm=r.NORM,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                dilation_per_block=[dilation * g for g in grid],
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
