"""
A variants-by-seeds study: train every (variant, seed) of a distillation config with
``train_net.py``, evaluate each, and tabulate mean and spread per variant.

A variant is a set of ``MODEL.ACAMKD`` settings (the baseline is the student trained alone): an
ACAM-KD reading, or another distillation method (``METHOD``).
Runs are keyed by what they train (config, effective settings, seed, common overrides), not by
the variant's name, so a run shared by two studies (the baseline, "no mask", the full method
under the chosen objective) is trained once and reused. Every run is a resumable
:class:`~acamkd.experiments.stages.Stage`: finished runs are skipped, an interrupted one resumes.
"""

import hashlib
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from ..modeling.teacher import resolve_config_file
from ..training.checkpoint_files import write_atomically
from ..training.mask_collapse import is_collapsed, read_final_statistics
from ..training.teacher_weights import weights_sha256
from .compare import json_safe
from .stages import (
    REPO_ROOT,
    Stage,
    final_metrics,
    read_metrics,
    resolved_config_digest,
    run_side_by_side,
)

__all__ = [
    "Variant",
    "VARIANT_SETS",
    "StudySpec",
    "run_study",
    "summarize",
    "format_study_markdown",
    "plot_study",
]

logger = logging.getLogger(__name__)

# Keys of MODEL.ACAMKD that only matter where masks exist, and those that only matter where
# STCA-FF exists; a run that has no such part is keyed without them.
_MASK_KEYS = (
    "NUM_MASKS",
    "CHANNEL_MASK_FORM",
    "MASK_OBJECTIVE",
    "NORMALIZER",
    "DIVERSITY_TARGETS",
    "DIVERSITY_WEIGHT",
    "MASK_INIT_STD",
    "DICE_EPS",
    "MASK_SOURCE",
)
_FUSION_KEYS = ("QUERY_SOURCE", "QUERY_CHANNEL_RATIO", "DETACH_STUDENT_IN_MASKS")
# Keys only ACAM-KD reads (plain MSE reads LOSS_WEIGHT and ALIGN too), and the config nodes of
# the other methods: a run of one method is keyed without the others' keys.
_ACAM_ONLY_KEYS = _MASK_KEYS + _FUSION_KEYS + ("MASKS", "ATTENTION", "LOSS_WEIGHT", "ALIGN")
_MSE_KEYS = ("LOSS_WEIGHT", "ALIGN")
_METHOD_NODES = ("FGD", "MGD", "CWD", "PKD", "MASKD")
# The keys the built-in variants set. A YAML study writes each of them out with its resolved
# value, so that a run's key and command say what it trains whatever the defaults of the day
# (a run keeps its key when a default changes, and "full" under the defaults is the same run as
# the objective row that states those defaults).
_STATED_KEYS = (
    "MASKS",
    "MASK_SOURCE",
    "QUERY_SOURCE",
    "MASK_OBJECTIVE",
    "NORMALIZER",
    "DETACH_STUDENT_IN_MASKS",
)
# The headline metric per evaluator task.
_MAIN_METRIC = {"bbox": "AP", "sem_seg": "mIoU"}


@dataclass(frozen=True)
class Variant:
    """
    One row of a study.

    Attributes:
        name (str): its row name.
        acam (dict[str, str]): ``MODEL.ACAMKD`` settings (key without the prefix, value as on
            the command line), on top of the study's common settings.
        student_only (bool): train the student alone (the baseline); ``acam`` is ignored.
        needs_inheritance (bool): the row only means something when the student inherits the
            teacher's FPN and head (INHERIT_TEACHER); a study whose pair does not leaves it out.
    """

    name: str
    acam: Mapping[str, str] = field(default_factory=dict)
    student_only: bool = False
    needs_inheritance: bool = False


