"""
The embedded default: generate the street scenes, train a teacher, a student baseline and an
ACAM-KD student with the same schedule and seed, evaluate all three with the COCO evaluator and
write a model-zoo style table.

Each stage is a plain ``train_net.py`` run in its own output folder (logs, ``metrics.json``,
TensorBoard events, checkpoints), so an interrupted demo resumes where it stopped and every
stage can be rerun by hand with the command it logs.
"""

import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .compare import ModelSpec, compare_models, format_markdown, json_safe
from .data import generate_streets
from .stages import REPO_ROOT, Stage, read_metrics

__all__ = ["demo_stages", "run_demo", "read_training_log"]

logger = logging.getLogger(__name__)


def _schedule(max_iter: int) -> List[str]:
    """A stage's schedule overrides; the comparison evaluates every stage afterwards."""
    return [
        "SOLVER.MAX_ITER",
        str(max_iter),
        "SOLVER.STEPS",
        f"({int(max_iter * 0.8)},)",
        "SOLVER.CHECKPOINT_PERIOD",
        str(max(1, max_iter // 3)),
        "DATASETS.TEST",
        "()",
    ]


@dataclass(frozen=True)
class _Task:
    """A demo task: its configs (teacher, student baseline, ACAM-KD student), the dataset all
    three are compared on, and the default schedules (iterations)."""

    folder: str
    configs: Tuple[str, str, str]
    dataset: str
    teacher_iters: int
    student_iters: int


_TASKS = {
    "detection": _Task(
        os.path.join("configs", "Streets-Detection"),
        (
            "retinanet_R_18_FPN_wide_streets.yaml",
            "retinanet_R_18_FPN_streets.yaml",
            "acamkd_retinanet_R_18_from_R_18_wide_streets.yaml",
        ),
        "streets_coco_val",
        teacher_iters=1500,
        student_iters=300,
    ),
    "segmentation": _Task(
        os.path.join("configs", "Streets-SemanticSegmentation"),
        (
            "deeplabv3_R_18_wide_OS8_streets.yaml",
            "deeplabv3_R_18_OS8_streets.yaml",
            "acamkd_deeplabv3_R_18_OS8_from_deeplabv3_R_18_wide_OS8_streets.yaml",
        ),
        "streets_sem_seg_val",
        teacher_iters=300,
        student_iters=180,
    ),
}


def demo_stages(
    output_dir: str,
    teacher_iters: int,
    student_iters: int,
    extra_opts: Sequence[str] = (),
    task: str = "detection",
) -> List[Stage]:
    """
    Teacher, student baseline and ACAM-KD student of ``task``: RetinaNet wide R-18-FPN ->
    R-18-FPN for "detection", DeepLabV3 wide R-18 -> R-18 for "segmentation".

    Args:
        extra_opts (list[str]): KEY VALUE overrides of every stage; the ACAM-KD stage also gives
            them to its teacher, so that it is built as the teacher stage trained it.
    """
    if task not in _TASKS:
        raise ValueError(f"Unknown demo task {task!r}; expected one of {sorted(_TASKS)}.")
    folder, (teacher, baseline, acamkd) = _TASKS[task].folder, _TASKS[task].configs
    teacher_weights = os.path.join(output_dir, "teacher", "model_final.pth")
    extra = list(extra_opts)
    return [
        Stage("teacher", os.path.join(folder, teacher), _schedule(teacher_iters) + extra),
        Stage("student_baseline", os.path.join(folder, baseline), _schedule(student_iters) + extra),
        Stage(
            "student_acamkd",
            os.path.join(folder, acamkd),
            _schedule(student_iters)
            + [
                "MODEL.ACAMKD.TEACHER.WEIGHTS",
                teacher_weights,
                "MODEL.ACAMKD.TEACHER.OPTS",
                repr(extra),
            ]
            + extra,
        ),
    ]


def read_training_log(output_dir: str) -> Dict[str, float]:
    """
    From a finished stage's ``metrics.json``: the median training seconds per iteration and
    the last logged ACAM statistics (``acam/<level>/...``, distillers only).
    """
    records = read_metrics(output_dir)
    times = [r["time"] for r in records if "time" in r]
    out = {"train_s_per_iter": statistics.median(times) if times else float("nan")}
    for r in reversed(records):  # the last training record holds the final mask statistics
        if any(k.startswith("acam/") for k in r):
            out.update({k: v for k, v in r.items() if k.startswith("acam/")})
            break
    return out


def run_demo(
    output_dir: str,
    *,
    num_train: int = 320,
    num_val: int = 80,
    width: int = 320,
    height: int = 160,
    max_depth: float = 14.0,
    teacher_iters: Optional[int] = None,
    student_iters: Optional[int] = None,
    extra_opts: Sequence[str] = (),
    task: str = "detection",
    command: str = "make demo",
) -> str:
    """
    Run the whole demo and write ``results.md`` and ``results.json`` under ``output_dir``.

    Args:
        extra_opts (list[str]): KEY VALUE overrides given to every stage (e.g. to shrink).
        task (str): "detection" (COCO box AP) or "segmentation" (mIoU), see :data:`_TASKS`.
        teacher_iters, student_iters (int or None): schedules; None: the task's default.

    Returns:
        str: the Markdown table.
    """
    os.makedirs(output_dir, exist_ok=True)
    start = time.perf_counter()
    # Under $DETECTRON2_DATASETS (default ./datasets), where the streets_* names point.
    generate_streets(
        num_train=num_train, num_val=num_val, width=width, height=height, max_depth=max_depth
    )
    if task not in _TASKS:
        raise ValueError(f"Unknown demo task {task!r}; expected one of {sorted(_TASKS)}.")
    teacher_iters = teacher_iters or _TASKS[task].teacher_iters
    student_iters = student_iters or _TASKS[task].student_iters
    stages = demo_stages(output_dir, teacher_iters, student_iters, extra_opts, task)
    seconds = {}
    for stage in stages:
        t0 = time.perf_counter()
        stage.run(output_dir)
        seconds[stage.name] = time.perf_counter() - t0
    # The comparison measures each stage as trained; the overrides that are not part of
    # the model (schedule, test set) do not matter there.
    specs = [
        ModelSpec(
            s.name,
            os.path.join(REPO_ROOT, s.config),
            os.path.join(s.output_dir(output_dir), "model_final.pth"),
            list(s.opts),
        )
        for s in stages
    ]
    rows = compare_models(specs, dataset=_TASKS[task].dataset, output_dir=output_dir)
    for stage, row in zip(stages, rows):
        row.update(read_training_log(os.path.join(output_dir, stage.name)))
    table = format_markdown(rows, extra_columns=[("train s/iter", "train_s_per_iter", 3)])
    table += f"\nReproduce: `{command}`\n"
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(
            {
                "rows": json_safe(rows),
                "stage_seconds": seconds,
                "total_seconds": time.perf_counter() - start,
                "command": command,
            },
            f,
            indent=2,
        )
    return table
