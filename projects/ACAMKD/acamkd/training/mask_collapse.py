"""
The mask-collapse rule (docs/METHOD.md, "Known risk"), as pure functions over the per-level
statistics that :class:`~acamkd.modeling.ACAMDistiller` logs (``acam/<level>/<kind>_mask_mean``
and friends in the event storage and in ``metrics.json``).

A level's spatial (or channel) masks have *collapsed* when their mean value leaves
``[low, high] = [0.01, 0.99]``: near 0 they weight the feature loss almost nowhere, near 1 they
weight every position (or channel) alike and the masked loss becomes a plain MSE. During
training the rule must hold at ``patience`` (3) consecutive checks, one check per logging
period on the median of that period, or at the run's last check. Every collapse measured in
this project fires (the former RetinaNet demo, literal reading: spatial means 9e-18 to 1e-3
at the end; segmentation demo: 1e-4; a 40-iteration segmentation run: 0.45 -> 0.006), healthy
masks (means 0.3-0.6) never do.

Nothing here imports torch: the same rule marks collapsed runs in a study table from the last
record of their ``metrics.json`` (:func:`is_collapsed`, :func:`collapsed_levels`,
:func:`read_final_statistics`).
"""

import json
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

__all__ = [
    "MASK_KINDS",
    "COLLAPSE_LOW",
    "COLLAPSE_HIGH",
    "COLLAPSE_PATIENCE",
    "MaskCollapse",
    "MaskCollapseGuard",
    "is_collapsed",
    "is_collapsed_mean",
    "level_statistics",
    "collapsed_levels",
    "read_final_statistics",
]

MASK_KINDS = ("spatial", "channel")
# Bounds of a healthy mask mean. Every collapse measured so far ended below 0.007; healthy
# masks sit around 0.3-0.6 (they start at 0.5).
COLLAPSE_LOW = 0.01
COLLAPSE_HIGH = 0.99
# Consecutive out-of-bounds checks before a warning during training (the last check of a run
# needs only one): one noisy logging period is not a collapse.
COLLAPSE_PATIENCE = 3

_PREFIX = "acam"
# The switches built against the collapse (config.py), with the value that addresses it and
# what it does.
_REMEDIES = (
    ("NORMALIZER", "sum_sq", "a scale-free normaliser: shrinking the masks no longer pays"),
    ("MASK_OBJECTIVE", "ascend", "the masks seek the discrepancy instead of fleeing it"),
    ("DETACH_STUDENT_IN_MASKS", "True", "the student learns only through the difference"),
)

logger = logging.getLogger(__name__)


def is_collapsed_mean(mean: float, low: float = COLLAPSE_LOW, high: float = COLLAPSE_HIGH) -> bool:
    """
    The rule on one number.

    Args:
        mean (float): the mean value of a level's spatial or channel masks.
        low, high (float): bounds of a healthy mean.

    Returns:
        bool: whether ``mean`` lies outside ``[low, high]`` (False for NaN: a diverged run is
        reported by detectron2's non-finite-loss check, not here).
    """
    return mean < low or mean > high


def level_statistics(scalars: Mapping[str, float]) -> Dict[str, Dict[str, float]]:
    """
    Group per-level scalars by level. Keys are ``acam/<level>/<name>`` (as logged) or
    ``<level>/<name>``; other keys and non-numeric values are ignored.

    Args:
        scalars (dict[str, float]): e.g. a ``metrics.json`` record or the latest values of the
            event storage.

    Returns:
        dict[str, dict[str, float]]: level -> {name: value}, levels in order of appearance.
    """
    levels: Dict[str, Dict[str, float]] = {}
    for key, value in scalars.items():
        parts = key.split("/")
        if parts[0] == _PREFIX:
            parts = parts[1:]
        if len(parts) != 2 or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        levels.setdefault(parts[0], {})[parts[1]] = float(value)
    return levels


