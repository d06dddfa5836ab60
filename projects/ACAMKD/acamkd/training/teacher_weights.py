"""
The teacher's weights: where a distiller's teacher gets them (:class:`TeacherWeights`), their
strict loading (:func:`load_teacher_weights`), and what a checkpoint records instead of the
teacher's tensors (:func:`teacher_source`: the file's path, setting and SHA-256, hashed once per
process).
"""

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import _IncompatibleKeys

from .checkpoint_files import WeightsError, _listing, explain_unreadable_weights

__all__ = [
    "TeacherWeights",
    "TeacherWeightsError",
    "load_teacher_weights",
    "teacher_source",
    "weights_sha256",
]

logger = logging.getLogger(__name__)


class TeacherWeightsError(WeightsError, ValueError):
    """Teacher weights that are empty without leave, or do not fit the teacher."""


@dataclass(frozen=True)
class TeacherWeights:
    """
    Where a distiller's teacher gets its weights and how strictly they are checked. The
    teacher's builders (``build_frozen_teacher``, ``build_lazy_teacher``) attach one to the
    teacher; :class:`~acamkd.training.checkpointer.DistillationCheckpointer` loads it with
    :func:`load_teacher_weights`.

    Attributes:
        path (str): a local path, a ``detectron2://`` or an ``https://`` URL; "" for none.
        allow_random_init (bool): accept an empty ``path`` (tests and smoke runs only).
        strict (bool): refuse a file in which a tensor that distillation uses is missing or
            has another shape (otherwise it is only logged).
        key, allow_key, strict_key (str): the settings of the three, as the messages name them.
    """

    path: str = ""
    allow_random_init: bool = False
    strict: bool = True
    key: str = "MODEL.ACAMKD.TEACHER.WEIGHTS"
    allow_key: str = "MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT True"
    strict_key: str = "MODEL.ACAMKD.TEACHER.STRICT False"


class _TeacherCheckpointer(DetectionCheckpointer):
    """detectron2's loader (URLs, model-zoo ``.pkl`` name conversion) that keeps the
    incompatible keys for :func:`load_teacher_weights` instead of logging them."""

    incompatible = None

    def _load_model(self, checkpoint) -> _IncompatibleKeys:
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    def _log_incompatible_keys(self, incompatible: _IncompatibleKeys) -> None:
        pass


def load_teacher_weights(
    teacher: nn.Module, weights: TeacherWeights, used: Sequence[str] = ("",)
) -> None:
    """
    Load ``weights`` into ``teacher`` with detectron2's checkpoint loader (``detectron2://`` and
    ``https://`` URLs, model-zoo ``.pkl`` files with their name conversion) and check it: every
    tensor of the submodules in ``used`` must load with its shape, and the file must have no
    tensor in a named submodule that the teacher lacks (a deeper backbone). Otherwise a
    ``TeacherWeightsError`` names the setting and the file and lists those keys (the first ten
    and the counts), unless ``weights.strict`` is False, which only logs them. Tensors outside
    ``used`` that did not load, and other keys of the file that the teacher lacks (e.g. a mask
    head), are logged.

    Args:
        teacher (nn.Module): the teacher model.
        weights (TeacherWeights): the file and the settings.
        used (list[str]): names of the teacher's submodules whose tensors distillation reads,
            e.g. ``["backbone"]``; "" stands for the whole teacher.

    Raises:
        TeacherWeightsError: empty ``path`` without ``allow_random_init``; a file that does not
            fit (strict).
        WeightsError: a file that cannot be read (the message says how to pass a local copy).
    """
    if not weights.path:
        if not weights.allow_random_init:
            raise TeacherWeightsError(
                f"{weights.key} is empty: distilling from a randomly initialised teacher is almost "
                "never intended. Give the teacher's checkpoint (a path, detectron2:// or https:// "
                f"URL), or set {weights.allow_key} for a smoke test."
            )
        logger.warning("Teacher is randomly initialised (%s).", weights.allow_key)
        return
    checkpointer = _TeacherCheckpointer(teacher)
    with explain_unreadable_weights(weights.path, weights.key, what="the teacher weights"):
        checkpointer.load(weights.path, checkpointables=[])
    _check_teacher_keys(teacher, weights, checkpointer.incompatible, used)


# The teacher's attribute that records where the weights now in it came from: a
# teacher_source() record, or {"embedded": checkpoint} for a checkpoint that held them.
_LOADED_ATTR = "acamkd_loaded_from"


# SHA-256 of files already hashed in this process, by (real path, inode, size, mtime): a teacher
# checkpoint of hundreds of MB is read once per run, not at every periodic save.
_SHA256_CACHE: Dict[Tuple[str, int, int, int], str] = {}


