"""
Training hooks that show what the ACAM masks do: a TensorBoard figure, a console table and a
warning when a level's masks collapse.
"""

import logging
from typing import Callable, Dict, Optional

import torch
from torch import nn

from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.utils.events import EventWriter, get_event_storage

from ..modeling.meta_arch.distiller import ACAMDistiller
from .mask_collapse import (
    COLLAPSE_HIGH,
    COLLAPSE_LOW,
    COLLAPSE_PATIENCE,
    MaskCollapseGuard,
    collapsed_levels,
    is_collapsed,
)

__all__ = [
    "ACAMStatsPrinter",
    "MaskCollapseHook",
    "MaskVisualizationHook",
    "acam_settings",
    "collapsed_levels",
    "is_collapsed",
    "unwrap_distiller",
]

# Logged where detectron2's CommonMetricPrinter logs, so the table lands in the same console
# and log.txt (default_setup only configures the "detectron2" and "fvcore" loggers).
_logger = logging.getLogger("detectron2.utils.events")


def unwrap_distiller(model: nn.Module) -> Optional[ACAMDistiller]:
    """The :class:`ACAMDistiller` in ``model`` (DistributedDataParallel or not), else None."""
    model = getattr(model, "module", model)
    return model if isinstance(model, ACAMDistiller) else None


class MaskVisualizationHook(HookBase):
    """
    Every ``period`` iterations, runs the distiller on one fixed image and puts a figure of its
    masks (one row per level, see :func:`acamkd.pictures.visualization.render_mask_figure`) into the
    event storage, which detectron2's TensorBoard writer writes as an image.

    The image is the first record of ``dataset`` passed through ``mapper`` (a test-time
    mapper, which resizes it as for evaluation and drops its annotations), read when the first
    figure is made, so successive figures show the same image. Models that are not distillers
    with spatial and channel masks get no figure (and one warning for the second kind).
    """

    def __init__(
        self,
        period: int,
        dataset: str,
        mapper: Callable[[dict], dict],
        *,
        tag: str = "acam/masks",
        panel_width: float = 1.6,
        dpi: int = 60,
    ) -> None:
        """
        Args:
            period (int): iterations between figures; 0 turns the hook off.
            dataset (str): a name registered in ``DatasetCatalog``; its first image is drawn.
            mapper (callable): dataset record -> model input (a dict with "image"), e.g.
                ``DatasetMapper(cfg, is_train=False)``.
            tag (str): the image's name in TensorBoard.
            panel_width, dpi: size of the figure, see :func:`render_mask_figure`.
        """
        self._period = period
        self._dataset = dataset
        self._mapper = mapper
        self._tag = tag
        self._panel_width = panel_width
        self._dpi = dpi
        self._input: Optional[dict] = None

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if self._period <= 0 or next_iter % self._period:
            return
        model = unwrap_distiller(self.trainer.model)
        if model is None:
            return
        kinds = {level.masks for level in model.acam.values()}
        if kinds != {"spatial_channel"}:
            _logger.warning(
                "The mask figure (VIS_PERIOD, train.vis_period) draws spatial and channel "
                "masks, but this model has masks %s (MODEL.ACAMKD.MASKS, model.acam.masks): no "
                "figure is made.",
                sorted(kinds),
            )
            self._period = 0
            return
        if self._input is None:
            records = DatasetCatalog.get(self._dataset)
            if not records:
                raise ValueError(f"Mask figure: dataset {self._dataset!r} has no images")
            self._input = self._mapper(records[0])
        self.trainer.storage.put_image(self._tag, self._figure(model, next_iter))

    def _figure(self, model: ACAMDistiller, iteration: int) -> torch.Tensor:
        # Drawing needs matplotlib: imported when the first figure is made, not with the trainer.
        from ..pictures.visualization import level_rows, render_mask_figure

        # The distiller is fed images in the student's format (INPUT.FORMAT).
        rows = level_rows(model, self._input, model.student_input_format)
        figure = render_mask_figure(
            rows,
            f"ACAM masks after {iteration} iterations",
            panel_width=self._panel_width,
            dpi=self._dpi,
        )
        return torch.from_numpy(figure).permute(2, 0, 1).float() / 255.0  # (3, H, W) in [0, 1]


