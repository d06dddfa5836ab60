#!/usr/bin/env python
"""
Submit a ``train_net.py`` run to a Slurm cluster with submitit:

    python tools/submit_slurm.py --nodes 2 --gpus-per-node 8 --partition <partition> \
        --time 72:00:00 --output-dir output/acamkd_retinanet -- \
        --config-file configs/COCO-Detection/acamkd_retinanet_R_50_from_R_101_FPN_2x.yaml

Everything after ``--`` is passed to ``train_net.py`` as you would type it on one machine
(config, options, ``KEY VALUE`` or ``key=value`` overrides); the launcher adds ``--num-gpus``,
``--num-machines``, ``--machine-rank`` and ``--dist-url`` from the Slurm environment of each node
and ``--resume``, and sets the output folder (``OUTPUT_DIR`` or ``train.output_dir``). When the
job is preempted or reaches its time limit, submitit requeues it (up to ``--max-requeue``
times) and it continues from the last checkpoint in ``--output-dir``. Slurm logs go to
``<output-dir>/submitit/``.

``--cluster local`` runs the same job on this machine in a subprocess (``debug``: in this
process), which is how the tests check it without Slurm.
"""

import argparse
import os
import re
import sys
from typing import List, Optional

from acamkd.config import REPO_ROOT
from acamkd.training.slurm import TrainingJob, import_submitit


def parse_time(value: str) -> int:
    """
    A Slurm time limit as whole minutes (seconds round up). Slurm's forms: ``M``, ``M:S``,
    ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``.
    """
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", value.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a Slurm time: {value!r} (e.g. 72:00:00, 2-00:00:00)")
    days = int(m.group(1) or 0)
    parts = [int(p) for p in m.group(2).split(":")]
    if m.group(1) is not None:  # D-H[:M[:S]]
        parts += [0] * (3 - len(parts))
    elif len(parts) == 1:  # M
        parts = [0, parts[0], 0]
    elif len(parts) == 2:  # M:S
        parts = [0] + parts
    hours, minutes, seconds = parts
    return days * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=1, help="machines")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (processes) per node")
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument(
        "--time",
        type=parse_time,
        default=parse_time("72:00:00"),
        help="time limit per run, e.g. 72:00:00 (default), 2-00:00:00, 90",
    )
    parser.add_argument(
        "--output-dir",
        required=True,
        help="training output (checkpoints, logs); submitit files in its submitit/",
    )
    parser.add_argument("--job-name", default="acamkd")
    parser.add_argument(
        "--cpus-per-task", type=int, default=None, help="CPUs per node (default: 10 per GPU)"
    )
    parser.add_argument("--mem-gb", type=int, default=None, help="memory per node")
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--constraint", default=None, help="Slurm --constraint, e.g. volta32gb")
    parser.add_argument("--comment", default=None)
    parser.add_argument(
        "--max-requeue",
        type=int,
        default=3,
        help="requeues after time-outs (preemptions do not count)",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="rendezvous port (default: derived from the job id)"
    )
    parser.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm")
    parser.add_argument("--train-script", default=os.path.join(REPO_ROOT, "train_net.py"))
    parser.add_argument(
        "train_args", nargs=argparse.REMAINDER, help="-- then train_net.py's arguments"
    )
    return parser


def output_dir_override(train_args: List[str], output_dir: str) -> List[str]:
    """The override that puts the run's output in ``output_dir``, for a YAML or .py config."""
    config = None
    for i, arg in enumerate(train_args):
        if arg == "--config-file" and i + 1 < len(train_args):
            config = train_args[i + 1]
        elif arg.startswith("--config-file="):
            config = arg.split("=", 1)[1]
    if config is None:
        raise SystemExit("train_net.py needs --config-file (after --)")
    if config.endswith(".py"):
        return [f"train.output_dir={output_dir}"]
    return ["OUTPUT_DIR", output_dir]


def make_executor(args: argparse.Namespace):
    submitit = import_submitit()
    folder = os.path.join(os.path.abspath(args.output_dir), "submitit")
    executor = submitit.AutoExecutor(
        folder=folder,
        cluster=args.cluster,
        slurm_max_num_timeout=args.max_requeue,
        local_max_num_timeout=args.max_requeue,
    )
    gpus = max(args.gpus_per_node, 0)
    params = dict(
        name=args.job_name,
        nodes=args.nodes,
        tasks_per_node=1,  # one train_net.py per node; detectron2 starts one process per GPU
        gpus_per_node=gpus,
        cpus_per_task=args.cpus_per_task or 10 * max(gpus, 1),
        timeout_min=args.time,
    )
    if args.mem_gb is not None:
        params["mem_gb"] = args.mem_gb
    slurm = {
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_constraint": args.constraint,
        "slurm_comment": args.comment,
    }
    params.update({k: v for k, v in slurm.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def main(argv: Optional[List[str]] = None):
    args = build_parser().parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    output_dir = os.path.abspath(args.output_dir)
    job = TrainingJob(
        args.train_script,
        train_args + output_dir_override(train_args, output_dir),
        num_gpus=max(args.gpus_per_node, 1),
        port=args.port,
    )
    executor = make_executor(args)
    submitted = executor.submit(job)
    print(f"submitted job {submitted.job_id}; training output in {output_dir}", flush=True)
    print(f"logs: {os.path.join(output_dir, 'submitit')}", flush=True)
    if args.cluster != "slurm":  # a local job ends with this process: wait for it
        submitted.result()
        print(f"job {submitted.job_id} finished", flush=True)
    return submitted


if __name__ == "__main__":
    main(sys.argv[1:])
