"""
Losses and mask statistics of ACAM-KD (docs/METHOD.md, "Losses" and "Known risk"), as pure
functions.

Every loss is computed per image and then averaged over the batch. The masked losses never build
the (B, M, C, H, W) product of masks and difference: the squared difference is first reduced
over the axis the mask does not cover.
"""

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

__all__ = [
    "NORMALIZERS",
    "masked_channel_loss",
    "masked_spatial_loss",
    "feature_mse_loss",
    "pairwise_dice",
    "dice_diversity_loss",
    "GradientReversal",
    "reverse_gradient",
    "mask_statistics",
    "mask_discrepancy_correlation",
]

NORMALIZERS = ("sum", "sum_sq")

# Floor of the masked-loss denominators: sigmoid masks are positive, so this only guards a mask
# whose every value underflowed to 0; it never changes a normal value.
_MIN_DENOMINATOR = 1e-12


def _mask_normalizer(masks: Tensor, normalizer: str) -> Tensor:
    """
    Args:
        masks (Tensor): (B, M, K) masks flattened over the axis they cover.
        normalizer (str): "sum" (``sum_k M_k``) or "sum_sq" (``sum_k M_k^2``).

    Returns:
        Tensor: (B, M) per-mask normaliser.
    """
    if normalizer == "sum":
        return masks.sum(dim=-1)
    if normalizer == "sum_sq":
        return masks.square().sum(dim=-1)
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")


def masked_channel_loss(diff: Tensor, channel_masks: Tensor, normalizer: str = "sum_sq") -> Tensor:
    """
    ``Lc = 1/M sum_m ||Mc_m * D||^2 / (H*W * n(Mc_m))``, per image, then the batch mean.

    The mask broadcasts over H and W, so ``||Mc_m * D||^2 = sum_k Mc_{m,k}^2 sum_p D_{k,p}^2``.

    Args:
        diff (Tensor): (B, C, H, W) difference D = T - f_align(S).
        channel_masks (Tensor): (B, M, C) channel masks Mc.
        normalizer (str): n(Mc_m) = ``sum_k Mc_{m,k}`` ("sum") or ``sum_k Mc_{m,k}^2``
            ("sum_sq").

    Returns:
        Tensor: 0-dim loss.
    """
    b, c, h, w = diff.shape
    per_channel = diff.square().sum(dim=(2, 3))  # (B, C): sum_p D_{k,p}^2
    numer = torch.einsum("bmc,bc->bm", channel_masks.square(), per_channel)
    denom = (h * w) * _mask_normalizer(channel_masks, normalizer)
    return (numer / denom.clamp_min(_MIN_DENOMINATOR)).mean(dim=1).mean()


def masked_spatial_loss(diff: Tensor, spatial_masks: Tensor, normalizer: str = "sum_sq") -> Tensor:
    """
    ``Ls = 1/M sum_m ||Ms_m * D||^2 / (C * n(Ms_m))``, per image, then the batch mean.

    The mask broadcasts over C, so ``||Ms_m * D||^2 = sum_p Ms_{m,p}^2 sum_c D_{c,p}^2``.

    Args:
        diff (Tensor): (B, C, H, W) difference D = T - f_align(S).
        spatial_masks (Tensor): (B, M, H, W) spatial masks Ms.
        normalizer (str): n(Ms_m) = ``sum_p Ms_{m,p}`` ("sum") or ``sum_p Ms_{m,p}^2``
            ("sum_sq").

    Returns:
        Tensor: 0-dim loss.
    """
    c = diff.shape[1]
    per_position = diff.square().sum(dim=1).flatten(1)  # (B, N): sum_c D_{c,p}^2
    masks = spatial_masks.flatten(2)  # (B, M, N)
    numer = torch.einsum("bmn,bn->bm", masks.square(), per_position)
    denom = c * _mask_normalizer(masks, normalizer)
    return (numer / denom.clamp_min(_MIN_DENOMINATOR)).mean(dim=1).mean()


