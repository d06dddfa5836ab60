"""
Compare models on one dataset: accuracy, size, compute and speed in one table.

Each model is a config (YAML or LazyConfig ``.py``, a path or a detectron2 model-zoo name) plus
a checkpoint. A distiller is measured as what it deploys, its student alone: a distiller
checkpoint or an exported student both load into it. Every model is evaluated on the same
dataset with the evaluator its ``evaluator_type`` selects, so the numbers are comparable:

- detection: AP, AP50, AP75, APs, APm, APl (COCO box AP, in percent);
- semantic segmentation: mIoU and pACC (in percent);
- parameters (millions) of the deployed model;
- GFLOPs on the first test image, counted by fvcore as detectron2's ``tools/analyze_model.py``
  does (``FlopCountAnalysis``; one multiply-add counts as one flop);
- inference seconds per image over the whole test set (the first batches excluded as warm-up,
  as in detectron2's ``inference_on_dataset``), at the test resolution of the model's config.
"""

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import LazyConfig, instantiate
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis

from ..config import get_acamkd_cfg
from ..lazy import build_dataset_evaluator
from ..modeling import ACAMDistiller
from ..modeling.teacher import resolve_config_file
from ..training.checkpointer import DistillationCheckpointer, load_checkpoint

__all__ = [
    "ModelSpec",
    "compare_models",
    "evaluate_model",
    "format_markdown",
    "json_safe",
    "METRICS",
]

logger = logging.getLogger(__name__)

# The columns per task, in the order of the table; keys of the evaluators' results.
METRICS = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl"],
    "sem_seg": ["mIoU", "pACC"],
}


@dataclass
class ModelSpec:
    """
    One model of a comparison.

    Attributes:
        name (str): its name in the table ("teacher", "baseline", "acamkd", ...).
        config (str): a YAML or ``.py`` config, a path or a detectron2 model-zoo name.
        weights (str): its checkpoint: a local path, a detectron2:// or an https:// URL.
        overrides (list[str]): applied to the config in its own syntax: KEY VALUE pairs for a
            YAML, "key=value" strings for a ``.py``.
    """

    name: str
    config: str
    weights: str
    overrides: List[str] = field(default_factory=list)


class _Timed(nn.Module):
    """Wraps a model and records the wall time and the number of images of every call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls: List[tuple] = []

    def forward(self, inputs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = self.model(inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.calls.append((time.perf_counter() - start, len(inputs)))
        return outputs

    def seconds_per_image(self) -> float:
        warmup = min(5, len(self.calls) - 1)  # as detectron2's inference_on_dataset
        timed = self.calls[warmup:]
        return sum(t for t, _ in timed) / max(1, sum(n for _, n in timed))


def _build(spec: ModelSpec, dataset: Optional[str], device: str):
    """The model (on ``device``, nothing loaded yet), its test loader and dataset name."""
    path = resolve_config_file(spec.config, key=f"--model {spec.name} CONFIG")
    if path.endswith(".py"):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(path), list(spec.overrides))
        if dataset:
            cfg.dataloader.test.dataset.names = dataset
        model = instantiate(cfg.model).to(device)
        return model, instantiate(cfg.dataloader.test), cfg.dataloader.test.dataset.names
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(spec.overrides))
    cfg.MODEL.DEVICE = device
    if dataset:
        cfg.DATASETS.TEST = (dataset,)
    cfg.freeze()
    name = cfg.DATASETS.TEST[0]
    return build_model(cfg), build_detection_test_loader(cfg, name), name


def _dataset_name(names) -> str:
    if isinstance(names, str):
        return names
    names = list(names)
    if len(names) != 1:
        raise ValueError(f"The test set is {names}; a comparison uses one dataset (--dataset).")
    return names[0]


def _gflops(model: nn.Module, inputs: list) -> Optional[float]:
    """fvcore's count on one image; None (with a warning) when the model cannot be traced."""
    try:
        flops = FlopCountAnalysis(model, inputs)
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with torch.no_grad():
            return flops.total() / 1e9
    except Exception as e:  # tracing fails on some control flow; the rest of the row is valid
        logger.warning("Could not count the FLOPs of %s: %s", type(model).__name__, e)
        return None