_BASELINE = Variant("baseline", student_only=True)
_NO_MASK = Variant("no_mask", {"MASKS": "none"})
# ACAM-KD's rows in the methods study, stated in full (the defaults of the day may change).
_ACAMKD_DEFAULT = {"METHOD": "ACAMKD", "MASKS": "spatial_channel", "MASK_SOURCE": "fused"}
_ACAMKD_DEFAULT.update({"MASK_OBJECTIVE": "descend", "NORMALIZER": "sum_sq"})
_MSE = Variant("mse", {"METHOD": "MSE"})
_ACAMKD = Variant("acamkd", _ACAMKD_DEFAULT)
_ACAMKD_TEACHER_ADAPTIVE = Variant(
    "acamkd_teacher_adaptive", {**_ACAMKD_DEFAULT, "MASK_SOURCE": "teacher"}
)
VARIANT_SETS: Dict[str, Tuple[Variant, ...]] = {
    # The paper's ablation rows (RetinaNet R101 -> R50 COCO in the paper), each on top of the
    # study's common settings (e.g. the objective chosen by the "objective" study).
    "paper-ablation": (
        _BASELINE,
        _NO_MASK,
        Variant("teacher_adaptive", {"MASK_SOURCE": "teacher"}),
        Variant("channel_only", {"MASKS": "channel"}),
        Variant("spatial_only", {"MASKS": "spatial"}),
        Variant("full", {}),
        Variant("query_student", {"QUERY_SOURCE": "student"}),
    ),
    # The readings of the mask objective (see docs/METHOD.md, "masks that flee"), each stated
    # in full so that the rows mean the same whatever the defaults are.
    "objective": (
        _BASELINE,
        _NO_MASK,
        Variant("literal", {"MASK_OBJECTIVE": "descend", "NORMALIZER": "sum"}),
        Variant("ascend", {"MASK_OBJECTIVE": "ascend", "NORMALIZER": "sum"}),
        Variant("sum_sq", {"MASK_OBJECTIVE": "descend", "NORMALIZER": "sum_sq"}),
        Variant("ascend_sum_sq", {"MASK_OBJECTIVE": "ascend", "NORMALIZER": "sum_sq"}),
        Variant(
            "detach",
            {"MASK_OBJECTIVE": "descend", "NORMALIZER": "sum", "DETACH_STUDENT_IN_MASKS": "True"},
        ),
    ),
    # ACAM-KD against its rivals, each at its authors' settings for the student's family. The
    # MasKD row needs stage 1's tokens (MASKD.TOKENS in the study's --acam settings); rows of a
    # method that reads boxes (FGD) are left out of a segmentation study.
    "methods": (
        _BASELINE,
        _MSE,
        Variant("fgd", {"METHOD": "FGD"}),
        Variant("mgd", {"METHOD": "MGD"}),
        Variant("cwd", {"METHOD": "CWD"}),
        Variant("pkd", {"METHOD": "PKD"}),
        Variant("maskd", {"METHOD": "MasKD"}),
        _ACAMKD,
        _ACAMKD_TEACHER_ADAPTIVE,
    ),
    # The paper's regime (docs/REGIME.md): on a pair whose student inherits the teacher's FPN
    # and head, the inheritance alone (a distiller whose loss weighs 0) beside no KD, MSE, the
    # methods study's best rival (CWD) and ACAM-KD's two readings.
    "regime": (
        _BASELINE,
        Variant("inherit_only", {"METHOD": "MSE", "LOSS_WEIGHT": "0.0"}, needs_inheritance=True),
        _MSE,
        Variant("cwd", {"METHOD": "CWD"}),
        _ACAMKD,
        _ACAMKD_TEACHER_ADAPTIVE,
    ),
    # This project's own reading (docs/METHOD.md, "masks on a budget") beside the default
    # reading and the plain MSE it has to beat; not one of the paper's rows.
    "budget": (
        _BASELINE,
        _MSE,
        _ACAMKD,
        Variant(
            "acamkd_budget",
            {**_ACAMKD_DEFAULT, "MASK_OBJECTIVE": "ascend", "MASK_BUDGET": "0.25"},
        ),
    ),
}