def collapsed_levels(
    final_stats: Mapping[str, float], low: float = COLLAPSE_LOW, high: float = COLLAPSE_HIGH
) -> Dict[str, Tuple[str, ...]]:
    """
    The levels whose masks have collapsed in one snapshot of the statistics, e.g. the last
    record of a run's ``metrics.json`` (see :func:`read_final_statistics`).

    Args:
        final_stats (dict[str, float]): flat ``acam/<level>/<name>`` scalars; the rule reads
            ``<kind>_mask_mean`` for kind in ("spatial", "channel"), kinds a run does not log
            are skipped.
        low, high (float): bounds of a healthy mean, see :func:`is_collapsed`.

    Returns:
        dict[str, tuple[str, ...]]: level -> its collapsed mask kinds, e.g.
        ``{"p3": ("spatial", "channel"), "p5": ("spatial",)}``; empty when nothing collapsed
        (or the run is not a distiller with masks).
    """
    out = {}
    for level, stats in level_statistics(final_stats).items():
        kinds = tuple(
            kind
            for kind in MASK_KINDS
            if f"{kind}_mask_mean" in stats
            and is_collapsed_mean(stats[f"{kind}_mask_mean"], low, high)
        )
        if kinds:
            out[level] = kinds
    return out


def is_collapsed(
    final_stats: Mapping[str, float], low: float = COLLAPSE_LOW, high: float = COLLAPSE_HIGH
) -> bool:
    """
    Whether any level's spatial or channel masks have collapsed in one snapshot of the
    statistics (see :func:`collapsed_levels`, which says which).

    Args:
        final_stats (dict[str, float]): ``acam/<level>/<name>`` or ``<level>/<name>`` scalars.
        low, high (float): bounds of a healthy mean.

    Returns:
        bool: True if some ``<kind>_mask_mean`` lies outside ``[low, high]``.
    """
    return bool(collapsed_levels(final_stats, low, high))


