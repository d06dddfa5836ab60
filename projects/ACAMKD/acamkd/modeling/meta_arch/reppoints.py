"""
RepPoints (Yang et al., "RepPoints: Point Set Representation for Object Detection", ICCV 2019)
as a detectron2 dense detector.

Every location of every FPN level holds a set of ``P`` points (9 by default) instead of anchor
boxes. The head predicts an initial point set from the location, samples the features at those
points with a deformable convolution (the points are its sampling positions), and from these
features predicts the class scores and a refinement of the point set. A point set becomes a box
through the "moment" transform: the points' mean, and their standard deviation times a learned
scale. Training follows the reference implementations (the authors' and mmdetection's):

* initial point sets: each ground truth is assigned to the location(s) of its FPN level (chosen
  from its size and ``point_base_scale``) closest to its centre;
* refined point sets and classification: max-IoU assignment of the ground truth to the boxes of
  the initial point sets, with the best box of every ground truth positive;
* focal loss for the classes, smooth L1 between the boxes of the point sets and their ground
  truth, both divided by ``point_base_scale * stride``.

detectron2 has no RepPoints. :class:`RepPoints` is registered in ``META_ARCH_REGISTRY`` and
builds from YAML (the keys all dense detectors share from ``MODEL.RETINANET``, as this
package's FCOS, the others from ``MODEL.REPPOINTS``, see :func:`add_reppoints_config`) and from
LazyConfig. The deformable convolution is ``torchvision.ops.deform_conv2d``, which runs on the
CPU and on CUDA without detectron2's compiled ops.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

import fvcore.nn.weight_init as weight_init
from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, ShapeSpec, batched_nms, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, build_resnet_backbone
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage
from fvcore.nn import sigmoid_focal_loss_jit, smooth_l1_loss

from .dense_config import dense_detector_kwargs

__all__ = [
    "RepPoints",
    "RepPointsHead",
    "LastLevelP6P7Norm",
    "add_reppoints_config",
    "build_reppoints_resnet_fpn_backbone",
    "points_to_boxes",
    "point_assignment",
]

_TRANSFORMS = ("moment", "minmax", "partial_minmax")


def add_reppoints_config(cfg: CfgNode) -> None:
    """
    Add the ``MODEL.REPPOINTS`` node to ``cfg`` in place (idempotent). What RepPoints shares
    with RetinaNet and FCOS (classes, head depth and norm, focal loss, IoU thresholds of the
    refined stage, smooth L1 beta, test thresholds) is read from ``MODEL.RETINANET``.
    """
    if "REPPOINTS" in cfg.MODEL:
        return
    _C = cfg
    _C.MODEL.REPPOINTS = CfgNode()
    # Points per set: the square of an odd number, the deformable convolution's kernel size.
    _C.MODEL.REPPOINTS.NUM_POINTS = 9
    # Width of the layers after the stacked convs (point convs and deformable convs).
    _C.MODEL.REPPOINTS.POINT_FEAT_CHANNELS = 256
    # Share of the classification and refinement gradients that reaches the initial points
    # through the deformable convolutions' offsets.
    _C.MODEL.REPPOINTS.GRADIENT_MUL = 0.1
    # Point set -> box: "moment" (the paper's), "minmax" or "partial_minmax" (first 4 points).
    _C.MODEL.REPPOINTS.TRANSFORM = "moment"
    # Share of its gradient that the learned scale of the moment transform receives.
    _C.MODEL.REPPOINTS.MOMENT_MUL = 0.01
    # A ground truth whose size (geometric mean of width and height) is
    # POINT_BASE_SCALE * 2**l goes to the level of stride 2**l; box losses are measured in
    # units of POINT_BASE_SCALE * stride.
    _C.MODEL.REPPOINTS.POINT_BASE_SCALE = 4
    # Locations assigned to each ground truth in the initial stage.
    _C.MODEL.REPPOINTS.POINT_POS_NUM = 1
    # Weights of the box losses of the initial and the refined point sets.
    _C.MODEL.REPPOINTS.LOSS_INIT_WEIGHT = 0.5
    _C.MODEL.REPPOINTS.LOSS_REFINE_WEIGHT = 1.0


def points_to_boxes(
    points: Tensor, transform: str = "moment", moment_scale: Optional[Tensor] = None
) -> Tensor:
    """
    Boxes of point sets.

    Args:
        points (Tensor): (..., P, 2) point sets, (x, y) per point.
        transform (str): "moment": centre at the mean, half width and half height the standard
            deviation (unbiased, over the P points) of x and y times ``exp(moment_scale)``;
            "minmax": the tightest box; "partial_minmax": the tightest box of the first 4.
        moment_scale (Tensor or None): (2,) log-scales of the half width and half height for
            "moment"; None is 0.

    Returns:
        Tensor: (..., 4) boxes, XYXY.
    """
    if transform == "moment":
        mean = points.mean(dim=-2)
        # Unbiased variance, written out: Tensor.var warns on an empty batch of sets. The
        # epsilon keeps the gradient finite for a set whose points coincide.
        var = (points - mean.unsqueeze(-2)).square().sum(dim=-2) / (points.shape[-2] - 1)
        half = (var + 1e-12).sqrt()
        if moment_scale is not None:
            half = half * moment_scale.exp()
        return torch.cat([mean - half, mean + half], dim=-1)
    if transform == "partial_minmax":
        points = points[..., :4, :]
    elif transform != "minmax":
        raise ValueError(
            f"Unknown point set transform {transform!r}; expected one of {_TRANSFORMS}"
        )
    return torch.cat([points.min(dim=-2).values, points.max(dim=-2).values], dim=-1)


@torch.no_grad()
def point_assignment(
    points: Tensor, point_levels: Tensor, gt_boxes: Tensor, *, scale: float = 4, pos_num: int = 1
) -> Tensor:
    """
    The initial stage's assignment. A ground truth of size ``s`` (geometric mean of width and
    height) belongs to level ``floor(log2(s / scale))``, clamped to the levels present; there it
    takes the ``pos_num`` locations closest to its centre, the distance measured in units of
    its width and height. A location claimed by several ground truths keeps the closest (the
    first one on a tie).

    Args:
        points (Tensor): (R, 2) locations (x, y) of all levels.
        point_levels (Tensor): (R,) level of each location, log2 of its stride.
        gt_boxes (Tensor): (M, 4) ground-truth boxes, XYXY.
        scale (float): see above (``point_base_scale``).
        pos_num (int): locations per ground truth.

    Returns:
        Tensor: (R,) int64, index of the assigned ground truth or -1 (background).
    """
    matched = torch.full((len(points),), -1, dtype=torch.long, device=points.device)
    if len(gt_boxes) == 0 or len(points) == 0:
        return matched
    closest = torch.full((len(points),), math.inf, device=points.device)
    centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    sizes = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clamp(min=1e-6)
    levels = (torch.log2(sizes / scale).sum(dim=1) / 2).floor().long()
    levels = levels.clamp(int(point_levels.min()), int(point_levels.max()))
    for j in range(len(gt_boxes)):
        candidates = torch.nonzero(point_levels == levels[j]).squeeze(1)
        if candidates.numel() == 0:
            continue
        distance = ((points[candidates] - centers[j]) / sizes[j]).norm(dim=1)
        distance, nearest = distance.topk(min(pos_num, candidates.numel()), largest=False)
        candidates = candidates[nearest]
        closer = distance < closest[candidates]
        matched[candidates[closer]] = j
        closest[candidates[closer]] = distance[closer]
    return matched


class LastLevelP6P7Norm(nn.Module):
    """
    P6 and P7 from C5 by two stride-2 3x3 convolutions, each followed by ``norm``, with no
    activation between them: mmdetection's FPN with ``add_extra_convs="on_input"`` and a norm,
    as the RepPoints "gn-neck+head" configs use it. detectron2's ``LastLevelP6P7`` has no norm
    and a ReLU before P7.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "", in_feature="res5"):
        """
        Args:
            in_channels (int): channels of ``in_feature`` (2048 for C5 of a ResNet-50).
            out_channels (int): the FPN's width.
            norm (str): see :func:`detectron2.layers.get_norm`; "" for none.
            in_feature (str): the bottom-up feature P6 is computed from.
        """
        super().__init__()
        self.num_levels = 2
        self.in_feature = in_feature
        for name, c_in in (("p6", in_channels), ("p7", out_channels)):
            conv = Conv2d(
                c_in,
                out_channels,
                kernel_size=3,
                stride=2,
                padding=1,
                bias=not norm,
                norm=get_norm(norm, out_channels),
            )
            weight_init.c2_xavier_fill(conv)
            self.add_module(name, conv)

    def forward(self, x: Tensor) -> List[Tensor]:
        p6 = self.p6(x)
        return [p6, self.p7(p6)]


