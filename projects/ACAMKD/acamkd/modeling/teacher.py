"""The frozen teacher: its own config, its own weights, never trained.

In a YAML config the teacher is described by ``MODEL.ACAMKD.TEACHER.{CONFIG_FILE, OPTS,
WEIGHTS}``; in a LazyConfig by ``L(build_lazy_teacher)(config=..., weights=...)``. Either way
it is loaded separately from the student because detectron2's checkpoint loader matches keys by
suffix and fails when one key matches both ``teacher.*`` and ``student.*``.
"""

import difflib
import logging
import os
from pathlib import Path
from typing import List, Sequence

from omegaconf import DictConfig, OmegaConf
from torch import nn

from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.projects.deeplab import add_deeplab_config

from ..checkpoint import explain_unreadable_weights
from ..config import add_acamkd_config
from .meta_arch.reppoints import add_reppoints_config

__all__ = [
    "get_acamkd_cfg",
    "resolve_config_file",
    "build_teacher_cfg",
    "build_frozen_teacher",
    "build_lazy_teacher",
    "freeze",
    "load_teacher_weights",
    "teacher_cfg_from_file",
]

logger = logging.getLogger(__name__)

# The repository root when the package is installed in editable mode (projects/ACAMKD/acamkd).
_REPO_ROOT = Path(__file__).resolve().parents[4]

_DISTILLER_AS_TEACHER = (
    "The teacher config {!r} describes a distiller; give the config of the teacher detector "
    "itself (e.g. the one it was trained with)."
)


