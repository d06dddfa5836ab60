"""
Figures of what ACAM-KD's masks do, for ``tools/visualize_masks.py`` and the training hook,
drawn from the arrays of :mod:`acamkd.pictures.mask_maps`.

One figure row shows one level of one image as the distiller sees it: the M spatial masks
overlaid on the image, the energy (mean of squares over channels) of the fused, teacher and
aligned student features and of their difference, and the M x C channel masks as a heat map.
The tool stacks one row per checkpoint (how the masks evolve over training); the hook stacks
one row per level.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend),
on a fixed layout, so a figure's pixel size depends only on its rows, masks and image shape.
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from detectron2.config import CfgNode

from ..modeling.meta_arch.distiller import ACAMDistiller
from .mask_maps import (
    LevelMaps,
    build_distiller_for_checkpoints,
    compute_level_maps,
    image_to_rgb,
    load_distiller_checkpoint,
)

__all__ = [
    "MaskRow",
    "level_rows",
    "mask_figure_size",
    "render_mask_figure",
    "visualize_checkpoints",
]


# Layout, in inches. Every panel is `panel_width` wide and as high as the image's aspect asks
# (clamped), with its title above and its colorbar strip below.
_LEFT, _RIGHT, _TOP, _BOTTOM = 1.45, 0.35, 0.5, 0.1
_TITLE_H, _CBAR_H, _CBAR_TICKS_H, _COL_GAP, _ROW_GAP = 0.4, 0.09, 0.3, 0.18, 0.2
_ASPECT_RANGE = (0.3, 2.0)
# Columns after the M mask overlays: fused, teacher, student and discrepancy energy, then the
# channel-mask heat map, two columns wide.
_NUM_MAP_COLUMNS = 4
_CHANNEL_SPAN = 2
_FONT = 7


@dataclass
class MaskRow:
    """
    One figure row.

    Attributes:
        label (str): shown left of the row (a checkpoint, a level).
        image (np.ndarray): (h, w, 3) uint8 RGB, the image the model saw (after resizing).
        maps (LevelMaps): the level's maps for that image.
    """

    label: str
    image: np.ndarray
    maps: LevelMaps


def level_rows(model: ACAMDistiller, x: dict, input_format: str) -> List[MaskRow]:
    """
    One figure row per level for one image (labelled by the level).

    Args:
        model (ACAMDistiller): the distiller, unwrapped.
        x (dict): a per-image dict with "image" (3, h, w) in ``input_format``.
        input_format (str): INPUT.FORMAT of the student, e.g. "BGR".

    Returns:
        list[MaskRow]: one per distilled level, in the model's order.
    """
    image = image_to_rgb(x["image"], input_format)
    levels = compute_level_maps(model, [x])[0]
    return [MaskRow(level, image, maps) for level, maps in levels.items()]


def _checkpoint_label(path: str, extra: Dict[str, object]) -> str:
    label = os.path.basename(path)
    if "iteration" in extra:
        label += f"\niter {extra['iteration']}"
    return label


def _unique_stems(file_names: Sequence[str]) -> List[str]:
    stems, seen = [], {}
    for name in file_names:
        stem = os.path.splitext(os.path.basename(name))[0]
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem] - 1}")
    return stems


def visualize_checkpoints(
    cfg: CfgNode,
    checkpoints: Sequence[str],
    inputs: Sequence[dict],
    output_dir: str,
    *,
    model: Optional[ACAMDistiller] = None,
    panel_width: float = 2.0,
    dpi: int = 100,
    stretch_masks: bool = False,
) -> List[str]:
    """
    Write one PNG per image and level, ``<output_dir>/<image>_<level>.png``, with one row per
    checkpoint (in the given order).

    Args:
        cfg (CfgNode): the distillation config of the run.
        checkpoints (list[str]): distillation checkpoints of that run.
        inputs (list[dict]): images from :func:`acamkd.pictures.mask_maps.load_images`.
        model (ACAMDistiller): the model to load into; built from ``cfg`` if None. The
            teacher is loaded from ``MODEL.ACAMKD.TEACHER.WEIGHTS``, which must have the
            content the checkpoints record (once for all of them).
        panel_width, dpi, stretch_masks: see :func:`render_mask_figure`.

    Returns:
        list[str]: the written files.
    """
    if not checkpoints:
        raise ValueError("No checkpoints given")
    if model is None:
        model = build_distiller_for_checkpoints(cfg)
    labels, per_checkpoint = [], []
    for path in checkpoints:
        extra = load_distiller_checkpoint(model, path)
        labels.append(_checkpoint_label(path, extra))
        per_checkpoint.append(compute_level_maps(model, inputs))

    os.makedirs(output_dir, exist_ok=True)
    written = []
    stems = _unique_stems([x.get("file_name", f"image{i}") for i, x in enumerate(inputs)])
    for i, (x, stem) in enumerate(zip(inputs, stems)):
        image = image_to_rgb(x["image"], cfg.INPUT.FORMAT)
        for level in per_checkpoint[0][i]:
            rows = [
                MaskRow(label, image, maps[i][level]) for label, maps in zip(labels, per_checkpoint)
            ]
            title = f"{stem}   level {level}   " + _grid_text(rows[0].maps, image.shape[:2])
            figure = render_mask_figure(
                rows, title, panel_width=panel_width, dpi=dpi, stretch_masks=stretch_masks
            )
            path = os.path.join(output_dir, f"{stem}_{level}.png")
            _write_png(path, figure)
            written.append(path)
    return written


def _grid_text(maps: LevelMaps, image_hw) -> str:
    grid_h, grid_w = maps.grid
    stride = maps.extent[1] / maps.spatial.shape[-2]
    return (
        f"grid {grid_h}x{grid_w} (stride {stride:g})   image {image_hw[0]}x{image_hw[1]}   "
        f"M={maps.spatial.shape[0]}   C={maps.channel.shape[1]}"
    )


def _write_png(path: str, image_rgb: np.ndarray) -> None:
    if not cv2.imwrite(path, image_rgb[:, :, ::-1]):
        raise OSError(f"Could not write {path}")


# ----------------------------------------------------------------------------- drawing


class _Layout:
    """Positions (figure fractions) of every panel of a figure of ``num_rows`` rows."""

    def __init__(self, num_rows: int, num_masks: int, image_hw, panel_width: float):
        aspect = min(max(image_hw[0] / image_hw[1], _ASPECT_RANGE[0]), _ASPECT_RANGE[1])
        self.panel_w, self.panel_h = panel_width, panel_width * aspect
        self.num_cols = num_masks + _NUM_MAP_COLUMNS + _CHANNEL_SPAN
        self.row_h = _TITLE_H + self.panel_h + _CBAR_H + _CBAR_TICKS_H
        self.width = _LEFT + self.num_cols * panel_width + (self.num_cols - 1) * _COL_GAP + _RIGHT
        self.height = _TOP + num_rows * self.row_h + (num_rows - 1) * _ROW_GAP + _BOTTOM

    def _rect(self, left: float, top: float, width: float, height: float):
        """Inches from the top-left corner -> matplotlib's [left, bottom, width, height]."""
        return [
            left / self.width,
            1 - (top + height) / self.height,
            width / self.width,
            height / self.height,
        ]

    def _span(self, col: int, span: int) -> Tuple[float, float]:
        left = _LEFT + col * (self.panel_w + _COL_GAP)
        return left, span * self.panel_w + (span - 1) * _COL_GAP

    def panel(self, row: int, col: int, span: int = 1):
        left, width = self._span(col, span)
        top = _TOP + row * (self.row_h + _ROW_GAP) + _TITLE_H
        return self._rect(left, top, width, self.panel_h)

    def colorbar(self, row: int, col: int, span: int = 1, max_width: Optional[float] = None):
        left, width = self._span(col, span)
        width = min(width, max_width or width)
        top = _TOP + row * (self.row_h + _ROW_GAP) + _TITLE_H + self.panel_h + 0.04
        return self._rect(left, top, width, _CBAR_H)

    def row_center(self, row: int) -> float:
        top = _TOP + row * (self.row_h + _ROW_GAP) + _TITLE_H + self.panel_h / 2
        return 1 - top / self.height


