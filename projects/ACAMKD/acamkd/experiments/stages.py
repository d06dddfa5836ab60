"""
One training run as a resumable stage: a ``train_net.py`` command in its own folder.

The demo and the study are sequences of stages. A stage counts as finished only when its
final checkpoint is readable and was trained with the requested command and the same resolved
config (both recorded in ``stage.json`` before training starts: the config file, the overrides
and a digest of the config they resolve to, so that an edited config file or a changed default
also counts as a change); a stage that changed is retrained from scratch, and an interrupted
one resumes from its last checkpoint (``--resume``). A run whose own ``config.yaml`` differs from
the config asked only by keys this package gained since it trained is kept, with a warning.
"""

import datetime
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from ..config import REPO_ROOT
from ..training.checkpoint_files import is_readable_checkpoint, write_atomically

__all__ = [
    "Stage",
    "REPO_ROOT",
    "final_metrics",
    "keys_added_since",
    "read_metrics",
    "resolved_config_digest",
    "resolved_config_text",
    "run_side_by_side",
]

logger = logging.getLogger(__name__)

_RECORD = "stage.json"
_FINAL = "model_final.pth"
_SAVED_CONFIG = "config.yaml"  # what train_net.py wrote: the config the run trained with
_OUTPUT_KEYS = ("OUTPUT_DIR", "train.output_dir")


def resolved_config_text(config: str, opts: Sequence[str]) -> str:
    """
    The config that ``train_net.py`` builds from ``config`` and ``opts``, as YAML text: for a
    YAML, this package's defaults merged with the file (and its ``_BASE_`` files) and the
    overrides; for a ``.py``, the loaded file with the overrides applied.

    Args:
        config (str): the config file, absolute or relative to the repository.
        opts (list[str]): its overrides, in the config's own syntax.
    """
    path = os.path.join(REPO_ROOT, config)
    if path.endswith(".py"):
        from omegaconf import OmegaConf

        from detectron2.config import LazyConfig

        return OmegaConf.to_yaml(LazyConfig.apply_overrides(LazyConfig.load(path), list(opts)))
    from ..config import get_acamkd_cfg

    cfg = get_acamkd_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg.dump()


def resolved_config_digest(config: str, opts: Sequence[str]) -> str:
    """SHA-256 of :func:`resolved_config_text`."""
    return hashlib.sha256(resolved_config_text(config, opts).encode()).hexdigest()


def _flatten(tree: object, prefix: str = "") -> Dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat: Dict[str, object] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def keys_added_since(saved_config: str, asked_text: str) -> Optional[Dict]:
    """
    The keys that the config asked now (``asked_text``, see :func:`resolved_config_text`) has
    and the one a run saved (``<run>/config.yaml``, as ``train_net.py`` wrote it) lacks, when
    they are the only difference besides the output folder: a run trained before a newer
    version of this package added a key.

    Returns:
        dict or None: ``{key: value now}``; None when the saved config is missing or unreadable,
        or differs in another way (a changed value, a removed key).
    """
    try:
        with open(saved_config) as f:
            saved = _flatten(yaml.safe_load(f))
    except (OSError, yaml.YAMLError):
        return None
    asked = _flatten(yaml.safe_load(asked_text))
    for flat in (saved, asked):
        for key in _OUTPUT_KEYS:
            flat.pop(key, None)
    if any(key not in asked or asked[key] != value for key, value in saved.items()):
        return None
    return {key: value for key, value in asked.items() if key not in saved}


