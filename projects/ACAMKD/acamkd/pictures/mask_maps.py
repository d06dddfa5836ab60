"""
The ACAM masks of a distiller as arrays, without matplotlib: what ``tools/visualize_masks.py``
and the training hook draw (:mod:`acamkd.pictures.visualization`).

For one image and one distilled level, :func:`compute_level_maps` runs the distiller and returns
the M spatial masks, the M x C channel masks and the energy (mean of squares over channels) of
the fused, teacher and aligned student features and of their difference, on the level's grid,
cropped to the cells that cover the image. The images come as the model sees them at test time
(:func:`load_images`); the weights from distillation checkpoints
(:func:`load_distiller_checkpoint`).
"""

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from ..modeling.acam import ACAMOutput
from ..modeling.meta_arch.distiller import ACAMDistiller
from ..training.checkpointer import DistillationCheckpointer, is_distiller_state

__all__ = [
    "IMAGE_EXTENSIONS",
    "LevelMaps",
    "build_distiller_for_checkpoints",
    "compute_level_maps",
    "feature_energy",
    "image_to_rgb",
    "list_image_files",
    "load_distiller_checkpoint",
    "load_images",
]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def feature_energy(features: torch.Tensor) -> torch.Tensor:
    """
    Args:
        features (Tensor): (B, C, H, W).

    Returns:
        Tensor: (B, H, W) float32, the mean of squares over channels.
    """
    return features.float().square().mean(dim=1)


@dataclass
class LevelMaps:
    """
    One level of one image, on the level's grid, cropped to the cells that cover the image
    (the rest only covers padding), as CPU float32 arrays.

    Attributes:
        spatial (np.ndarray): (M, h, w) spatial masks, in [0, 1].
        channel (np.ndarray): (M, C) channel masks, in [0, 1].
        energy (dict[str, np.ndarray]): (h, w) mean over channels of the squared "fused",
            "teacher", "student" (aligned) features and "discrepancy" ``T - f_align(S)``.
        extent (tuple[float, float]): (width, height) in image pixels that the h x w cells span.
        grid (tuple[int, int]): the level's full (padded) grid size (H, W).
        stats (dict[str, float]): the level's mask statistics (see :class:`ACAMOutput`).
    """

    spatial: np.ndarray
    channel: np.ndarray
    energy: Dict[str, np.ndarray]
    extent: Tuple[float, float]
    grid: Tuple[int, int]
    stats: Dict[str, float]


def _padded_hw(model: ACAMDistiller, image_hw: Tuple[int, int]) -> Tuple[int, int]:
    """The size to which the student pads an image of ``image_hw`` (as its preprocessing)."""
    backbone = model.student.backbone
    probe = torch.empty((1,) + tuple(image_hw), dtype=torch.uint8)
    padded = ImageList.from_tensors(
        [probe], backbone.size_divisibility, padding_constraints=backbone.padding_constraints
    )
    return tuple(padded.tensor.shape[-2:])


def _strides(model: ACAMDistiller, outputs: Dict[str, ACAMOutput], padded_hw) -> Dict:
    """Level -> (stride_y, stride_x) in image pixels of its grid."""
    if model.distill_target == "fpn":
        shapes = model.student.backbone.output_shape()
        return {level: (shapes[level].stride,) * 2 for level in outputs}
    # Logits: at the head's stride, possibly resampled to the other model's grid.
    return {
        level: tuple(p / g for p, g in zip(padded_hw, out.masks["spatial"].shape[-2:]))
        for level, out in outputs.items()
    }


def _level_maps(out: ACAMOutput, image_hw, stride: Tuple[float, float]) -> LevelMaps:
    masks = out.masks
    assert masks is not None, "ACAMOutput without masks: run with return_masks=True"
    if "spatial" not in masks or "channel" not in masks:
        raise ValueError(
            "The mask figure draws spatial and channel masks, but this model computes "
            f"{sorted(k for k in ('spatial', 'channel') if k in masks) or 'none'}: it was built "
            "with another MODEL.ACAMKD.MASKS than 'spatial_channel' (an ablation row)."
        )
    grid_h, grid_w = masks["spatial"].shape[-2:]
    cell_h, cell_w = stride
    valid_h = min(grid_h, math.ceil(image_hw[0] / cell_h))
    valid_w = min(grid_w, math.ceil(image_hw[1] / cell_w))

    def crop(x: torch.Tensor) -> np.ndarray:
        return x[0, ..., :valid_h, :valid_w].float().cpu().numpy()

    energy = {name: crop(feature_energy(masks[name])) for name in ("fused", "teacher", "student")}
    energy["discrepancy"] = crop(feature_energy(masks["teacher"] - masks["student"]))
    return LevelMaps(
        spatial=crop(masks["spatial"]),
        channel=masks["channel"][0].float().cpu().numpy(),
        energy=energy,
        extent=(valid_w * cell_w, valid_h * cell_h),
        grid=(grid_h, grid_w),
        stats={k: float(v) for k, v in out.stats.items()},
    )


