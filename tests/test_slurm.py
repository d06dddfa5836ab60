"""
The Slurm launcher (``tools/submit_slurm.py``, ``acamkd.training.slurm``) without Slurm: the
rendezvous derived from a fake Slurm environment, and a tiny distillation trained through
submitit's local executor, preempted after its first checkpoint, requeued and resumed from that
checkpoint.
"""

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
import submitit

from detectron2.engine import default_argument_parser

from acamkd.data import add_register_coco_argument
from acamkd.training.slurm import (
    Rendezvous,
    TrainingJob,
    rendezvous_from_job_environment,
    rendezvous_port,
)

from tiny_models import REPO, distill_cfg

SUBMIT = os.path.join(REPO, "tools", "submit_slurm.py")


def _fake_slurm(monkeypatch, node: int, procid: int) -> None:
    """The variables Slurm sets in the batch step of node ``node`` of a 3-node job."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "3")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-a[07-08],gpu-b12")
    monkeypatch.setenv("SLURM_NODEID", str(node))
    monkeypatch.setenv("SLURM_NTASKS", "3")
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURM_LOCALID", "0")


def _train_net_args(cmd: List[str]):
    """Parse a launcher command line with train_net.py's own parser."""
    assert cmd[0] == sys.executable and cmd[1].endswith("train_net.py")
    return add_register_coco_argument(default_argument_parser()).parse_args(cmd[2:])


@pytest.mark.parametrize("node", [0, 2])
def test_rendezvous_from_fake_slurm_environment(monkeypatch, node: int) -> None:
    _fake_slurm(monkeypatch, node=node, procid=node)
    job_env = submitit.JobEnvironment()
    assert type(job_env).__name__ == "SlurmJobEnvironment"

    port = rendezvous_port("4242")
    assert 15000 <= port < 30000
    rendezvous = rendezvous_from_job_environment(job_env, num_gpus=8)
    # Every node names the first host of the node list and the same port.
    assert rendezvous == Rendezvous(8, 3, node, f"tcp://gpu-a07:{port}")

    user_args = ["--config-file", "cfg.yaml", "SOLVER.MAX_ITER", "10"]
    cmd = TrainingJob("train_net.py", user_args, num_gpus=8).command(rendezvous)
    args = _train_net_args(cmd)
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (8, 3, node)
    assert args.dist_url == f"tcp://gpu-a07:{port}"
    assert args.resume and args.config_file == "cfg.yaml"
    assert args.opts == ["SOLVER.MAX_ITER", "10"]

    explicit = rendezvous_from_job_environment(job_env, num_gpus=8, port=23456)
    assert explicit.dist_url == "tcp://gpu-a07:23456"


def test_rendezvous_single_node_and_distinct_jobs(monkeypatch) -> None:
    _fake_slurm(monkeypatch, node=0, procid=0)
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-a07")
    single = rendezvous_from_job_environment(submitit.JobEnvironment(), num_gpus=4)
    assert single == Rendezvous(4, 1, 0, "auto")  # detectron2 picks a free local port
    assert rendezvous_port("4242") == rendezvous_port("4242")
    assert len({rendezvous_port(str(j)) for j in range(1000, 1100)}) > 90


def test_launch_options_are_refused() -> None:
    for given in (["--num-gpus", "2"], ["--dist-url=tcp://h:1"], ["--resume"]):
        with pytest.raises(ValueError, match="set by the launcher"):
            TrainingJob("train_net.py", ["--config-file", "c.yaml"] + given, num_gpus=1)


def test_import_acamkd_does_not_import_submitit() -> None:
    code = (
        "import sys, acamkd, acamkd.training.slurm; "
        "assert 'submitit' not in sys.modules, 'imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_checkpoint_requeues_the_same_job() -> None:
    job = TrainingJob("train_net.py", ["--config-file", "c.yaml"], num_gpus=2, port=1234)
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is job and delayed.args == () and delayed.kwargs == {}


def _write_coco(root: Path) -> Path:
    """Four 64x96 images with two boxes each, as a COCO json for --register-coco."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(4):
        image = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
        image[10:50, 8:40] = (0, 0, 255)
        cv2.imwrite(str(root / "images" / f"{i}.png"), image)
        images.append({"id": i, "file_name": f"{i}.png", "height": 64, "width": 96})
        for k, (box, cat) in enumerate((([8, 10, 32, 40], 1), ([50, 20, 40, 40], 2))):
            annotations.append(
                {"id": 2 * i + k, "image_id": i, "category_id": cat, "bbox": box,
                 "area": box[2] * box[3], "iscrowd": 0}
            )  # fmt: skip
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    path = root / "train.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def _processes() -> dict:
    """pid -> (parent pid, command line) of this machine's processes."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        out[int(entry.name)] = (ppid, cmdline)
    return out


def _wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 600):
    start = time.time()
    while time.time() - start < timeout:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"the launcher exited ({proc.returncode}) before {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _iterations(metrics: Path) -> List[int]:
    return [json.loads(line)["iteration"] for line in metrics.read_text().splitlines() if line]


