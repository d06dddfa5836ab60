"""FGD: Focal and Global Knowledge Distillation (Yang et al., CVPR 2022), one FPN level."""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.config import configurable

from .common import alignment, check_choice, check_level_inputs
from .registry import DISTILL_METHOD_REGISTRY, LevelContext, LevelOutput, family_setting

__all__ = ["FGD", "BOX_MAPPINGS", "fgd_attention", "fgd_box_masks"]

# MODEL.ACAMKD.FGD.BOX_MAPPING: "unpadded" scales a box by the grid's size over the image's size
# before padding (the authors' code, so boxes stretch by the padding ratio); "stride" scales it
# by the grid's size over the padded size (divides by the level's stride).
BOX_MAPPINGS = ("unpadded", "stride")

# The authors' settings per student family (their configs, docs/RIVALS.md "1. FGD").
_AUTHORS = {
    "RetinaNet": {"TEMP": 0.5, "ALPHA": 1e-3, "BETA": 5e-4, "GAMMA": 5e-4, "LAMBDA": 5e-6},
    "GeneralizedRCNN": {"TEMP": 0.5, "ALPHA": 5e-5, "BETA": 2.5e-5, "GAMMA": 5e-5, "LAMBDA": 5e-7},
    "FCOS": {"TEMP": 0.8, "ALPHA": 1.6e-3, "BETA": 8e-4, "GAMMA": 8e-4, "LAMBDA": 8e-6},
    "RepPoints": {"TEMP": 0.5, "ALPHA": 1.6e-3, "BETA": 8e-4, "GAMMA": 8e-4, "LAMBDA": 8e-6},
}


def fgd_attention(feature: Tensor, temp: float) -> Tuple[Tensor, Tensor]:
    """
    FGD's spatial and channel attention of a feature.

    ``A_S(F)[n,h,w] = H*W * softmax_(h,w)(mean_c |F[n,c,h,w]| / temp)`` and
    ``A_C(F)[n,c] = C * softmax_c(mean_(h,w) |F[n,c,h,w]| / temp)``.

    Args:
        feature (Tensor): (B, C, H, W).
        temp (float): the temperature.

    Returns:
        tuple[Tensor, Tensor]: A_S (B, H, W), averaging 1 per image, and A_C (B, C), averaging
        1 per image.
    """
    b, c, h, w = feature.shape
    value = feature.abs()
    spatial = F.softmax((value.mean(dim=1) / temp).reshape(b, h * w), dim=1)
    channel = F.softmax(value.mean(dim=(2, 3)) / temp, dim=1)
    return (h * w) * spatial.reshape(b, h, w), c * channel


def _box_scales(
    context: LevelContext, grid_hw: Tuple[int, int], box_mapping: str
) -> List[Tuple[float, float]]:
    """Per image, the (x, y) factors that take input pixels to grid cells."""
    gh, gw = grid_hw
    if box_mapping == "unpadded":
        return [(gw / w, gh / h) for h, w in context.image_sizes]
    ph, pw = context.padded_hw
    return [(gw / pw, gh / ph)] * len(context.image_sizes)


