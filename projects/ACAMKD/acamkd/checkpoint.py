"""
Checkpoints that keep teacher and student apart, survive a crash, and errors that say what to do.

A checkpoint (and ``last_checkpoint``) is written to a temporary file in the same folder and
renamed into place once complete, so a process killed while saving never leaves a truncated
``model_*.pth``; resuming skips, with a warning, any checkpoint that cannot be read anyway
(e.g. cut short by a full disk or written by an older version) and uses the newest readable one.

A distiller's checkpoint leaves the frozen teacher out: it records where the teacher's weights
came from and their SHA-256 (:func:`teacher_source`), and loading it reloads the teacher from
its setting, refusing a file whose content differs from the recorded one. (A randomly
initialised teacher, for tests and smoke runs, has no file to be reloaded from: it is saved.)

A model whose teacher has known weights but which has no student (MasKD's stage-1
``MasKDTokenLearner``) is treated the same way for its teacher. A distiller's level module may
declare :class:`FrozenWeights` (MasKD's receptive tokens, learned in stage 1): they are loaded
strictly from their own file when a run starts, their file's SHA-256 is recorded in every
checkpoint (:data:`FROZEN_SOURCES_KEY`), and on resume they come from the checkpoint, a file of
other content being refused.
"""

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import Detectron2Handler, PathManager
from fvcore.common.checkpoint import Checkpointer, _IncompatibleKeys

__all__ = [
    "DistillationCheckpointer",
    "FrozenWeights",
    "FrozenWeightsError",
    "TeacherWeights",
    "TeacherWeightsError",
    "WeightsError",
    "explain_unreadable_weights",
    "is_distiller_state",
    "is_readable_checkpoint",
    "load_checkpoint",
    "load_frozen_weights",
    "load_teacher_weights",
    "teacher_source",
]

logger = logging.getLogger(__name__)

# Suffix of the file a checkpoint is written to before it is renamed into place. It does not
# end in ".pth", so a partial file is never taken for a checkpoint.
_PARTIAL_SUFFIX = ".partial"

# The entry of a distiller checkpoint that records where the teacher's weights came from (see
# teacher_source); the checkpoint holds no teacher.* tensors then.
TEACHER_SOURCE_KEY = "teacher_source"
# The entry of a distiller checkpoint that records, per setting, where the frozen weights of its
# level modules came from (see FrozenWeights); the tensors themselves are in the checkpoint.
FROZEN_SOURCES_KEY = "frozen_sources"


def is_readable_checkpoint(path: str) -> bool:
    """
    Whether ``path`` is a checkpoint ``torch.load`` reads completely, as resuming loads it
    (on the CPU). False for a missing, empty, truncated or otherwise corrupt file.

    Args:
        path (str): a local file, e.g. ``output/model_final.pth``.

    Returns:
        bool: True if it loads.
    """
    try:
        torch.load(path, map_location="cpu")
    except Exception:  # truncated zip, unpickling errors, missing file, ...
        return False
    return True


def is_distiller_state(state_dict: dict) -> bool:
    """True for a state dict saved from :class:`ACAMDistiller` (keys under ``student.``)."""
    return any(k.startswith("student.") for k in state_dict)


