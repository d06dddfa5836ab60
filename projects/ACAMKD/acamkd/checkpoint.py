"""Checkpoint loading that keeps teacher and student apart, with errors that say what to do."""

import contextlib
from typing import Any, Dict, Iterator

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import Detectron2Handler
from fvcore.common.checkpoint import Checkpointer

__all__ = [
    "DistillationCheckpointer",
    "explain_unreadable_weights",
    "is_distiller_state",
    "load_checkpoint",
]


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
    """

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
