"""ASCM: adaptive spatial-channel masks from the fused feature (docs/METHOD.md, "ASCM")."""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["AdaptiveSpatialChannelMasks", "sigmoid_with_budget"]

# Bisection steps of the budget's shift: the bracket is the logits' range, so 40 halvings leave
# it below 1e-10 of that range, far below float32's resolution of a mask value.
_BUDGET_BISECTION_STEPS = 40


def sigmoid_with_budget(logits: Tensor, budget: float) -> Tensor:
    """
    ``sigmoid(z - tau)`` with one shift ``tau`` per row, chosen so that every row's mean is
    ``budget`` (this project's "budget" reading, docs/METHOD.md; not the paper's).

    ``tau`` is found by bisection without gradient; its gradient is the implicit one,
    ``d tau / d z_p = s'_p / sum_q s'_q`` (``s' = s (1 - s)``), so a gradient step moves the
    mask between positions and never changes its mean.

    Args:
        logits (Tensor): (..., K) mask logits z, one mask per row.
        budget (float): the mean of every mask, in (0, 1).

    Returns:
        Tensor: (..., K) masks in (0, 1) whose rows average ``budget``.
    """
    target = math.log(budget / (1 - budget))  # sigmoid(target) = budget
    with torch.no_grad():
        # mean sigmoid(z - tau) falls as tau grows; at these ends it is >= and <= budget.
        low = logits.amin(dim=-1, keepdim=True) - target
        high = logits.amax(dim=-1, keepdim=True) - target
        for _ in range(_BUDGET_BISECTION_STEPS):
            mid = (low + high) / 2
            above = torch.sigmoid(logits - mid).mean(dim=-1, keepdim=True) > budget
            low = torch.where(above, mid, low)
            high = torch.where(above, high, mid)
        tau = (low + high) / 2
    masks = torch.sigmoid(logits - tau)
    # Zero in value; in gradient, the implicit derivative of tau (mean(masks) - budget = 0).
    residual = masks.mean(dim=-1, keepdim=True)
    slope = (masks * (1 - masks)).mean(dim=-1, keepdim=True).detach().clamp_min(1e-12)
    tau = tau + (residual - residual.detach()) / slope
    return torch.sigmoid(logits - tau)


class AdaptiveSpatialChannelMasks(nn.Module):
    """
    M learnable selection units that turn the fused feature F into M spatial and M channel masks.

    - spatial: ``Ms = sigmoid(m_s z)`` with ``z = F`` flattened (C x N), ``m_s`` in R^{M x C};
    - channel: ``v = avgpool_spatial(F)`` (length C) and ``Mc = sigmoid(m_c v^T)`` with ``m_c``
      in R^{M x 1} ("scalar", the paper's literal form) or ``Mc = sigmoid(m_c * v)`` with ``m_c``
      in R^{M x C} elementwise ("per_channel").

    ``m_s`` and ``m_c`` are the parameters ``spatial_units`` and ``channel_units``; they start
    from N(0, init_std), so every mask starts near 0.5. With a ``budget`` in (0, 1) each mask is
    shifted to average ``budget`` over what it covers (:func:`sigmoid_with_budget`). A kind of
    mask that is not asked for (``spatial=False`` or ``channel=False``, the paper's "channel
    only" / "spatial only" rows) has no parameter and is returned as None.

    Its arguments are checked where they are chosen, by :class:`~acamkd.modeling.acam.ACAMLevel`
    (``MODEL.ACAMKD.NUM_MASKS``, ``CHANNEL_MASK_FORM``, ``MASKS``), which builds it.
    """

    def __init__(
        self,
        channels: int,
        num_masks: int = 6,
        channel_mask_form: str = "scalar",
        init_std: float = 0.01,
        spatial: bool = True,
        channel: bool = True,
        budget: float = 0.0,
    ) -> None:
        """
        Args:
            channels (int): C, the channel count of the fused feature.
            num_masks (int): M, the number of spatial and of channel masks.
            channel_mask_form (str): "scalar" or "per_channel" (see the class docstring).
            init_std (float): standard deviation of the normal init of ``m_s`` and ``m_c``.
            spatial (bool): build the spatial masks.
            channel (bool): build the channel masks.
            budget (float): 0 (the paper's sigmoid masks) or the fixed mean of every mask.
        """
        super().__init__()
        self.channels = channels
        self.num_masks = num_masks
        self.channel_mask_form = channel_mask_form
        self.budget = budget
        self.spatial_units = self.channel_units = None
        if spatial:
            self.spatial_units = nn.Parameter(torch.empty(num_masks, channels))
            nn.init.normal_(self.spatial_units, std=init_std)
        if channel:
            channel_width = 1 if channel_mask_form == "scalar" else channels
            self.channel_units = nn.Parameter(torch.empty(num_masks, channel_width))
            nn.init.normal_(self.channel_units, std=init_std)

    def forward(self, fused: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """
        Args:
            fused (Tensor): (B, C, H, W) fused feature F.

        Returns:
            spatial_masks (Tensor or None): (B, M, H, W), values in (0, 1).
            channel_masks (Tensor or None): (B, M, C), values in (0, 1).
        """
        logits = pooled = None
        if self.spatial_units is not None:
            logits = torch.einsum("mc,bchw->bmhw", self.spatial_units, fused)
        if self.channel_units is not None:
            pooled = fused.mean(dim=(2, 3))
        return self.masks(logits, pooled)

    def masks(
        self, spatial_logits: Optional[Tensor], pooled: Optional[Tensor]
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """
        The masks from all that :meth:`forward` reads of F, which
        :meth:`~acamkd.modeling.stca_ff.STCAFusion.project` gives without forming F.

        Args:
            spatial_logits (Tensor or None): (B, M, H, W), ``m_s`` applied to F at every
                position; None without spatial masks.
            pooled (Tensor or None): (B, C), F averaged over H and W; None without channel
                masks.

        Returns:
            spatial_masks (Tensor or None): (B, M, H, W), values in (0, 1).
            channel_masks (Tensor or None): (B, M, C), values in (0, 1).
        """
        spatial_masks = channel_masks = None
        if self.spatial_units is not None:
            b, m, h, w = spatial_logits.shape
            spatial_masks = self._squash(spatial_logits.reshape(b, m, h * w)).view(b, m, h, w)
        if self.channel_units is not None:
            # Scalar form: (M, 1) * (B, 1, C) is the outer product m_c v^T per image;
            # per-channel form: (M, C) * (B, 1, C) is elementwise. One broadcast serves both.
            channel_masks = self._squash(self.channel_units * pooled.unsqueeze(1))
        return spatial_masks, channel_masks

    def _squash(self, logits: Tensor) -> Tensor:
        """(B, M, K) logits -> masks: a sigmoid, or one that averages ``budget`` per mask."""
        if self.budget > 0:
            return sigmoid_with_budget(logits, self.budget)
        return torch.sigmoid(logits)