def fgd_box_masks(
    context: LevelContext,
    grid_hw: Tuple[int, int],
    box_mapping: str = "unpadded",
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> Tuple[Tensor, Tensor]:
    """
    FGD's foreground and background masks of a level, rasterised for every box at once.

    A box (x1, y1, x2, y2) in input pixels is scaled to grid units (see :data:`BOX_MAPPINGS`),
    then covers rows ``floor(y1')..ceil(y2')`` and columns ``floor(x1')..ceil(x2')``, both
    inclusive and clipped to the grid (a box wholly outside covers nothing), with the weight
    ``1 / ((ceil(y2') - floor(y1') + 1) * (ceil(x2') - floor(x1') + 1))`` of its unclipped
    extent. ``M_fg`` is, at each position, the largest weight of the boxes covering it (0 where
    none does); ``M_bg`` is 1 where ``M_fg`` is 0, divided by the image's count of such
    positions (so it sums to 1 per image, or is all 0 if there are none).

    The scaling runs in float64 as ``x * grid / size``, so a box edge that maps exactly onto a
    cell boundary gets the same floor and ceil as in exact arithmetic.

    Args:
        context (LevelContext): the image sizes, padded size and the (K_i, 4) XYXY boxes.
        grid_hw (tuple[int, int]): the level's (H, W).
        box_mapping (str): "unpadded" or "stride".
        dtype (torch.dtype): of the masks.
        device (torch.device): of the masks (the boxes may be elsewhere).

    Returns:
        tuple[Tensor, Tensor]: M_fg and M_bg, each (B, H, W).
    """
    gh, gw = grid_hw
    boxes = context.gt_boxes
    num_images = len(boxes)
    if device is None:
        device = boxes[0].device if boxes else torch.device("cpu")
    fg = torch.zeros(num_images, gh * gw, dtype=dtype, device=device)
    counts = [len(b) for b in boxes]
    if sum(counts) > 0:
        scales = torch.tensor(
            _box_scales(context, grid_hw, box_mapping), dtype=torch.float64, device=device
        )
        owner = torch.repeat_interleave(
            torch.arange(num_images, device=device), torch.tensor(counts, device=device)
        )
        xyxy = torch.cat([b.reshape(-1, 4) for b in boxes]).to(device=device, dtype=torch.float64)
        xyxy = xyxy * scales[owner].repeat(1, 2)  # (K, 4) in grid units: (sx, sy, sx, sy)
        low, high = xyxy[:, :2].floor().long(), xyxy[:, 2:].ceil().long()  # (K, 2) as (x, y)
        extent = high - low + 1
        weight = 1.0 / (extent[:, 0] * extent[:, 1]).to(torch.float64)
        cols = torch.arange(gw, device=device)
        rows = torch.arange(gh, device=device)
        in_cols = (cols >= low[:, :1]) & (cols <= high[:, :1])  # (K, W)
        in_rows = (rows >= low[:, 1:]) & (rows <= high[:, 1:])  # (K, H)
        cover = in_rows[:, :, None] & in_cols[:, None, :]  # (K, H, W)
        # An empty box (extent <= 0) covers nothing, so its weight (maybe inf) is never read.
        values = torch.where(cover, weight.to(dtype)[:, None, None], torch.zeros((), dtype=dtype))
        values = values.reshape(-1, gh * gw)
        fg.scatter_reduce_(0, owner[:, None].expand_as(values), values, reduce="amax")
    fg = fg.reshape(num_images, gh, gw)
    bg = (fg == 0).to(dtype)
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1)
    return fg, bg


