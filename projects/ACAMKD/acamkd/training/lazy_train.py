"""
Training and evaluation from a LazyConfig ``.py`` file, on detectron2's
``tools/lazyconfig_train_net.py`` template, with what the YAML trainer has too
(:mod:`acamkd.training.common`): this project's checkpointer (``train.init_checkpoint``
initialises the student only; ``--resume`` restores everything), the step loop that stops at a
non-finite loss, the mask-statistics table, the mask-collapse warning and the TensorBoard mask
figure; and DDP that also runs on CPU processes.

The config has detectron2's standard top-level names: ``model``, ``dataloader.{train, test,
evaluator}``, ``optimizer``, ``lr_multiplier`` and ``train`` (``output_dir``,
``init_checkpoint``, ``max_iter``, ``amp.enabled``, ``ddp``, ``checkpointer``, ``eval_period``,
``log_period``, ``device``), as in detectron2's ``configs/common/train.py``, plus this
project's optional ``train.vis_period`` (the YAML ``VIS_PERIOD``: iterations between mask
figures; 0 or absent: none) and ``train.clip_gradients`` (the YAML ``SOLVER.CLIP_GRADIENTS``
with lower-case keys, e.g. ``dict(enabled=True, clip_type="norm", clip_value=1.0)``; absent:
no clipping, as in detectron2's LazyConfig loop).
"""

import logging
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.checks import StopOnUnreadableImage, check_datasets_registered, check_num_classes
from .clipping import add_gradient_clipping
from .common import (
    build_checkpointer,
    build_step_trainer,
    load_for_evaluation,
    load_for_training,
    with_project_hooks,
)
from .nonfinite import LAZY_CURES
from .trainer import create_ddp_model

__all__ = ["is_lazy_config", "setup_lazy", "with_gradient_clipping", "do_test", "do_train", "main"]

logger = logging.getLogger("acamkd")


def is_lazy_config(path: str) -> bool:
    """Whether ``path`` is a LazyConfig (``.py``) rather than a YAML config."""
    return path.endswith(".py")


def setup_lazy(args) -> DictConfig:
    """
    The config of ``args.config_file`` with the trailing ``key=value`` overrides applied; logging,
    output directory (with the merged ``config.yaml``) and seed, as for a YAML config.

    Args:
        args: detectron2's ``default_argument_parser`` arguments.

    Returns:
        DictConfig: the config.
    """
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    _check_device(cfg)
    default_setup(cfg, args)
    # This package's warnings (e.g. a checkpoint skipped on --resume) go where detectron2's go.
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="acamkd")
    return cfg


def _check_device(cfg: DictConfig) -> None:
    device = str(cfg.train.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"train.device={device!r} but CUDA is not available: add train.device=cpu to the "
            "command line."
        )
    if cfg.train.amp.enabled and not device.startswith("cuda"):
        raise ValueError(
            "train.amp.enabled=True needs a GPU (detectron2's AMPTrainer): add "
            "train.amp.enabled=False to train on the CPU."
        )


def _dataset_names(cfg: DictConfig, split: str):
    """``dataloader.<split>.dataset.names`` (detectron2's standard loaders), else None."""
    try:
        return OmegaConf.select(cfg, f"dataloader.{split}.dataset.names", default=None)
    except Exception:  # a loader of another layout, e.g. a plain list
        return None


def _build_train_loader(cfg: DictConfig):
    """``dataloader.train``, whose mapper stops at an image that cannot be read, naming it
    (docs/TROUBLESHOOTING.md). The config is left as it was: other nodes interpolate the
    mapper's settings (e.g. ``${..dataloader.train.mapper.image_format}``)."""
    loader = cfg.dataloader.train
    if not (isinstance(loader, DictConfig) and "mapper" in loader):
        return instantiate(loader)
    mapper = loader.mapper
    loader.mapper = StopOnUnreadableImage(instantiate(mapper), "dataloader.train.dataset.names")
    try:
        return instantiate(loader)
    finally:
        loader.mapper = mapper


def _figure_data(cfg: DictConfig) -> Tuple[Optional[str], Optional[Callable[[dict], dict]]]:
    """The mask figure's dataset (the first of ``dataloader.test.dataset.names``, else of
    ``dataloader.train``'s) and its test-time mapper (``dataloader.test.mapper``), as the YAML
    trainer takes them from DATASETS.TEST and INPUT; None for what the config lacks."""
    names = _dataset_names(cfg, "test") or _dataset_names(cfg, "train")
    if names is not None and not isinstance(names, str):
        names = next(iter(names), None)
    try:
        mapper = OmegaConf.select(cfg, "dataloader.test.mapper", default=None)
    except Exception:  # a loader of another layout
        mapper = None
    return names, (instantiate(mapper) if mapper is not None else None)