def get_acamkd_cfg() -> CfgNode:
    """detectron2's default config with the DeepLab, RepPoints and ``MODEL.ACAMKD`` keys."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_reppoints_config(cfg)
    add_acamkd_config(cfg)
    return cfg


def resolve_config_file(name_or_path: str, key: str = "MODEL.ACAMKD.TEACHER.CONFIG_FILE") -> str:
    """
    Find a config (YAML or LazyConfig ``.py``) given as a path (absolute, relative to the
    working directory or to this repository) or as a detectron2 model-zoo name such as
    ``"COCO-Detection/retinanet_R_101_FPN_3x.yaml"`` or ``"COCO-Detection/fcos_R_50_FPN_1x.py"``.

    Args:
        name_or_path (str): the path or model-zoo name.
        key (str): where the user gave it, for the error messages.

    Returns:
        str: an existing file path.
    """
    if not name_or_path:
        raise ValueError(
            f"{key} is empty: set it to the teacher's config file or a detectron2 model-zoo "
            "name, e.g. 'COCO-Detection/retinanet_R_101_FPN_3x.yaml'."
        )
    for candidate in (Path(name_or_path), _REPO_ROOT / name_or_path):
        if candidate.is_file():
            return str(candidate)
    try:
        return model_zoo.get_config_file(name_or_path)
    except RuntimeError:
        raise FileNotFoundError(
            f"Config {name_or_path!r} ({key}) is neither a file (looked in {os.getcwd()} and "
            f"{_REPO_ROOT}) nor a detectron2 model-zoo config name such as "
            "'COCO-Detection/retinanet_R_101_FPN_3x.yaml' or 'COCO-Detection/fcos_R_50_FPN_1x.py'."
        ) from None


def teacher_cfg_from_file(
    config_file: str,
    opts: Sequence[str] = (),
    *,
    device: str = "cpu",
    weights: str = "",
    key: str = "MODEL.ACAMKD.TEACHER.CONFIG_FILE",
    opts_key: str = "MODEL.ACAMKD.TEACHER.OPTS",
) -> CfgNode:
    """
    A teacher's YAML config: the file (a path or a model-zoo name), then ``opts``.

    Args:
        config_file (str): see :func:`resolve_config_file`.
        opts (list[str]): overrides as a flat KEY VALUE list.
        device (str): its MODEL.DEVICE.
        weights (str): its MODEL.WEIGHTS.
        key (str): where the user gave ``config_file``, for the error messages.
        opts_key (str): where the user gave ``opts``, for the error messages.

    Returns:
        CfgNode: the frozen config.
    """
    tcfg = get_acamkd_cfg()
    tcfg.merge_from_file(resolve_config_file(config_file, key))
    _check_yaml_overrides(tcfg, list(opts), config_file, opts_key)
    tcfg.merge_from_list(list(opts))
    tcfg.MODEL.DEVICE = device
    tcfg.MODEL.WEIGHTS = weights
    if tcfg.MODEL.META_ARCHITECTURE == "ACAMDistiller":
        raise ValueError(_DISTILLER_AS_TEACHER.format(config_file))
    tcfg.freeze()
    return tcfg


def _flat_keys(cfg, prefix: str = "") -> List[str]:
    keys = []
    for k, v in cfg.items():
        keys += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, (dict, DictConfig)) else []
        keys.append(f"{prefix}{k}")
    return keys


def _unknown_key_error(key: str, cfg, config: str, opts_key: str) -> KeyError:
    close = difflib.get_close_matches(key, _flat_keys(cfg), n=3, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return KeyError(
        f"{opts_key} sets {key}, which the teacher's config {config!r} does not have.{hint} "
        "Check its spelling, or set it in the teacher's config file."
    )


def _check_yaml_overrides(tcfg: CfgNode, opts: List[str], config: str, opts_key: str) -> None:
    """KEY VALUE pairs whose keys the teacher's YAML config has (yacs's own errors say neither
    which setting nor which config)."""
    if len(opts) % 2:
        raise ValueError(
            f"{opts_key} has {len(opts)} items {opts}: it takes KEY VALUE pairs, e.g. "
            "['MODEL.RESNETS.DEPTH', '101']."
        )
    for key in opts[::2]:
        node = tcfg
        for part in str(key).split("."):
            if not isinstance(node, CfgNode) or part not in node:
                raise _unknown_key_error(str(key), tcfg, config, opts_key)
            node = node[part]


_MISSING = object()


def _check_lazy_overrides(cfg: DictConfig, overrides: List[str], config: str) -> None:
    """``key=value`` strings whose keys the teacher's LazyConfig has (detectron2 would add an
    unknown key, which then fails as an unexpected argument when the teacher is built)."""
    opts_key = "model.teacher.overrides"
    for item in overrides:
        if "=" not in str(item):
            raise ValueError(
                f"{opts_key} item {item!r} is not key=value: a LazyConfig teacher takes "
                "'key=value' strings, e.g. 'model.backbone.bottom_up.stages.depth=101'."
            )
        key = str(item).split("=", 1)[0].strip()
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise _unknown_key_error(key, cfg, config, opts_key)


def build_teacher_cfg(cfg: CfgNode) -> CfgNode:
    """
    The teacher's own config: its file, then ``TEACHER.OPTS``; device and weights from ``cfg``.
    """
    teacher = cfg.MODEL.ACAMKD.TEACHER
    return teacher_cfg_from_file(
        teacher.CONFIG_FILE, teacher.OPTS, device=cfg.MODEL.DEVICE, weights=teacher.WEIGHTS
    )


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
    load_teacher_weights(teacher, tcfg.MODEL.WEIGHTS, allow_random_init=allow_random_init)
    return freeze(teacher)


def build_lazy_teacher(
    config: str,
    weights: str = "",
    allow_random_init: bool = False,
    overrides: Sequence[str] = (),
) -> nn.Module:
    """
    The frozen teacher of a LazyConfig, ``L(build_lazy_teacher)(config=..., weights=...)``:
    built from its own config, a YAML or a LazyConfig ``.py``, then loaded and frozen. It is
    built on the CPU; the training script moves the whole distiller to ``train.device``.

    Args:
        config (str): the teacher's config: a path or a detectron2 model-zoo name such as
            "COCO-Detection/retinanet_R_101_FPN_3x.yaml" or "COCO-Detection/fcos_R_50_FPN_1x.py".
        weights (str): its checkpoint: a local path, a detectron2:// or an https:// URL. The
            config's own MODEL.WEIGHTS / train.init_checkpoint are ignored.
        allow_random_init (bool): accept empty ``weights`` (tests and smoke runs only).
        overrides (list[str]): applied to the teacher's config in its own syntax: a flat
            KEY VALUE list for a YAML ("MODEL.RESNETS.DEPTH", "50"), "key=value" strings for a
            ``.py`` ("model.backbone.bottom_up.stages.depth=50").

    Returns:
        nn.Module: the teacher in eval mode, without gradients.
    """
    path = resolve_config_file(config, key="model.teacher.config")
    if path.endswith(".py"):
        cfg = LazyConfig.load(path)
        _check_lazy_overrides(cfg, list(overrides), config)
        cfg = LazyConfig.apply_overrides(cfg, list(overrides))
        if "model" not in cfg:
            raise ValueError(f"The teacher config {config!r} defines no `model`.")
        target = cfg.model.get("_target_", "")
        if getattr(target, "__name__", str(target)).endswith("ACAMDistiller"):
            raise ValueError(_DISTILLER_AS_TEACHER.format(config))
        teacher = instantiate(cfg.model)
    else:
        tcfg = teacher_cfg_from_file(
            path, overrides, key="model.teacher.config", opts_key="model.teacher.overrides"
        )
        teacher = build_model(tcfg)
    load_teacher_weights(
        teacher,
        weights,
        allow_random_init=allow_random_init,
        key="model.teacher.weights",
        allow_key="model.teacher.allow_random_init=True",
    )
    return freeze(teacher)


def load_teacher_weights(
    teacher: nn.Module,
    weights: str,
    *,
    allow_random_init: bool = False,
    key: str = "MODEL.ACAMKD.TEACHER.WEIGHTS",
    allow_key: str = "MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT True",
) -> None:
    """
    Load ``weights`` into ``teacher`` alone (fvcore logs any missing or unexpected keys), with an
    error that names the file or URL and says how to pass a local copy when it cannot be read.

    Args:
        teacher (nn.Module): the teacher model.
        weights (str): a local path, a detectron2:// or https:// URL; "" keeps the random init
            if ``allow_random_init``, else is an error.
        allow_random_init (bool): accept empty ``weights``.
        key, allow_key (str): the settings of ``weights`` and ``allow_random_init``, for the
            messages.
    """
    if not weights:
        if not allow_random_init:
            raise ValueError(
                f"{key} is empty: distilling from a randomly initialised teacher is almost never "
                "intended. Give the teacher's checkpoint (a path, detectron2:// or https:// URL), "
                f"or set {allow_key} for a smoke test."
            )
        logger.warning("Teacher is randomly initialised (%s).", allow_key)
        return
    with explain_unreadable_weights(weights, key, what="the teacher weights"):
        DetectionCheckpointer(teacher).load(weights)
