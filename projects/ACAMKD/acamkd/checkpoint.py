"""
Checkpoints that keep teacher and student apart, survive a crash, and errors that say what to do.

A checkpoint (and ``last_checkpoint``) is written to a temporary file in the same folder and
renamed into place once complete, so a process killed while saving never leaves a truncated
``model_*.pth``; resuming skips, with a warning, any checkpoint that cannot be read anyway
(e.g. cut short by a full disk or written by an older version) and uses the newest readable one.
"""

import contextlib
import logging
import os
from typing import Any, Dict, Iterator, List

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import Detectron2Handler
from fvcore.common.checkpoint import Checkpointer

__all__ = [
    "DistillationCheckpointer",
    "explain_unreadable_weights",
    "is_distiller_state",
    "is_readable_checkpoint",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)

# Suffix of the file a checkpoint is written to before it is renamed into place. It does not
# end in ".pth", so a partial file is never taken for a checkpoint.
_PARTIAL_SUFFIX = ".partial"


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

    - this project's own checkpoints (student, teacher and ACAM modules) restore everything,
      by exact names;
    - any other checkpoint (``MODEL.WEIGHTS``: ImageNet backbones, plain detectron2 models,
      exported students) initialises the student alone. detectron2's suffix-matching loader
      would otherwise match one key against both ``teacher.*`` and ``student.*`` and fail.

    For a model that is not a distiller it behaves exactly as :class:`DetectionCheckpointer`.

    Saving is atomic for a local ``save_dir``: the checkpoint and ``last_checkpoint`` are
    written to ``<name>.partial`` and renamed into place when complete. Resuming uses the
    checkpoint named by ``last_checkpoint`` or, if it cannot be read, the newest readable
    ``.pth`` of ``save_dir``, and says so in a warning.
    """

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not os.path.isdir(self.save_dir):  # not a local folder: fvcore writes in place
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        assert os.path.basename(save_file) == basename, basename
        self.logger.info(f"Saving checkpoint to {save_file}")
        _write_atomically(save_file, lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(basename)

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
        return super().load(path, *args, **kwargs)

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
            return DetectionCheckpointer(student)._load_model(checkpoint)
        return super()._load_model(checkpoint)


@contextlib.contextmanager
def explain_unreadable_weights(path: str, key: str, what: str = "the weights") -> Iterator[None]:
    """
    Turn any error raised inside the block into a RuntimeError that names ``path`` and the
    setting it came from, and, for a URL, says how to pass a local copy instead (the machines
    this runs on may have no network).

    Args:
        path (str): the file or URL being loaded.
        key (str): where the user gave it, e.g. "MODEL.WEIGHTS" or "train.init_checkpoint".
        what (str): what the file is, for the message.
    """
    try:
        yield
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
        raise RuntimeError(f"Could not load {what} {path!r}: {e}. {hint}") from e


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
