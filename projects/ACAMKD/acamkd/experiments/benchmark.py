"""
The cost of a distillation step against its floor, in one process (``tools/benchmark_step.py``).

The floor of a distillation step is the student's own training step plus the teacher's forward
pass; what the distillation step takes beyond it is ACAM's cost. :func:`benchmark_step` builds
the distiller of a YAML config with random weights (``MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT``),
feeds it synthetic images and boxes, and times, in interleaved rounds so that a change in the
machine's load hits every part alike:

* ``student_step``: the student alone, forward, backward and an optimiser step;
* ``teacher_forward``: :meth:`ACAMDistiller.teacher_features` on the same images;
* ``distill_step``: the distiller's training forward, backward and an optimiser step;
* per distilled level, ACAM's forward and its backward (to the level's inputs) on the
  features of this batch.

The optimiser is SGD with momentum and learning rate 0: every step costs what a training step
costs, and the weights, hence the computation, stay the same from step to step.

Peak memory is the growth over the memory in use once the model and the batch exist: on CUDA
``torch.cuda.max_memory_allocated``, on the CPU the resident set size sampled every 2 ms by a
thread (``/proc/self/statm``), which the allocator's caching of freed memory may understate
for the parts measured after a larger one.

``"before"`` is the implementation this project had before issue 16: STCA-FF through the fused
SDPA kernels with the value split into heads (``MODEL.ACAMKD.ATTENTION sdpa``) and the teacher
under ``torch.no_grad`` instead of ``torch.inference_mode``; ``"after"`` is the code as it is.
Given both, one model runs both, switched in place, and every round times the shared student
step once and each implementation's teacher forward, distillation step and levels in turn: the
machine's speed, which varies between processes on a shared virtual machine, is then the same
for both.

Any other implementation name is a distillation method (``MODEL.ACAMKD.METHOD``: "MSE",
"FGD", ...): its level modules are built for the same levels and widths and swapped into the
same distiller, so every method is timed on the same student, teacher and batch, interleaved.
"""

import contextlib
import math
import os
import platform
import resource
import statistics
import threading
import time
import types
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ..modeling.meta_arch.distiller import (
    _FEATURE_MODULE,
    ACAMDistiller,
    _capture_output,
    _level_context,
)
from ..modeling.methods import DISTILL_METHOD_REGISTRY, LevelContext, build_distill_method
from ..modeling.teacher import get_acamkd_cfg

__all__ = ["IMPLS", "benchmark_step", "build_benchmark_cfg", "synthetic_batch", "format_report"]

IMPLS = ("after", "before")
PARTS = ("student_step", "teacher_forward", "distill_step")


def build_benchmark_cfg(config_file: str, opts: Sequence[str] = (), device: str = "cpu") -> CfgNode:
    """
    The distiller config of ``config_file`` with random weights on ``device``.

    Args:
        config_file (str): a distillation YAML config (``MODEL.META_ARCHITECTURE ACAMDistiller``).
        opts (list[str]): KEY VALUE overrides, applied last.
        device (str): "cpu" or "cuda".

    Returns:
        CfgNode: frozen.
    """
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(
        ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "MODEL.ACAMKD.TEACHER.WEIGHTS", ""]
        + ["MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT", "True"]
    )
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.META_ARCHITECTURE != "ACAMDistiller":
        raise ValueError(
            f"{config_file} is not a distillation config (MODEL.META_ARCHITECTURE is "
            f"{cfg.MODEL.META_ARCHITECTURE!r}, not 'ACAMDistiller')"
        )
    cfg.freeze()
    return cfg