def parse_variant(text: str) -> Variant:
    """
    ``"name"`` (a built-in row: baseline, no_mask, full, ...) or
    ``"name:KEY=VALUE,KEY=VALUE"`` (``MODEL.ACAMKD`` keys without the prefix).
    """
    name, _, settings = text.partition(":")
    if not settings:
        for variants in VARIANT_SETS.values():
            for v in variants:
                if v.name == name:
                    return v
        known = sorted({v.name for vs in VARIANT_SETS.values() for v in vs})
        raise ValueError(
            f"--variant {text!r}: no built-in variant of that name ({known}); write a new one "
            "as NAME:KEY=VALUE,KEY=VALUE with MODEL.ACAMKD keys, e.g. 'm4:NUM_MASKS=4'."
        )
    acam = {}
    for item in settings.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--variant {text!r}: {item!r} is not KEY=VALUE.")
        acam[key.strip().upper().removeprefix("MODEL.ACAMKD.")] = value.strip()
    return Variant(name, acam)


@dataclass
class StudySpec:
    """
    What a study trains.

    Attributes:
        config (str): the distillation config (YAML or ``.py``), relative to the repository or
            absolute.
        variants (list[Variant]): the rows.
        seeds (list[int]): every variant is trained once per seed.
        teacher_weights (str): the teacher's checkpoint given to every distilled run.
        teacher_config (str): the teacher's own config (evaluated for the table's teacher row).
        teacher_opts (list[str]): overrides of the teacher's config (its TEACHER.OPTS), applied
            when it is evaluated.
        acam (dict[str, str]): ``MODEL.ACAMKD`` settings common to every distilled variant.
        opts (list[str]): overrides of every run (teacher excluded), in the config's syntax.
        baseline_config (str): the student's config for the baseline; "" derives it from a
            YAML ``config`` (its MODEL.META_ARCHITECTURE set to the student's).
        num_gpus (int): ``--num-gpus`` of every run.
    """

    config: str
    variants: Sequence[Variant]
    seeds: Sequence[int]
    teacher_weights: str
    teacher_config: str
    teacher_opts: Sequence[str] = ()
    acam: Mapping[str, str] = field(default_factory=dict)
    opts: Sequence[str] = ()
    baseline_config: str = ""
    num_gpus: int = 1

    @property
    def is_lazy(self) -> bool:
        return self.config.endswith(".py")


def _yaml_cfg(spec: StudySpec):
    from ..modeling.teacher import get_acamkd_cfg

    cfg = get_acamkd_cfg()
    cfg.merge_from_file(os.path.join(REPO_ROOT, spec.config))
    cfg.merge_from_list(list(spec.opts))
    return cfg


def _effective_acam(spec: StudySpec, variant: Variant) -> Dict[str, str]:
    """
    The variant's MODEL.ACAMKD settings, without those its model has no use for. For a YAML
    config, every key of ``_STATED_KEYS`` and every key set by the study or the variant, with
    its resolved value in one canonical spelling ("True", "sum_sq", "0.5").
    """
    if variant.student_only:
        return {}
    acam = {**spec.acam, **variant.acam}
    if not spec.is_lazy:
        from detectron2.config import CfgNode

        node = _yaml_cfg(spec).MODEL.ACAMKD
        resolved = {k: node[k] for k in _STATED_KEYS + ("METHOD",)}
        resolved.update({k: CfgNode._decode_cfg_value(v) for k, v in acam.items()})
        acam = {k: v if isinstance(v, str) else repr(v) for k, v in resolved.items()}
    method = acam.get("METHOD", "ACAMKD")
    drop = {
        k for k in acam if k.split(".")[0] in _METHOD_NODES and k.split(".")[0] != method.upper()
    }
    if method == "ACAMKD":
        drop.add("METHOD")  # ACAM-KD runs keep the keys they had before METHOD existed
        if acam.get("MASKS") == "none":
            drop.update(_MASK_KEYS + _FUSION_KEYS)
        elif acam.get("MASK_SOURCE") == "teacher":
            drop.update(_FUSION_KEYS)
    else:
        drop.update(k for k in _ACAM_ONLY_KEYS if not (method == "MSE" and k in _MSE_KEYS))
    return {k: v for k, v in sorted(acam.items()) if k not in drop}


