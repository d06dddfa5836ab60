"""
``train_net.py`` as a subprocess the kill-and-resume tests (test_resume.py) can stop at a
known point: the arguments are train_net.py's, the probes are set by environment variables.

- ``PAUSE_AFTER_SAVE=N``: once the N-th checkpoint (and ``last_checkpoint``) is written, write
  the JSON file ``PAUSE_MARKER`` and sleep until killed;
- ``PAUSE_IN_SAVE=N``: write the first half of the N-th checkpoint's bytes, then do the same,
  as a process killed in the middle of ``torch.save`` would leave it;
- ``RESUME_STATE=path``: when training starts (after resuming and the hooks' ``before_train``),
  ``torch.save`` the start iteration and the trainer's ``state_dict()`` (iteration, optimizer,
  LR scheduler) to ``path``.

The test sends the SIGKILL itself, from outside, once the marker exists.
"""

import io
import json
import os
import runpy
import sys
import time

import torch

from detectron2.engine.train_loop import TrainerBase

from acamkd.training.checkpointer import DistillationCheckpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_saves = {"count": 0, "cut": False}


def _pause(**info) -> None:
    marker = os.environ["PAUSE_MARKER"]
    with open(marker + ".tmp", "w") as f:
        json.dump(dict(info, pid=os.getpid()), f)
    os.replace(marker + ".tmp", marker)
    while True:
        time.sleep(1)


def _save(self, name, **kwargs):
    _saves["count"] += 1
    _saves["cut"] = _saves["count"] == int(os.environ.get("PAUSE_IN_SAVE", 0))
    _real_save(self, name, **kwargs)
    if _saves["count"] == int(os.environ.get("PAUSE_AFTER_SAVE", 0)):
        _pause(after_save=name)


def _torch_save(obj, f, *args, **kwargs):
    if _saves["cut"]:
        buffer = io.BytesIO()
        _real_torch_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        _pause(in_save=getattr(f, "name", ""), size=len(data))
    return _real_torch_save(obj, f, *args, **kwargs)


def _before_train(self):
    _real_before_train(self)
    path = os.environ.get("RESUME_STATE")
    if path:
        _real_torch_save({"start_iter": self.start_iter, "state": self.state_dict()}, path)


_real_save, DistillationCheckpointer.save = DistillationCheckpointer.save, _save
_real_torch_save, torch.save = torch.save, _torch_save
_real_before_train, TrainerBase.before_train = TrainerBase.before_train, _before_train

if __name__ == "__main__":
    sys.argv[0] = os.path.join(REPO, "train_net.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