def _sha256(local_path: str) -> str:
    st = os.stat(local_path)
    key = (os.path.realpath(local_path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(local_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


def weights_sha256(path: str) -> str:
    """SHA-256 of the weights file ``path`` (a URL: of its local copy), computed once per
    process."""
    return _sha256(PathManager.get_local_path(path))


def teacher_source(weights: TeacherWeights) -> Dict[str, Any]:
    """
    What a distiller checkpoint records instead of the teacher's tensors: ``{"path",
    "setting", "sha256"}``, the file as the setting gives it (a URL stays a URL; its local
    copy is hashed), or ``{"path": "", "setting", "random_init": True}`` for a teacher with
    no file (whose tensors the checkpoint then holds: nothing could reload them). The hash of
    a file is computed once per process (cached by path, inode, size and modification time).

    Raises:
        WeightsError: the file cannot be read or downloaded.
    """
    return _file_source(weights.path, weights.key, "the teacher weights")


def _file_source(path: str, setting: str, what: str) -> Dict[str, Any]:
    """:func:`teacher_source` of the file ``path`` given by ``setting`` ("" for none)."""
    if not path:
        return {"path": "", "setting": setting, "random_init": True}
    with explain_unreadable_weights(path, setting, what=what):
        digest = weights_sha256(path)
    return {"path": path, "setting": setting, "sha256": digest}


def _same_teacher(recorded: Dict[str, Any], current: Dict[str, Any]) -> bool:
    if recorded.get("random_init") or current.get("random_init"):
        return bool(recorded.get("random_init")) and bool(current.get("random_init"))
    return bool(recorded.get("sha256")) and recorded.get("sha256") == current.get("sha256")


def _describe(source: Dict[str, Any]) -> str:
    if source.get("random_init"):
        return f"a randomly initialised teacher ({source.get('setting')} empty)"
    return f"{source.get('path')!r} ({source.get('setting')}, sha256 {source.get('sha256')})"


def _load_teacher_from(
    model: nn.Module, weights: TeacherWeights, source: Optional[Dict[str, Any]] = None
) -> None:
    """Load a distiller's teacher with :func:`load_teacher_weights` and remember its source."""
    load_teacher_weights(model.teacher, weights, model.teacher_parts_used)
    setattr(model.teacher, _LOADED_ATTR, source if source is not None else teacher_source(weights))


def _check_teacher_keys(
    teacher: nn.Module, weights: TeacherWeights, incompatible, used: Sequence[str]
) -> None:
    """Refuse (or, not strict, log) what :func:`load_teacher_weights` describes; log the rest."""

    def under(key: str, parts) -> bool:
        return any(not part or key == part or key.startswith(part + ".") for part in parts)

    named = [part for part in used if part]  # "" (the whole teacher) excluded
    # The tensors that did not load because the file has them in another shape (fvcore also
    # reports them as missing). BatchNorm's num_batches_tracked is never read in eval mode,
    # and checkpoints converted from other libraries lack it.
    shapes = {k: (tuple(c), tuple(m)) for k, c, m in incompatible.incorrect_shapes}
    missing = [
        k
        for k in incompatible.missing_keys
        if k not in shapes and not k.endswith("num_batches_tracked")
    ]
    bad_missing = [k for k in missing if under(k, used)]
    bad_shapes = [
        f"{k} {shape[0]} in the file, {shape[1]} in the teacher"
        for k, shape in shapes.items()
        if under(k, used)
    ]
    # A key of the file inside a submodule distillation uses, which the teacher lacks: the
    # file's network is another one there (e.g. a deeper backbone); elsewhere (a mask head) it
    # is only logged.
    bad_extra = [k for k in incompatible.unexpected_keys if under(k, named)]
    extra = [k for k in incompatible.unexpected_keys if not under(k, named)]
    unused = [k for k in missing + list(shapes) if not under(k, used)]
    source = f"{weights.path!r} ({weights.key})"
    if extra:
        logger.info(
            "The teacher checkpoint %s has %d tensors the teacher does not have; they are "
            "ignored: %s",
            source,
            len(extra),
            _listing(extra),
        )
    if unused:
        logger.warning(
            "%d tensors of the teacher that distillation does not use were not loaded from %s "
            "(missing or of another shape there); they keep their random init: %s",
            len(unused),
            source,
            _listing(unused),
        )
    if not bad_missing and not bad_shapes and not bad_extra:
        logger.info("Loaded the teacher from %s.", source)
        return
    what = "the whole teacher" if "" in used else "the teacher's " + ", ".join(named)
    lines = [
        f"The teacher checkpoint {source} does not fit the teacher built from its config. "
        f"Distillation uses {what}: {len(bad_missing)} of its tensors are missing from the "
        f"file, {len(bad_shapes)} have another shape there, and the file has {len(bad_extra)} "
        f"tensors of the teacher's {', '.join(named)} that the teacher lacks."
    ]
    if bad_missing:
        lines.append(f"Missing ({len(bad_missing)}): {_listing(bad_missing)}.")
    if bad_shapes:
        lines.append(f"Another shape ({len(bad_shapes)}): {_listing(bad_shapes)}.")
    if bad_extra:
        lines.append(f"Only in the file ({len(bad_extra)}): {_listing(bad_extra)}.")
    if extra and bad_missing:
        lines.append(
            f"The file has {len(extra)} other tensors the teacher lacks (a renamed prefix?): "
            f"{_listing(extra)}."
        )
    if weights.strict:
        lines.append(
            "Give the checkpoint of the teacher's own config (same depth, widths and classes), "
            f"or set {weights.strict_key} to distil from it anyway (what did not load stays "
            "random)."
        )
        raise TeacherWeightsError("\n".join(lines))
    lines.append(f"{weights.strict_key} is set: distilling anyway, those tensors stay random.")
    logger.warning("\n".join(lines))