def test_local_executor_trains_is_preempted_and_resumes(tmp_path: Path) -> None:
    max_iter = 12
    cfg = distill_cfg("RetinaNet")
    cfg.DATASETS.TRAIN = ("tiny_slurm_train",)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.001
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.TEST.EVAL_PERIOD = 0
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump())
    coco = _write_coco(tmp_path / "data")
    out = tmp_path / "run"

    cmd = [sys.executable, SUBMIT, "--cluster", "local", "--gpus-per-node", "0", "--time", "30"]
    cmd += ["--output-dir", str(out), "--", "--config-file", str(config)]
    cmd += ["--register-coco", "tiny_slurm_train", str(coco), str(tmp_path / "data" / "images")]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Preempt the job once its first periodic checkpoint (iteration 1) is on disk.
        _wait_for(lambda: (out / "last_checkpoint").exists(), "the first checkpoint", launcher)
        procs = _processes()
        tasks = [p for p, (_, c) in procs.items() if "submitit.core._submit" in c and str(out) in c]
        assert len(tasks) == 1, procs
        trainers = [p for p, (pp, c) in procs.items() if pp == tasks[0] and "train_net.py" in c]
        assert len(trainers) == 1
        # Slurm signals every process of the job: the training process must survive it, and
        # submitit (in the task) checkpoints the job and requeues it.
        os.kill(trainers[0], signal.SIGUSR2)
        os.kill(tasks[0], signal.SIGUSR2)
        stdout, _ = launcher.communicate(timeout=900)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, stdout[-5000:]
    assert "finished" in stdout

    logs = "".join(p.read_text() for p in (out / "submitit").glob("*_log.*"))
    assert "this job is preempted" in logs and "Requeued job" in logs, logs[-5000:]
    assert logs.count("[acamkd.training.slurm] ") == 4  # environment and command, once per run
    assert "--num-gpus 1 --num-machines 1 --machine-rank 0 --dist-url auto --resume" in logs

    log = (out / "log.txt").read_text()
    marker = "Starting training from iteration "
    starts = [int(line.split(marker)[1]) for line in log.splitlines() if marker in line]
    assert starts[0] == 0 and len(starts) == 2, starts
    assert 2 <= starts[1] < max_iter  # resumed after a checkpoint, not from scratch
    saved = [int(p.stem.split("_")[1]) for p in out.glob("model_0*.pth")]
    assert starts[1] - 1 in saved
    assert (out / "model_final.pth").exists()
    assert _iterations(out / "metrics.json")[-1] == max_iter - 1  # trained to the end


def _submit_tool():
    spec = importlib.util.spec_from_file_location("submit_slurm", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_limits_and_output_overrides() -> None:
    tool = _submit_tool()
    minutes = {"90": 90, "30:30": 31, "72:00:00": 4320, "2-00:00:00": 2880, "1-12": 2160}
    minutes.update({"1-2:30": 1590, "0:0:1": 1})
    assert {value: tool.parse_time(value) for value in minutes} == minutes
    with pytest.raises(argparse.ArgumentTypeError):
        tool.parse_time("3h")
    yaml = tool.output_dir_override(["--config-file", "a.yaml", "SOLVER.MAX_ITER", "5"], "/o")
    assert yaml == ["OUTPUT_DIR", "/o"]
    assert tool.output_dir_override(["--config-file=b.py"], "/o") == ["train.output_dir=/o"]


def test_sbatch_script_from_the_launcher_options(tmp_path: Path, monkeypatch) -> None:
    # submitit's Slurm executor only checks that srun exists before writing the batch script.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    tool = _submit_tool()
    out = tmp_path / "run"
    options = ["--nodes", "2", "--gpus-per-node", "8", "--partition", "learnfair"]
    options += ["--time", "3-00:00:00", "--account", "acc", "--output-dir", str(out)]
    args = tool.build_parser().parse_args(options + ["--", "--config-file", "x.yaml"])
    executor = tool.make_executor(args)
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "u")
    lines = set(script.splitlines())
    expected = {"--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1", "--time=4320"}
    expected |= {"--partition=learnfair", "--account=acc", "--signal=USR2@90"}
    expected |= {f"--output={out}/submitit/%j_0_log.out", "--cpus-per-task=80"}
    assert {f"#SBATCH {e}" for e in expected} <= lines, script
