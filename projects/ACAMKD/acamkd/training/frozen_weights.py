"""
Frozen weights of a distiller's level modules (:class:`FrozenWeights`), e.g. MasKD's receptive
tokens, learned in stage 1: they are loaded strictly from their own file when a run starts
(:func:`load_frozen_weights`); the checkpointer records their file's SHA-256 in every checkpoint
and, on resume, takes them from the checkpoint, a file of other content being refused.
"""

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.utils.file_io import PathManager

from .checkpoint_files import WeightsError, _listing, _strip_module, explain_unreadable_weights
from .teacher_weights import _LOADED_ATTR, _describe, _file_source

__all__ = ["FrozenWeights", "FrozenWeightsError", "load_frozen_weights"]

logger = logging.getLogger(__name__)


class FrozenWeightsError(WeightsError, ValueError):
    """Frozen weights of a level module (:class:`FrozenWeights`) that are empty without leave,
    do not fit, or differ from those a checkpoint was trained with."""


@dataclass(frozen=True)
class FrozenWeights:
    """
    Weights of a part of a distiller's level module that another run learned and that stay
    frozen here, e.g. MasKD's receptive tokens from its stage 1. A level module declares them
    as its ``frozen_weights`` attribute;
    :class:`~acamkd.training.checkpointer.DistillationCheckpointer` loads them strictly from
    ``path`` when a run starts (:func:`load_frozen_weights`), records the file's SHA-256 in
    every checkpoint and, on resume, takes them from the checkpoint and refuses a file of other
    content.

    Attributes:
        path (str): a local path or URL of a checkpoint whose ``"model"`` entry holds them;
            "" for none.
        key (str): the setting that gives ``path``, e.g. "MODEL.ACAMKD.MASKD.TOKENS".
        submodule (str): the level module's submodule loaded, e.g. "tokens".
        file_prefix (str): the prefix of its keys in the file, where "{level}" stands for the
            distilled level's name, e.g. "tokens.{level}.".
        what (str): what they are, for the messages, e.g. "MasKD's receptive tokens".
        allow_empty (bool): accept an empty ``path`` (they keep their random init; tests and
            smoke runs only).
        allow_key (str): the setting that allows it, for the messages.
        hint (str): how to make the file, said when it is empty or does not fit.
    """

    path: str = ""
    key: str = ""
    submodule: str = ""
    file_prefix: str = ""
    what: str = "the frozen weights"
    allow_empty: bool = False
    allow_key: str = "MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT True"
    hint: str = ""


def _frozen_groups(model: nn.Module) -> Dict[str, List[Tuple[str, nn.Module, FrozenWeights]]]:
    """The level modules (``model.acam``) that declare :class:`FrozenWeights`, by setting:
    setting -> [(level, module, weights)]."""
    levels = getattr(model, "acam", None)
    groups: Dict[str, List[Tuple[str, nn.Module, FrozenWeights]]] = {}
    if not isinstance(levels, nn.ModuleDict):
        return groups
    for level, module in levels.items():
        weights = getattr(module, "frozen_weights", None)
        if isinstance(weights, FrozenWeights):
            groups.setdefault(weights.key, []).append((level, module, weights))
    return groups