def compute_level_maps(model: ACAMDistiller, inputs: Sequence[dict]) -> List[Dict[str, LevelMaps]]:
    """
    Run the distiller on each image alone (no ground truth needed) and collect its maps.

    Args:
        model (ACAMDistiller): the distiller, unwrapped (not DistributedDataParallel).
        inputs (list[dict]): detectron2 per-image dicts with "image" (3, h, w) in the
            student's input format, e.g. from :func:`load_images`.

    Returns:
        list[dict[str, LevelMaps]]: per image, level name -> its maps, in the model's order.
    """
    results = []
    for x in inputs:
        image_hw = tuple(x["image"].shape[-2:])
        outputs = model.distill_features([x])
        strides = _strides(model, outputs, _padded_hw(model, image_hw))
        results.append(
            {level: _level_maps(out, image_hw, strides[level]) for level, out in outputs.items()}
        )
    return results


def image_to_rgb(image: torch.Tensor, input_format: str) -> np.ndarray:
    """(3, h, w) image in ``input_format`` (INPUT.FORMAT) -> (h, w, 3) uint8 RGB."""
    return np.ascontiguousarray(convert_image_to_rgb(image.permute(1, 2, 0), input_format))


def list_image_files(paths: Sequence[str]) -> List[str]:
    """Image files among ``paths``; a folder stands for its image files, sorted by name."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(os.listdir(path))
            files += [os.path.join(path, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"No such image file or folder: {path!r}")
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {list(paths)}")
    return files


def load_images(
    cfg: CfgNode,
    image_paths: Sequence[str] = (),
    dataset: Optional[str] = None,
    num_images: Optional[int] = None,
) -> List[dict]:
    """
    Images as the model sees them at test time: read in ``cfg.INPUT.FORMAT`` and resized by
    ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` (detectron2's ``DatasetMapper(is_train=False)``,
    which drops annotations).

    Args:
        image_paths (list[str]): image files or folders of images.
        dataset (str): or a name registered in ``DatasetCatalog``: its first ``num_images``.
        num_images (int): at most this many images (all if None).

    Returns:
        list[dict]: detectron2 per-image dicts with "file_name" and "image" (3, h, w) uint8.
    """
    if bool(image_paths) == bool(dataset):
        raise ValueError("Give either image files/folders or a dataset name, not both")
    if dataset:
        records = DatasetCatalog.get(dataset)[:num_images]
        if not records:
            raise ValueError(f"Dataset {dataset!r} has no images")
    else:
        records = [{"file_name": f} for f in list_image_files(image_paths)[:num_images]]
    mapper = DatasetMapper(cfg, is_train=False)
    return [mapper(r) for r in records]


class _DistillerOnlyCheckpointer(DistillationCheckpointer):
    """Refuses checkpoints that are not whole distillers: their ACAM modules would be random."""

    def _load_model(self, checkpoint):
        if not is_distiller_state(checkpoint["model"]):
            raise ValueError(
                "Not a distillation checkpoint (no 'student.*' keys): the masks come from the "
                "ACAM modules saved with the distiller, e.g. a run's "
                "model_final.pth or model_XXXXXXX.pth."
            )
        return super()._load_model(checkpoint)


def load_distiller_checkpoint(model: ACAMDistiller, path: str) -> Dict[str, object]:
    """
    Load a distillation checkpoint (student and ACAM modules; the teacher is reloaded from
    its recorded source, see :class:`~acamkd.training.checkpointer.DistillationCheckpointer`) into
    ``model``.

    Returns:
        dict: what the checkpoint holds besides the weights ("iteration", ...).
    """
    return _DistillerOnlyCheckpointer(model).load(path, checkpointables=[])


def build_distiller_for_checkpoints(cfg: CfgNode) -> ACAMDistiller:
    """The distiller of ``cfg``, in eval mode, with nothing loaded yet (building reads no
    weights; loading a distillation checkpoint reloads the teacher from its recorded
    source)."""
    if cfg.MODEL.META_ARCHITECTURE != "ACAMDistiller":
        raise ValueError(
            f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}: the masks exist only "
            "in an ACAMDistiller config"
        )
    model = build_model(cfg)
    model.eval()
    return model
