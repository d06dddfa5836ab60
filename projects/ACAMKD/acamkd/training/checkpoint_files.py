"""
Checkpoint files: atomic writes, the readable-checkpoint check, and errors that name a weights
file that cannot be read.

A checkpoint (and ``last_checkpoint``) is written to a temporary file in the same folder and
renamed into place once complete (:func:`write_atomically`), so a process killed while saving
never leaves a truncated ``model_*.pth``; a checkpoint that cannot be read anyway (e.g. cut short
by a full disk or written by an older version) raises :class:`_UnreadableCheckpoint`, which
resuming skips. A weights file that cannot be read or downloaded raises a :class:`WeightsError`
that names the file and its setting (:func:`explain_unreadable_weights`).
"""

import contextlib
import os
from typing import Iterator, Sequence

import torch

from detectron2.utils.file_io import Detectron2Handler

__all__ = [
    "WeightsError",
    "explain_unreadable_weights",
    "is_readable_checkpoint",
    "write_atomically",
]


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


class WeightsError(RuntimeError):
    """
    An error about a weights file whose message already names the file and its setting:
    :func:`explain_unreadable_weights` passes it on unchanged.
    """


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


def write_atomically(path: str, write, mode: str) -> None:
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


# How many keys an error or a log line lists.
_LISTED = 10


def _listing(keys: Sequence[str]) -> str:
    more = f", ... ({len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def _strip_module(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key
