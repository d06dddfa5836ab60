"""The frozen teacher: its own config, its own weights, never trained.

In a YAML config the teacher is described by ``MODEL.ACAMKD.TEACHER.{CONFIG_FILE, OPTS,
WEIGHTS, STRICT}``; in a LazyConfig by ``L(build_lazy_teacher)(config=..., weights=...)``.
Building it reads no weights: the builders attach a
:class:`~acamkd.training.teacher_weights.TeacherWeights` and
:class:`~acamkd.training.checkpointer.DistillationCheckpointer` loads it when a run starts,
separately from the student because detectron2's checkpoint loader matches keys by suffix and
fails when one key matches both ``teacher.*`` and ``student.*``.
"""

import difflib
import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from torch import nn

from detectron2 import model_zoo
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.modeling import build_model

from ..config import REPO_ROOT, get_acamkd_cfg
from ..training.teacher_weights import TeacherWeights

__all__ = [
    "resolve_config_file",
    "build_teacher_cfg",
    "build_frozen_teacher",
    "build_lazy_teacher",
    "freeze",
    "teacher_cfg_from_file",
    "teacher_weights_from_cfg",
]

logger = logging.getLogger(__name__)

_DISTILLER_AS_TEACHER = (
    "The teacher config {!r} describes a distiller; give the config of the teacher detector "
    "itself (e.g. the one it was trained with)."
)


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
    for candidate in (Path(name_or_path), Path(REPO_ROOT) / name_or_path):
        if candidate.is_file():
            return str(candidate)
    try:
        return model_zoo.get_config_file(name_or_path)
    except RuntimeError:
        raise FileNotFoundError(
            f"Config {name_or_path!r} ({key}) is neither a file (looked in {os.getcwd()} and "
            f"{REPO_ROOT}) nor a detectron2 model-zoo config name such as "
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


def teacher_weights_from_cfg(cfg: CfgNode) -> TeacherWeights:
    """The teacher's weights as ``MODEL.ACAMKD.TEACHER.{WEIGHTS, ALLOW_RANDOM_INIT, STRICT}``
    of a distillation config give them."""
    teacher = cfg.MODEL.ACAMKD.TEACHER
    return TeacherWeights(
        path=teacher.WEIGHTS, allow_random_init=teacher.ALLOW_RANDOM_INIT, strict=teacher.STRICT
    )


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients and put ``module`` in eval mode (BatchNorm statistics included)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _with_weights(teacher: nn.Module, weights: TeacherWeights) -> nn.Module:
    # Read by ACAMDistiller.teacher_weights, for the checkpointer.
    teacher.acamkd_weights = weights
    return freeze(teacher)


def build_frozen_teacher(tcfg: CfgNode, weights: Optional[TeacherWeights] = None) -> nn.Module:
    """
    Build the teacher from its config, frozen, without reading any file: its weights are
    loaded by :class:`~acamkd.training.checkpointer.DistillationCheckpointer` when a run starts.

    Args:
        tcfg (CfgNode): the teacher's config, see :func:`build_teacher_cfg`.
        weights (TeacherWeights): where the checkpointer loads it from; default
            ``tcfg.MODEL.WEIGHTS``, strictly checked, never empty.

    Returns:
        nn.Module: the teacher in eval mode, without gradients, randomly initialised.
    """
    weights = weights if weights is not None else TeacherWeights(path=tcfg.MODEL.WEIGHTS)
    return _with_weights(build_model(tcfg), weights)


def build_lazy_teacher(
    config: str,
    weights: str = "",
    allow_random_init: bool = False,
    overrides: Sequence[str] = (),
    strict: bool = True,
) -> nn.Module:
    """
    The frozen teacher of a LazyConfig, ``L(build_lazy_teacher)(config=..., weights=...)``:
    built from its own config, a YAML or a LazyConfig ``.py``, and frozen. It is built on the
    CPU; the training script moves the whole distiller to ``train.device``. ``weights`` is not
    read here: :class:`~acamkd.training.checkpointer.DistillationCheckpointer` loads it when a
    run starts without a distiller checkpoint.

    Args:
        config (str): the teacher's config: a path or a detectron2 model-zoo name such as
            "COCO-Detection/retinanet_R_101_FPN_3x.yaml" or "COCO-Detection/fcos_R_50_FPN_1x.py".
        weights (str): its checkpoint: a local path, a detectron2:// or an https:// URL. The
            config's own MODEL.WEIGHTS / train.init_checkpoint are ignored.
        allow_random_init (bool): accept empty ``weights`` (tests and smoke runs only).
        overrides (list[str]): applied to the teacher's config in its own syntax: a flat
            KEY VALUE list for a YAML ("MODEL.RESNETS.DEPTH", "50"), "key=value" strings for a
            ``.py`` ("model.backbone.bottom_up.stages.depth=50").
        strict (bool): every tensor distillation uses must load from ``weights`` with its
            shape (see :func:`~acamkd.training.teacher_weights.load_teacher_weights`); False
            only logs them.

    Returns:
        nn.Module: the teacher in eval mode, without gradients, randomly initialised.
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
    weights = TeacherWeights(
        path=weights,
        allow_random_init=allow_random_init,
        strict=strict,
        key="model.teacher.weights",
        allow_key="model.teacher.allow_random_init=True",
        strict_key="model.teacher.strict=False",
    )
    return _with_weights(teacher, weights)
