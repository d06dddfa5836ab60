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

``impl="before"`` measures the implementation this project had before issue 16: STCA-FF through
the fused SDPA kernels with the value split into heads (``MODEL.ACAMKD.ATTENTION sdpa``) and the
teacher under ``torch.no_grad`` instead of ``torch.inference_mode``. Both in one idle window
give the before and after of one change.
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

from .modeling.meta_arch.distiller import _FEATURE_MODULE, ACAMDistiller, _capture_output
from .modeling.teacher import get_acamkd_cfg

__all__ = ["IMPLS", "benchmark_step", "build_benchmark_cfg", "synthetic_batch", "format_report"]

IMPLS = ("after", "before")
PARTS = ("student_step", "teacher_forward", "distill_step")


def build_benchmark_cfg(
    config_file: str, opts: Sequence[str] = (), device: str = "cpu", impl: str = "after"
) -> CfgNode:
    """
    The distiller config of ``config_file`` with random weights on ``device``.

    Args:
        config_file (str): a distillation YAML config (``MODEL.META_ARCHITECTURE ACAMDistiller``).
        opts (list[str]): KEY VALUE overrides, applied last.
        device (str): "cpu" or "cuda".
        impl (str): "after" (the config as it is) or "before" (``MODEL.ACAMKD.ATTENTION sdpa``;
            the teacher's ``no_grad`` forward is set up by :func:`benchmark_step`).

    Returns:
        CfgNode: frozen.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(
        ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "MODEL.ACAMKD.TEACHER.WEIGHTS", ""]
        + ["MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT", "True"]
    )
    if impl == "before":
        cfg.merge_from_list(["MODEL.ACAMKD.ATTENTION", "sdpa"])
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
    impl: str = "after",
    rounds: int = 2,
    repeats: int = 2,
    warmup: int = 1,
    amp: str = "none",
    opts: Sequence[str] = (),
    seed: int = 0,
    levels: bool = True,
) -> Dict[str, object]:
    """
    Time a distillation step against its floor (the student's step plus the teacher's forward)
    and break ACAM's part down per level.

    Args:
        config_file (str): distillation YAML config.
        batch (int): images per step.
        height, width (int): image size (padded by the model to its size divisibility).
        device (str): "cpu" or "cuda".
        impl (str): "after" (this implementation) or "before" (see the module docstring).
        rounds (int): interleaved rounds; each runs every part ``repeats`` times.
        repeats (int): timed runs of each part per round.
        warmup (int): untimed runs of each part before the first round.
        amp (str): "none", "fp16" or "bf16": the steps run under ``torch.autocast``.
        opts (list[str]): config overrides (KEY VALUE ...).
        seed (int): seed of the weights and the synthetic batch.
        levels (bool): also time ACAM per level.

    Returns:
        dict: the settings, per part the times (s) and their median, ``floor_s``,
        ``ratio`` (distill_step / floor), ``acam_overhead_s``, per level the grid and the
        median forward and backward times, per part the peak memory growth (MB), the losses
        of the last distillation step, and the environment (torch, device, threads, load).
    """
    if amp not in ("none", "fp16", "bf16"):
        raise ValueError(f"amp must be 'none', 'fp16' or 'bf16', got {amp!r}")
    # The detectors and the distiller log to detectron2's event storage, as under a trainer.
    with EventStorage(0):
        return _benchmark_step(
            config_file,
            batch,
            height,
            width,
            device,
            impl,
            rounds,
            repeats,
            warmup,
            amp,
            opts,
            seed,
            levels,
        )


def _benchmark_step(
    config_file: str,
    batch: int,
    height: int,
    width: int,
    device: str,
    impl: str,
    rounds: int,
    repeats: int,
    warmup: int,
    amp: str,
    opts: Sequence[str],
    seed: int,
    levels: bool,
) -> Dict[str, object]:
    torch.manual_seed(seed)
    cfg = build_benchmark_cfg(config_file, opts, device, impl)
    dev = torch.device(device)
    model = build_model(cfg)
    model.train()
    if impl == "before":
        model.teacher_features = types.MethodType(_teacher_features_no_grad, model)
    inputs = synthetic_batch(cfg, batch, height, width, seed=seed, device=device)

    student_params = [p for p in model.student.parameters() if p.requires_grad]
    distill_params = [p for p in model.parameters() if p.requires_grad]
    student_opt = torch.optim.SGD(student_params, lr=0.0, momentum=0.9)
    distill_opt = torch.optim.SGD(distill_params, lr=0.0, momentum=0.9)
    last_losses: Dict[str, float] = {}

    def student_step() -> None:
        student_opt.zero_grad(set_to_none=True)
        with _autocast(dev, amp):
            losses = model.student(inputs)
        sum(losses.values()).backward()
        student_opt.step()

    padded_hw, level_inputs = _probe(model, inputs, levels)

    def teacher_forward() -> None:
        with _autocast(dev, amp):
            model.teacher_features(inputs, padded_hw)

    def distill_step() -> None:
        distill_opt.zero_grad(set_to_none=True)
        with _autocast(dev, amp):
            losses = model(inputs)
        sum(losses.values()).backward()
        distill_opt.step()
        last_losses.clear()
        last_losses.update({k: float(v.detach()) for k, v in losses.items()})

    level_fns = {
        name: _level_runner(model.acam[name], t, s, dev, amp)
        for name, (t, s) in level_inputs.items()
    }

    parts: Dict[str, Callable[[], None]] = {
        "student_step": student_step,
        "teacher_forward": teacher_forward,
        "distill_step": distill_step,
    }
    for fn in parts.values():
        for _ in range(warmup):
            fn()
    for run in level_fns.values():
        for _ in range(warmup):
            run()
    _sync(dev)

    baseline = _PeakMemory.current_mb(dev)
    memory = _PeakMemory(dev, baseline)
    times: Dict[str, List[float]] = {name: [] for name in parts}
    peaks: Dict[str, float] = {name: -math.inf for name in parts}
    level_times: Dict[str, Dict[str, List[float]]] = {
        name: {"forward": [], "backward": []} for name in level_fns
    }
    for _ in range(rounds):
        for name, fn in parts.items():
            for _ in range(repeats):
                with memory.measure() as mem:
                    times[name].append(_timed(fn, dev))
                peaks[name] = max(peaks[name], mem["growth_mb"])
        for name, run in level_fns.items():
            for _ in range(repeats):
                fwd, bwd = run()
                level_times[name]["forward"].append(fwd)
                level_times[name]["backward"].append(bwd)

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    floor = medians["student_step"] + medians["teacher_forward"]
    level_report = {}
    for name, (t, _) in level_inputs.items():
        fwd = statistics.median(level_times[name]["forward"])
        bwd = statistics.median(level_times[name]["backward"])
        level_report[name] = {
            "shape": list(t.shape),
            "N": int(t.shape[-2] * t.shape[-1]),
            "forward_s": fwd,
            "backward_s": bwd,
            "total_s": fwd + bwd,
        }
    fusion = next((m.fusion for m in model.acam.values() if m.fusion is not None), None)
    return {
        "config": config_file,
        "opts": list(opts),
        "impl": impl,
        "attention": fusion.attention_impl(dev) if fusion is not None else None,
        "teacher_mode": "no_grad" if impl == "before" else "inference_mode",
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
        "rounds": rounds,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "times_s": times,
        "median_s": medians,
        "floor_s": floor,
        "ratio": medians["distill_step"] / floor,
        "acam_overhead_s": medians["distill_step"] - floor,
        "levels": level_report,
        "levels_total_s": sum(r["total_s"] for r in level_report.values()),
        "memory_baseline_mb": baseline,
        "peak_memory_growth_mb": peaks,
        "memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "sampled RSS",
        "losses": last_losses,
        "losses_finite": all(math.isfinite(v) for v in last_losses.values()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # The machine may be shared: the load at the end of the run, for context.
        "loadavg_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


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
    level: nn.Module, teacher: Tensor, student: Tensor, device: torch.device, amp: str
) -> Callable[[], tuple]:
    """One ACAM level: returns a function timing its forward and its backward."""

    def run() -> tuple:
        level.zero_grad(set_to_none=True)
        student.grad = None
        holder = {}

        def forward() -> None:
            with _autocast(device, amp):
                holder["loss"] = sum(level(teacher, student).losses.values())

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