@BACKBONE_REGISTRY.register()
def build_reppoints_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """
    ResNet-FPN of RepPoints: P3-P5 from C3-C5, P6/P7 from C5 (:class:`LastLevelP6P7Norm`), and
    ``MODEL.FPN.NORM`` on every FPN convolution, P6/P7 included.
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7Norm(
            bottom_up.output_shape()["res5"].channels, out_channels, norm=cfg.MODEL.FPN.NORM
        ),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


class RepPointsHead(nn.Module):
    """
    The RepPoints head, shared by all levels: a classification and a localisation tower of
    3x3 convolutions (each with ``norm`` and ReLU), the initial points from the localisation
    tower, then two deformable convolutions whose sampling positions are the initial points:
    one for the class scores, one for the refinement of the points.

    Points are predicted as offsets from their location, in units of the level's stride, in the
    layout of the deformable convolution's offsets: (dy_1, dx_1, ..., dy_P, dx_P).
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        conv_dims: List[int],
        point_feat_channels: int = 256,
        num_points: int = 9,
        gradient_mul: float = 0.1,
        transform: str = "moment",
        moment_mul: float = 0.01,
        norm: str = "GN",
        prior_prob: float = 0.01,
    ):
        """
        Args:
            input_shape (list[ShapeSpec]): the input of every level (all of one width).
            num_classes (int): foreground classes.
            conv_dims (list[int]): widths of the stacked convolutions of each tower.
            point_feat_channels (int): width of the point convolutions.
            num_points (int): points per set, the square of an odd kernel size.
            gradient_mul (float): share of the gradient that flows from the deformable
                convolutions' offsets back into the initial points.
            transform (str): point set -> box, see :func:`points_to_boxes`.
            moment_mul (float): share of its gradient that the moment scale receives.
            norm (str): norm of the stacked convolutions ("GN" in the paper's configs).
            prior_prob (float): initial foreground probability of the class scores.
        """
        super().__init__()
        kernel = int(round(math.sqrt(num_points)))
        if kernel * kernel != num_points or kernel % 2 == 0:
            raise ValueError(
                f"MODEL.REPPOINTS.NUM_POINTS={num_points}: the points are the sampling positions "
                "of a square deformable kernel, so it must be the square of an odd number."
            )
        if transform not in _TRANSFORMS:
            raise ValueError(
                f"MODEL.REPPOINTS.TRANSFORM={transform!r}; expected one of {_TRANSFORMS}"
            )
        if len({s.channels for s in input_shape}) != 1:
            raise ValueError(
                "RepPointsHead shares its weights over levels: give it levels of one width."
            )
        self.num_classes = num_classes
        self.num_points = num_points
        self.gradient_mul = gradient_mul
        self.transform = transform
        self.moment_mul = moment_mul

        self.cls_subnet = self._tower(input_shape[0].channels, conv_dims, norm)
        self.pts_subnet = self._tower(input_shape[0].channels, conv_dims, norm)
        channels = conv_dims[-1] if conv_dims else input_shape[0].channels
        self.cls_dcn = DeformConv2d(
            channels, point_feat_channels, kernel, padding=kernel // 2, bias=False
        )
        self.cls_score = nn.Conv2d(point_feat_channels, num_classes, kernel_size=1)
        self.pts_init_conv = nn.Conv2d(channels, point_feat_channels, kernel_size=3, padding=1)
        self.pts_init_out = nn.Conv2d(point_feat_channels, 2 * num_points, kernel_size=1)
        self.pts_refine_dcn = DeformConv2d(
            channels, point_feat_channels, kernel, padding=kernel // 2, bias=False
        )
        self.pts_refine_out = nn.Conv2d(point_feat_channels, 2 * num_points, kernel_size=1)
        # log-scales of half width and half height of the moment transform
        self.moment_transfer = nn.Parameter(torch.zeros(2)) if transform == "moment" else None

        # The regular kernel grid, (dy, dx) per kernel position in row-major order: a
        # deformable convolution samples position k at its location + grid_k + offset_k, so
        # offsets = points - grid make it sample exactly at the points.
        r = torch.arange(kernel, dtype=torch.float32) - kernel // 2
        grid = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).reshape(1, -1, 1, 1)
        self.register_buffer("kernel_grid", grid, persistent=False)

        for module in self.modules():
            if isinstance(module, (nn.Conv2d, DeformConv2d)):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @staticmethod
    def _tower(in_channels: int, conv_dims: List[int], norm: str) -> nn.Sequential:
        layers = []
        for out_channels in conv_dims:
            layers.append(
                Conv2d(
                    in_channels,
                    out_channels,
                    kernel_size=3,
                    padding=1,
                    bias=not norm,
                    norm=get_norm(norm, out_channels),
                    activation=F.relu,
                )
            )
            in_channels = out_channels
        return nn.Sequential(*layers)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: List[ShapeSpec]):
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "conv_dims": [input_shape[0].channels] * cfg.MODEL.RETINANET.NUM_CONVS,
            "point_feat_channels": cfg.MODEL.REPPOINTS.POINT_FEAT_CHANNELS,
            "num_points": cfg.MODEL.REPPOINTS.NUM_POINTS,
            "gradient_mul": cfg.MODEL.REPPOINTS.GRADIENT_MUL,
            "transform": cfg.MODEL.REPPOINTS.TRANSFORM,
            "moment_mul": cfg.MODEL.REPPOINTS.MOMENT_MUL,
            "norm": cfg.MODEL.RETINANET.NORM,
            "prior_prob": cfg.MODEL.RETINANET.PRIOR_PROB,
        }

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """
        Args:
            features (list[Tensor]): (N, C, Hi, Wi) per level.

        Returns:
            list[Tensor]: class logits, (N, K, Hi, Wi) per level.
            list[Tensor]: initial points, (N, 2P, Hi, Wi) per level, offsets in strides.
            list[Tensor]: refined points, (N, 2P, Hi, Wi) per level, offsets in strides.
        """
        logits, points_init, points_refine = [], [], []
        for x in features:
            cls_feature = self.cls_subnet(x)
            pts_feature = self.pts_subnet(x)
            init = self.pts_init_out(F.relu(self.pts_init_conv(pts_feature)))
            # Same value as `init`; only gradient_mul of the gradient passes to the points.
            scaled = init.detach() + self.gradient_mul * (init - init.detach())
            offset = scaled - self.kernel_grid
            logits.append(self.cls_score(F.relu(self.cls_dcn(cls_feature, offset))))
            refine = self.pts_refine_out(F.relu(self.pts_refine_dcn(pts_feature, offset)))
            points_init.append(init)
            points_refine.append(refine + init.detach())
        return logits, points_init, points_refine

    def boxes(self, points: Tensor) -> Tensor:
        """
        Boxes of point sets by the head's transform and its learned moment scale.

        Args:
            points (Tensor): (..., P, 2) point sets, (x, y).

        Returns:
            Tensor: (..., 4) XYXY.
        """
        scale = None
        if self.moment_transfer is not None:
            t = self.moment_transfer
            scale = t.detach() + self.moment_mul * (t - t.detach())
        return points_to_boxes(points, self.transform, scale)


