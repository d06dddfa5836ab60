"""The distillation meta-architecture: a frozen teacher, a trained student, one distillation
method's module (ACAM-KD by default) per level."""

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.config import CfgNode, configurable
from detectron2.layers import ASPP
from detectron2.modeling import META_ARCH_REGISTRY, build_model

from ...training.teacher_weights import TeacherWeights
from ..methods import LevelContext, LevelOutput, build_distill_method
from ..methods.common import current_storage
from ..teacher import build_frozen_teacher, build_teacher_cfg, teacher_weights_from_cfg

__all__ = ["ACAMDistiller", "DistillOutput", "build_student_cfg"]

logger = logging.getLogger(__name__)

_DISTILL_TARGETS = ("fpn", "sem_seg_logits")
# The module whose output is distilled, per target. For logits it is the head's final 1x1
# classifier: its output is at the head's stride, before upsampling to the image.
_FEATURE_MODULE = {"fpn": "backbone", "sem_seg_logits": "sem_seg_head.predictor"}
# The teacher's submodules that run to compute it: their weights must load (TEACHER.STRICT).
_TEACHER_PARTS_USED = {"fpn": ("backbone",), "sem_seg_logits": ("backbone", "sem_seg_head")}
_LOGITS = "logits"


@dataclass
class DistillOutput:
    """
    What :meth:`ACAMDistiller.distill` returns.

    Attributes:
        student (Any): the student's own output: in training its dict[str, Tensor] of task
            losses, in eval its predictions (detectron2's list of per-image dicts).
        levels (dict[str, LevelOutput]): distilled level name ("p3", ..., or "logits") -> the
            level's distillation losses, statistics and, if asked for, masks.
    """

    student: Any
    levels: Dict[str, LevelOutput]

    def total_losses(self) -> Dict[str, Tensor]:
        """The student's task losses plus each distillation loss summed over the levels."""
        losses = dict(self.student)
        for out in self.levels.values():
            for name, value in out.losses.items():
                losses[name] = losses[name] + value if name in losses else value
        return losses


def build_student_cfg(cfg: CfgNode) -> CfgNode:
    """The student's plain detectron2 config: ``cfg`` with the student's meta-architecture."""
    scfg = cfg.clone()
    scfg.defrost()
    scfg.MODEL.META_ARCHITECTURE = cfg.MODEL.ACAMKD.STUDENT_META_ARCHITECTURE
    scfg.freeze()
    return scfg