class ACAMStatsPrinter(EventWriter):
    """
    Logs the per-level ACAM statistics (``acam/<level>/...`` in the event storage) as one line
    per level, median-smoothed like detectron2's metric printer: mask mean, coverage (> 0.5)
    and pairwise Dice of the spatial and channel masks, the correlation of the spatial masks
    with the discrepancy, and each loss's share of the total ACAM loss.
    """

    _COLUMNS = (
        (
            "spatial mean/cover/dice",
            ("spatial_mask_mean", "spatial_mask_coverage", "spatial_mask_dice"),
        ),
        (
            "channel mean/cover/dice",
            ("channel_mask_mean", "channel_mask_coverage", "channel_mask_dice"),
        ),
        ("corr", ("mask_discrepancy_corr",)),
        ("loss share channel/spatial/div", ("share_channel", "share_spatial", "share_diversity")),
    )

    def __init__(self, window_size: int = 20) -> None:
        self._window_size = window_size
        self._last_write = -1

    def write(self) -> None:
        storage = get_event_storage()
        if storage.iter == self._last_write:
            return
        self._last_write = storage.iter
        histories = storage.histories()
        levels = []
        for key in histories:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "acam" and parts[1] not in levels:
                levels.append(parts[1])
        for level in levels:
            fields = []
            for title, names in self._COLUMNS:
                keys = [f"acam/{level}/{n}" for n in names]
                if all(k in histories for k in keys):
                    values = [histories[k].median(self._window_size) for k in keys]
                    fields.append(f"{title} " + "/".join(f"{v:.3f}" for v in values))
            if fields:
                _logger.info(f" acam {level}: " + "  ".join(fields))


def acam_settings(model: nn.Module) -> Dict[str, object]:
    """
    Args:
        model (nn.Module): the trained model, DistributedDataParallel or not.

    Returns:
        dict[str, object]: the distiller's NORMALIZER, MASK_OBJECTIVE and
        DETACH_STUDENT_IN_MASKS (as set on its ACAM levels); empty for other models.
    """
    distiller = unwrap_distiller(model)
    if distiller is None or len(distiller.acam) == 0:
        return {}
    level = next(iter(distiller.acam.values()))
    names = (
        ("NORMALIZER", "normalizer"),
        ("MASK_OBJECTIVE", "mask_objective"),
        ("DETACH_STUDENT_IN_MASKS", "detach_student_in_masks"),
    )
    return {key: getattr(level, attr) for key, attr in names if hasattr(level, attr)}


class MaskCollapseHook(HookBase):
    """
    Warns, once per level and mask kind, when a level's spatial or channel masks collapse
    (:class:`acamkd.training.mask_collapse.MaskCollapseGuard`): every ``period`` iterations and
    at the last one, it reads the median over the period of each ``acam/<level>/...`` scalar
    from the event storage and passes them to the guard. Runs without ACAM statistics (plain
    detectors, the no-mask ablation) are never warned about.
    """

    def __init__(
        self,
        period: int = 20,
        *,
        low: float = COLLAPSE_LOW,
        high: float = COLLAPSE_HIGH,
        patience: int = COLLAPSE_PATIENCE,
    ) -> None:
        """
        Args:
            period (int): iterations between checks (detectron2's logging period).
            low, high (float): bounds of a healthy mask mean.
            patience (int): consecutive out-of-bounds checks before a warning (the last
                iteration needs one).
        """
        if period < 1:
            raise ValueError(f"MaskCollapseHook: period must be >= 1, got {period}")
        self.period = period
        self.low = low
        self.high = high
        self.patience = patience
        self.guard: Optional[MaskCollapseGuard] = None

    def before_train(self) -> None:
        self.guard = MaskCollapseGuard(
            low=self.low,
            high=self.high,
            patience=self.patience,
            settings=acam_settings(self.trainer.model),
            log=_logger,
        )

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        final = next_iter >= self.trainer.max_iter
        if self.guard is None or (next_iter % self.period and not final):
            return
        stats = {
            key: float(history.median(self.period))
            for key, history in self.trainer.storage.histories().items()
            if key.startswith("acam/")
        }
        if stats:
            self.guard.update(self.trainer.iter, stats, final=final)
