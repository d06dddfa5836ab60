"""The frozen teacher: its own config, its own weights, never trained.

The teacher is described by ``MODEL.ACAMKD.TEACHER.{CONFIG_FILE, OPTS, WEIGHTS}``. It is loaded
separately from the student because detectron2's checkpoint loader matches keys by suffix and
fails when one key matches both ``teacher.*`` and ``student.*``.
"""

import logging
import os
from pathlib import Path

from torch import nn

from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.projects.deeplab import add_deeplab_config

from ..config import add_acamkd_config

__all__ = [
    "get_acamkd_cfg",
    "resolve_config_file",
    "build_teacher_cfg",
    "build_frozen_teacher",
    "freeze",
    "load_teacher_weights",
]

logger = logging.getLogger(__name__)

# The repository root when the package is installed in editable mode (projects/ACAMKD/acamkd).
_REPO_ROOT = Path(__file__).resolve().parents[4]


def get_acamkd_cfg() -> CfgNode:
    """detectron2's default config plus the DeepLab keys and ``MODEL.ACAMKD``."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_acamkd_config(cfg)
    return cfg


def resolve_config_file(name_or_path: str) -> str:
    """
    Find a config given as a path (absolute, relative to the working directory or to this
    repository) or as a detectron2 model-zoo name such as
    ``"COCO-Detection/retinanet_R_101_FPN_3x.yaml"``.

    Returns:
        str: an existing file path.
    """
    if not name_or_path:
        raise ValueError(
            "MODEL.ACAMKD.TEACHER.CONFIG_FILE is empty: set it to the teacher's config file or a "
            "detectron2 model-zoo name, e.g. 'COCO-Detection/retinanet_R_101_FPN_3x.yaml'."
        )
    for candidate in (Path(name_or_path), _REPO_ROOT / name_or_path):
        if candidate.is_file():
            return str(candidate)
    try:
        return model_zoo.get_config_file(name_or_path)
    except RuntimeError:
        raise FileNotFoundError(
            f"Teacher config {name_or_path!r} (MODEL.ACAMKD.TEACHER.CONFIG_FILE) is neither a file "
            f"(looked in {os.getcwd()} and {_REPO_ROOT}) nor a detectron2 model-zoo config name "
            "such as 'COCO-Detection/retinanet_R_101_FPN_3x.yaml'."
        ) from None


def build_teacher_cfg(cfg: CfgNode) -> CfgNode:
    """
    The teacher's own config: its file, then ``TEACHER.OPTS``; device and weights from ``cfg``.
    """
    tcfg = get_acamkd_cfg()
    tcfg.merge_from_file(resolve_config_file(cfg.MODEL.ACAMKD.TEACHER.CONFIG_FILE))
    tcfg.merge_from_list(list(cfg.MODEL.ACAMKD.TEACHER.OPTS))
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = cfg.MODEL.ACAMKD.TEACHER.WEIGHTS
    if tcfg.MODEL.META_ARCHITECTURE == "ACAMDistiller":
        raise ValueError(
            f"The teacher config {cfg.MODEL.ACAMKD.TEACHER.CONFIG_FILE!r} describes a distiller; "
            "give the config of the teacher detector itself (e.g. the one it was trained with)."
        )
    tcfg.freeze()
    return tcfg


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients and put ``module`` in eval mode (BatchNorm statistics included)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def build_frozen_teacher(tcfg: CfgNode, *, allow_random_init: bool = False) -> nn.Module:
    """
    Build the teacher from its config and load ``tcfg.MODEL.WEIGHTS`` (a local path, a
    ``detectron2://`` or an ``https://`` URL), then freeze it.

    Args:
        tcfg (CfgNode): the teacher's config, see :func:`build_teacher_cfg`.
        allow_random_init (bool): accept empty weights (tests and smoke runs only).
    """
    teacher = build_model(tcfg)
    weights = tcfg.MODEL.WEIGHTS
    if not weights:
        if not allow_random_init:
            raise ValueError(
                "MODEL.ACAMKD.TEACHER.WEIGHTS is empty: distilling from a randomly initialised "
                "teacher is almost never intended. Give the teacher's checkpoint (a path, "
                "detectron2:// or https:// URL), or set "
                "MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT True for a smoke test."
            )
        logger.warning("Teacher is randomly initialised (MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT).")
    else:
        load_teacher_weights(teacher, weights)
    return freeze(teacher)


def load_teacher_weights(teacher: nn.Module, weights: str) -> None:
    """
    Load ``weights`` into ``teacher`` alone (fvcore logs any missing or unexpected keys), with an
    error that names the file or URL and says how to pass a local copy when it cannot be read.
    """
    try:
        DetectionCheckpointer(teacher).load(weights)
    except Exception as e:  # iopath raises many types (URLError, OSError, HTTP errors ...)
        hint = (
            "This machine could not download it: fetch the file elsewhere and pass its local "
            "path, e.g. MODEL.ACAMKD.TEACHER.WEIGHTS /path/to/model_final.pkl"
            if "://" in weights
            else "Check the path (MODEL.ACAMKD.TEACHER.WEIGHTS)."
        )
        raise RuntimeError(f"Could not load the teacher weights {weights!r}: {e}. {hint}") from e