def _acam_opts(spec: StudySpec, acam: Mapping[str, str]) -> List[str]:
    if spec.is_lazy:
        return [f"model.acam.{k.lower()}={v}" for k, v in acam.items()]
    return [x for k, v in acam.items() for x in (f"MODEL.ACAMKD.{k}", v)]


def make_stage(spec: StudySpec, variant: Variant, seed: int) -> Stage:
    """The run of ``variant`` at ``seed``, in ``runs/<key>`` (key: a hash of what it trains)."""
    acam = _effective_acam(spec, variant)
    if variant.student_only:
        if spec.baseline_config:
            config, opts = spec.baseline_config, []
        elif spec.is_lazy:
            raise ValueError(
                "A LazyConfig study needs --baseline-config (the student's own .py config) for "
                "its baseline row."
            )
        else:
            config = spec.config
            arch = _yaml_cfg(spec).MODEL.ACAMKD.STUDENT_META_ARCHITECTURE
            opts = ["MODEL.META_ARCHITECTURE", arch]
    else:
        config = spec.config
        weights = os.path.abspath(spec.teacher_weights)
        opts = _acam_opts(spec, acam)
        opts += (
            [f"model.teacher.weights={weights}"]
            if spec.is_lazy
            else ["MODEL.ACAMKD.TEACHER.WEIGHTS", weights]
        )
    seed_opt = [f"train.seed={seed}"] if config.endswith(".py") else ["SEED", str(seed)]
    opts = [*opts, *spec.opts, *seed_opt]
    identity = json.dumps({"config": config, "opts": opts}, sort_keys=True)
    key = hashlib.sha1(identity.encode()).hexdigest()[:10]
    return Stage(os.path.join("runs", f"{key}"), config, opts, spec.num_gpus)


def applicable_variants(spec: StudySpec) -> List[Variant]:
    """
    The variants the study's config can train: a method that reads ground-truth boxes (FGD) is
    left out, with a log line, of a study that distils segmentation logits, and a row that
    measures the inheritance alone of a study whose student inherits nothing. A MasKD row
    without stage 1's tokens is an error before anything trains.
    """
    from ..modeling.methods import DISTILL_METHOD_REGISTRY

    node = None if spec.is_lazy else _yaml_cfg(spec).MODEL.ACAMKD  # resolved once
    target = "fpn" if node is None else node.DISTILL_TARGET
    kept = []
    for variant in spec.variants:
        acam = _effective_acam(spec, variant)
        method = acam.get("METHOD", "ACAMKD")
        needs_boxes = method in DISTILL_METHOD_REGISTRY and getattr(
            DISTILL_METHOD_REGISTRY.get(method), "needs_boxes", False
        )
        if needs_boxes and target != "fpn":
            logger.info(
                "Study: row %r (METHOD %s) left out: it needs ground-truth boxes, and this "
                "study distils %s.",
                variant.name,
                method,
                target,
            )
            continue
        inherits = acam.get("INHERIT_TEACHER", str(node is None or node.INHERIT_TEACHER))
        if variant.needs_inheritance and inherits.lower() != "true":
            logger.info(
                "Study: row %r left out: it measures the inheritance alone, and this study's "
                "student inherits nothing (MODEL.ACAMKD.INHERIT_TEACHER False).",
                variant.name,
            )
            continue
        tokens = acam.get("MASKD.TOKENS") or ("" if node is None else node.MASKD.TOKENS)
        if method == "MasKD" and not tokens:
            raise ValueError(
                f"Study row {variant.name!r} distils with MasKD, which needs the tokens of its "
                "first stage: train a MasKDTokenLearner config (configs/*/maskd_tokens_*.yaml) "
                "with the study's teacher, then give --acam MASKD.TOKENS=<its model_final.pth>."
            )
        kept.append(variant)
    return kept


def _mask_summary(final_stats: Mapping[str, float]) -> Dict[str, float]:
    """Mean over levels of each final mask statistic (``acam/<level>/<stat>`` scalars)."""
    names = (
        "spatial_mask_mean",
        "spatial_mask_coverage",
        "channel_mask_mean",
        "channel_mask_coverage",
        "mask_discrepancy_corr",
    )
    by_stat: Dict[str, List[float]] = {}
    for key, value in final_stats.items():
        name = key.rsplit("/", 1)[-1]
        if name in names:
            by_stat.setdefault(name, []).append(value)
    return {n: statistics.fmean(by_stat[n]) for n in names if n in by_stat}