def feature_mse_loss(diff: Tensor) -> Tensor:
    """
    The paper's "no mask" row: ``||D||^2 / (C*H*W)`` per image, then the batch mean.

    Args:
        diff (Tensor): (B, C, H, W) difference D = T - f_align(S).

    Returns:
        Tensor: 0-dim loss.
    """
    return diff.square().mean()


def pairwise_dice(masks: Tensor, eps: float = 1e-6) -> Tensor:
    """
    Mean Dice overlap ``2 <M_i, M_j> / (||M_i||^2 + ||M_j||^2 + eps)`` over the ordered pairs
    ``i != j`` of one image's masks.

    Args:
        masks (Tensor): (B, M, ...) masks; every axis after the second is flattened.
        eps (float): added to the denominator.

    Returns:
        Tensor: (B,) per-image mean pairwise Dice; zeros when M < 2 (no pair).
    """
    flat = masks.flatten(2)  # (B, M, K)
    m = flat.shape[1]
    if m < 2:
        return flat.new_zeros(flat.shape[0])
    inner = torch.bmm(flat, flat.transpose(1, 2))  # (B, M, M)
    sq_norm = torch.diagonal(inner, dim1=1, dim2=2)  # (B, M)
    dice = 2 * inner / (sq_norm.unsqueeze(2) + sq_norm.unsqueeze(1) + eps)
    off_diagonal = ~torch.eye(m, dtype=torch.bool, device=flat.device)
    return dice[:, off_diagonal].mean(dim=1)


def dice_diversity_loss(masks: Tensor, eps: float = 1e-6) -> Tensor:
    """
    Args:
        masks (Tensor): (B, M, ...) masks.
        eps (float): added to the Dice denominator.

    Returns:
        Tensor: 0-dim batch mean of :func:`pairwise_dice`.
    """
    return pairwise_dice(masks, eps).mean()


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; negates the gradient in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tuple[Tensor]:
        return (grad_output.neg(),)


def reverse_gradient(x: Tensor) -> Tensor:
    """
    Args:
        x (Tensor): any tensor.

    Returns:
        Tensor: ``x`` unchanged; what is upstream of it receives the negated gradient, so
        descending a loss of the result ascends it for the parameters that produced ``x``.
    """
    return GradientReversal.apply(x)


@torch.no_grad()
def mask_statistics(masks: Tensor, eps: float = 1e-6) -> Dict[str, Tensor]:
    """
    Args:
        masks (Tensor): (B, M, ...) masks in (0, 1).
        eps (float): added to the Dice denominator.

    Returns:
        dict[str, Tensor]: detached 0-dim tensors "mean" (mean mask value), "coverage"
        (fraction of values > 0.5) and "dice" (batch mean of :func:`pairwise_dice`).
    """
    masks = masks.detach().float()
    return {
        "mean": masks.mean(),
        "coverage": (masks > 0.5).float().mean(),
        "dice": pairwise_dice(masks, eps).mean(),
    }


@torch.no_grad()
def mask_discrepancy_correlation(spatial_masks: Tensor, discrepancy: Tensor) -> Tensor:
    """
    Pearson correlation, over positions, between each spatial mask and the per-position
    discrepancy, averaged over masks and images. Positive: masks cover where the student lags.

    Args:
        spatial_masks (Tensor): (B, M, H, W) spatial masks.
        discrepancy (Tensor): (B, H, W) per-position discrepancy ``sum_c D^2``.

    Returns:
        Tensor: detached 0-dim correlation in [-1, 1]; a constant mask or discrepancy (no
        defined correlation) contributes 0.
    """
    masks = spatial_masks.detach().float().flatten(2)  # (B, M, N)
    disc = discrepancy.detach().float().flatten(1).unsqueeze(1)  # (B, 1, N)
    masks = masks - masks.mean(dim=-1, keepdim=True)
    disc = disc - disc.mean(dim=-1, keepdim=True)
    cov = (masks * disc).sum(dim=-1)
    norm = masks.norm(dim=-1) * disc.norm(dim=-1)
    corr = torch.where(norm > 0, cov / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    return corr.mean()
