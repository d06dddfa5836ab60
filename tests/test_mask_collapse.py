"""
The mask-collapse guard: the rule on streams of statistics shaped like the runs measured in this
project (collapsing and healthy), the study-table helpers on a metrics.json, and the hook in a
fake storage and a real YAML trainer run; both engines register it, with the other project
hooks, in the same places.
"""

import json
import logging
import random
from types import SimpleNamespace
from typing import Dict, List

import pytest
import torch
from omegaconf import OmegaConf

from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper
from detectron2.engine import PeriodicWriter, SimpleTrainer
from detectron2.modeling import build_model
from detectron2.solver import get_default_optimizer_params
from detectron2.utils.events import EventStorage
from fvcore.common.param_scheduler import ConstantParamScheduler

from acamkd import DistillationTrainer
from acamkd.training import lazy_train
from acamkd.training.hooks import ACAMStatsPrinter, MaskCollapseHook, MaskVisualizationHook
from acamkd.training.mask_collapse import (
    COLLAPSE_LOW,
    MaskCollapseGuard,
    collapsed_levels,
    is_collapsed,
    is_collapsed_mean,
    level_statistics,
    read_final_statistics,
)

from tiny_models import distill_cfg, register_tiny_dataset

LEVELS = ("p3", "p4", "p5", "p6", "p7")
KINDS = ("spatial", "channel")