def run_result(output_dir: str) -> Optional[Dict[str, object]]:
    """
    A finished run's final evaluation ("task", "metrics"), median train seconds per iteration,
    mean final mask statistics over levels ("masks") and whether some level's masks collapsed.
    None if the run has no evaluation yet.
    """
    for task in _MAIN_METRIC:
        metrics = final_metrics(output_dir, task)
        if metrics:
            break
    else:
        return None
    times = [r["time"] for r in read_metrics(output_dir) if "time" in r]
    final_stats = read_final_statistics(os.path.join(output_dir, "metrics.json"))
    return {
        "task": task,
        "metrics": metrics,
        "train_s_per_iter": statistics.median(times) if times else float("nan"),
        "masks": _mask_summary(final_stats),
        "collapsed": is_collapsed(final_stats),
    }


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_study(
    spec: StudySpec,
    output_dir: str,
    teacher_row: Optional[Dict] = None,
    train: bool = True,
    jobs: int = 1,
    threads: Optional[int] = None,
) -> Dict:
    """
    Train and evaluate every (variant, seed) not already finished, then write
    ``study.md``, ``study.json`` and ``study.png`` under ``output_dir``.

    Args:
        teacher_row (dict or None): the teacher's evaluation (``{"metrics": {...}}``), for the
            gap column; None evaluates ``spec.teacher_config`` with ``spec.teacher_weights``
            (no teacher row when there are no teacher weights: a baselines-only study).
        train (bool): False trains nothing and tabulates the runs finished so far.
        jobs (int): runs trained at once, each in its own process with its console output in
            ``<run>/console.log`` (1: one after the other, output on this console).
        threads (int or None): CPU threads of each of the ``jobs`` runs; None shares this
            machine's cores among them.

    Returns:
        dict: what ``study.json`` holds: "variants" (the summary rows), "runs", "teacher" and
        "seeds"; and "trained_now", the number of runs this call trained or resumed.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    os.makedirs(output_dir, exist_ok=True)
    variants = applicable_variants(spec)
    # Seed-major: a study stopped early has every variant at the same number of seeds.
    planned = [(v, s, make_stage(spec, v, s)) for s in spec.seeds for v in variants]
    unfinished = [job for job in planned if not job[2].is_finished(output_dir)]
    todo = unfinished if train else []
    finished = {stage.name for _, _, stage in planned} - {stage.name for _, _, stage in unfinished}
    logger.info(
        "Study: %d variants x %d seeds = %d runs, %d already finished.",
        len(variants),
        len(spec.seeds),
        len(planned),
        len(planned) - len(unfinished),
    )
    if teacher_row is None and spec.teacher_weights:
        teacher_row = _evaluate_teacher(spec, output_dir)
    by_name = {stage.name: (variant, seed) for variant, seed, stage in todo}
    durations: List[float] = []

    def record(stage: Stage, seconds: float) -> None:
        """Log the finished run and the ETA; rewrite the table, in case the study stops."""
        durations.append(seconds)
        finished.add(stage.name)
        variant, seed = by_name[stage.name]
        eta = statistics.fmean(durations) * (len(todo) - len(durations)) / jobs
        result = run_result(stage.output_dir(output_dir))
        if result is None:
            outcome = "no evaluation"
        else:
            name = _MAIN_METRIC[result["task"]]
            outcome = f"{result['task']}/{name} {result['metrics'].get(name, float('nan')):.2f}"
        logger.info(
            "Study [%d/%d] %s seed %d: %s in %s; ETA %s",
            len(durations),
            len(todo),
            variant.name,
            seed,
            outcome,
            _fmt_duration(seconds),
            _fmt_duration(eta),
        )
        if len(durations) < len(todo):
            _write_study(spec, output_dir, planned, finished, teacher_row, require_all=False)

    if jobs > 1:
        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        stages = [stage for _, _, stage in todo]
        run_side_by_side(stages, output_dir, jobs, threads, on_finish=record)
    else:
        for _, _, stage in todo:
            start = time.perf_counter()
            stage.run(output_dir)
            record(stage, time.perf_counter() - start)
    study = _write_study(spec, output_dir, planned, finished, teacher_row, require_all=train)
    logger.info("Study table:\n%s", study.pop("table"))
    return {**study, "trained_now": len(todo)}


def _write_study(
    spec: StudySpec,
    output_dir: str,
    jobs: Sequence,
    finished: Set[str],
    teacher_row: Optional[Dict],
    require_all: bool,
) -> Dict:
    """Tabulate the runs of ``jobs`` whose stage names are in ``finished`` into
    study.md/json/png; with ``require_all``, a finished run without an evaluation is an error
    (otherwise it is left out)."""
    runs = []
    for variant, seed, stage in jobs:
        if stage.name not in finished:
            continue
        result = run_result(stage.output_dir(output_dir))
        if result is None and require_all:
            raise RuntimeError(
                f"Run {stage.output_dir(output_dir)} ({variant.name}, seed {seed}) finished "
                "without an evaluation in its metrics.json: does its config have a test set "
                "(DATASETS.TEST / dataloader.test)?"
            )
        if result is not None:
            runs.append({"variant": variant.name, "seed": seed, "dir": stage.name, **result})
    names = [v.name for v in spec.variants if any(r["variant"] == v.name for r in runs)]
    summary = summarize(runs, names, teacher_row)
    study = {"variants": summary, "runs": runs, "teacher": teacher_row, "seeds": list(spec.seeds)}
    write_atomically(
        os.path.join(output_dir, "study.json"),
        lambda f: json.dump(json_safe(study), f, indent=1),
        "w",
    )
    table = format_study_markdown(summary, runs[0]["task"] if runs else "bbox", teacher_row)
    write_atomically(os.path.join(output_dir, "study.md"), lambda f: f.write(table), "w")
    if summary:
        plot_study(summary, teacher_row, os.path.join(output_dir, "study.png"))
    return {**study, "table": table}


def _evaluate_teacher(spec: StudySpec, output_dir: str) -> Dict:
    """The teacher's evaluation, kept in ``teacher_eval/teacher.json`` and reused while its
    weights (by SHA-256) and the config they are built with (resolved) stay the same."""
    from .compare import ModelSpec, evaluate_model  # noqa: F811

    folder = os.path.join(output_dir, "teacher_eval")
    saved = os.path.join(folder, "teacher.json")
    identity = {
        "weights_sha256": weights_sha256(spec.teacher_weights),
        "config_sha256": resolved_config_digest(
            resolve_config_file(spec.teacher_config), spec.teacher_opts
        ),
    }
    if os.path.isfile(saved):
        with open(saved) as f:
            previous = json.load(f)
        if previous.get("identity") == identity:
            logger.info("Teacher: evaluated before (%s), not again", saved)
            return previous["result"]
    result = evaluate_model(
        ModelSpec("teacher", spec.teacher_config, spec.teacher_weights, list(spec.teacher_opts)),
        output_dir=folder,
    )
    os.makedirs(folder, exist_ok=True)
    kept = {"identity": identity, "result": json_safe(result)}
    write_atomically(saved, lambda f: json.dump(kept, f, indent=1), "w")
    return result


def summarize(
    runs: Sequence[Dict], variant_names: Sequence[str], teacher_row: Optional[Dict] = None
) -> List[Dict]:
    """
    Per variant: mean and sample standard deviation over seeds of the headline metric (AP or
    mIoU), its difference to the baseline, the fraction of the teacher-baseline gap closed,
    the median train seconds per iteration and the mean final mask statistics.

    Args:
        runs (list[dict]): one per (variant, seed): "variant", "seed", "task", "metrics",
            "train_s_per_iter", "masks" (see :func:`run_result`).
        variant_names (list[str]): the rows, in order.
        teacher_row (dict or None): the teacher's "metrics".

    Returns:
        list[dict]: one per variant.
    """
    rows = []
    for name in variant_names:
        mine = [r for r in runs if r["variant"] == name]
        metric = _MAIN_METRIC[mine[0]["task"]]
        values = [float(r["metrics"][metric]) for r in mine]
        masks: Dict[str, List[float]] = {}
        for r in mine:
            for k, v in r["masks"].items():
                masks.setdefault(k, []).append(v)
        rows.append(
            {
                "variant": name,
                "metric": metric,
                "seeds": [r["seed"] for r in mine],
                "values": values,
                "mean": _mean(values),
                "std": _std(values),
                "train_s_per_iter": statistics.median(r["train_s_per_iter"] for r in mine),
                "masks": {k: statistics.fmean(v) for k, v in masks.items()},
                "collapsed": any(r["collapsed"] for r in mine),
            }
        )
    base = next((r for r in rows if r["variant"] == _BASELINE.name), None)
    teacher = None
    if teacher_row is not None and rows:
        teacher = teacher_row["metrics"].get(rows[0]["metric"])
    for row in rows:
        row["delta"] = row["mean"] - base["mean"] if base else float("nan")
        gap = (teacher - base["mean"]) if (base and teacher is not None) else float("nan")
        row["gap_closed"] = row["delta"] / gap if gap and not math.isnan(gap) else float("nan")
    return rows


def _mean(values: Sequence[float]) -> float:
    """The plain mean; NaN (an evaluation without predictions) stays NaN."""
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float:
    """The sample standard deviation (0 for one value); NaN stays NaN."""
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _c(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def format_study_markdown(rows: Sequence[Dict], task: str, teacher_row: Optional[Dict]) -> str:
    """The summary of :func:`summarize` as a Markdown table."""
    metric = _MAIN_METRIC[task]
    head = [
        "variant",
        "seeds",
        f"{metric} (mean ± std)",
        "per seed",
        "Δ baseline",
        "gap closed",
        "train s/iter",
        "spatial mean",
        "spatial cover",
        "channel mean",
        "channel cover",
        "corr(mask, D²)",
        "collapsed",
    ]
    lines = []
    if teacher_row is not None:
        lines += [f"Teacher: {metric} {_c(teacher_row['metrics'].get(metric), '.1f')}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        m = r["masks"]
        cells = [
            r["variant"],
            str(len(r["values"])),  # a study stopped early may have fewer seeds in some rows
            f"{_c(r['mean'], '.2f')} ± {_c(r['std'], '.2f')}",
            ", ".join(f"s{s} {_c(v, '.2f')}" for s, v in zip(r["seeds"], r["values"])),
            _c(r["delta"], "+.2f"),
            _c(r["gap_closed"], ".0%"),
            _c(r["train_s_per_iter"], ".3f"),
            _c(m.get("spatial_mask_mean"), ".3g"),
            _c(m.get("spatial_mask_coverage"), ".2f"),
            _c(m.get("channel_mask_mean"), ".3g"),
            _c(m.get("channel_mask_coverage"), ".2f"),
            _c(m.get("mask_discrepancy_corr"), "+.2f"),
            "yes" if r["collapsed"] else ("no" if m else "-"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_study(rows: Sequence[Dict], teacher_row: Optional[Dict], path: str) -> None:
    """A bar chart of the headline metric per variant, error bars one std over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.6), dpi=110)
    xs = range(len(rows))
    colors = ["#d62728" if r["collapsed"] else "#1f77b4" for r in rows]
    ax.bar(xs, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color=colors)
    for x, r in zip(xs, rows):
        ax.plot([x] * len(r["values"]), r["values"], "k.", markersize=4)
    metric = rows[0]["metric"] if rows else ""
    if teacher_row is not None and metric in teacher_row["metrics"]:
        ax.axhline(teacher_row["metrics"][metric], color="gray", ls="--", label="teacher")
        ax.legend(loc="lower right")
    ax.set_xticks(list(xs), [r["variant"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    lows = [min(r["values"]) for r in rows]
    if lows:
        ax.set_ylim(bottom=max(0.0, min(lows) - 3))
    ax.set_title("red: masks collapsed in at least one seed", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