class DistillationCheckpointer(DetectionCheckpointer):
    """
    A :class:`DetectionCheckpointer` that knows the distiller's layout:

    - this project's own checkpoints (student and ACAM modules; the teacher only as where its
      weights came from and their SHA-256, see :func:`teacher_source`) restore everything, by
      exact names: the teacher is reloaded from its setting (``MODEL.ACAMKD.TEACHER.WEIGHTS``,
      ``model.teacher.weights``), and a file whose content differs from the recorded one is
      refused with a :class:`TeacherWeightsError` that names both. Checkpoints that hold the
      teacher's tensors (written before teacher-less checkpoints, or of a randomly initialised
      teacher, which has no file) load them as they are;
    - any other checkpoint (``MODEL.WEIGHTS``: ImageNet backbones, plain detectron2 models,
      exported students) initialises the student alone. detectron2's suffix-matching loader
      would otherwise match one key against both ``teacher.*`` and ``student.*`` and fail.

    - the teacher's own weights are loaded here, not when the model is built: a run that starts
      from ``MODEL.WEIGHTS`` (or from nothing) loads them, with the strict check of
      :func:`load_teacher_weights`, then applies the inheritance strategy if the distiller has
      it; a teacher-less distiller checkpoint reloads them without the inheritance.

    For a model that is not a distiller it behaves exactly as :class:`DetectionCheckpointer`.

    Args:
        restore_teacher (bool): reload the teacher of a teacher-less distiller checkpoint (and
            check its file). False where the model only runs its student's inference
            (``--eval-only``, model comparisons): the teacher's file is then neither read nor
            checked, and the teacher keeps its random init.
        model, save_dir, save_to_disk, checkpointables: as for :class:`DetectionCheckpointer`.

    Saving is atomic for a local ``save_dir``: the checkpoint and ``last_checkpoint`` are
    written to ``<name>.partial`` and renamed into place when complete. Resuming uses the
    checkpoint named by ``last_checkpoint`` or, if it cannot be read, the newest readable
    ``.pth`` of ``save_dir``, and says so in a warning.
    """

    _loading = ""  # the checkpoint load() is reading, for the messages of _load_model

    def __init__(self, model, save_dir: str = "", *, restore_teacher: bool = True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.restore_teacher = restore_teacher

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        source = self._teacher_source_to_save()
        if source is not None:
            data[TEACHER_SOURCE_KEY] = source
            if not source.get("random_init"):  # the teacher is reloaded from its file
                data["model"] = {k: v for k, v in data["model"].items() if not _is_teacher_key(k)}
        frozen = _frozen_sources_to_save(self.model)
        if frozen:
            data[FROZEN_SOURCES_KEY] = frozen
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        assert os.path.basename(save_file) == basename, basename
        self.logger.info(f"Saving checkpoint to {save_file}")
        if os.path.isdir(self.save_dir):
            _write_atomically(save_file, lambda f: torch.save(data, f), "wb")
        else:  # not a local folder: written in place, as fvcore does
            with self.path_manager.open(save_file, "wb") as f:
                torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def _distiller(self) -> Optional[nn.Module]:
        """The model if it is a distiller (a student and a teacher) or a teacher-only model whose
        teacher has known weights (MasKD's token learner: no student, a ``teacher_weights``),
        else None."""
        model = self.model
        if getattr(model, "teacher", None) is None:
            return None
        if getattr(model, "student", None) is not None:
            return model
        return model if getattr(model, "teacher_weights", None) is not None else None

    def _restores_teacher(self) -> bool:
        """Whether a teacher-less checkpoint's teacher is reloaded: ``restore_teacher``, and
        always for a model without a student, which runs its teacher even in evaluation."""
        return self.restore_teacher or getattr(self.model, "student", None) is None

    def _teacher_source_to_save(self) -> Optional[Dict[str, Any]]:
        """
        What a checkpoint records instead of the teacher's tensors: where the weights in the
        teacher came from (:func:`teacher_source`, remembered when they were loaded, so a file
        is hashed once per run), or, for a teacher not loaded yet, where they will come from.
        None keeps the teacher in the checkpoint: a model that is not a distiller, a teacher
        with no known source, or one restored from a checkpoint that held it (so does a
        record of a randomly initialised teacher).
        """
        distiller = self._distiller()
        if distiller is None:
            return None
        loaded = getattr(distiller.teacher, _LOADED_ATTR, None)
        if loaded is not None:
            return None if loaded.get("embedded") else dict(loaded)
        weights = getattr(distiller, "teacher_weights", None)
        return None if weights is None else teacher_source(weights)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not os.path.isdir(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        _write_atomically(save_file, lambda f: f.write(last_filename_basename), "w")

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """
        fvcore's ``resume_or_load``, except that when resuming, a last checkpoint that cannot
        be read is reported and the newest readable checkpoint of ``save_dir`` is loaded.

        Raises:
            RuntimeError: resuming, but no checkpoint of ``save_dir`` can be read.
        """
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        self._remove_partial_files()
        last = self.get_checkpoint_file()
        skipped = []
        for candidate in self._resume_candidates(last):
            try:
                ret = self.load(candidate)
            except _UnreadableCheckpoint as e:
                self._parsed_url_during_load = None  # DetectionCheckpointer.load left it set
                skipped.append(candidate)
                logger.warning(
                    f"Checkpoint {candidate} cannot be read ({e.reason}); it was probably cut "
                    "short while it was written. Trying the next newest checkpoint."
                )
                continue
            if skipped:
                logger.warning(
                    f"Resumed from {candidate} (iteration {ret.get('iteration', '?')}), the "
                    f"newest readable checkpoint of {self.save_dir}, instead of {last}."
                )
            return ret
        raise RuntimeError(
            f"--resume: no checkpoint in {self.save_dir} can be read (tried "
            f"{', '.join(os.path.basename(c) for c in skipped)}). Delete "
            f"{os.path.join(self.save_dir, 'last_checkpoint')} to start from MODEL.WEIGHTS "
            "(train.init_checkpoint), or train without --resume."
        )

    def _resume_candidates(self, last: str) -> List[str]:
        """The last checkpoint first, then every other ``.pth`` of ``save_dir``, newest first."""
        others = [
            f
            for f in self.get_all_checkpoint_files()
            if os.path.abspath(f) != os.path.abspath(last)
        ]
        others.sort(key=lambda f: (os.path.getmtime(f), f), reverse=True)
        return [last] + others

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        if path and not os.path.isfile(path) and "://" not in path:
            raise _UnreadableCheckpoint(path, "no such file")
        if not path:  # nothing to load: a distiller's teacher still needs its weights
            self.load_teacher()
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = ""

    def load_teacher(self) -> None:
        """
        Load a distiller's teacher from its own weights (see :class:`TeacherWeights`), then, if
        the distiller has the inheritance strategy on, copy the teacher's FPN and heads into the
        student. :meth:`load` calls it whenever what it loads is not a distiller checkpoint; for
        a model that is not a distiller it does nothing.
        """
        model = self._distiller()
        if model is None:
            return
        weights = getattr(model, "teacher_weights", None)
        if weights is None:
            logger.warning(
                "The distiller's teacher was not built by build_frozen_teacher or "
                "build_lazy_teacher, so no weights are known for it: it is left as it was built."
            )
        else:
            _load_teacher_from(model, weights)
        if getattr(model, "inherit_teacher", False):
            from .modeling.inheritance import inherit_from_teacher  # modeling imports this module

            inherit_from_teacher(model.student, model.teacher)
        load_frozen_weights(model)

    def _restore_teacher(self, recorded: Optional[Dict[str, Any]]) -> None:
        """
        Reload the teacher of a checkpoint that left it out, from its setting: the file must
        have the content ``recorded`` (see :func:`teacher_source`), else
        :class:`TeacherWeightsError` names both. The inheritance strategy is not applied: the
        checkpoint holds the student.
        """
        model = self._distiller()
        weights = getattr(model, "teacher_weights", None)
        if weights is None:
            logger.warning(
                f"The checkpoint {self._loading} does not hold the teacher, and the distiller's "
                "teacher was not built by build_frozen_teacher or build_lazy_teacher, so no "
                "weights are known for it: it is left as it was built."
            )
            return
        if not recorded:
            logger.warning(
                f"The checkpoint {self._loading} holds neither the teacher's weights nor where "
                f"they came from: the teacher is loaded from {weights.key} {weights.path!r}."
            )
            _load_teacher_from(model, weights)
            return
        current = teacher_source(weights)
        if not _same_teacher(recorded, current):
            raise TeacherWeightsError(
                f"The checkpoint {self._loading} was distilled from {_describe(recorded)}, "
                f"but {weights.key} now gives {_describe(current)}: another teacher. Set "
                f"{weights.key} to the file the checkpoint names (or one with the same "
                "content), or start a new run in another output folder."
            )
        if recorded.get("path") != current.get("path"):
            logger.info(
                f"The checkpoint {self._loading} was distilled from the teacher "
                f"{recorded.get('path')!r}; {weights.key} now gives {current.get('path')!r}, "
                "with the same content."
            )
        _load_teacher_from(model, weights, current)

    def _teacher_in_checkpoint(self, recorded: Optional[Dict[str, Any]]) -> None:
        """
        A checkpoint that holds the teacher's tensors: they are loaded with the rest. One of a
        randomly initialised teacher (``recorded``) is refused, naming both, where the teacher's
        setting now gives a file; the checkpoints saved from this model keep the teacher too.
        """
        model = self._distiller()
        weights = getattr(model, "teacher_weights", None)
        if recorded and recorded.get("random_init"):
            if self._restores_teacher() and weights is not None and weights.path:
                raise TeacherWeightsError(
                    f"The checkpoint {self._loading} was distilled from {_describe(recorded)}, "
                    f"but {weights.key} now gives {weights.path!r}: another teacher. Empty "
                    f"{weights.key} to go on with the checkpoint's random teacher, or start a "
                    "new run in another output folder."
                )
            logger.info(
                f"The checkpoint {self._loading} holds its randomly initialised teacher, which "
                "is loaded from it."
            )
            setattr(model.teacher, _LOADED_ATTR, dict(recorded))
            return
        logger.info(
            f"The checkpoint {self._loading} holds the teacher's weights (written before "
            "checkpoints left the teacher out): the teacher is loaded from it, not from its "
            "setting, and the checkpoints saved from this model keep it too."
        )
        setattr(model.teacher, _LOADED_ATTR, {"embedded": self._loading})

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            return super()._load_file(filename)
        except Exception as e:
            raise _UnreadableCheckpoint(filename, f"{type(e).__name__}: {e}") from e

    def _remove_partial_files(self) -> None:
        """Remove what a process killed while saving left behind (main process only)."""
        if not self.save_to_disk or not os.path.isdir(self.save_dir):
            return
        for f in sorted(os.listdir(self.save_dir)):
            if f.endswith(_PARTIAL_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.save_dir, f))
                    logger.warning(
                        f"Removed {os.path.join(self.save_dir, f)}, a checkpoint that a killed "
                        "process had not finished writing."
                    )

    def _load_model(self, checkpoint):
        student = getattr(self.model, "student", None)
        if student is not None and not is_distiller_state(checkpoint["model"]):
            self.load_teacher()  # before the student: inheritance must not overwrite its init
            return DetectionCheckpointer(student)._load_model(checkpoint)
        if self._distiller() is None:
            return super()._load_model(checkpoint)
        if student is None:
            self._check_teacher_only_state(checkpoint["model"])
        # Checked before anything is loaded; a checkpoint that does not record them (one of
        # another method) leaves them to be loaded from their own files afterwards.
        unrecorded = self._check_frozen_sources(checkpoint.get(FROZEN_SOURCES_KEY))
        if any(_is_teacher_key(k) for k in checkpoint["model"]):
            self._teacher_in_checkpoint(checkpoint.get(TEACHER_SOURCE_KEY))
            incompatible = super()._load_model(checkpoint)
        else:
            if self._restores_teacher():
                self._restore_teacher(checkpoint.get(TEACHER_SOURCE_KEY))
            else:
                logger.info(
                    f"The checkpoint {self._loading} leaves the teacher out and this model runs "
                    "its student alone: the teacher's weights are not loaded."
                )
            incompatible = super()._load_model(checkpoint)
            # Not in the checkpoint by design: the teacher was reloaded above.
            incompatible.missing_keys[:] = [
                k for k in incompatible.missing_keys if not _is_teacher_key(k)
            ]
        if unrecorded:
            load_frozen_weights(self.model, unrecorded)
            incompatible.missing_keys[:] = [
                k
                for k in incompatible.missing_keys
                if not _is_frozen_key(self.model, unrecorded, k)
            ]
        return incompatible

    def _check_teacher_only_state(self, state: Dict[str, Any]) -> None:
        """
        A model with a teacher and no student (MasKD's token learner) loads only its own
        checkpoints: one that holds none of its other tensors (e.g. the teacher's own file
        given as MODEL.WEIGHTS) would be matched by suffix into its teacher.
        """
        own = {k for k in self.model.state_dict() if not _is_teacher_key(k)}
        if any(_strip_module(k) in own for k in state):
            return
        weights = getattr(self.model, "teacher_weights", None)
        setting = weights.key if weights is not None else "its teacher's setting"
        raise WeightsError(
            f"{self._loading} is not a checkpoint of this {type(self.model).__name__}: it holds "
            f"none of its tensors ({_listing(sorted(own))}). Its teacher is loaded from "
            f"{setting}; MODEL.WEIGHTS (train.init_checkpoint) only takes this model's own "
            "checkpoints (to evaluate them): leave it empty to start a run."
        )

    def _check_frozen_sources(self, recorded: Optional[Dict[str, Any]]) -> List[str]:
        """
        For a checkpoint of a distiller whose level modules declare :class:`FrozenWeights`:
        each setting's file must have the content the checkpoint recorded (the frozen tensors
        come from the checkpoint), else a :class:`FrozenWeightsError` names both. Nothing is
        checked where the model runs its student alone (``restore_teacher`` False).

        Returns:
            list[str]: the settings the checkpoint has no record of (it is not one of this
            method): their weights are loaded from their files after the checkpoint.
        """
        groups = _frozen_groups(self.model)
        if not groups or not self._restores_teacher():
            return []
        recorded = recorded or {}
        unrecorded = []
        for setting, parts in groups.items():
            weights = parts[0][2]
            before = recorded.get(setting)
            if not before:
                logger.warning(
                    f"The checkpoint {self._loading} does not record where {weights.what} came "
                    f"from: they are loaded from {setting} {weights.path!r}."
                )
                unrecorded.append(setting)
                continue
            current = _file_source(weights.path, setting, weights.what)
            if not _same_teacher(before, current):
                raise FrozenWeightsError(
                    f"The checkpoint {self._loading} was trained with {weights.what} from "
                    f"{_describe_frozen(before)}, but {setting} now gives "
                    f"{_describe_frozen(current)}, of other content. Set {setting} to the file "
                    "the checkpoint names (or one with the same content), or start a new run in "
                    "another output folder."
                )
            if before.get("path") != current.get("path"):
                logger.info(
                    f"The checkpoint {self._loading} was trained with {weights.what} from "
                    f"{before.get('path')!r}; {setting} now gives {current.get('path')!r}, with "
                    "the same content."
                )
            for _, module, _ in parts:  # the tensors come from the checkpoint
                setattr(module, _LOADED_ATTR, dict(current))
        return unrecorded


class WeightsError(RuntimeError):
    """
    An error about a weights file whose message already names the file and its setting:
    :func:`explain_unreadable_weights` passes it on unchanged.
    """


class TeacherWeightsError(WeightsError, ValueError):
    """Teacher weights that are empty without leave, or do not fit the teacher."""


@dataclass(frozen=True)
class TeacherWeights:
    """
    Where a distiller's teacher gets its weights and how strictly they are checked. The
    teacher's builders (``build_frozen_teacher``, ``build_lazy_teacher``) attach one to the
    teacher; :class:`DistillationCheckpointer` loads it with :func:`load_teacher_weights`.

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


class FrozenWeightsError(WeightsError, ValueError):
    """Frozen weights of a level module (:class:`FrozenWeights`) that are empty without leave,
    do not fit, or differ from those a checkpoint was trained with."""


@dataclass(frozen=True)
class FrozenWeights:
    """
    Weights of a part of a distiller's level module that another run learned and that stay
    frozen here, e.g. MasKD's receptive tokens from its stage 1. A level module declares them
    as its ``frozen_weights`` attribute; :class:`DistillationCheckpointer` loads them strictly
    from ``path`` when a run starts (:func:`load_frozen_weights`), records the file's SHA-256
    in every checkpoint and, on resume, takes them from the checkpoint and refuses a file of
    other content.

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
    will come from), as :func:`teacher_source` describes a file."""
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


def _strip_module(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


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


class _TeacherCheckpointer(DetectionCheckpointer):
    """detectron2's loader (URLs, model-zoo ``.pkl`` name conversion) that keeps the
    incompatible keys for :func:`load_teacher_weights` instead of logging them."""

    incompatible = None

    def _load_model(self, checkpoint) -> _IncompatibleKeys:
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    def _log_incompatible_keys(self, incompatible: _IncompatibleKeys) -> None:
        pass


# How many keys an error or a log line lists.
_LISTED = 10


def _listing(keys: Sequence[str]) -> str:
    more = f", ... ({len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


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


def _is_teacher_key(key: str) -> bool:
    return key.startswith("teacher.") or key.startswith("module.teacher.")


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
        digest = _sha256(PathManager.get_local_path(path))
    return {"path": path, "setting": setting, "sha256": digest}


def _same_teacher(recorded: Dict[str, Any], current: Dict[str, Any]) -> bool:
    if recorded.get("random_init") or current.get("random_init"):
        return bool(recorded.get("random_init")) and bool(current.get("random_init"))
    return bool(recorded.get("sha256")) and recorded.get("sha256") == current.get("sha256")


def _describe(source: Dict[str, Any]) -> str:
    if source.get("random_init"):
        return f"a randomly initialised teacher ({source.get('setting')} empty)"
    return f"{source.get('path')!r} ({source.get('setting')}, sha256 {source.get('sha256')})"


def _describe_frozen(source: Dict[str, Any]) -> str:
    if source.get("random_init"):
        return f"no file (randomly initialised, {source.get('setting')} empty)"
    return _describe(source)


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


@contextlib.contextmanager
def explain_unreadable_weights(path: str, key: str, what: str = "the weights") -> Iterator[None]:
    """
    Turn any error raised inside the block into a :class:`WeightsError` (a RuntimeError) that
    names ``path`` and the setting it came from, and, for a URL, says how to pass a local copy
    instead (the machines this runs on may have no network). A :class:`WeightsError` raised
    inside (e.g. about the teacher's weights, loaded with the student's) passes unchanged.

    Args:
        path (str): the file or URL being loaded.
        key (str): where the user gave it, e.g. "MODEL.WEIGHTS" or "train.init_checkpoint".
        what (str): what the file is, for the message.
    """
    try:
        yield
    except WeightsError:  # already names its file and setting (e.g. the teacher's, loaded inside)
        raise
    except Exception as e:  # iopath raises many types (URLError, OSError, HTTP errors ...)
        if "://" in path:
            url = path
            if path.startswith(Detectron2Handler.PREFIX):
                url = Detectron2Handler.S3_DETECTRON2_PREFIX + path[len(Detectron2Handler.PREFIX) :]
            hint = (
                f"This machine could not download it: fetch {url} elsewhere and give its local "
                f"path as {key}."
            )
        else:
            hint = f"Check the path ({key})."
        raise WeightsError(f"Could not load {what} {path!r}: {e}. {hint}") from e


class _UnreadableCheckpoint(RuntimeError):
    """A checkpoint file that cannot be read (missing, truncated, not a checkpoint)."""

    def __init__(self, path: str, reason: str):
        self.reason = reason.splitlines()[0] if reason else "unknown error"
        super().__init__(f"Cannot read checkpoint {path}: {reason}")


def _write_atomically(path: str, write, mode: str) -> None:
    """
    Write ``path`` through ``write(file)`` into ``path + ".partial"`` in the same folder, flush
    it to disk, then rename it onto ``path`` (atomic on POSIX and Windows): a reader sees the
    old file or the complete new one, never a part.
    """
    partial = path + _PARTIAL_SUFFIX
    try:
        with open(partial, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


def load_checkpoint(
    checkpointer: Checkpointer, path: str, *, resume: bool = False, key: str = "MODEL.WEIGHTS"
) -> Dict[str, Any]:
    """
    ``checkpointer.resume_or_load(path, resume=resume)``: the last checkpoint of the
    checkpointer's ``save_dir`` when resuming and there is one, else ``path`` ("" loads
    nothing). An unreadable ``path`` raises an error that names it and ``key``
    (see :func:`explain_unreadable_weights`).

    Args:
        checkpointer (Checkpointer): e.g. a :class:`DistillationCheckpointer`.
        path (str): a local path, a ``detectron2://`` or ``https://`` URL, or "".
        resume (bool): restore the last checkpoint (model, optimizer, iteration ...) if any.
        key (str): where the user set ``path``, for the error message.

    Returns:
        dict: the checkpoint's extra entries (e.g. "iteration"), as ``resume_or_load``.
    """
    if resume and checkpointer.has_checkpoint():
        return checkpointer.resume_or_load(path, resume=True)
    with explain_unreadable_weights(path, key):
        return checkpointer.resume_or_load(path, resume=False)