def mask_figure_size(
    num_rows: int, num_masks: int, image_hw: Tuple[int, int], panel_width: float, dpi: int
) -> Tuple[int, int]:
    """
    Returns:
        tuple[int, int]: (height, width) in pixels of :func:`render_mask_figure`'s output.
    """
    layout = _Layout(num_rows, num_masks, image_hw, panel_width)
    # Agg truncates the figure size in pixels, as here.
    return int(layout.height * dpi), int(layout.width * dpi)


def render_mask_figure(
    rows: Sequence[MaskRow],
    title: str,
    *,
    panel_width: float = 2.0,
    dpi: int = 100,
    stretch_masks: bool = False,
) -> np.ndarray:
    """
    Draw the rows one under the other. Per row: the M spatial masks over the image (colour
    scale [0, 1], or the row's min-max with ``stretch_masks``; white contour at 0.5), the
    fused, teacher and aligned student energies (teacher and student on one scale) and the
    discrepancy energy, each with a colorbar, and the channel masks as an M x C heat map.

    Args:
        rows (list[MaskRow]): all with the same number of masks and the same image shape.
        title (str): the figure's title.
        panel_width (float): width of one panel in inches.
        dpi (int): pixels per inch.
        stretch_masks (bool): stretch the mask colours to each row's range, to see structure
            in masks that are still near 0.5; the fixed [0, 1] scale compares rows.

    Returns:
        np.ndarray: (H, W, 3) uint8 RGB, of :func:`mask_figure_size`.
    """
    if not rows:
        raise ValueError("render_mask_figure: no rows")
    num_masks = rows[0].maps.spatial.shape[0]
    layout = _Layout(len(rows), num_masks, rows[0].image.shape[:2], panel_width)
    fig = Figure(figsize=(layout.width, layout.height), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    fig.text(0.5, 1 - 0.12 / layout.height, title, ha="center", va="top", fontsize=_FONT + 2)
    for r, row in enumerate(rows):
        if row.maps.spatial.shape[0] != num_masks:
            raise ValueError("render_mask_figure: all rows need the same number of masks")
        _draw_row(fig, layout, r, row, stretch_masks)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def _draw_row(fig: Figure, layout: _Layout, r: int, row: MaskRow, stretch_masks: bool) -> None:
    maps, image = row.maps, row.image
    h, w = image.shape[:2]
    extent = (0, maps.extent[0], maps.extent[1], 0)
    num_masks = maps.spatial.shape[0]
    stats = maps.stats
    fig.text(
        0.1 / layout.width,
        layout.row_center(r),
        f"{row.label}\n\nspatial masks\nmean {stats['spatial_mask_mean']:.3g}\n"
        f"cover {stats['spatial_mask_coverage']:.3f}\ndice {stats['spatial_mask_dice']:.3f}\n"
        f"corr(mask, D²) {stats['mask_discrepancy_corr']:+.2f}",
        ha="left",
        va="center",
        fontsize=_FONT,
    )

    vmin, vmax = 0.0, 1.0
    if stretch_masks:
        vmin, vmax = float(maps.spatial.min()), float(maps.spatial.max())
        vmax = max(vmax, vmin + 1e-6)
    for m in range(num_masks):
        mask = maps.spatial[m]
        ax = fig.add_axes(layout.panel(r, m))
        ax.imshow(image, extent=(0, w, h, 0))
        im = ax.imshow(
            mask,
            cmap="turbo",
            alpha=0.55,
            vmin=vmin,
            vmax=vmax,
            extent=extent,
            interpolation="bilinear",
        )
        if mask.shape[0] > 1 and mask.shape[1] > 1 and mask.min() < 0.5 < mask.max():
            ys = (np.arange(mask.shape[0]) + 0.5) * maps.extent[1] / mask.shape[0]
            xs = (np.arange(mask.shape[1]) + 0.5) * maps.extent[0] / mask.shape[1]
            ax.contour(xs, ys, mask, levels=[0.5], colors="white", linewidths=0.7)
        _finish(ax, w, h, f"mask {m}\nmean {mask.mean():.3g}  [{mask.min():.3g}, {mask.max():.3g}]")
    cax = fig.add_axes(layout.colorbar(r, 0, num_masks, max_width=2 * layout.panel_w))
    _colorbar(fig, im, cax, "mask value")

    e = maps.energy
    feature_max = max(float(e["teacher"].max()), float(e["student"].max()), 1e-12)
    # (key, title, colour map, colour scale maximum, colorbar span: 0 = shares the previous)
    panels = [
        ("fused", "fused energy", "magma", None, 1),
        ("teacher", "teacher energy", "magma", feature_max, 2),
        ("student", "aligned student energy", "magma", feature_max, 0),
        ("discrepancy", "discrepancy energy (T-S)²", "viridis", None, 1),
    ]
    for i, (key, name, cmap, top, cbar_span) in enumerate(panels):
        col = num_masks + i
        ax = fig.add_axes(layout.panel(r, col))
        im = ax.imshow(
            e[key], cmap=cmap, vmin=0.0, vmax=top, extent=extent, interpolation="nearest"
        )
        _finish(ax, w, h, f"{name}\nmean {e[key].mean():.3g}")
        if cbar_span:
            _colorbar(fig, im, fig.add_axes(layout.colorbar(r, col, cbar_span)))

    col = num_masks + _NUM_MAP_COLUMNS
    ax = fig.add_axes(layout.panel(r, col, _CHANNEL_SPAN))
    cmin, cmax = 0.0, 1.0
    if stretch_masks:
        cmin, cmax = float(maps.channel.min()), max(float(maps.channel.max()), cmin + 1e-6)
    im = ax.imshow(
        maps.channel, cmap="turbo", vmin=cmin, vmax=cmax, aspect="auto", interpolation="nearest"
    )
    ax.set_xticks([])
    ax.yaxis.tick_right()
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(num_masks, 8), integer=True))
    ax.tick_params(labelsize=_FONT - 1, length=2)
    ax.set_title(
        f"channel masks (M x C = {num_masks} x {maps.channel.shape[1]})\n"
        f"mean {stats['channel_mask_mean']:.3g}  cover {stats['channel_mask_coverage']:.3f}  "
        f"dice {stats['channel_mask_dice']:.3f}",
        fontsize=_FONT,
    )
    _colorbar(fig, im, fig.add_axes(layout.colorbar(r, col, _CHANNEL_SPAN)))


def _finish(ax, w: int, h: int, title: str) -> None:
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=_FONT)


def _colorbar(fig: Figure, mappable, cax, label: Optional[str] = None) -> None:
    cbar = fig.colorbar(mappable, cax=cax, orientation="horizontal")
    cbar.locator = MaxNLocator(nbins=3)
    cbar.formatter.set_powerlimits((-2, 3))
    cbar.update_ticks()
    cbar.ax.tick_params(labelsize=_FONT - 1, length=2, pad=1)
    cbar.solids.set_alpha(1.0)  # the scale itself, not the translucent overlay
    if label:
        cbar.set_label(label, fontsize=_FONT - 1, labelpad=1)