@META_ARCH_REGISTRY.register()
class RepPoints(DenseDetector):
    """
    RepPoints (:paper:`RepPoints`): anchor-free, a point set per location, refined once.

    Training returns ``loss_cls`` (focal loss of the refined stage's assignment),
    ``loss_pts_init`` and ``loss_pts_refine`` (smooth L1 of the boxes of the initial and the
    refined point sets), each already weighted; inference returns ``Instances`` with
    ``pred_boxes``, ``scores`` and ``pred_classes``, like detectron2's RetinaNet and FCOS.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        head: RepPointsHead,
        head_in_features: Optional[List[str]] = None,
        refine_matcher: Matcher,
        num_classes: int,
        point_base_scale: float = 4,
        point_pos_num: int = 1,
        smooth_l1_beta: float = 0.11,
        loss_init_weight: float = 0.5,
        loss_refine_weight: float = 1.0,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.5,
        max_detections_per_image: int = 100,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
    ):
        """
        Args:
            backbone (nn.Module): an FPN whose levels have power-of-two strides.
            head (RepPointsHead): the head.
            head_in_features (list[str]): the levels the head runs on (default: all).
            refine_matcher (Matcher): assignment of the refined stage on the IoU between the
                ground truth and the boxes of the initial point sets (mmdetection: [0.4, 0.5)
                ignored, low-quality matches allowed).
            num_classes (int): foreground classes.
            point_base_scale (float): see :func:`point_assignment`; also the box losses are
                measured in units of ``point_base_scale * stride``.
            point_pos_num (int): locations per ground truth in the initial stage.
            smooth_l1_beta (float): beta of the smooth L1 box losses.
            loss_init_weight, loss_refine_weight (float): weights of the two box losses.
            focal_loss_alpha, focal_loss_gamma (float): of the classification loss.
            test_score_thresh, test_topk_candidates, test_nms_thresh,
            max_detections_per_image: inference, as in detectron2's RetinaNet.
            pixel_mean, pixel_std (tuple[float]): image normalisation (BGR).
        """
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        shapes = backbone.output_shape()
        self.fpn_strides = [shapes[k].stride for k in self.head_in_features]
        for stride in self.fpn_strides:
            if stride & (stride - 1):
                raise ValueError(
                    f"RepPoints needs power-of-two FPN strides, got {self.fpn_strides}"
                )
        # One square of the stride's size per location; RepPoints uses only its centre.
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[s] for s in self.fpn_strides], aspect_ratios=[1.0], strides=self.fpn_strides
        )
        self.refine_matcher = refine_matcher
        self.num_classes = num_classes
        self.point_base_scale = point_base_scale
        self.point_pos_num = point_pos_num
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_init_weight = loss_init_weight
        self.loss_refine_weight = loss_refine_weight
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image

    @classmethod
    def from_config(cls, cfg: CfgNode):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        in_features = cfg.MODEL.RETINANET.IN_FEATURES
        return {
            "backbone": backbone,
            "head": RepPointsHead(cfg, [shapes[f] for f in in_features]),
            "head_in_features": in_features,
            "refine_matcher": Matcher(
                cfg.MODEL.RETINANET.IOU_THRESHOLDS,
                cfg.MODEL.RETINANET.IOU_LABELS,
                allow_low_quality_matches=True,
            ),
            "point_base_scale": cfg.MODEL.REPPOINTS.POINT_BASE_SCALE,
            "point_pos_num": cfg.MODEL.REPPOINTS.POINT_POS_NUM,
            "smooth_l1_beta": cfg.MODEL.RETINANET.SMOOTH_L1_LOSS_BETA,
            "loss_init_weight": cfg.MODEL.REPPOINTS.LOSS_INIT_WEIGHT,
            "loss_refine_weight": cfg.MODEL.REPPOINTS.LOSS_REFINE_WEIGHT,
            **dense_detector_kwargs(cfg),
        }

    def locations(self, features: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """
        Args:
            features (list[Tensor]): the head's input levels.

        Returns:
            Tensor: (R, 2) every location (x, y) of all levels, level by level, row-major.
            Tensor: (R,) the stride of each location.
        """
        anchors = self.anchor_generator(features)
        centers = Boxes.cat(anchors).get_centers()
        strides = torch.cat(
            [
                torch.full((len(a),), float(s), device=centers.device)
                for a, s in zip(anchors, self.fpn_strides)
            ]
        )
        return centers, strides

    def offsets_to_points(self, offsets: Tensor, centers: Tensor, strides: Tensor) -> Tensor:
        """
        Args:
            offsets (Tensor): (..., R, 2P) the head's (dy, dx) pairs, in strides.
            centers (Tensor): (R, 2) locations (x, y).
            strides (Tensor): (R,) their strides.

        Returns:
            Tensor: (..., R, P, 2) the points (x, y) in image pixels.
        """
        xy = offsets.unflatten(-1, (-1, 2)).flip(-1)
        return centers[:, None, :] + xy * strides[:, None, None]

    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: List[List[Tensor]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        num_points = self.head.num_points
        logits, offsets_init, offsets_refine = (
            torch.cat(x, dim=1)
            for x in self._transpose_dense_predictions(
                predictions, [self.num_classes, 2 * num_points, 2 * num_points]
            )
        )
        centers, strides = self.locations(features)
        boxes_init = self.head.boxes(self.offsets_to_points(offsets_init, centers, strides))
        boxes_refine = self.head.boxes(self.offsets_to_points(offsets_refine, centers, strides))
        targets = self.label_points(centers, strides, boxes_init.detach(), gt_instances)
        return self.losses(logits, boxes_init, boxes_refine, strides, *targets)

    @torch.no_grad()
    def label_points(
        self,
        centers: Tensor,
        strides: Tensor,
        boxes_init: Tensor,
        gt_instances: List[Instances],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """
        The targets of both stages.

        Args:
            centers (Tensor): (R, 2) locations, see :meth:`locations`.
            strides (Tensor): (R,) their strides.
            boxes_init (Tensor): (N, R, 4) boxes of the initial point sets.
            gt_instances (list[Instances]): ground truth per image.

        Returns:
            Tensor: (N, R) int64, ground-truth box index of the initial stage, -1 background.
            Tensor: (N, R, 4) its box (zeros for background).
            Tensor: (N, R) int64, class of the refined stage: a class, ``num_classes``
                (background) or -1 (ignored).
            Tensor: (N, R, 4) the refined stage's ground-truth box (meaningful where positive).
        """
        levels = torch.log2(strides).round().long()
        init_idxs, init_boxes, refine_classes, refine_boxes = [], [], [], []
        for inst, boxes in zip(gt_instances, boxes_init):
            gt = inst.gt_boxes.tensor
            matched = point_assignment(
                centers, levels, gt, scale=self.point_base_scale, pos_num=self.point_pos_num
            )
            init_idxs.append(matched)
            init_boxes.append(gt[matched.clamp(min=0)] if len(gt) else torch.zeros_like(boxes))

            # A ground truth that no box overlaps takes no part: with low-quality matches its
            # "best" boxes would be every box, all at IoU 0.
            quality = pairwise_iou(inst.gt_boxes, Boxes(boxes))
            overlapped = torch.nonzero(quality.max(dim=1).values > 0).squeeze(1)
            idxs, labels = self.refine_matcher(quality[overlapped])
            if len(overlapped):
                idxs = overlapped[idxs]
                classes = inst.gt_classes[idxs].clone()
                refine_boxes.append(gt[idxs])
            else:
                classes = torch.zeros_like(idxs)
                refine_boxes.append(torch.zeros_like(boxes))
            classes[labels == 0] = self.num_classes
            classes[labels == -1] = -1
            refine_classes.append(classes)
        return (
            torch.stack(init_idxs),
            torch.stack(init_boxes),
            torch.stack(refine_classes),
            torch.stack(refine_boxes),
        )

    def losses(
        self,
        logits: Tensor,
        boxes_init: Tensor,
        boxes_refine: Tensor,
        strides: Tensor,
        init_idxs: Tensor,
        gt_boxes_init: Tensor,
        refine_classes: Tensor,
        gt_boxes_refine: Tensor,
    ) -> Dict[str, Tensor]:
        """
        Focal loss on every location not ignored by the refined stage, smooth L1 on the
        positives of each stage, each divided by its number of positives (at least 1 per
        image), as in the reference implementations.

        Args:
            logits (Tensor): (N, R, K).
            boxes_init, boxes_refine (Tensor): (N, R, 4) boxes of the point sets.
            strides (Tensor): (R,) strides of the locations.
            init_idxs, gt_boxes_init, refine_classes, gt_boxes_refine: see
                :meth:`label_points`.

        Returns:
            dict[str, Tensor]: ``loss_cls``, ``loss_pts_init``, ``loss_pts_refine``.
        """
        pos_init = init_idxs >= 0
        pos_refine = (refine_classes >= 0) & (refine_classes != self.num_classes)
        num_init = pos_init.sum(dim=1).clamp(min=1).sum().item()
        num_refine = pos_refine.sum(dim=1).clamp(min=1).sum().item()
        storage = get_event_storage()
        storage.put_scalar("num_pos_init", pos_init.sum().item() / len(logits))
        storage.put_scalar("num_pos_refine", pos_refine.sum().item() / len(logits))

        valid = refine_classes >= 0
        targets = F.one_hot(refine_classes[valid], self.num_classes + 1)[:, :-1]
        loss_cls = sigmoid_focal_loss_jit(
            logits[valid],
            targets.to(logits.dtype),
            alpha=self.focal_loss_alpha,
            gamma=self.focal_loss_gamma,
            reduction="sum",
        )
        unit = (self.point_base_scale * strides).expand_as(pos_init)[..., None]

        def box_loss(pred, gt, pos):
            scale = unit[pos]
            return smooth_l1_loss(pred[pos] / scale, gt[pos] / scale, self.smooth_l1_beta, "sum")

        return {
            "loss_cls": loss_cls / num_refine,
            "loss_pts_init": self.loss_init_weight
            * box_loss(boxes_init, gt_boxes_init, pos_init)
            / num_init,
            "loss_pts_refine": self.loss_refine_weight
            * box_loss(boxes_refine, gt_boxes_refine, pos_refine)
            / num_refine,
        }

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ) -> List[Instances]:
        num_points = self.head.num_points
        logits, _, offsets_refine = self._transpose_dense_predictions(
            predictions, [self.num_classes, 2 * num_points, 2 * num_points]
        )
        anchors = self.anchor_generator(features)
        results = []
        for i, image_size in enumerate(images.image_sizes):
            per_level = [
                self._decode_level(
                    logits_l[i].sigmoid(), offsets_l[i], a.get_centers(), stride, image_size
                )
                for logits_l, offsets_l, a, stride in zip(
                    logits, offsets_refine, anchors, self.fpn_strides
                )
            ]
            pred = Instances.cat(per_level)
            keep = batched_nms(
                pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh
            )
            results.append(pred[keep[: self.max_detections_per_image]])
        return results

    def _decode_level(
        self, scores: Tensor, offsets: Tensor, centers: Tensor, stride: int, image_size
    ) -> Instances:
        """
        The ``test_topk_candidates`` best (location, class) pairs of one level above
        ``test_score_thresh``, boxed by the refined point sets.

        Args:
            scores (Tensor): (HW, K) probabilities.
            offsets (Tensor): (HW, 2P) refined points.
            centers (Tensor): (HW, 2) locations.
        """
        keep = scores > self.test_score_thresh
        scores = scores[keep]
        idxs = torch.nonzero(keep)
        scores, top = scores.topk(min(len(scores), self.test_topk_candidates))
        locations, classes = idxs[top].unbind(dim=1)
        strides = torch.full((len(locations),), float(stride), device=scores.device)
        points = self.offsets_to_points(offsets[locations], centers[locations], strides)
        return Instances(
            image_size,
            pred_boxes=Boxes(self.head.boxes(points)),
            scores=scores,
            pred_classes=classes,
        )