def evaluate_model(
    spec: ModelSpec, *, dataset: Optional[str] = None, device: str = "cpu", output_dir: str
) -> Dict[str, object]:
    """
    Build one model, load its weights and measure it (see the module docstring).

    Args:
        spec (ModelSpec): the model.
        dataset (str or None): the dataset to evaluate on; None: the config's test set.
        device (str): "cpu" or "cuda".
        output_dir (str): the evaluator writes under ``{output_dir}/{spec.name}``.

    Returns:
        dict: "name", "config", "weights", "dataset", "task" ("bbox" or "sem_seg"),
        "metrics" (dict[str, float]), "params_m", "gflops" (None if not countable),
        "seconds_per_image" and "images".
    """
    if not spec.weights:
        raise ValueError(f"--model {spec.name}: no weights given; pass its checkpoint.")
    model, loader, names = _build(spec, dataset, device)
    # The student alone is measured: a teacher-less checkpoint's teacher is not reloaded.
    checkpointer = DistillationCheckpointer(model, restore_teacher=False)
    load_checkpoint(checkpointer, spec.weights, key=f"the WEIGHTS of --model {spec.name}")
    if isinstance(model, ACAMDistiller):
        model = model.student  # what the distiller deploys
    model.eval()
    name = _dataset_name(names)

    timed = _Timed(model).eval()  # inference_on_dataset restores this mode afterwards
    evaluator = build_dataset_evaluator(name, os.path.join(output_dir, spec.name))
    results = inference_on_dataset(timed, loader, evaluator)
    task = next((t for t in METRICS if t in results), None)
    if task is None:
        raise ValueError(
            f"--model {spec.name}: the evaluator of {name!r} gave {sorted(results)}; expected "
            f"one of {sorted(METRICS)}."
        )
    first = next(iter(loader))[:1]
    return {
        "name": spec.name,
        "config": spec.config,
        "weights": spec.weights,
        "dataset": name,
        "task": task,
        "metrics": {k: float(results[task][k]) for k in METRICS[task] if k in results[task]},
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": _gflops(model, first),
        "seconds_per_image": timed.seconds_per_image(),
        "images": sum(n for _, n in timed.calls),
    }


def _cell(value: Optional[float], digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_markdown(
    rows: Sequence[Dict[str, object]], extra_columns: Sequence[Tuple[str, str, int]] = ()
) -> str:
    """
    The rows of :func:`compare_models` as a Markdown table.

    Args:
        rows (list[dict]): what :func:`evaluate_model` returns, all of one task.
        extra_columns (list[tuple[str, str, int]]): more columns at the end, as (header, row
            key, decimals), e.g. ``("train s/iter", "train_s_per_iter", 3)``.

    Returns:
        str: the table, with a heading line naming the dataset.
    """
    task = rows[0]["task"]
    head = ["model", "config"] + METRICS[task] + ["params (M)", "GFLOPs", "s / image"]
    head += [header for header, _, _ in extra_columns]
    lines = [
        f"Dataset: `{rows[0]['dataset']}` ({rows[0]['images']} images)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for row in rows:
        cells = [str(row["name"]), f"`{os.path.basename(str(row['config']))}`"]
        cells += [_cell(row["metrics"].get(k), 1) for k in METRICS[task]]
        cells += [
            _cell(row["params_m"], 1),
            _cell(row["gflops"], 1),
            _cell(row["seconds_per_image"], 3),
        ]
        cells += [_cell(row.get(key), digits) for _, key, digits in extra_columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def json_safe(value):
    """``value`` with NaN floats (also nested in dicts and lists) replaced by None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def compare_models(
    specs: Sequence[ModelSpec],
    *,
    dataset: Optional[str] = None,
    device: str = "cpu",
    output_dir: str = "./output/compare",
) -> List[Dict[str, object]]:
    """
    Evaluate every model on the same dataset and write ``comparison.md`` and
    ``comparison.json`` (NaN metrics, e.g. APs without small objects, become null) to
    ``output_dir``.

    Args:
        specs (list[ModelSpec]): the models, in the order of the table.
        dataset (str or None): the dataset; None: the test set of the first model's config.
        device (str): "cpu" or "cuda".
        output_dir (str): where the table and the evaluators' files go.

    Returns:
        list[dict]: one row per model, see :func:`evaluate_model`.
    """
    if not specs:
        raise ValueError("Nothing to compare: give at least one model.")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Model names must be unique, got {names}.")
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    for spec in specs:
        rows.append(evaluate_model(spec, dataset=dataset, device=device, output_dir=output_dir))
        if rows[-1]["task"] != rows[0]["task"]:
            raise ValueError(
                f"--model {spec.name} gives {rows[-1]['task']} results but --model "
                f"{rows[0]['name']} gives {rows[0]['task']}: they cannot share a table."
            )
        if dataset is None:
            dataset = rows[0]["dataset"]
            logger.info("Every model is evaluated on %s, the first config's test set.", dataset)
    table = format_markdown(rows)
    with open(os.path.join(output_dir, "comparison.md"), "w") as f:
        f.write(table)
    with open(os.path.join(output_dir, "comparison.json"), "w") as f:
        json.dump(json_safe(rows), f, indent=2)
    logger.info("Comparison on %s:\n%s", rows[0]["dataset"], table)
    return rows