def read_final_statistics(metrics_path: str) -> Dict[str, float]:
    """
    Args:
        metrics_path (str): a run's ``metrics.json`` (detectron2's JSON lines).

    Returns:
        dict[str, float]: the ``acam/...`` scalars of the last record that has any (the final
        statistics, median-smoothed over detectron2's logging window); empty if none.
    """
    final: Dict[str, float] = {}
    with open(metrics_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            stats = {k: v for k, v in record.items() if k.startswith(_PREFIX + "/")}
            if level_statistics(stats):
                final = stats
    return final


@dataclass(frozen=True)
class MaskCollapse:
    """
    One collapse the guard reported.

    Attributes:
        level (str): the level ("p3", ..., or "logits").
        kind (str): "spatial" or "channel".
        iteration (int): the iteration of the check that fired.
        checks (int): consecutive out-of-bounds checks up to it.
        final (bool): fired at the run's last check.
        stats (dict[str, float]): the level's statistics at that check.
        message (str): the logged warning.
    """

    level: str
    kind: str
    iteration: int
    checks: int
    final: bool
    stats: Dict[str, float] = field(repr=False)
    message: str = field(repr=False)


class MaskCollapseGuard:
    """
    Applies the collapse rule to a stream of per-level statistics and logs ONE warning per
    level and mask kind, the first time the rule holds: the mean is outside ``[low, high]`` at
    ``patience`` consecutive checks, or at the final check of the run. A kind that recovers
    resets its count; a kind that was reported is never reported again.
    """

    def __init__(
        self,
        *,
        low: float = COLLAPSE_LOW,
        high: float = COLLAPSE_HIGH,
        patience: int = COLLAPSE_PATIENCE,
        settings: Optional[Mapping[str, object]] = None,
        log: Optional[logging.Logger] = None,
    ) -> None:
        """
        Args:
            low, high (float): bounds of a healthy mask mean.
            patience (int): consecutive out-of-bounds checks needed during training (>= 1).
            settings (dict[str, object] or None): the run's current ``MODEL.ACAMKD`` values of
                NORMALIZER, MASK_OBJECTIVE and DETACH_STUDENT_IN_MASKS, if known; the warning
                then names only the switches not yet at the value that addresses a collapse.
            log (logging.Logger or None): where warnings go (default: this module's logger).
        """
        if not 0 <= low < high:
            raise ValueError(f"MaskCollapseGuard: need 0 <= low < high, got {low} and {high}")
        if patience < 1:
            raise ValueError(f"MaskCollapseGuard: patience must be >= 1, got {patience}")
        self.low = low
        self.high = high
        self.patience = patience
        self.settings = dict(settings or {})
        self._log = log or logger
        self._streak: Dict[Tuple[str, str], int] = {}
        self.reported: List[MaskCollapse] = []

    def update(
        self, iteration: int, stats: Mapping[str, float], final: bool = False
    ) -> List[MaskCollapse]:
        """
        One check.

        Args:
            iteration (int): the iteration the statistics belong to.
            stats (dict[str, float]): flat ``acam/<level>/<name>`` scalars (other keys are
                ignored, see :func:`level_statistics`); a kind missing from them keeps its
                count.
            final (bool): the run's last check: any out-of-bounds kind is reported.

        Returns:
            list[MaskCollapse]: the collapses reported at this check (also logged as warnings
            and appended to ``self.reported``).
        """
        done = {(c.level, c.kind) for c in self.reported}
        new = []
        for level, level_stats in level_statistics(stats).items():
            for kind in MASK_KINDS:
                mean = level_stats.get(f"{kind}_mask_mean")
                if mean is None or (level, kind) in done:
                    continue
                key = (level, kind)
                if not is_collapsed_mean(mean, self.low, self.high):
                    self._streak[key] = 0
                    continue
                self._streak[key] = self._streak.get(key, 0) + 1
                if self._streak[key] >= self.patience or final:
                    collapse = MaskCollapse(
                        level=level,
                        kind=kind,
                        iteration=iteration,
                        checks=self._streak[key],
                        final=final,
                        stats=dict(level_stats),
                        message=self._message(level, kind, iteration, level_stats, final),
                    )
                    self._log.warning(collapse.message)
                    new.append(collapse)
        self.reported.extend(new)
        return new

    def _message(
        self, level: str, kind: str, iteration: int, stats: Mapping[str, float], final: bool
    ) -> str:
        mean = stats[f"{kind}_mask_mean"]
        key = (level, kind)
        when = (
            f"at the end of training (iteration {iteration})"
            if final and self._streak[key] < self.patience
            else f"at {self._streak[key]} consecutive checks up to iteration {iteration}"
        )
        details = [f"mean {mean:.3g}"]
        for name, title in (("coverage", "coverage (> 0.5)"), ("dice", "pairwise Dice")):
            if f"{kind}_mask_{name}" in stats:
                details.append(f"{title} {stats[f'{kind}_mask_{name}']:.3g}")
        if kind == "spatial" and "mask_discrepancy_corr" in stats:
            details.append(f"correlation with the discrepancy {stats['mask_discrepancy_corr']:.3g}")
        effect = (
            "they weight the feature loss almost nowhere"
            if mean < self.low
            else "they weight everything alike, a plain MSE"
        )
        remedies = [
            f"MODEL.ACAMKD.{name} {value} (LazyConfig: model.acam.{name.lower()}={value}; {what})"
            for name, value, what in _REMEDIES
            if str(self.settings.get(name, "")) != value
        ]
        if remedies:
            advice = "Switches that address it: " + "; ".join(remedies) + "."
        else:
            advice = (
                "The switches built against it (NORMALIZER sum_sq, MASK_OBJECTIVE ascend, "
                "DETACH_STUDENT_IN_MASKS True) are all set already."
            )
        now = ", ".join(f"{k} {v}" for k, v in self.settings.items())
        return (
            f"ACAM-KD mask collapse at level {level}: the {kind} masks' mean is outside "
            f"[{self.low:g}, {self.high:g}] {when} ({', '.join(details)}), so {effect} and the "
            f"masked {kind} loss teaches almost nothing. {advice}"
            + (f" This run: {now}." if now else "")
            + ' See docs/METHOD.md, "Known risk". Reported once per level and mask kind.'
        )