def _frozen_sources_to_save(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """setting -> where the frozen weights now in the model came from (or, not loaded yet,
    will come from), as :func:`~acamkd.training.teacher_weights.teacher_source` describes a
    file."""
    out = {}
    for setting, parts in _frozen_groups(model).items():
        weights = parts[0][2]
        loaded = getattr(parts[0][1], _LOADED_ATTR, None)
        out[setting] = dict(loaded) if loaded else _file_source(weights.path, setting, weights.what)
    return out


def _is_frozen_key(model: nn.Module, settings: Sequence[str], key: str) -> bool:
    """Whether ``key`` of the model's state is a tensor of the frozen weights of ``settings``."""
    groups = _frozen_groups(model)
    for setting in settings:
        for level, _, weights in groups.get(setting, []):
            if _strip_module(key).startswith(f"acam.{level}.{weights.submodule}."):
                return True
    return False


def _read_model_state(weights: FrozenWeights) -> Dict[str, Any]:
    """The ``"model"`` entry of the checkpoint ``weights.path`` (a plain state dict is taken
    as it is), without a DistributedDataParallel ``module.`` prefix."""
    with explain_unreadable_weights(weights.path, weights.key, what=weights.what):
        with PathManager.open(weights.path, "rb") as f:
            data = torch.load(f, map_location="cpu")
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise FrozenWeightsError(
            f"{weights.path!r} ({weights.key}) holds no model state, so it cannot give "
            f"{weights.what}. {weights.hint}"
        )
    return {_strip_module(k): v for k, v in state.items()}


def load_frozen_weights(model: nn.Module, settings: Optional[Sequence[str]] = None) -> None:
    """
    Load the :class:`FrozenWeights` every level module of a distiller declares from their
    files, strictly: each tensor of the submodule must be in the file (under the level's
    ``file_prefix``) with its shape, else a :class:`FrozenWeightsError` names the file, the
    setting and the missing and mis-shaped keys, and says how to make the file. An empty path
    is refused unless the weights allow it (then they keep their random init). Where they came
    from is remembered for the checkpoints. A model without such modules is left as it is.

    Args:
        model (nn.Module): the distiller.
        settings (list[str]): only the weights of these settings; default all.
    """
    for setting, parts in _frozen_groups(model).items():
        if settings is not None and setting not in settings:
            continue
        weights = parts[0][2]
        if not weights.path:
            if not weights.allow_empty:
                raise FrozenWeightsError(
                    f"{setting} is empty: {weights.what} are needed. " f"{weights.hint}"
                )
            logger.warning(
                "%s is empty: %s keep their random init (%s).",
                setting,
                weights.what,
                weights.allow_key,
            )
        else:
            _load_frozen_parts(parts, _read_model_state(weights), weights)
        source = _file_source(weights.path, setting, weights.what)
        for _, module, _ in parts:
            setattr(module, _LOADED_ATTR, dict(source))


def _load_frozen_parts(
    parts: List[Tuple[str, nn.Module, FrozenWeights]], state: Dict[str, Any], weights: FrozenWeights
) -> None:
    missing, shapes, loads, used = [], [], [], set()
    for level, module, part in parts:
        target = module.get_submodule(part.submodule)
        prefix = part.file_prefix.format(level=level)
        mapped = {}
        for name, tensor in target.state_dict().items():
            key = prefix + name
            if key not in state:
                missing.append(key)
            elif tuple(state[key].shape) != tuple(tensor.shape):
                shapes.append(
                    f"{key} {tuple(state[key].shape)} in the file, {tuple(tensor.shape)} here"
                )
            else:
                mapped[name] = state[key]
                used.add(key)
        loads.append((target, mapped))
    source = f"{weights.path!r} ({weights.key})"
    if missing or shapes:
        lines = [
            f"The file {source} does not fit {weights.what} of this model: {len(missing)} of "
            f"their tensors are missing from it and {len(shapes)} have another shape there."
        ]
        if missing:
            lines.append(f"Missing ({len(missing)}): {_listing(missing)}.")
        if shapes:
            lines.append(f"Another shape ({len(shapes)}): {_listing(shapes)}.")
        lines.append(weights.hint)
        raise FrozenWeightsError("\n".join(line for line in lines if line))
    for target, mapped in loads:
        target.load_state_dict(mapped, strict=True)
    root = weights.file_prefix.split("{level}")[0]
    unused = sorted(k for k in state if k.startswith(root) and k not in used) if root else []
    if unused:
        logger.info(
            "%d tensors of %s under %r are not distilled here and are ignored: %s",
            len(unused),
            source,
            root,
            _listing(unused),
        )
    logger.info("Loaded %s from %s.", weights.what, source)


def _describe_frozen(source: Dict[str, Any]) -> str:
    if source.get("random_init"):
        return f"no file (randomly initialised, {source.get('setting')} empty)"
    return _describe(source)