def synthetic_batch(
    cfg: CfgNode,
    batch: int,
    height: int,
    width: int,
    boxes_per_image: int = 8,
    seed: int = 0,
    device: str = "cpu",
) -> List[Dict[str, object]]:
    """
    Random images with random boxes (and, for a segmentation student, random labels), in the
    per-image dict format of detectron2's training loaders.

    Args:
        cfg (CfgNode): the distiller config (for the number of classes).
        batch (int): images.
        height, width (int): image size; the model pads it to its size divisibility.
        boxes_per_image (int): ground-truth boxes per image.
        seed (int): seed of a generator local to this call.
        device (str): where the tensors are put.

    Returns:
        list[dict]: "image" (3, H, W) uint8, "height", "width", and "instances" (gt_boxes,
        gt_classes) or "sem_seg" (H, W) int64.
    """
    gen = torch.Generator().manual_seed(seed)
    segmentation = cfg.MODEL.ACAMKD.DISTILL_TARGET == "sem_seg_logits"
    num_classes = (
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        if segmentation
        else min(cfg.MODEL.RETINANET.NUM_CLASSES, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    )
    inputs = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8)
        record: Dict[str, object] = {"image": image.to(device), "height": height, "width": width}
        if segmentation:
            labels = torch.randint(0, num_classes, (height, width), generator=gen)
            record["sem_seg"] = labels.to(device)
        else:
            xy = torch.rand(boxes_per_image, 2, generator=gen) * torch.tensor([width, height])
            wh = (0.05 + 0.45 * torch.rand(boxes_per_image, 2, generator=gen)) * torch.tensor(
                [width, height]
            )
            x1y1 = torch.minimum(xy, torch.tensor([width, height]) - wh)
            boxes = torch.cat([x1y1, x1y1 + wh], dim=1)
            instances = Instances((height, width))
            instances.gt_boxes = Boxes(boxes.to(device))
            instances.gt_classes = torch.randint(
                0, num_classes, (boxes_per_image,), generator=gen
            ).to(device)
            record["instances"] = instances
        inputs.append(record)
    return inputs


def _teacher_features_no_grad(
    self: ACAMDistiller, batched_inputs: List[Dict[str, object]], padded_hw: tuple
) -> Dict[str, Tensor]:
    """ACAMDistiller.teacher_features as it was before issue 16: under ``torch.no_grad``."""
    with torch.no_grad():
        images = self._teacher_images(batched_inputs, padded_hw)
        if self.distill_target == "fpn":
            return self.teacher.backbone(images)
        with _capture_output(self.teacher.sem_seg_head.predictor) as record:
            self.teacher.sem_seg_head(self.teacher.backbone(images))
        return self._as_dict(record["output"])


def _method_levels(cfg: CfgNode, model: ACAMDistiller, device, methods: Sequence[str]):
    """Per distillation method, its level modules for the distiller's levels and widths."""
    out = {}
    for method in methods:
        mcfg = cfg.clone()
        mcfg.defrost()
        mcfg.MODEL.ACAMKD.METHOD = method
        out[method] = nn.ModuleDict(
            {
                name: build_distill_method(
                    mcfg,
                    teacher_channels=level.teacher_channels,
                    student_channels=level.student_channels,
                )
                for name, level in model.acam.items()
            }
        ).to(device)
    return out


@contextlib.contextmanager
def _implementation(
    model: ACAMDistiller, impl: str, methods: Dict[str, nn.ModuleDict]
) -> Iterator[None]:
    """Run ``model`` as ``impl`` ("after": as built; "before": see the module docstring; a
    method name: with that method's level modules in place of the distiller's)."""
    if impl in methods:
        built = model.acam
        model.acam = methods[impl]
        try:
            yield
        finally:
            model.acam = built
        return
    fusions = [m.fusion for m in model.acam.values() if getattr(m, "fusion", None) is not None]
    attentions = [f.attention for f in fusions]
    if impl == "before":
        for fusion in fusions:
            fusion.attention = "sdpa"
        model.teacher_features = types.MethodType(_teacher_features_no_grad, model)
    try:
        yield
    finally:
        for fusion, attention in zip(fusions, attentions):
            fusion.attention = attention
        model.__dict__.pop("teacher_features", None)