@dataclass
class Stage:
    """
    One ``train_net.py`` run.

    Attributes:
        name (str): its folder under the output directory.
        config (str): a YAML or ``.py`` config, absolute or relative to the repository.
        opts (list[str]): overrides in the config's own syntax (KEY VALUE pairs for a YAML,
            key=value for a ``.py``), OUTPUT_DIR excluded.
        num_gpus (int): ``--num-gpus`` of the run.
    """

    name: str
    config: str
    opts: Sequence[str] = ()
    num_gpus: int = 1

    def output_dir(self, root: str) -> str:
        return os.path.join(root, self.name)

    def command(self, root: str) -> List[str]:
        """The ``train_net.py`` command line (``--resume`` continues an interrupted run)."""
        out = self.output_dir(root)
        is_lazy = self.config.endswith(".py")
        output_opt = [f"train.output_dir={out}"] if is_lazy else ["OUTPUT_DIR", out]
        return [
            sys.executable,
            os.path.join(REPO_ROOT, "train_net.py"),
            "--config-file",
            os.path.join(REPO_ROOT, self.config),
            "--num-gpus",
            str(self.num_gpus),
            "--resume",
            *output_opt,
            *self.opts,
        ]

    def _asked(self) -> Tuple[Dict[str, object], str]:
        """The record of what this stage asks (``stage.json``) and the config it resolves to."""
        text = resolved_config_text(self.config, self.opts)
        record = {
            "config": self.config,
            "opts": list(self.opts),
            "resolved_sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
        return record, text

    def _matches(
        self, out: str, previous: Dict[str, object], asked: Tuple[Dict[str, object], str]
    ) -> bool:
        """
        Whether the run in ``out``, recorded as ``previous``, was trained as ``asked`` (this
        stage's :meth:`_asked`) asks. A record written before the digest existed is compared
        on the config file and overrides. Where only the digest differs, a run whose saved
        config lacks nothing but keys added to this package since it trained is kept (see
        :func:`keys_added_since`), with a warning naming them.
        """
        current, asked_text = asked
        if previous == current:
            return True
        command = {k: v for k, v in current.items() if k != "resolved_sha256"}
        if "resolved_sha256" not in previous:
            return previous == command
        if {k: v for k, v in previous.items() if k != "resolved_sha256"} != command:
            return False
        added = keys_added_since(os.path.join(out, _SAVED_CONFIG), asked_text)
        if added is None:
            return False
        if added:
            logger.warning(
                "[%s] %s was trained before %s existed; kept, as they are its only difference "
                "from the config asked now (new keys keep the old behaviour by default)",
                self.name,
                out,
                ", ".join(f"{k} (now {v!r})" for k, v in sorted(added.items())),
            )
        return True

    def is_finished(self, root: str) -> bool:
        """The final checkpoint is readable and was trained as this stage asks."""
        return self._is_finished(root, self._asked())

    def _is_finished(self, root: str, asked: Tuple[Dict[str, object], str]) -> bool:
        out = self.output_dir(root)
        record = os.path.join(out, _RECORD)
        if not (os.path.isfile(record) and os.path.isfile(os.path.join(out, _FINAL))):
            return False
        with open(record) as f:
            if not self._matches(out, json.load(f), asked):
                return False
        return is_readable_checkpoint(os.path.join(out, _FINAL))

    def prepare(self, root: str) -> Optional[List[str]]:
        """
        Get the folder ready to train: a folder trained with another command or config is set
        aside (renamed ``<folder>.replaced-<n>``), the record of what is asked is written.

        Returns:
            list[str] or None: the command to run, or None if the stage is finished.
        """
        out = self.output_dir(root)
        asked = self._asked()  # resolves the config once for the checks and the record
        if self._is_finished(root, asked):
            logger.info("[%s] already trained in %s: skipped", self.name, out)
            return None
        record = os.path.join(out, _RECORD)
        if os.path.isfile(record):
            with open(record) as f:
                previous = json.load(f)
            if not self._matches(out, previous, asked):
                aside = _set_aside(out)
                logger.warning(
                    "[%s] %s was trained with %s; now asked for %s (config file, overrides or "
                    "the config they resolve to differ): retraining from scratch, the old run "
                    "set aside in %s",
                    self.name,
                    out,
                    previous,
                    asked[0],
                    aside,
                )
        elif os.path.isfile(os.path.join(out, _FINAL)):
            # A final checkpoint without a record (an older layout, or unreadable): no way to
            # know its schedule, so it is not trusted.
            aside = _set_aside(out)
            logger.warning(
                "[%s] %s has no %s: retraining from scratch, the old run set aside in %s",
                self.name,
                out,
                _RECORD,
                aside,
            )
        os.makedirs(out, exist_ok=True)
        write_atomically(record, lambda f: json.dump(asked[0], f, indent=1), "w")
        cmd = self.command(root)
        logger.info("[%s] %s", self.name, shlex.join(cmd))
        return cmd

    def run(self, root: str) -> bool:
        """
        Train unless finished (see :meth:`prepare`).

        Returns:
            bool: True if it trained (or resumed), False if it was already finished.
        """
        cmd = self.prepare(root)
        if cmd is None:
            return False
        subprocess.run(cmd, check=True, cwd=REPO_ROOT)
        return True


def _set_aside(folder: str) -> str:
    """Rename ``folder`` to the first free ``<folder>.replaced-<n>`` (nothing is deleted: a run
    retrained by mistake can be moved back); returns the new path."""
    n = 1
    while os.path.exists(f"{folder}.replaced-{n}"):
        n += 1
    os.rename(folder, f"{folder}.replaced-{n}")
    return f"{folder}.replaced-{n}"


def run_side_by_side(
    stages: Sequence[Stage],
    root: str,
    jobs: int,
    threads: int,
    poll_seconds: float = 60.0,
    on_finish: Optional[Callable[[Stage, float], None]] = None,
) -> Dict[str, float]:
    """
    Train ``stages``, up to ``jobs`` at a time (in order, the next one starting when one
    ends), each in its own process with ``threads`` CPU threads and its console output in
    ``<stage>/console.log``; every ``poll_seconds`` one progress line per running stage
    (iteration, ETA, from its ``metrics.json``). ``on_finish(stage, seconds)`` is called as
    each stage ends without error.

    Returns:
        dict[str, float]: wall seconds per stage trained here, from its start to its end
        (finished stages are skipped).

    Raises:
        RuntimeError: a stage failed (the others are let finish), naming it and its log.
        An interrupt stops every run; rerunning resumes each from its last checkpoint.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    waiting, running, seconds, failed = list(stages), {}, {}, []
    try:
        last_report = time.monotonic()
        while waiting or running:
            while waiting and len(running) < jobs:
                stage = waiting.pop(0)
                cmd = stage.prepare(root)
                if cmd is None:
                    continue
                log_path = os.path.join(stage.output_dir(root), "console.log")
                with open(log_path, "a") as log:
                    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
                running[stage.name] = (stage, proc, log_path, time.perf_counter())
            time.sleep(1.0 if running else 0.0)
            report = time.monotonic() - last_report >= poll_seconds
            if report:
                last_report = time.monotonic()
            for name, (stage, proc, log_path, start) in list(running.items()):
                code = proc.poll()
                if code is None:
                    if report:
                        logger.info("[%s] %s", name, _progress(stage.output_dir(root)))
                    continue
                del running[name]
                seconds[name] = time.perf_counter() - start
                if code != 0:
                    failed.append(f"{name} (exit {code}, see {log_path})")
                else:
                    logger.info("[%s] finished in %.0f s", name, seconds[name])
                    if on_finish is not None:
                        on_finish(stage, seconds[name])
    except BaseException:  # e.g. Ctrl-C: stop the runs too; each resumes from its checkpoint
        for _, proc, _, _ in running.values():
            proc.terminate()
        raise
    if failed:
        raise RuntimeError("Training failed: " + "; ".join(failed))
    return seconds


def _progress(output_dir: str) -> str:
    """``iteration N, ETA 0:04:10`` from a run's last training record, or ``starting``."""
    try:
        records = read_metrics(output_dir)
    except ValueError:  # a line being written
        return "running"
    for record in reversed(records):
        if "eta_seconds" in record:
            eta = datetime.timedelta(seconds=int(record["eta_seconds"]))
            return f"iteration {record['iteration'] + 1}, ETA {eta}"
    return "starting"


def read_metrics(output_dir: str) -> List[Dict[str, float]]:
    """The records of a run's ``metrics.json`` (one JSON object a line), in order."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_metrics(output_dir: str, prefix: str) -> Optional[Dict[str, float]]:
    """
    The last evaluation of a run, from its ``metrics.json``: ``{"AP": ..., ...}`` for
    ``prefix="bbox"``, ``{"mIoU": ..., ...}`` for ``"sem_seg"``; None if it has none.
    """
    for record in reversed(read_metrics(output_dir)):
        found = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith(prefix + "/")}
        if found:
            return found
    return None