def do_test(cfg: DictConfig, model: torch.nn.Module) -> Optional[Dict]:
    """
    Evaluate ``model`` on ``dataloader.test`` with ``dataloader.evaluator``.

    Returns:
        dict or None: the evaluator's results (None when the config has no evaluator).
    """
    if "evaluator" not in cfg.dataloader:
        return None
    ret = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(ret)
    return ret


def with_gradient_clipping(
    optimizer: torch.optim.Optimizer, clip: Optional[Mapping]
) -> torch.optim.Optimizer:
    """
    ``train.clip_gradients`` applied as the YAML trainer applies ``SOLVER.CLIP_GRADIENTS``
    (:func:`~acamkd.training.clipping.add_gradient_clipping`, "full_model" included), so that
    a LazyConfig run clips exactly as a YAML run with the same settings.

    Args:
        optimizer (Optimizer): the instantiated optimizer.
        clip (Mapping or None): lower-case ``SOLVER.CLIP_GRADIENTS`` keys (enabled, clip_type,
            clip_value, norm_type); the missing ones take detectron2's defaults.

    Returns:
        Optimizer: ``optimizer``, clipping its gradients at each step when enabled.
    """
    if not clip:
        return optimizer
    node = get_cfg().SOLVER.CLIP_GRADIENTS
    for key, value in clip.items():
        if key.upper() not in node:
            known = ", ".join(sorted(k.lower() for k in node))
            raise KeyError(f"train.clip_gradients.{key}: no such key (known: {known})")
        node[key.upper()] = value
    return add_gradient_clipping(optimizer, node, key="train.clip_gradients")


def do_train(cfg: DictConfig, resume: bool = False) -> None:
    """
    Train ``cfg.model`` with ``SimpleTrainer`` (or ``AMPTrainer``) and detectron2's hooks:
    LR schedule, periodic checkpoints, evaluation every ``train.eval_period`` and at the end,
    metrics writers; for a distiller also the YAML trainer's (:func:`with_project_hooks`):
    the mask-statistics table and collapse warning every ``train.log_period`` iterations, and
    a TensorBoard mask figure every ``train.vis_period``.

    Args:
        cfg (DictConfig): the config, see the module docstring.
        resume (bool): continue from the last checkpoint of ``train.output_dir`` if there is
            one; otherwise ``train.init_checkpoint`` initialises the model (the student alone
            for a distiller, unless it is a distiller checkpoint).
    """
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optim = with_gradient_clipping(
        instantiate(cfg.optimizer), OmegaConf.select(cfg, "train.clip_gradients", default=None)
    )
    train_loader = _build_train_loader(cfg)
    names = _dataset_names(cfg, "train")
    if names is not None:  # loaded by now, so their metadata has their classes
        check_num_classes(names, model, yaml=False, dataset_key="dataloader.train.dataset.names")

    model = create_ddp_model(model, **cfg.train.ddp)
    # The non-finite loss message names this config's keys.
    trainer = build_step_trainer(
        model, train_loader, optim, amp=cfg.train.amp.enabled, cures=LAZY_CURES
    )
    checkpointer = build_checkpointer(model, cfg.train.output_dir, trainer)
    vis_period = OmegaConf.select(cfg, "train.vis_period", default=0) or 0
    figure_dataset, figure_mapper = _figure_data(cfg) if vis_period > 0 else (None, None)
    standard = [
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        (
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None
        ),
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        (
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None
        ),
    ]
    trainer.register_hooks(
        with_project_hooks(
            standard,
            model,
            log_period=cfg.train.log_period,
            vis_period=vis_period,
            figure_dataset=figure_dataset,
            figure_mapper=figure_mapper,
        )
    )

    start_iter = load_for_training(
        checkpointer, trainer, cfg.train.init_checkpoint, resume=resume, key="train.init_checkpoint"
    )
    trainer.train(start_iter, cfg.train.max_iter)


def main(args) -> Optional[Dict]:
    """
    ``train_net.py``'s entry point for a ``.py`` config: train, or with ``--eval-only``
    evaluate ``train.init_checkpoint`` (or, with ``--resume``, the last checkpoint of
    ``train.output_dir``).

    Returns:
        dict or None: the evaluation results with ``--eval-only``.
    """
    cfg = setup_lazy(args)
    splits = ["test"] if args.eval_only else ["train", "test"]
    check_datasets_registered(
        {f"dataloader.{split}.dataset.names": _dataset_names(cfg, split) for split in splits}
    )
    if not args.eval_only:
        do_train(cfg, resume=args.resume)
        return None
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    model = create_ddp_model(model)
    load_for_evaluation(
        model,
        cfg.train.output_dir,
        cfg.train.init_checkpoint,
        resume=args.resume,
        key="train.init_checkpoint",
    )
    return do_test(cfg, model)
