"""Learning-rate scheduler dispatch shared by the trainers."""

import torch

from detectron2.config import CfgNode
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.solver import LRScheduler
from detectron2.solver import build_lr_scheduler as build_d2_lr_scheduler

__all__ = ["build_lr_scheduler"]


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """Build the scheduler named by ``cfg.SOLVER.LR_SCHEDULER_NAME``.

    "WarmupPolyLR" (the segmentation schedule: ``base_lr * (1 - iter / MAX_ITER) ** power``
    after the warm-up) is DeepLab's and reads ``SOLVER.POLY_LR_POWER`` and
    ``SOLVER.POLY_LR_CONSTANT_ENDING`` (from ``add_deeplab_config``); every other name goes to
    detectron2's ``build_lr_scheduler``.

    Args:
        cfg (CfgNode): the training config.
        optimizer (torch.optim.Optimizer): the optimizer whose learning rates are scheduled.

    Returns:
        LRScheduler: a scheduler stepped once per iteration.
    """
    if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR":
        return build_deeplab_lr_scheduler(cfg, optimizer)
    return build_d2_lr_scheduler(cfg, optimizer)