class _GlobalContext(nn.Module):
    """
    FGD's GcNet-style global module: ``G(F) = F + transform(context(F))``, where ``context``
    pools F over positions with a softmax over a 1x1 conv C -> 1, and ``transform`` is
    1x1 conv C -> C/2, LayerNorm, ReLU, 1x1 conv C/2 -> C. The context conv is Kaiming
    (fan_in) with a zero bias, the last conv zero, so G starts as the identity.
    """

    def __init__(self, channels: int) -> None:
        """
        Args:
            channels (int): C.
        """
        super().__init__()
        hidden = channels // 2
        self.context = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.context.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor): (B, C, H, W).

        Returns:
            Tensor: (B, C, H, W), ``x`` plus a (B, C, 1, 1) term broadcast over positions.
        """
        b, c, h, w = x.shape
        weights = F.softmax(self.context(x).reshape(b, h * w), dim=1)  # (B, HW)
        pooled = torch.bmm(x.reshape(b, c, h * w), weights[:, :, None])  # (B, C, 1)
        return x + self.transform(pooled.reshape(b, c, 1, 1))


@DISTILL_METHOD_REGISTRY.register("FGD")
class FGD(nn.Module):
    """
    FGD on one FPN level (docs/RIVALS.md, "1. FGD"). With T the teacher feature,
    ``S' = f_align(S)`` (a 1x1 conv only where the widths differ), N the batch size,
    teacher attention ``A_S(T)``, ``A_C(T)`` (:func:`fgd_attention`) and the box masks
    ``M_fg``, ``M_bg`` (:func:`fgd_box_masks`):

    - ``L_fg = 1/N sum_(n,c,h,w) M_fg A_S(T) A_C(T) (S' - T)^2``, ``L_bg`` the same with M_bg;
    - ``L_att = 1/N [sum_(n,c) |A_C(S') - A_C(T)| + sum_(n,h,w) |A_S(S') - A_S(T)|]``;
    - ``L_glb = 1/N sum_(n,c,h,w) (G_s(S') - G_t(T))^2`` with two trainable global modules;

    returned as ``loss_fgd_fg`` (alpha * L_fg), ``loss_fgd_bg`` (beta * L_bg),
    ``loss_fgd_attention`` (gamma * L_att) and ``loss_fgd_global`` (lambda * L_glb).

    The teacher feature is detached; the losses are computed in float32 (or the module's
    float64), also under autocast. Needs each image's ground-truth boxes.
    """

    needs_boxes = True

    @configurable
    def __init__(
        self,
        *,
        teacher_channels: int,
        student_channels: int,
        temp: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 5e-4,
        lambda_: float = 5e-6,
        box_mapping: str = "unpadded",
    ) -> None:
        """
        Args:
            teacher_channels (int): Ct.
            student_channels (int): Cs.
            temp (float): temperature of the attention.
            alpha, beta, gamma, lambda_ (float): weights of L_fg, L_bg, L_att and L_glb. The
                defaults are the authors' RetinaNet values.
            box_mapping (str): how boxes map onto the grid, one of :data:`BOX_MAPPINGS`.
        """
        super().__init__()
        check_choice("FGD.BOX_MAPPING", box_mapping, BOX_MAPPINGS)
        if temp <= 0:
            raise ValueError(f"MODEL.ACAMKD.FGD.TEMP must be positive, got {temp}")
        self.teacher_channels = teacher_channels
        self.student_channels = student_channels
        self.temp = temp
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.lambda_ = lambda_
        self.box_mapping = box_mapping
        self.align = alignment(student_channels, teacher_channels, always=False)
        self.global_s = _GlobalContext(teacher_channels)
        self.global_t = _GlobalContext(teacher_channels)

    @classmethod
    def from_config(cls, cfg, teacher_channels: int, student_channels: int) -> Dict:
        target = cfg.MODEL.ACAMKD.DISTILL_TARGET
        if target != "fpn":
            raise ValueError(
                "The distillation method FGD needs each image's ground-truth boxes at each FPN "
                "level, which a semantic-segmentation student (MODEL.ACAMKD.DISTILL_TARGET "
                f"{target!r}) does not have: choose another MODEL.ACAMKD.METHOD."
            )

        def setting(key):
            return family_setting(cfg, "FGD", key, _AUTHORS)

        return {
            "teacher_channels": teacher_channels,
            "student_channels": student_channels,
            "temp": setting("TEMP"),
            "alpha": setting("ALPHA"),
            "beta": setting("BETA"),
            "gamma": setting("GAMMA"),
            "lambda_": setting("LAMBDA"),
            "box_mapping": cfg.MODEL.ACAMKD.FGD.BOX_MAPPING,
        }

    def forward(
        self,
        teacher: Tensor,
        student: Tensor,
        context: Optional[LevelContext] = None,
        return_masks: bool = False,
    ) -> LevelOutput:
        """
        Args:
            teacher (Tensor): (B, Ct, H, W), detached here.
            student (Tensor): (B, Cs, H, W) on the teacher's grid.
            context (LevelContext): the image sizes, padded size and ground-truth boxes.
            return_masks (bool): also return the features, the discrepancy, M_fg and A_S(T).

        Returns:
            LevelOutput: ``loss_fgd_{fg,bg,attention,global}``; stats "fg_fraction" (the
            fraction of positions some box covers) and "fg_attention_share" (the fraction of
            the teacher's spatial attention on them).
        """
        check_level_inputs("FGD", teacher, student, self.teacher_channels, self.student_channels)
        if context is None or context.gt_boxes is None:
            raise ValueError(
                "FGD needs the images' ground-truth 'instances' (their gt_boxes) to build its "
                "foreground and background masks; the inputs carry none."
            )
        batch, _, h, w = teacher.shape
        if len(context.gt_boxes) != batch or len(context.image_sizes) != batch:
            raise ValueError(
                f"FGD: {batch} images but {len(context.gt_boxes)} box lists and "
                f"{len(context.image_sizes)} image sizes"
            )
        teacher = teacher.detach()
        aligned = self.align(student)
        dtype = torch.promote_types(self.global_s.context.weight.dtype, torch.float32)
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            t, s = teacher.to(dtype), aligned.to(dtype)
            fg, bg = fgd_box_masks(
                context, (h, w), self.box_mapping, dtype=dtype, device=teacher.device
            )
            spatial_t, channel_t = fgd_attention(t, self.temp)
            spatial_s, channel_s = fgd_attention(s, self.temp)
            sq = (s - t).square()
            # sum_c A_C(T) (S' - T)^2, then the spatial weights: no (B, C, H, W) product twice.
            channel_weighted = torch.einsum("bchw,bc->bhw", sq, channel_t)
            loss_fg = (fg * spatial_t * channel_weighted).sum() / batch
            loss_bg = (bg * spatial_t * channel_weighted).sum() / batch
            loss_att = (
                (channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()
            ) / batch
            loss_glb = (self.global_s(s) - self.global_t(t)).square().sum() / batch
            losses = {
                "loss_fgd_fg": self.alpha * loss_fg,
                "loss_fgd_bg": self.beta * loss_bg,
                "loss_fgd_attention": self.gamma * loss_att,
                "loss_fgd_global": self.lambda_ * loss_glb,
            }
            covered = (fg > 0).to(dtype)
            stats = {
                "fg_fraction": covered.mean().detach(),
                "fg_attention_share": ((covered * spatial_t).sum() / (batch * h * w)).detach(),
            }
        maps = None
        if return_masks:
            maps = {
                "teacher": teacher,
                "student": aligned.detach(),
                "discrepancy": sq.detach().sum(dim=1),
                "foreground": fg,
                "spatial_attention": spatial_t.detach(),
            }
        return LevelOutput(losses=losses, stats=stats, masks=maps)
