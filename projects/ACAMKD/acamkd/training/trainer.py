"""The trainer: detectron2's ``DefaultTrainer`` with the few changes distillation needs."""

import logging
import weakref
from typing import List

import torch
from torch import nn

import detectron2.data.transforms as T
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model as d2_create_ddp_model
from detectron2.projects.deeplab import build_lr_scheduler
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.checks import StopOnUnreadableImage, check_num_classes
from .clipping import add_gradient_clipping
from .common import build_checkpointer, build_step_trainer, load_for_training, with_project_hooks
from .evaluation import build_evaluator
from .nonfinite import YAML_CURES

__all__ = ["DistillationTrainer", "create_ddp_model", "is_semantic_segmentation"]

# DefaultTrainer's logging period (its PeriodicWriter's, fixed in detectron2).
_LOG_PERIOD = 20


def create_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """
    detectron2's ``create_ddp_model``, which also works for CPU processes (gloo): detectron2
    passes ``device_ids=[local_rank]``, which DistributedDataParallel rejects for CPU modules.
    """
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return d2_create_ddp_model(model, **kwargs)


def is_semantic_segmentation(cfg: CfgNode) -> bool:
    """Whether ``cfg`` trains a semantic segmentor (plain or as a distillation student), or
    learns MasKD's tokens on one (whose family STUDENT_META_ARCHITECTURE names)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch in ("ACAMDistiller", "MasKDTokenLearner"):
        arch = cfg.MODEL.ACAMKD.STUDENT_META_ARCHITECTURE
    return arch == "SemanticSegmentor"


def build_sem_seg_train_aug(cfg: CfgNode) -> List[T.Augmentation]:
    """The DeepLab project's training augmentations: resize, category-aware crop, flip."""
    augs = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
        )
    augs.append(T.RandomFlip())
    return augs


class DistillationTrainer(DefaultTrainer):
    """
    ``DefaultTrainer`` for distillers and for the plain teachers and students they compare to:

    - ``MODEL.WEIGHTS`` initialises the student only; ``--resume`` restores everything;
    - DDP works with a frozen teacher and on CPU processes;
    - evaluators follow the dataset's ``evaluator_type``; semantic segmentation uses the
      DeepLab project's augmentations and LR schedule;
    - for a distiller, the per-level mask statistics are logged as a table, a warning names
      any level whose masks collapse, and every ``VIS_PERIOD`` iterations a figure of the
      masks goes to TensorBoard.

    The step loop, the checkpointer, its loading and these hooks are the LazyConfig loop's
    too (:mod:`acamkd.training.common`).
    """

    def __init__(self, cfg: CfgNode):
        """
        ``DefaultTrainer.__init__`` (detectron2 at the pinned commit, step for step), with this
        project's parts where detectron2's constructor offers no override point: the CPU-aware
        DDP wrapper, the trainers that stop at a non-finite loss with a precise message, and the
        checkpointer that keeps teacher and student apart and saves atomically. For a plain
        detector on GPUs each behaves exactly as detectron2's.
        """
        if cfg.SOLVER.AMP.ENABLED and not torch.cuda.is_available():
            raise ValueError(
                "SOLVER.AMP.ENABLED is True but CUDA is not available: detectron2's AMPTrainer "
                "needs a GPU. Set SOLVER.AMP.ENABLED False to train on the CPU."
            )
        TrainerBase.__init__(self)  # not DefaultTrainer's: it is what this method replaces
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()  # as DefaultTrainer does when setup_logger was not called for d2
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())

        # detectron2's order: model, optimizer, data loader, then the DDP wrapper.
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = build_step_trainer(
            model, data_loader, optimizer, amp=cfg.SOLVER.AMP.ENABLED, cures=YAML_CURES
        )

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = build_checkpointer(model, cfg.OUTPUT_DIR, weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())
        # The loader has loaded the training sets: their metadata now has their classes.
        check_num_classes(cfg.DATASETS.TRAIN, self.model)

    def build_hooks(self):
        """``DefaultTrainer``'s hooks with this project's (:func:`with_project_hooks`); the mask
        figure shows the first image of ``DATASETS.TEST[0]`` (``DATASETS.TRAIN[0]`` without a
        test set: loading a big training set's annotations a second time costs memory)."""
        cfg = self.cfg
        datasets = cfg.DATASETS.TEST or cfg.DATASETS.TRAIN
        figure = cfg.VIS_PERIOD > 0 and len(datasets) > 0
        return with_project_hooks(
            super().build_hooks(),
            self.model,
            log_period=_LOG_PERIOD,
            vis_period=cfg.VIS_PERIOD,
            figure_dataset=datasets[0] if figure else None,
            figure_mapper=DatasetMapper(cfg, is_train=False) if figure else None,
        )

    def resume_or_load(self, resume: bool = True) -> None:
        """
        ``DefaultTrainer.resume_or_load``; when ``MODEL.WEIGHTS`` is what gets loaded and it
        cannot be read, the error names it and says how to pass a local copy.
        """
        self.start_iter = load_for_training(
            self.checkpointer, self, self.cfg.MODEL.WEIGHTS, resume=resume, key="MODEL.WEIGHTS"
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(dataset_name, cfg.OUTPUT_DIR, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        if is_semantic_segmentation(cfg):
            mapper = DatasetMapper(cfg, is_train=True, augmentations=build_sem_seg_train_aug(cfg))
        else:
            mapper = DatasetMapper(cfg, is_train=True)  # what DefaultTrainer's loader uses
        # An image that cannot be read stops training with its file name (docs/TROUBLESHOOTING).
        mapper = StopOnUnreadableImage(mapper, "DATASETS.TRAIN")
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """
        detectron2's optimizer, clipping as ``SOLVER.CLIP_GRADIENTS`` says, with one type more
        than detectron2's: "full_model" (:mod:`acamkd.training.clipping`).
        """
        unclipped = cfg.clone()
        unclipped.defrost()
        unclipped.SOLVER.CLIP_GRADIENTS.ENABLED = False
        optimizer = super().build_optimizer(unclipped, model)
        return add_gradient_clipping(optimizer, cfg.SOLVER.CLIP_GRADIENTS)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # The DeepLab project's builder: "WarmupPolyLR" (SOLVER.POLY_LR_POWER and
        # POLY_LR_CONSTANT_ENDING), every other name detectron2's build_lr_scheduler.
        return build_lr_scheduler(cfg, optimizer)