class _PeakMemory:
    """Peak memory growth of a block: CUDA allocator statistics, or sampled RSS on the CPU."""

    def __init__(self, device: torch.device, baseline_mb: float) -> None:
        self.device = device
        self.baseline_mb = baseline_mb

    @staticmethod
    def current_mb(device: torch.device) -> float:
        if device.type == "cuda":
            return torch.cuda.memory_allocated(device) / 2**20
        return _rss_mb()

    @contextlib.contextmanager
    def measure(self) -> Iterator[Dict[str, float]]:
        result: Dict[str, float] = {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield result
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            samples = [_rss_mb()]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.002):
                    samples.append(_rss_mb())

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            try:
                yield result
            finally:
                stop.set()
                thread.join()
            samples.append(_rss_mb())
            peak = max(samples)
        result["peak_mb"] = peak
        result["growth_mb"] = peak - self.baseline_mb


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux: the process's peak so far (KiB on Linux/BSD)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def benchmark_step(
    config_file: str,
    batch: int = 2,
    height: int = 640,
    width: int = 640,
    device: str = "cpu",
    impls: Sequence[str] = ("after",),
    rounds: int = 2,
    repeats: int = 2,
    warmup: int = 1,
    amp: str = "none",
    opts: Sequence[str] = (),
    seed: int = 0,
    levels: bool = True,
) -> Dict[str, Dict[str, object]]:
    """
    Time a distillation step against its floor (the student's step plus the teacher's forward)
    and break ACAM's part down per level, for one or several implementations interleaved.

    Args:
        config_file (str): distillation YAML config.
        batch (int): images per step.
        height, width (int): image size (padded by the model to its size divisibility).
        device (str): "cpu" or "cuda".
        impls (list[str]): among "after" (this implementation), "before" (see the module
            docstring) and names of distillation methods ("MSE", "FGD", ...), timed in turn
            within every round.
        rounds (int): interleaved rounds; each runs every part ``repeats`` times.
        repeats (int): timed runs of each part per round.
        warmup (int): untimed runs of each part before the first round.
        amp (str): "none", "fp16" or "bf16": the steps run under ``torch.autocast``.
        opts (list[str]): config overrides (KEY VALUE ...).
        seed (int): seed of the weights and the synthetic batch.
        levels (bool): also time ACAM per level.

    Returns:
        dict: per implementation, a dict with the settings, per part the times (s) and their
        median (the student step's are shared), ``floor_s``, ``ratio`` (distill_step / floor),
        ``acam_overhead_s``, per level the grid and the median forward and backward times, per
        part the peak memory growth (MB), the losses of the last distillation step, and the
        environment (torch, device, threads, load).
    """
    if amp not in ("none", "fp16", "bf16"):
        raise ValueError(f"amp must be 'none', 'fp16' or 'bf16', got {amp!r}")
    impls = list(dict.fromkeys(impls))
    known = IMPLS + tuple(name for name, _ in DISTILL_METHOD_REGISTRY)
    if not impls or any(impl not in known for impl in impls):
        raise ValueError(f"impls must be among {sorted(known)}, got {impls}")
    torch.manual_seed(seed)
    cfg = build_benchmark_cfg(config_file, opts, device)
    dev = torch.device(device)
    # The detectors and the distiller log to detectron2's event storage, as under a trainer.
    with EventStorage(0):
        model = build_model(cfg)
        model.train()
        methods = _method_levels(cfg, model, dev, [i for i in impls if i not in IMPLS])
        inputs = synthetic_batch(cfg, batch, height, width, seed=seed, device=device)
        padded_hw, level_inputs = _probe(model, inputs, levels)
        context = _level_context(inputs, padded_hw)
        steps = _Steps(model, inputs, padded_hw, dev, amp)
        level_fns = {}
        for impl in impls:
            modules = methods.get(impl, model.acam)
            level_fns[impl] = {
                name: _level_runner(modules[name], t, s, dev, amp, context)
                for name, (t, s) in level_inputs.items()
            }
        runs = {impl: _ImplRuns(impl, list(level_inputs)) for impl in impls}
        for _ in range(warmup):
            steps.student_step()
            for impl in impls:
                with _implementation(model, impl, methods):
                    steps.teacher_forward()
                    steps.distill_step()
                    for run in level_fns[impl].values():
                        run()
        _sync(dev)

        memory = _PeakMemory(dev, _PeakMemory.current_mb(dev))
        student = runs[impls[0]]
        for _ in range(rounds):
            student.time("student_step", steps.student_step, repeats, memory, dev)
            for impl in impls:
                with _implementation(model, impl, methods):
                    runs[impl].time("teacher_forward", steps.teacher_forward, repeats, memory, dev)
                    runs[impl].time("distill_step", steps.distill_step, repeats, memory, dev)
                    runs[impl].losses = dict(steps.last_losses)
                    for name, run in level_fns[impl].items():
                        for _ in range(repeats):
                            runs[impl].add_level(name, *run())
                    runs[impl].attention = _attention_impl(model, dev)
        for impl in impls[1:]:  # one student step, shared
            runs[impl].times["student_step"] = student.times["student_step"]
            runs[impl].peaks["student_step"] = student.peaks["student_step"]

    settings = {
        "config": config_file,
        "opts": list(opts),
        "amp": amp,
        "device": str(dev),
        "device_name": (
            torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "batch": batch,
        "height": height,
        "width": width,
        "padded_hw": list(padded_hw),
        "interleaved_with": impls,
        "rounds": rounds,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "memory_baseline_mb": memory.baseline_mb,
        "memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "sampled RSS",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # The machine may be shared: the load at the end of the run, for context.
        "loadavg_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return {impl: {**settings, **runs[impl].summary(level_inputs)} for impl in impls}


class _Steps:
    """The timed parts of a step on one model and batch; SGD with learning rate 0."""

    def __init__(
        self,
        model: ACAMDistiller,
        inputs: List[Dict[str, object]],
        padded_hw: tuple,
        device: torch.device,
        amp: str,
    ) -> None:
        self.model, self.inputs, self.padded_hw = model, inputs, padded_hw
        self.device, self.amp = device, amp
        student_params = [p for p in model.student.parameters() if p.requires_grad]
        self.student_opt = torch.optim.SGD(student_params, lr=0.0, momentum=0.9)
        # One optimiser per set of level modules swapped in (see _implementation).
        self.distill_opts: Dict[int, torch.optim.Optimizer] = {}
        self.last_losses: Dict[str, float] = {}

    def student_step(self) -> None:
        self.student_opt.zero_grad(set_to_none=True)
        with _autocast(self.device, self.amp):
            losses = self.model.student(self.inputs)
        sum(losses.values()).backward()
        self.student_opt.step()

    def teacher_forward(self) -> None:
        with _autocast(self.device, self.amp):
            self.model.teacher_features(self.inputs, self.padded_hw)

    def distill_step(self) -> None:
        key = id(self.model.acam)
        if key not in self.distill_opts:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.distill_opts[key] = torch.optim.SGD(params, lr=0.0, momentum=0.9)
        optimizer = self.distill_opts[key]
        optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, self.amp):
            losses = self.model(self.inputs)
        sum(losses.values()).backward()
        optimizer.step()
        self.last_losses = {k: float(v.detach()) for k, v in losses.items()}


class _ImplRuns:
    """The times, peak memory and last losses measured for one implementation."""

    def __init__(self, impl: str, level_names: List[str]) -> None:
        self.impl = impl
        self.times: Dict[str, List[float]] = {name: [] for name in PARTS}
        self.peaks: Dict[str, float] = {name: -math.inf for name in PARTS}
        self.levels = {name: {"forward": [], "backward": []} for name in level_names}
        self.losses: Dict[str, float] = {}
        self.attention = None

    def time(
        self,
        part: str,
        fn: Callable[[], None],
        repeats: int,
        memory: "_PeakMemory",
        device: torch.device,
    ) -> None:
        for _ in range(repeats):
            with memory.measure() as mem:
                self.times[part].append(_timed(fn, device))
            self.peaks[part] = max(self.peaks[part], mem["growth_mb"])

    def add_level(self, name: str, forward_s: float, backward_s: float) -> None:
        self.levels[name]["forward"].append(forward_s)
        self.levels[name]["backward"].append(backward_s)

    def summary(self, level_inputs: Dict[str, tuple]) -> Dict[str, object]:
        medians = {name: statistics.median(ts) for name, ts in self.times.items()}
        floor = medians["student_step"] + medians["teacher_forward"]
        levels = {}
        for name, (t, _) in level_inputs.items():
            fwd = statistics.median(self.levels[name]["forward"])
            bwd = statistics.median(self.levels[name]["backward"])
            levels[name] = {
                "shape": list(t.shape),
                "N": int(t.shape[-2] * t.shape[-1]),
                "forward_s": fwd,
                "backward_s": bwd,
                "total_s": fwd + bwd,
            }
        return {
            "impl": self.impl,
            "attention": self.attention,
            "teacher_mode": "no_grad" if self.impl == "before" else "inference_mode",
            "times_s": self.times,
            "median_s": medians,
            "floor_s": floor,
            "ratio": medians["distill_step"] / floor,
            "acam_overhead_s": medians["distill_step"] - floor,
            "levels": levels,
            "levels_total_s": sum(r["total_s"] for r in levels.values()),
            "peak_memory_growth_mb": self.peaks,
            "losses": self.losses,
            "losses_finite": all(math.isfinite(v) for v in self.losses.values()),
        }


def _attention_impl(model: ACAMDistiller, device: torch.device):
    """STCA-FF's attention path on ``device`` ("chunked", "sdpa"), None without STCA-FF."""
    fusions = (getattr(m, "fusion", None) for m in model.acam.values())
    fusion = next((f for f in fusions if f is not None), None)
    return fusion.attention_impl(device) if fusion is not None else None


def _probe(
    model: ACAMDistiller, inputs: List[Dict[str, object]], levels: bool
) -> Tuple[tuple, Dict[str, tuple]]:
    """
    The student's padded image size for ``inputs`` and, if ``levels``, per distilled level the
    teacher feature and a leaf copy of the student feature (requiring grad).
    """
    feature_module = model.student.get_submodule(_FEATURE_MODULE[model.distill_target])
    with torch.no_grad(), _capture_output(model.student.backbone) as images, _capture_output(
        feature_module
    ) as record:
        model.student(inputs)
    padded_hw = tuple(images["input"].shape[-2:])
    if not levels:
        return padded_hw, {}
    student = model._as_dict(record["output"])
    teacher = model.teacher_features(inputs, padded_hw)
    pairs = {}
    for name in model.acam:
        t, s = teacher[name], student[name]
        if model.distill_target == "sem_seg_logits":
            t, s = model._to_common_grid(t, s)
        pairs[name] = (t.detach().clone(), s.detach().clone().requires_grad_(True))
    return padded_hw, pairs


def _level_runner(
    level: nn.Module,
    teacher: Tensor,
    student: Tensor,
    device: torch.device,
    amp: str,
    context: LevelContext,
) -> Callable[[], tuple]:
    """One level's module: returns a function timing its forward and its backward."""

    def run() -> tuple:
        level.zero_grad(set_to_none=True)
        student.grad = None
        holder = {}

        def forward() -> None:
            with _autocast(device, amp):
                holder["loss"] = sum(level(teacher, student, context=context).losses.values())

        fwd = _timed(forward, device)
        bwd = _timed(lambda: holder.pop("loss").backward(), device)
        return fwd, bwd

    return run


def format_report(result: Dict[str, object]) -> str:
    """A plain-text summary of :func:`benchmark_step`'s result."""
    med = result["median_s"]
    lines = [
        f"{os.path.basename(str(result['config']))}  impl={result['impl']} "
        f"(attention {result['attention']}, teacher {result['teacher_mode']})  "
        f"{result['device']}  amp={result['amp']}  batch {result['batch']} at "
        f"{result['width']}x{result['height']} (padded {result['padded_hw'][1]}x"
        f"{result['padded_hw'][0]})",
        f"{'part':<16} {'median s':>9} {'peak mem +MB':>13}",
    ]
    for name in PARTS:
        lines.append(f"{name:<16} {med[name]:>9.3f} {result['peak_memory_growth_mb'][name]:>13.0f}")
    lines.append(
        f"floor (student step + teacher forward) {result['floor_s']:.3f} s; distill / floor "
        f"= {result['ratio']:.3f}; ACAM overhead {result['acam_overhead_s']:.3f} s"
    )
    if result["levels"]:
        lines.append(f"{'level':<8} {'N':>7} {'fwd s':>8} {'bwd s':>8}")
        for name, r in result["levels"].items():
            lines.append(f"{name:<8} {r['N']:>7} {r['forward_s']:>8.3f} {r['backward_s']:>8.3f}")
        lines.append(f"ACAM levels forward+backward: {result['levels_total_s']:.3f} s")
    if not result["losses_finite"]:
        lines.append("warning: non-finite losses (random weights); the timings still stand")
    return "\n".join(lines)
