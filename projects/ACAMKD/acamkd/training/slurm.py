"""
Training on a Slurm cluster with submitit (``tools/submit_slurm.py``).

One Slurm task per node runs ``train_net.py`` with detectron2's own multi-machine arguments
(``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``), which detectron2's
``launch`` turns into one process per GPU. The rendezvous comes from the Slurm environment of
the running job, so nothing is set by hand per node. Every run passes ``--resume``: the first
one starts from ``MODEL.WEIGHTS``, and a job that Slurm preempts or times out is requeued by
submitit and continues from the last checkpoint in its output folder.

This module needs ``submitit`` (``pip install -e .[slurm]``); ``import acamkd`` does not import
it.
"""

import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

__all__ = [
    "Rendezvous",
    "TrainingJob",
    "import_submitit",
    "rendezvous_from_job_environment",
    "rendezvous_port",
]

# train_net.py options that the launcher sets from the Slurm environment.
LAUNCH_OPTIONS = ("--num-gpus", "--num-machines", "--machine-rank", "--dist-url")
# Ports are derived from the job id in [_PORT_BASE, _PORT_BASE + _PORT_SPAN): above the
# well-known and registered services most clusters run, below Linux's ephemeral range (32768+).
_PORT_BASE = 15000
_PORT_SPAN = 15000


def import_submitit() -> Any:
    """``import submitit``, with an error that says how to install it."""
    try:
        import submitit
    except ImportError as e:
        raise ImportError(
            "Slurm training needs submitit: pip install submitit (or pip install -e '.[slurm]')"
        ) from e
    return submitit


@dataclass(frozen=True)
class Rendezvous:
    """
    detectron2's ``launch`` arguments for one node of a job.

    Attributes:
        num_gpus (int): processes (GPUs) on this node.
        num_machines (int): nodes in the job.
        machine_rank (int): this node's index, 0 on the node that hosts the rendezvous.
        dist_url (str): ``tcp://<first node>:<port>``, or ``auto`` (a free local port) for a
            single node.
    """

    num_gpus: int
    num_machines: int
    machine_rank: int
    dist_url: str

    def train_net_args(self) -> List[str]:
        """The four options as ``train_net.py`` takes them."""
        values = (self.num_gpus, self.num_machines, self.machine_rank, self.dist_url)
        return [a for option, value in zip(LAUNCH_OPTIONS, values) for a in (option, str(value))]


def rendezvous_port(job_id: str) -> int:
    """
    A TCP port that all nodes of job ``job_id`` agree on without talking to each other. It is
    stable across requeues (Slurm keeps the job id) and spreads different jobs that share a
    first node over ``_PORT_SPAN`` ports.
    """
    digest = hashlib.sha1(str(job_id).encode()).hexdigest()
    return _PORT_BASE + int(digest, 16) % _PORT_SPAN


def rendezvous_from_job_environment(
    job_env: Any, num_gpus: int, port: Optional[int] = None
) -> Rendezvous:
    """
    The rendezvous of the node that runs ``job_env``.

    Args:
        job_env: a ``submitit.JobEnvironment`` (on Slurm it reads ``SLURM_JOB_ID``,
            ``SLURM_JOB_NUM_NODES``, ``SLURM_NODEID`` and the node list ``SLURM_JOB_NODELIST``,
            e.g. ``gpu[07-08]``) or any object with ``job_id``, ``num_nodes``, ``node`` and
            ``hostnames``.
        num_gpus (int): processes to start on this node (the job's GPUs per node).
        port (int or None): the rendezvous port; by default :func:`rendezvous_port` of the job.

    Returns:
        Rendezvous
    """
    num_nodes = int(job_env.num_nodes)
    if num_nodes == 1:
        dist_url = "auto"  # detectron2 picks a free port on the node
    else:
        master = job_env.hostnames[0]
        dist_url = f"tcp://{master}:{port or rendezvous_port(job_env.job_id)}"
    return Rendezvous(num_gpus, num_nodes, int(job_env.node), dist_url)


def _ignore_scheduler_signals() -> None:
    # Runs in the training process before exec. Slurm signals every process of the job, and
    # submitit, in the parent, answers SIGUSR2 (checkpoint and requeue) and ignores SIGTERM;
    # the training process must not die of them first (both kill a process by default).
    # Ignored dispositions survive exec; detectron2's worker processes inherit them.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainingJob:
    """
    The function submitit runs on each node: ``train_net.py --resume`` with the rendezvous of
    the node, then, on preemption or time-out, a resubmission of itself (submitit calls
    :meth:`checkpoint` and requeues the job).

    Args:
        train_script (str): path of ``train_net.py``.
        train_args (list[str]): its arguments as typed on one machine (``--config-file ...``,
            options, then ``KEY VALUE`` / ``key=value`` overrides), without the four launch
            options.
        num_gpus (int): GPUs (processes) per node.
        port (int or None): rendezvous port; by default derived from the job id.
    """

    def __init__(
        self,
        train_script: str,
        train_args: Sequence[str],
        *,
        num_gpus: int,
        port: Optional[int] = None,
    ):
        given = sorted({a.split("=")[0] for a in train_args} & set(LAUNCH_OPTIONS + ("--resume",)))
        if given:
            raise ValueError(f"{given} are set by the launcher from the Slurm environment")
        self.train_script = os.path.abspath(train_script)
        self.train_args = list(train_args)
        self.num_gpus = num_gpus
        self.port = port

    def command(self, rendezvous: Rendezvous) -> List[str]:
        """The ``train_net.py`` command line this node runs."""
        launch = rendezvous.train_net_args() + ["--resume"]
        return [sys.executable, self.train_script] + launch + self.train_args

    def __call__(self) -> int:
        job_env = import_submitit().JobEnvironment()
        rendezvous = rendezvous_from_job_environment(job_env, self.num_gpus, self.port)
        cmd = self.command(rendezvous)
        print(
            f"[acamkd.training.slurm] {job_env}\n[acamkd.training.slurm] {' '.join(cmd)}",
            flush=True,
        )
        # On preemption submitit's SIGUSR2 handler raises (SystemExit) inside this wait: the
        # training process is killed, and the requeued job resumes from its last checkpoint.
        # detectron2's per-GPU workers go when Slurm ends the job (it kills all its processes).
        with subprocess.Popen(cmd, preexec_fn=_ignore_scheduler_signals) as proc:
            try:
                returncode = proc.wait()
            except BaseException:
                proc.kill()
                raise
        if returncode != 0:
            raise RuntimeError(f"train_net.py exited with status {returncode}: {' '.join(cmd)}")
        return returncode

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on preemption or time-out: requeue the same job. detectron2 has
        been saving checkpoints all along, and ``--resume`` starts from the last one."""
        return import_submitit().helpers.DelayedSubmission(self)
