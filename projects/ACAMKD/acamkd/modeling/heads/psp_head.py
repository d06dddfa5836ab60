"""PSPNet's pyramid pooling head (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017)
for detectron2's ``SemanticSegmentor``, with the contract of DeepLab's ``DeepLabV3Head``."""

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

import fvcore.nn.weight_init as weight_init
from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.deeplab.loss import DeepLabCE

__all__ = ["PSPHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class PSPHead(nn.Module):
    """Pyramid pooling module, a 3x3 bottleneck conv and a 1x1 classifier (``predictor``).

    The input feature is average-pooled to each ``pool_scales`` grid, reduced by a 1x1 conv to
    ``C_in / len(pool_scales)`` channels (the paper's 1/N), upsampled back and concatenated with
    the input; a 3x3 conv to ``conv_dims`` channels, dropout and ``predictor`` give the logits
    at the input feature's stride. In training the logits are upsampled by ``common_stride``
    for the loss; in eval they are returned upsampled.

    Batch norm after the 1x1-pooled branch needs more than one image per batch (per GPU with
    "BN"; across GPUs with "SyncBN") in training, as in every PSPNet implementation.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        conv_dims: int,
        common_stride: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: Union[str, Callable] = "BN",
        loss_weight: float = 1.0,
        loss_type: str = "cross_entropy",
        ignore_value: int = -1,
    ):
        """
        Args:
            input_shape (dict[str->ShapeSpec]): exactly one feature, the one the head reads.
            num_classes (int): number of classes C of the logits.
            conv_dims (int): channels of the bottleneck conv after the pyramid pooling.
            common_stride (int): stride of the input feature, by which the logits are
                upsampled; must equal ``input_shape``'s stride when that is known.
            pool_scales (list[int]): output grid sizes of the adaptive average pools.
            dropout (float): dropout probability before ``predictor``.
            norm (str or callable): normalisation of every conv but ``predictor``.
            loss_weight (float): weight of ``loss_sem_seg``.
            loss_type (str): "cross_entropy" or DeepLab's "hard_pixel_mining" (top 20% pixels).
            ignore_value (int): label ignored by the loss (and used to pad the targets).
        """
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(f"PSPHead reads exactly one feature, got {list(input_shape)}")
        if not pool_scales:
            raise ValueError("PSPHead needs at least one pool scale")
        ((self.in_feature, shape),) = input_shape.items()
        if shape.stride is not None and shape.stride != common_stride:
            raise ValueError(
                f"PSPHead: COMMON_STRIDE {common_stride} differs from the stride {shape.stride} "
                f"of feature {self.in_feature!r}; the logits would not match the input size"
            )
        self.common_stride = common_stride
        self.loss_weight = loss_weight
        self.ignore_value = ignore_value

        in_channels = shape.channels
        branch_channels = in_channels // len(pool_scales)
        use_bias = norm == ""
        self.pool_scales = tuple(pool_scales)
        self.branches = nn.ModuleList()
        for scale in self.pool_scales:
            conv = Conv2d(
                in_channels,
                branch_channels,
                kernel_size=1,
                bias=use_bias,
                norm=get_norm(norm, branch_channels),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(conv)
            self.branches.append(nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv))
        self.bottleneck = Conv2d(
            in_channels + branch_channels * len(pool_scales),
            conv_dims,
            kernel_size=3,
            padding=1,
            bias=use_bias,
            norm=get_norm(norm, conv_dims),
            activation=F.relu,
        )
        weight_init.c2_xavier_fill(self.bottleneck)
        self.dropout = nn.Dropout(dropout)
        self.predictor = Conv2d(conv_dims, num_classes, kernel_size=1)
        # Same init as DeepLabV3Head's predictor, so both students start from near-uniform logits.
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)

        if loss_type == "cross_entropy":
            self.loss = nn.CrossEntropyLoss(reduction="mean", ignore_index=ignore_value)
        elif loss_type == "hard_pixel_mining":
            self.loss = DeepLabCE(ignore_label=ignore_value, top_k_percent_pixels=0.2)
        else:
            raise ValueError(f"Unexpected loss type: {loss_type!r}")

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "num_classes": head.NUM_CLASSES,
            "conv_dims": head.CONVS_DIM,
            "common_stride": head.COMMON_STRIDE,
            "pool_scales": cfg.MODEL.ACAMKD.PSP.POOL_SCALES,
            "dropout": cfg.MODEL.ACAMKD.PSP.DROPOUT,
            "norm": head.NORM,
            "loss_weight": head.LOSS_WEIGHT,
            # LOSS_TYPE comes with add_deeplab_config; without it, plain cross entropy.
            "loss_type": head.get("LOSS_TYPE", "cross_entropy"),
            "ignore_value": head.IGNORE_VALUE,
        }

    def forward(
        self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
    ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """
        Args:
            features (dict[str->Tensor]): backbone features; the head reads its one feature,
                (N, C_in, h, w) at stride ``common_stride``.
            targets (Tensor or None): (N, h * s, w * s) class labels, s = ``common_stride``;
                needed in training.

        Returns:
            In training: (None, {"loss_sem_seg": weighted loss}).
            In eval: ((N, num_classes, h * s, w * s) logits upsampled to the input, {}).
        """
        x = self.layers(features)
        if self.training:
            return None, self.losses(x, targets)
        x = F.interpolate(x, scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        return x, {}

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """
        Args:
            features (dict[str->Tensor]): backbone features, see :meth:`forward`.

        Returns:
            Tensor: (N, num_classes, h, w) logits at stride ``common_stride``, the output of
            ``predictor``.
        """
        x = features[self.in_feature]
        size = x.shape[-2:]
        pyramid = [x] + [
            F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False)
            for branch in self.branches
        ]
        x = self.bottleneck(torch.cat(pyramid, dim=1))
        return self.predictor(self.dropout(x))

    def losses(self, predictions: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            predictions (Tensor): (N, num_classes, h, w) logits at stride ``common_stride``.
            targets (Tensor): (N, h * s, w * s) class labels.

        Returns:
            dict[str->Tensor]: {"loss_sem_seg": scalar, already multiplied by ``loss_weight``}.
        """
        predictions = F.interpolate(
            predictions, scale_factor=self.common_stride, mode="bilinear", align_corners=False
        )
        return {"loss_sem_seg": self.loss(predictions, targets) * self.loss_weight}
