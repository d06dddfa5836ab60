"""
Stop training at the first loss that is NaN or infinite, with a message that says which loss,
for an ACAM loss which level (its losses, mask statistics and the largest teacher and student
feature magnitudes, as the distiller logged them for this iteration), and what usually cures it.

detectron2's ``SimpleTrainer`` raises a bare ``FloatingPointError`` in ``_write_metrics``, after
the backward pass and before ``optimizer.step()``; the trainers here check at the same point, so
the weights never take a non-finite step and the checkpoints already written stay as they were.
"""

from typing import Dict, Mapping, Optional

import torch

from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils.events import EventStorage, get_event_storage

__all__ = [
    "YAML_CURES",
    "LAZY_CURES",
    "NonFiniteLossError",
    "check_finite_losses",
    "FiniteSimpleTrainer",
    "FiniteAMPTrainer",
]

# The settings that usually cure a diverging run, by config style.
YAML_CURES = (
    "a lower learning rate (SOLVER.BASE_LR), a longer warm-up (SOLVER.WARMUP_ITERS), gradient "
    "clipping (SOLVER.CLIP_GRADIENTS.ENABLED True), a smaller ACAM loss weight "
    "(MODEL.ACAMKD.LOSS_WEIGHT, MODEL.ACAMKD.DIVERSITY_WEIGHT)"
)
LAZY_CURES = (
    "a lower learning rate (optimizer.lr), a longer warm-up (lr_multiplier.warmup_length), "
    'gradient clipping (train.clip_gradients, e.g. dict(enabled=True, clip_type="norm", '
    "clip_value=1.0)), a smaller ACAM loss weight (model.acam.loss_weight, "
    "model.acam.diversity_weight)"
)

# Per-level statistics shown in the message, in this order (see ACAMOutput and the distiller).
_MASK_STATS = (
    ("spatial_mask_mean", "spatial mean"),
    ("spatial_mask_coverage", "coverage"),
    ("spatial_mask_dice", "dice"),
    ("channel_mask_mean", "channel mean"),
    ("channel_mask_coverage", "coverage"),
    ("channel_mask_dice", "dice"),
    ("mask_discrepancy_corr", "corr(mask, discrepancy)"),
)


class NonFiniteLossError(FloatingPointError):
    """A loss is NaN or infinite; the message says where and what to try."""


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _level_report(level: str, stats: Mapping[str, float]) -> str:
    losses = ", ".join(
        f"{k} = {_fmt(v)}" for k, v in sorted(stats.items()) if k.startswith("loss_")
    )
    masks = ", ".join(f"{title} {_fmt(stats[k])}" for k, title in _MASK_STATS if k in stats)
    line = f"  Distilled level {level}: {losses}"
    if masks:
        line += f"; masks: {masks}"
    if "teacher_feature_absmax" in stats and "student_feature_absmax" in stats:
        line += (
            f"; largest |feature|: teacher {_fmt(stats['teacher_feature_absmax'])}, "
            f"student {_fmt(stats['student_feature_absmax'])}"
        )
    return line


def _acam_levels(storage: Optional[EventStorage], iteration: int) -> Dict[str, Dict[str, float]]:
    """The ``acam/<level>/<name>`` scalars the distiller put at ``iteration``, by level."""
    levels: Dict[str, Dict[str, float]] = {}
    if storage is None:
        return levels
    for key, (value, it) in storage.latest().items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "acam" and it == iteration:
            levels.setdefault(parts[1], {})[parts[2]] = float(value)
    return levels


def non_finite_loss_message(
    bad: Mapping[str, float],
    iteration: int,
    storage: Optional[EventStorage] = None,
    cures: str = YAML_CURES,
) -> str:
    """
    The message for losses ``bad`` (name -> value) that are not finite at ``iteration``.

    Args:
        bad (dict[str, float]): the non-finite losses.
        iteration (int): the training iteration.
        storage (EventStorage or None): where the distiller logged its per-level statistics
            for this iteration (``acam/<level>/...``).
        cures (str): the settings to suggest, :data:`YAML_CURES` or :data:`LAZY_CURES`.

    Returns:
        str: the message.
    """
    names = ", ".join(f"{k} = {_fmt(v)}" for k, v in sorted(bad.items()))
    lines = [f"Loss is not finite at iteration {iteration}: {names}."]
    levels = _acam_levels(storage, iteration)
    # The distillation method's losses (ACAM-KD's loss_acam_*, a rival's loss_fgd_*, ...): the
    # ones the distiller also logged per level.
    distill = {k for stats in levels.values() for k in stats if k.startswith("loss_")}
    if any(k.startswith("loss_acam_") or k in distill for k in bad):
        culprits = {
            level: stats
            for level, stats in levels.items()
            if any(
                k.startswith("loss_") and not torch.isfinite(torch.tensor(v))
                for k, v in stats.items()
            )
        }
        lines += [_level_report(level, stats) for level, stats in culprits.items()]
        finite = [level for level in levels if level not in culprits]
        if finite:
            lines.append(f"  Levels whose distillation losses are finite: {', '.join(finite)}.")
        lines.append(
            "  Features far larger in the teacher than in the student point at the teacher's "
            "weights or its input normalisation; masks at 0 or 1 at a collapse of the masks."
        )
    lines.append(
        f"Training stops here; the checkpoints already written are intact. Usual cures: {cures}."
    )
    return "\n".join(lines)


def check_finite_losses(
    loss_dict: Mapping[str, torch.Tensor],
    iteration: int,
    storage: Optional[EventStorage] = None,
    cures: str = YAML_CURES,
) -> None:
    """
    Raise :class:`NonFiniteLossError` if any loss of ``loss_dict`` is NaN or infinite.

    Args:
        loss_dict (dict[str, Tensor]): the model's losses.
        iteration (int): the training iteration, for the message.
        storage (EventStorage or None): see :func:`non_finite_loss_message`.
        cures (str): see :func:`non_finite_loss_message`.
    """
    bad = {}
    for name, value in loss_dict.items():
        value = value.detach()
        if not torch.isfinite(value).all():
            bad[name] = float(value.float().sum())
    if bad:
        raise NonFiniteLossError(non_finite_loss_message(bad, iteration, storage, cures))


class _FiniteLossCheck:
    """Checks every loss of every step (on every process) before detectron2 logs them."""

    cures: str = YAML_CURES

    def _write_metrics(self, loss_dict, data_time, prefix: str = "", iter=None) -> None:
        iteration = self.iter if iter is None else iter
        check_finite_losses(loss_dict, iteration, get_event_storage(), self.cures)
        super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)


class FiniteSimpleTrainer(_FiniteLossCheck, SimpleTrainer):
    """detectron2's ``SimpleTrainer`` that stops at a non-finite loss with a precise message."""


class FiniteAMPTrainer(_FiniteLossCheck, AMPTrainer):
    """detectron2's ``AMPTrainer`` that stops at a non-finite loss with a precise message."""