@contextlib.contextmanager
def _capture_output(module: nn.Module) -> Iterator[Dict[str, object]]:
    """Record ``module``'s first input and its output while the context is open."""
    record: Dict[str, object] = {}

    def hook(_module, inputs, output):
        record["input"] = inputs[0]
        record["output"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


@META_ARCH_REGISTRY.register()
class ACAMDistiller(nn.Module):
    """
    Wraps a frozen teacher and a trained student (RetinaNet, GeneralizedRCNN, FCOS, RepPoints
    or SemanticSegmentor) and adds one distillation module per distilled level: an
    :class:`ACAMLevel` by default, or any method of
    :data:`~acamkd.modeling.methods.DISTILL_METHOD_REGISTRY` (``MODEL.ACAMKD.METHOD``).

    Training returns the student's own losses plus the method's (for ACAM-KD
    ``loss_acam_{channel,spatial,diversity}``), summed over levels and already weighted;
    per-level losses and statistics go to the event storage under ``acam/<level>/...``. Eval
    returns exactly the student's outputs.

    Building it reads no weights: :class:`~acamkd.training.checkpointer.DistillationCheckpointer`
    loads the teacher's (:attr:`teacher_weights`) and applies the inheritance strategy when a
    run starts without a distiller checkpoint.
    """

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        acam: nn.ModuleDict,
        distill_target: str = "fpn",
        student_input_format: str = "BGR",
        teacher_input_format: str = "BGR",
        logits_grid: str = "student",
        inherit_teacher: bool = False,
    ):
        """
        Args:
            student (nn.Module): a detectron2 meta-architecture, trained.
            teacher (nn.Module): a detectron2 meta-architecture, frozen here.
            acam (nn.ModuleDict): one method module (e.g. :class:`ACAMLevel`) per distilled
                level name ("p3", ..., or "logits").
            distill_target (str): "fpn" or "sem_seg_logits".
            student_input_format, teacher_input_format (str): "BGR" or "RGB" (INPUT.FORMAT of
                each); the images given to the forward are in the student's format.
            logits_grid (str): for "sem_seg_logits", resample both logits to the "teacher" or
                "student" grid when their strides differ.
            inherit_teacher (bool): the paper's inheritance strategy: once the teacher's
                weights are loaded, the checkpointer copies its FPN and head weights into the
                student where names and shapes match.
        """
        super().__init__()
        if distill_target not in _DISTILL_TARGETS:
            raise ValueError(
                f"MODEL.ACAMKD.DISTILL_TARGET={distill_target!r}; "
                f"expected one of {_DISTILL_TARGETS}"
            )
        if logits_grid not in ("teacher", "student"):
            raise ValueError(
                f"MODEL.ACAMKD.LOGITS_GRID={logits_grid!r}; expected 'teacher' or 'student'"
            )
        self.student = student
        self.teacher = teacher
        self.acam = acam
        self.distill_target = distill_target
        self.student_input_format = student_input_format
        self.teacher_input_format = teacher_input_format
        self.logits_grid = logits_grid
        _check_tasks(student, teacher, distill_target)
        _check_method_task(acam, distill_target)
        _check_levels(student, teacher, list(acam.keys()), distill_target)
        _check_channels(student, teacher, acam, distill_target)
        self.inherit_teacher = inherit_teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    @classmethod
    def from_config(cls, cfg: CfgNode):
        scfg = build_student_cfg(cfg)
        tcfg = build_teacher_cfg(cfg)
        # Before anything is built or loaded: a teacher of another task fails here.
        _check_tasks(
            scfg.MODEL.META_ARCHITECTURE,
            tcfg.MODEL.META_ARCHITECTURE,
            cfg.MODEL.ACAMKD.DISTILL_TARGET,
            cfg.MODEL.ACAMKD.TEACHER.CONFIG_FILE,
        )
        student = build_model(scfg)
        teacher = build_frozen_teacher(tcfg, teacher_weights_from_cfg(cfg))
        target = cfg.MODEL.ACAMKD.DISTILL_TARGET
        if target == "fpn":
            levels = _shared_levels(student, teacher, list(cfg.MODEL.ACAMKD.IN_FEATURES))
            t_shapes, s_shapes = teacher.backbone.output_shape(), student.backbone.output_shape()
            channels = {k: (t_shapes[k].channels, s_shapes[k].channels) for k in levels}
        else:
            _check_teacher_crop(scfg, tcfg, teacher)
            t_classes = tcfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
            s_classes = scfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
            if t_classes != s_classes:
                raise ValueError(
                    f"Teacher predicts {t_classes} classes and student {s_classes} "
                    "(MODEL.SEM_SEG_HEAD.NUM_CLASSES): logits distillation needs the same classes. "
                    "Give a teacher trained on the student's classes, or set the student's "
                    "MODEL.SEM_SEG_HEAD.NUM_CLASSES to the teacher's."
                )
            channels = {_LOGITS: (t_classes, s_classes)}
        acam = nn.ModuleDict(
            {
                k: build_distill_method(cfg, teacher_channels=ct, student_channels=cs)
                for k, (ct, cs) in channels.items()
            }
        )
        return {
            "student": student,
            "teacher": teacher,
            "acam": acam,
            "distill_target": target,
            "student_input_format": scfg.INPUT.FORMAT,
            "teacher_input_format": tcfg.INPUT.FORMAT,
            "logits_grid": cfg.MODEL.ACAMKD.LOGITS_GRID,
            "inherit_teacher": cfg.MODEL.ACAMKD.INHERIT_TEACHER,
        }

    @property
    def device(self) -> torch.device:
        return self.student.device

    @property
    def teacher_weights(self) -> Optional[TeacherWeights]:
        """Where the checkpointer loads the teacher from; None for a teacher that was not
        built by ``build_frozen_teacher`` or ``build_lazy_teacher``."""
        return getattr(self.teacher, "acamkd_weights", None)

    @property
    def teacher_parts_used(self) -> Tuple[str, ...]:
        """
        The teacher's submodules whose weights distillation reads, which must load from its
        checkpoint (see :func:`~acamkd.training.teacher_weights.load_teacher_weights`): the
        backbone (with the FPN), also ``sem_seg_head`` for logits; with the inheritance
        strategy, which copies its FPN and heads, also "", the whole teacher.
        """
        parts = _TEACHER_PARTS_USED[self.distill_target]
        return parts + ("",) if self.inherit_teacher else parts

    def train(self, mode: bool = True) -> "ACAMDistiller":
        """Like ``nn.Module.train``, but the teacher stays in eval mode (BN statistics frozen)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, batched_inputs: List[Dict[str, object]]):
        """
        Args:
            batched_inputs (list[dict]): detectron2's per-image dicts, as for the student.

        Returns:
            In training, dict[str, Tensor] of already-weighted losses. In eval, the student's
            outputs, unchanged.
        """
        if not self.training:
            return self.student(batched_inputs)
        outputs = self.distill(batched_inputs)
        self._log_stats(outputs.levels)
        return outputs.total_losses()

    def distill(
        self, batched_inputs: List[Dict[str, object]], return_masks: bool = False
    ) -> DistillOutput:
        """
        Run the student (in training with its task losses) and the teacher, then the
        distillation method on every level.

        Args:
            return_masks (bool): keep each level's masks and maps in its output.
        """
        feature_module = self.student.get_submodule(_FEATURE_MODULE[self.distill_target])
        with _capture_output(self.student.backbone) as images, _capture_output(
            feature_module
        ) as student_record:
            student_output = self.student(batched_inputs)
        padded_hw = tuple(images["input"].shape[-2:])
        student_features = self._as_dict(student_record["output"])
        teacher_features = self.teacher_features(batched_inputs, padded_hw)
        context = _level_context(batched_inputs, padded_hw)
        levels: Dict[str, LevelOutput] = {}
        for level, acam in self.acam.items():
            t, s = teacher_features[level], student_features[level]
            if self.distill_target == "sem_seg_logits":
                t, s = self._to_common_grid(t, s)
            elif t.shape[-2:] != s.shape[-2:]:
                raise ValueError(
                    f"FPN level {level!r}: teacher grid {tuple(t.shape[-2:])} != student grid "
                    f"{tuple(s.shape[-2:])} for padded images of size {padded_hw}. The two "
                    "backbones pad or stride differently; use the same FPN strides and "
                    "size divisibility for both."
                )
            levels[level] = acam(t, s, context=context, return_masks=return_masks)
            # Logged with the mask statistics; they name the culprit when a loss is not finite.
            levels[level].stats["teacher_feature_absmax"] = t.detach().abs().amax()
            levels[level].stats["student_feature_absmax"] = s.detach().abs().amax()
        return DistillOutput(student=student_output, levels=levels)

    @torch.no_grad()
    def distill_features(self, batched_inputs: List[Dict[str, object]]) -> Dict[str, LevelOutput]:
        """
        The distillation method on every level, with its masks, for images without annotations
        (visualisation): the student runs its inference path, so neither its task losses nor
        ground truth are needed (a method that reads boxes gets them where the inputs have
        them), and its normalisation layers use their running statistics.

        Returns:
            dict[str, LevelOutput]: level name -> the level's output, masks included.
        """
        was_training = self.student.training
        self.student.eval()
        try:
            return self.distill(batched_inputs, return_masks=True).levels
        finally:
            self.student.train(was_training)

    def teacher_features(
        self, batched_inputs: List[Dict[str, object]], padded_hw: tuple
    ) -> Dict[str, Tensor]:
        """
        The teacher's features for the distilled levels, from images normalised with its own
        pixel mean/std and input format and padded like the student's.

        The teacher runs under ``torch.inference_mode`` (no autograd bookkeeping at all, a
        little cheaper than ``no_grad``). Its outputs are cloned outside that mode: the ACAM
        losses take them as constants, but the projections that read them (STCA-FF's query)
        save their input for the backward, which inference tensors forbid.

        Args:
            padded_hw (tuple[int, int]): the student's padded image size.

        Returns:
            dict[str, Tensor]: level name -> (B, C, H, W), not requiring grad.
        """
        with torch.inference_mode():
            images = self._teacher_images(batched_inputs, padded_hw)
            if self.distill_target == "fpn":
                features = self.teacher.backbone(images)
            else:
                with _capture_output(self.teacher.sem_seg_head.predictor) as record:
                    self.teacher.sem_seg_head(self.teacher.backbone(images))
                features = self._as_dict(record["output"])
        return {name: x.clone() for name, x in features.items()}

    def _teacher_images(self, batched_inputs, padded_hw) -> Tensor:
        teacher = self.teacher
        divisibility = teacher.backbone.size_divisibility
        if divisibility > 1 and (padded_hw[0] % divisibility or padded_hw[1] % divisibility):
            raise ValueError(
                f"The student pads images to {padded_hw}, which the teacher's backbone cannot "
                f"take (its size_divisibility is {divisibility}). Give the student a backbone "
                "whose size divisibility is a multiple of the teacher's."
            )
        images = []
        for x in batched_inputs:
            image = x["image"].to(teacher.pixel_mean.device).float()
            if self.teacher_input_format != self.student_input_format:
                image = image.flip(0)  # BGR <-> RGB
            image = (image - teacher.pixel_mean) / teacher.pixel_std
            h, w = image.shape[-2:]
            images.append(F.pad(image, (0, padded_hw[1] - w, 0, padded_hw[0] - h)))
        return torch.stack(images)

    def _to_common_grid(self, teacher: Tensor, student: Tensor):
        if teacher.shape[-2:] == student.shape[-2:]:
            return teacher, student
        size = (teacher if self.logits_grid == "teacher" else student).shape[-2:]
        return tuple(
            F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for x in (teacher, student)
        )

    @staticmethod
    def _as_dict(features) -> Dict[str, Tensor]:
        return features if isinstance(features, dict) else {_LOGITS: features}

    def _log_stats(self, outputs: Dict[str, LevelOutput]) -> None:
        storage = current_storage()
        if storage is None:
            return
        scalars = {}
        for level, out in outputs.items():
            for name, value in out.stats.items():
                scalars[f"acam/{level}/{name}"] = float(value)
            for name, value in out.losses.items():
                scalars[f"acam/{level}/{name}"] = float(value.detach())
        # Each level's part of the total distillation loss (all levels, all three terms): the shares
        # sum to 1 and show which level and which term drive the distillation.
        losses = {
            (level, name): scalars[f"acam/{level}/{name}"]
            for level, out in outputs.items()
            for name in out.losses
        }
        total = sum(losses.values())
        if total > 0:
            for (level, name), value in losses.items():
                scalars[
                    f"acam/{level}/share_{name.removeprefix('loss_acam_').removeprefix('loss_')}"
                ] = (value / total)
        storage.put_scalars(**scalars)


def _level_context(batched_inputs: List[Dict[str, object]], padded_hw: tuple) -> LevelContext:
    """The image sizes and, where the inputs carry them, the ground-truth boxes of a batch."""
    sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
    boxes = None
    if all("instances" in x for x in batched_inputs):
        boxes = [x["instances"].gt_boxes.tensor for x in batched_inputs]
    return LevelContext(padded_hw=tuple(padded_hw), image_sizes=sizes, gt_boxes=boxes)


def _check_method_task(levels: nn.ModuleDict, target: str) -> None:
    """A method that reads ground-truth boxes (``needs_boxes``) distils detection FPN levels."""
    for module in levels.values():
        if getattr(module, "needs_boxes", False) and target != "fpn":
            raise ValueError(
                f"The distillation method {type(module).__name__} needs each image's "
                "ground-truth boxes at each FPN level's stride, which a semantic-segmentation "
                f"student (MODEL.ACAMKD.DISTILL_TARGET {target!r}) does not have: choose "
                "another MODEL.ACAMKD.METHOD (MSE, MGD, CWD, PKD, MasKD or ACAMKD)."
            )


def _check_teacher_crop(scfg: CfgNode, tcfg: CfgNode, teacher: nn.Module) -> None:
    """
    A DeepLab head with INPUT.CROP enabled builds its ASPP image pooling with a fixed kernel,
    ``INPUT.CROP.SIZE / output stride`` (a global pool on its own training crops), and then runs
    only on feature grids that kernel divides. The distiller feeds the teacher the student's
    (padded) training images, so a teacher with such a head must have the student's crop.

    Args:
        scfg (CfgNode): the student's config.
        tcfg (CfgNode): the teacher's config.
        teacher (nn.Module): the teacher built from ``tcfg``.

    Raises:
        ValueError: naming the override that fixes it.
    """
    kernels = [
        tuple(m.pool_kernel_size)
        for m in teacher.sem_seg_head.modules()
        if isinstance(m, ASPP) and m.pool_kernel_size is not None
    ]
    if not kernels:
        return
    s_crop, t_crop = scfg.INPUT.CROP, tcfg.INPUT.CROP
    student_crop = tuple(s_crop.SIZE) if s_crop.ENABLED and s_crop.TYPE == "absolute" else None
    if student_crop == tuple(t_crop.SIZE):
        return
    if student_crop:
        seen = f"{student_crop} crops"
        fix = f"['INPUT.CROP.SIZE', '({student_crop[0]}, {student_crop[1]})']"
    else:  # a global pool (no fixed kernel) takes images of any size
        seen = "uncropped images (INPUT.CROP disabled or not 'absolute')"
        fix = "['INPUT.CROP.ENABLED', 'False']"
    raise ValueError(
        f"The teacher's ASPP image pooling has a fixed kernel {kernels[0]}, from its "
        f"INPUT.CROP.SIZE {tuple(t_crop.SIZE)}, but the student trains on {seen}: the teacher "
        f"would not run on the student's images. Set MODEL.ACAMKD.TEACHER.OPTS {fix}; the "
        "pooling has no weights, so the teacher's checkpoint still loads."
    )


# The task of detectron2's meta-architectures (and this project's), by class name; a subclass
# solves its base's task. Teacher and student must solve the same one.
_TASKS = {
    "RetinaNet": "detection",
    "GeneralizedRCNN": "detection",
    "ProposalNetwork": "detection",
    "FCOS": "detection",
    "RepPoints": "detection",
    "SemanticSegmentor": "semantic segmentation",
    "PanopticFPN": "panoptic segmentation",
}


def _task(arch) -> Tuple[str, Optional[str]]:
    """(name, task) of a meta-architecture given by name or as a module; task None if unknown."""
    if isinstance(arch, str):
        return arch, _TASKS.get(arch)
    for cls in type(arch).__mro__:
        if cls.__name__ in _TASKS:
            return type(arch).__name__, _TASKS[cls.__name__]
    return type(arch).__name__, None


def _check_tasks(student, teacher, target: str, teacher_config: str = "") -> None:
    """
    Teacher and student solve the same task, and logits distillation has a segmentor student.

    Args:
        student, teacher (str or nn.Module): meta-architecture names or the built models.
        target (str): MODEL.ACAMKD.DISTILL_TARGET.
        teacher_config (str): the teacher's config file, for the message.
    """
    (s_name, s_task), (t_name, t_task) = _task(student), _task(teacher)
    if s_task and t_task and s_task != t_task:
        given = f" (now {teacher_config!r})" if teacher_config else ""
        raise ValueError(
            f"The teacher is a {t_name} ({t_task}) but the student a {s_name} ({s_task}): "
            "ACAM-KD distils a teacher of the student's own task. Set "
            f"MODEL.ACAMKD.TEACHER.CONFIG_FILE{given} (model.teacher.config in a LazyConfig) "
            f"to the config of a {s_task} model."
        )
    if target == "sem_seg_logits" and s_task and s_task != "semantic segmentation":
        raise ValueError(
            f"MODEL.ACAMKD.DISTILL_TARGET 'sem_seg_logits' distils semantic segmentation "
            f"logits, but the student is a {s_name} ({s_task}): use 'fpn'."
        )


def _shared_levels(student: nn.Module, teacher: nn.Module, requested: List[str]) -> List[str]:
    """FPN levels to distil: ``requested`` or every level both backbones output."""
    s_shapes, t_shapes = student.backbone.output_shape(), teacher.backbone.output_shape()
    levels = requested or [k for k in s_shapes if k in t_shapes]
    if not levels:
        raise ValueError(
            f"Teacher FPN levels {sorted(t_shapes)} and student levels {sorted(s_shapes)} share "
            "none: nothing to distil. Use backbones with common levels (e.g. p3-p7)."
        )
    _check_levels(student, teacher, levels, "fpn")
    return levels


def _check_levels(student, teacher, levels: List[str], target: str) -> None:
    """Every distilled FPN level exists in both backbones with the same stride."""
    if target != "fpn":
        return
    s_shapes, t_shapes = student.backbone.output_shape(), teacher.backbone.output_shape()
    for level in levels:
        for who, shapes in (("teacher", t_shapes), ("student", s_shapes)):
            if level not in shapes:
                raise ValueError(
                    f"FPN level {level!r} (MODEL.ACAMKD.IN_FEATURES) is not an output of the "
                    f"{who}'s backbone, whose levels are {sorted(shapes)}."
                )
        if s_shapes[level].stride != t_shapes[level].stride:
            raise ValueError(
                f"FPN level {level!r} has stride {t_shapes[level].stride} in the teacher and "
                f"{s_shapes[level].stride} in the student: their grids would not align."
            )


def _check_channels(student, teacher, acam: nn.ModuleDict, target: str) -> None:
    """Every ACAM level was built for the widths its two inputs have (a LazyConfig states them)."""
    for level, module in acam.items():
        for who, net in (("teacher", teacher), ("student", student)):
            if target == "fpn":
                have = net.backbone.output_shape()[level].channels
            else:
                have = getattr(net.sem_seg_head.predictor, "out_channels", None)
            want = getattr(module, f"{who}_channels", None)
            if None not in (have, want) and have != want:
                raise ValueError(
                    f"ACAM level {level!r} was built for {want} {who} channels but the {who} "
                    f"gives {have}: set its {who}_channels to {have} (model.acam.{who}_channels "
                    "in a LazyConfig)."
                )