def _stats(means: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """{"p3": {"spatial": m, "channel": m}} -> flat acam/<level>/... scalars as logged."""
    out = {}
    for level, kinds in means.items():
        for kind, mean in kinds.items():
            out[f"acam/{level}/{kind}_mask_mean"] = mean
            out[f"acam/{level}/{kind}_mask_coverage"] = float(mean > 0.5)
            out[f"acam/{level}/{kind}_mask_dice"] = 0.9
        out[f"acam/{level}/mask_discrepancy_corr"] = -0.6
        out[f"acam/{level}/loss_acam_spatial"] = 0.1
    out["total_loss"] = 1.0  # not an ACAM statistic: ignored
    return out


def _interp(start: float, end: float, t: float) -> float:
    """Geometric interpolation, as a sigmoid mask's mean decays."""
    return start * (end / start) ** t


# The former RetinaNet demo's ACAM-KD run, literal reading (README, docs/METHOD.md): at the end
# the spatial means are 9e-18 (p3), 2e-26 (p4), 3e-4 .. 1e-3 (p5-p7); channel 2e-12 (p3), 2e-7
# (p4), 0.5 (p5-p7).
DEMO_END = {
    "p3": {"spatial": 9e-18, "channel": 2e-12},
    "p4": {"spatial": 2e-26, "channel": 2e-7},
    "p5": {"spatial": 3e-4, "channel": 0.5},
    "p6": {"spatial": 6e-4, "channel": 0.5},
    "p7": {"spatial": 1e-3, "channel": 0.5},
}


def _demo_stream(num_checks: int = 9) -> List[Dict[str, float]]:
    """180 iterations logged every 20: from 0.5 to the demo's final means."""
    stream = []
    for i in range(num_checks):
        t = (i + 1) / num_checks
        means = {
            level: {kind: _interp(0.5, end, t) for kind, end in kinds.items()}
            for level, kinds in DEMO_END.items()
        }
        stream.append(_stats(means))
    return stream


def _run(guard: MaskCollapseGuard, stream: List[Dict[str, float]], period: int = 20):
    for i, stats in enumerate(stream):
        guard.update((i + 1) * period - 1, stats, final=i == len(stream) - 1)
    return [(c.level, c.kind) for c in guard.reported]


def test_rule_bounds():
    for collapsed in (9e-18, 2e-26, 3e-4, 1e-3, 1e-4, 0.006, 0.995):
        assert is_collapsed_mean(collapsed)
    for healthy in (0.3, 0.32, 0.45, 0.5, 0.6, COLLAPSE_LOW, 0.99):
        assert not is_collapsed_mean(healthy)
    assert not is_collapsed_mean(float("nan"))


def test_demo_collapse_warns_exactly_once_per_level_and_kind():
    records = []
    log = logging.getLogger("test_mask_collapse.demo")
    handler = _ListHandler(records)
    log.addHandler(handler)
    try:
        reported = _run(MaskCollapseGuard(log=log), _demo_stream())
    finally:
        log.removeHandler(handler)
    expected = {(level, "spatial") for level in LEVELS} | {("p3", "channel"), ("p4", "channel")}
    assert sorted(reported) == sorted(expected)  # each once, channel p5-p7 (0.5) never
    assert len(records) == len(expected)
    assert all(r.levelno == logging.WARNING for r in records)
    p3 = next(r.getMessage() for r in records if "level p3" in r.getMessage())
    for switch in ("NORMALIZER sum_sq", "MASK_OBJECTIVE ascend", "DETACH_STUDENT_IN_MASKS True"):
        assert switch in p3
    assert "docs/METHOD.md" in p3 and "consecutive checks" in p3


def test_collapse_fires_during_training_not_only_at_the_end():
    guard = MaskCollapseGuard(patience=3)
    collapsed = _stats({"p3": {"spatial": 1e-4, "channel": 0.5}})
    healthy = _stats({"p3": {"spatial": 0.4, "channel": 0.5}})
    assert guard.update(19, healthy) == []
    assert guard.update(39, collapsed) == []
    assert guard.update(59, collapsed) == []
    fired = guard.update(79, collapsed)
    assert [(c.level, c.kind, c.checks, c.final) for c in fired] == [("p3", "spatial", 3, False)]
    for it in range(99, 400, 20):  # stays collapsed: never again
        assert guard.update(it, collapsed) == []
    assert guard.update(399, collapsed, final=True) == []
    assert len(guard.reported) == 1


def test_short_segmentation_run_warns_at_its_end():
    # 40 iterations, logged every 20: spatial 0.45 -> 0.006 (segmentation, 19 masks on logits).
    guard = MaskCollapseGuard()
    assert guard.update(19, _stats({"logits": {"spatial": 0.2, "channel": 0.33}})) == []
    fired = guard.update(39, _stats({"logits": {"spatial": 0.006, "channel": 0.32}}), final=True)
    assert [(c.level, c.kind, c.final) for c in fired] == [("logits", "spatial", True)]
    assert "at the end of training" in fired[0].message


def test_segmentation_demo_spatial_collapse_channel_healthy():
    guard = MaskCollapseGuard()
    stream = [
        _stats({"logits": {"spatial": _interp(0.5, 1e-4, (i + 1) / 9), "channel": 0.32}})
        for i in range(9)
    ]
    assert _run(guard, stream) == [("logits", "spatial")]


def test_healthy_stream_stays_silent():
    rng = random.Random(0)
    guard = MaskCollapseGuard()
    stream = [
        _stats(
            {
                level: {"spatial": rng.uniform(0.3, 0.6), "channel": rng.uniform(0.3, 0.6)}
                for level in LEVELS
            }
        )
        for _ in range(200)
    ]
    assert _run(guard, stream) == []


def test_one_noisy_period_is_not_a_collapse_and_recovery_resets():
    guard = MaskCollapseGuard(patience=3)
    low = _stats({"p5": {"spatial": 0.005}})
    ok = _stats({"p5": {"spatial": 0.4}})
    for it, stats in enumerate([low, low, ok, low, ok, low, low, ok]):
        assert guard.update(it, stats) == []
    assert guard.update(100, ok, final=True) == []


def test_saturated_masks_collapse_too():
    guard = MaskCollapseGuard(patience=2)
    full = _stats({"p3": {"spatial": 0.5, "channel": 0.999}})
    guard.update(0, full)
    fired = guard.update(1, full)
    assert [(c.level, c.kind) for c in fired] == [("p3", "channel")]
    assert "alike" in fired[0].message


def test_message_names_only_the_switches_not_yet_set():
    stats = _stats({"p3": {"spatial": 1e-5}})
    settings = {"NORMALIZER": "sum_sq", "MASK_OBJECTIVE": "descend"}
    guard = MaskCollapseGuard(patience=1, settings=settings)
    message = guard.update(0, stats)[0].message
    assert "NORMALIZER sum_sq (" not in message and "MASK_OBJECTIVE ascend" in message
    assert "This run: NORMALIZER sum_sq, MASK_OBJECTIVE descend" in message
    all_set = {"NORMALIZER": "sum_sq", "MASK_OBJECTIVE": "ascend", "DETACH_STUDENT_IN_MASKS": True}
    message = MaskCollapseGuard(patience=1, settings=all_set).update(0, stats)[0].message
    assert "are all set already" in message


def test_bad_arguments():
    with pytest.raises(ValueError, match="patience"):
        MaskCollapseGuard(patience=0)
    with pytest.raises(ValueError, match="low < high"):
        MaskCollapseGuard(low=0.5, high=0.5)


def test_collapsed_levels_and_final_statistics_of_a_metrics_json(tmp_path):
    first = _stats({level: {"spatial": 0.5, "channel": 0.5} for level in LEVELS})
    last = _stats(DEMO_END)
    path = tmp_path / "metrics.json"
    with open(path, "w") as f:
        for record in (first, last, {"bbox/AP": 0.3, "iteration": 179}):
            f.write(json.dumps(dict(record, iteration=1)) + "\n")
    final = read_final_statistics(str(path))
    assert final["acam/p3/spatial_mask_mean"] == 9e-18 and "bbox/AP" not in final
    assert collapsed_levels(final) == {
        "p3": ("spatial", "channel"),
        "p4": ("spatial", "channel"),
        "p5": ("spatial",),
        "p6": ("spatial",),
        "p7": ("spatial",),
    }
    assert collapsed_levels(first) == {}
    assert collapsed_levels({"total_loss": 1.0}) == {}  # a plain detector, the no-mask row
    assert collapsed_levels({"acam/p3/spatial_mask_mean": 0.2}, low=0.25) == {"p3": ("spatial",)}
    assert is_collapsed(final) and not is_collapsed(first) and not is_collapsed({})
    # The study keeps per-level statistics as "<level>/<name>": the same rule applies.
    per_level = {k.split("/", 1)[1]: v for k, v in final.items()}
    assert collapsed_levels(per_level) == collapsed_levels(final) and is_collapsed(per_level)
    assert level_statistics({"acam/p3/spatial_mask_mean": 0.4, "lr": 0.1, "p4/x": True}) == {
        "p3": {"spatial_mask_mean": 0.4}
    }


def test_rule_is_importable_from_the_hooks_module():
    from acamkd.training import hooks

    assert hooks.is_collapsed is is_collapsed and hooks.collapsed_levels is collapsed_levels


class _ListHandler(logging.Handler):
    def __init__(self, records: list) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _attach(name: str, records: list) -> logging.Handler:
    handler = _ListHandler(records)
    logging.getLogger(name).addHandler(handler)
    return handler


def test_hook_reads_the_event_storage():
    hook = MaskCollapseHook(period=20)
    trainer = SimpleNamespace(iter=0, max_iter=180, model=torch.nn.Linear(1, 1))
    hook.trainer = trainer
    hook.before_train()
    assert hook.guard.settings == {}  # not a distiller: nothing known about its switches
    records = []
    handler = _attach("detectron2.utils.events", records)
    try:
        with EventStorage(0) as storage:
            trainer.storage = storage
            for it in range(180):
                storage.iter = trainer.iter = it
                t = (it + 1) / 180
                means = {
                    level: {k: _interp(0.5, end, t) for k, end in kinds.items()}
                    for level, kinds in DEMO_END.items()
                }
                storage.put_scalars(**_stats(means))
                hook.after_step()
    finally:
        logging.getLogger("detectron2.utils.events").removeHandler(handler)
    reported = [(c.level, c.kind) for c in hook.guard.reported]
    expected = {(level, "spatial") for level in LEVELS} | {("p3", "channel"), ("p4", "channel")}
    assert sorted(reported) == sorted(expected)
    assert sum("mask collapse" in r.getMessage() for r in records) == len(expected)
    # Checks fall on the logging period: every report is at an iteration 20k - 1.
    assert all((c.iteration + 1) % 20 == 0 for c in hook.guard.reported)


def test_hook_fires_in_a_real_trainer_run(tmp_path):
    register_tiny_dataset("tiny_collapse_train", str(tmp_path / "images"))
    cfg = distill_cfg("RetinaNet", extra=["MODEL.ACAMKD.NORMALIZER", "sum_sq"])
    cfg.merge_from_list(
        ["DATASETS.TRAIN", ("tiny_collapse_train",), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH"]
        + ["2", "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1"]
        + ["OUTPUT_DIR", str(tmp_path / "out"), "SEED", "1", "SOLVER.CHECKPOINT_PERIOD", "100"]
    )
    trainer = DistillationTrainer(cfg)
    trainer.resume_or_load(resume=False)
    hooks = [h for h in trainer._hooks if isinstance(h, MaskCollapseHook)]
    assert len(hooks) == 1
    hook = hooks[0]
    # Three iterations cannot collapse masks that start at 0.5: declare 0.5 out of bounds, so
    # the hook's wiring (storage keys, levels, once per level) is what is tested.
    hook.low, hook.period, hook.patience = 0.6, 1, 2
    records = []
    handler = _attach("detectron2.utils.events", records)
    try:
        trainer.train()
    finally:
        logging.getLogger("detectron2.utils.events").removeHandler(handler)
    reported = [(c.level, c.kind) for c in hook.guard.reported]
    assert sorted(reported) == sorted((level, kind) for level in LEVELS for kind in KINDS)
    assert {c.iteration for c in hook.guard.reported} == {1}  # second check, patience 2
    assert hook.guard.settings == {
        "NORMALIZER": "sum_sq",
        "MASK_OBJECTIVE": "descend",
        "DETACH_STUDENT_IN_MASKS": False,
    }
    messages = [r.getMessage() for r in records if "mask collapse" in r.getMessage()]
    assert len(messages) == 10 and not any("NORMALIZER sum_sq (" in m for m in messages)


def _tiny_distiller():
    return build_model(distill_cfg("RetinaNet"))


def _project_hooks(hooks) -> list:
    """The hooks of acamkd.training.common.with_project_hooks among ``hooks``, by kind: the
    figure (with its period and dataset), the table's writer (its period), the collapse guard
    (its period); detectron2's writer as "writer", so their order shows."""
    out = []
    for h in hooks:
        if isinstance(h, MaskVisualizationHook):
            out.append(("figure", h._period, h._dataset))
        elif isinstance(h, PeriodicWriter):
            kinds = {type(w) for w in h._writers}
            out.append(("table", h._period) if kinds == {ACAMStatsPrinter} else ("writer",))
        elif isinstance(h, MaskCollapseHook):
            out.append(("collapse", h.period))
    return out


def test_yaml_and_lazy_engines_register_the_same_project_hooks(tmp_path, monkeypatch):
    register_tiny_dataset("tiny_engines_train", str(tmp_path / "images"))
    cfg = distill_cfg("RetinaNet")
    cfg.merge_from_list(
        ["DATASETS.TRAIN", ("tiny_engines_train",), "DATASETS.TEST", (), "VIS_PERIOD", "5"]
        + ["OUTPUT_DIR", str(tmp_path / "yaml"), "SOLVER.IMS_PER_BATCH", "2"]
    )
    yaml_hooks = _project_hooks(DistillationTrainer(cfg)._hooks)

    registered = []

    def fake_train(self, start_iter, max_iter):
        registered.extend(self._hooks)

    monkeypatch.setattr(SimpleTrainer, "train", fake_train)
    lazy_cfg = OmegaConf.create(
        {
            "model": L(_tiny_distiller)(),
            "optimizer": L(torch.optim.SGD)(params=L(get_default_optimizer_params)(), lr=0.1),
            "dataloader": {
                "train": [],
                "test": {
                    "dataset": {"names": ["tiny_engines_train"]},
                    "mapper": L(DatasetMapper)(
                        is_train=False, augmentations=[], image_format="BGR"
                    ),
                },
            },
            "lr_multiplier": L(ConstantParamScheduler)(value=1.0),
            "train": {
                "output_dir": str(tmp_path / "lazy"),
                "init_checkpoint": "",
                "max_iter": 10,
                "amp": {"enabled": False},
                "ddp": {},
                "checkpointer": {"period": 5, "max_to_keep": 1},
                "eval_period": 0,
                "log_period": 20,  # DefaultTrainer's
                "vis_period": 5,
                "device": "cpu",
            },
        }
    )
    lazy_train.do_train(lazy_cfg)
    lazy_hooks = _project_hooks(registered)
    # The figure before detectron2's writer (which writes it), the table right after it.
    expected = [("figure", 5, "tiny_engines_train"), ("writer",), ("table", 20), ("collapse", 20)]
    assert yaml_hooks == lazy_hooks == expected

    # The periods follow the config: train.log_period, and no figure without train.vis_period.
    registered.clear()
    lazy_cfg.train.log_period = 7
    del lazy_cfg.train["vis_period"]
    lazy_train.do_train(lazy_cfg)
    assert _project_hooks(registered) == [("writer",), ("table", 7), ("collapse", 7)]
