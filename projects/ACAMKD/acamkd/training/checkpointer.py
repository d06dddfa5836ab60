"""
The checkpointer: checkpoints that keep teacher and student apart, survive a crash, and errors
that say what to do.

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
declare :class:`~acamkd.training.frozen_weights.FrozenWeights` (MasKD's receptive tokens, learned
in stage 1): they are loaded strictly from their own file when a run starts, their file's
SHA-256 is recorded in every checkpoint (:data:`FROZEN_SOURCES_KEY`), and on resume they come
from the checkpoint, a file of other content being refused.

The weights it loads are described in :mod:`acamkd.training.teacher_weights` and
:mod:`acamkd.training.frozen_weights`; the file utilities are in
:mod:`acamkd.training.checkpoint_files`.
"""

import contextlib
import logging
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import Checkpointer

from ..modeling.inheritance import inherit_from_teacher
from .checkpoint_files import (
    _PARTIAL_SUFFIX,
    WeightsError,
    _listing,
    _strip_module,
    _UnreadableCheckpoint,
    explain_unreadable_weights,
    write_atomically,
)
from .frozen_weights import (
    FrozenWeightsError,
    _describe_frozen,
    _frozen_groups,
    _frozen_sources_to_save,
    _is_frozen_key,
    load_frozen_weights,
)
from .teacher_weights import (
    _LOADED_ATTR,
    TeacherWeightsError,
    _describe,
    _file_source,
    _load_teacher_from,
    _same_teacher,
    teacher_source,
)

__all__ = ["DistillationCheckpointer", "is_distiller_state", "load_checkpoint"]

logger = logging.getLogger(__name__)


# The entry of a distiller checkpoint that records where the teacher's weights came from (see
# teacher_source); the checkpoint holds no teacher.* tensors then.
TEACHER_SOURCE_KEY = "teacher_source"
# The entry of a distiller checkpoint that records, per setting, where the frozen weights of its
# level modules came from (see FrozenWeights); the tensors themselves are in the checkpoint.
FROZEN_SOURCES_KEY = "frozen_sources"


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
      :func:`~acamkd.training.teacher_weights.load_teacher_weights`, then applies the
      inheritance strategy if the distiller has it; a teacher-less distiller checkpoint reloads
      them without the inheritance.

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
            write_atomically(save_file, lambda f: torch.save(data, f), "wb")
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
        write_atomically(save_file, lambda f: f.write(last_filename_basename), "w")

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
        Load a distiller's teacher from its own weights (see
        :class:`~acamkd.training.teacher_weights.TeacherWeights`), then, if the distiller has the
        inheritance strategy on, copy the teacher's FPN and heads into the student. :meth:`load`
        calls it whenever what it loads is not a distiller checkpoint; for a model that is not a
        distiller it does nothing.
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
        For a checkpoint of a distiller whose level modules declare
        :class:`~acamkd.training.frozen_weights.FrozenWeights`: each setting's file must have the
        content the checkpoint recorded (the frozen tensors come from the checkpoint), else a
        :class:`FrozenWeightsError` names both. Nothing is checked where the model runs its
        student alone (``restore_teacher`` False).

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


def _is_teacher_key(key: str) -> bool:
    return key.startswith("teacher.") or key.startswith("module.teacher.")


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
