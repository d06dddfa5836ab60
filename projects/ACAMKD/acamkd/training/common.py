"""
What the two engines share, defined once: the YAML trainer (:class:`~acamkd.training.trainer.
DistillationTrainer`) and the LazyConfig loop (:mod:`acamkd.training.lazy_train`) differ only in
where they read their settings, so a run behaves the same whichever config style starts it.

- :func:`build_step_trainer`: detectron2's ``SimpleTrainer`` or ``AMPTrainer``, stopping at a
  non-finite loss with the cures named in the config style's keys;
- :func:`build_checkpointer`, :func:`load_for_training`, :func:`load_for_evaluation`: the
  :class:`~acamkd.training.checkpointer.DistillationCheckpointer` of a run, what it loads when a
  run starts (the last checkpoint with ``--resume``, else the student's initial weights and the
  teacher's) and when ``--eval-only`` evaluates (the student alone, no teacher file read);
- :func:`with_project_hooks`: this project's hooks around detectron2's standard ones;
- the evaluator: :func:`acamkd.training.evaluation.build_evaluator`, which the YAML trainer and the
  ``.py`` configs (``acamkd.lazy.build_dataset_evaluator``) both call.
"""

import logging
from typing import Callable, Dict, List, Optional, Sequence

from torch import nn

from detectron2.engine import HookBase, PeriodicWriter, SimpleTrainer
from detectron2.utils import comm

from .checkpointer import DistillationCheckpointer, load_checkpoint
from .hooks import ACAMStatsPrinter, MaskCollapseHook, MaskVisualizationHook, unwrap_distiller
from .nonfinite import FiniteAMPTrainer, FiniteSimpleTrainer

__all__ = [
    "build_checkpointer",
    "build_step_trainer",
    "load_for_evaluation",
    "load_for_training",
    "with_project_hooks",
]

logger = logging.getLogger(__name__)


def build_step_trainer(model: nn.Module, data_loader, optimizer, *, amp: bool, cures: str):
    """
    The loop that runs the training steps.

    Args:
        model, data_loader, optimizer: as detectron2's ``SimpleTrainer`` takes them.
        amp (bool): mixed precision (``AMPTrainer``; needs a GPU).
        cures (str): the settings a non-finite loss's message suggests,
            :data:`~acamkd.training.nonfinite.YAML_CURES` or ``LAZY_CURES``.

    Returns:
        SimpleTrainer: a :class:`FiniteSimpleTrainer` or :class:`FiniteAMPTrainer`.
    """
    trainer_class = FiniteAMPTrainer if amp else FiniteSimpleTrainer
    trainer = trainer_class(model, data_loader, optimizer)
    trainer.cures = cures
    return trainer


def build_checkpointer(model: nn.Module, output_dir: str, trainer) -> DistillationCheckpointer:
    """
    The checkpointer of a training run: the model, and ``trainer``'s state (iteration,
    optimizer, LR scheduler and the other hooks' states), in ``output_dir``.
    """
    return DistillationCheckpointer(model, output_dir, trainer=trainer)


def load_for_training(
    checkpointer: DistillationCheckpointer,
    trainer: SimpleTrainer,
    weights: str,
    *,
    resume: bool,
    key: str,
) -> int:
    """
    Load what a training run starts from: with ``resume`` the last checkpoint of the
    checkpointer's folder if there is one (model, teacher from its recorded source, trainer
    state), else ``weights`` (the student's, or a whole distiller's) and the teacher's file.

    Args:
        checkpointer (DistillationCheckpointer): from :func:`build_checkpointer`.
        trainer: the object whose ``iter`` the checkpoint restores.
        weights (str): ``MODEL.WEIGHTS`` or ``train.init_checkpoint`` ("" loads none).
        resume (bool): ``--resume``.
        key (str): the setting ``weights`` came from, for the error about unreadable weights.

    Returns:
        int: the iteration to start at (the one after the checkpoint's; 0 for a new run).
    """
    load_checkpoint(checkpointer, weights, resume=resume, key=key)
    # The checkpoint stores the iteration that just finished: start at the next one.
    return trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0


def load_for_evaluation(
    model: nn.Module, output_dir: str, weights: str, *, resume: bool, key: str
) -> Dict[str, object]:
    """
    Load the model ``--eval-only`` evaluates: ``weights``, or with ``resume`` the last
    checkpoint of ``output_dir``. Evaluation runs the student alone, so a teacher-less
    distiller checkpoint's teacher is not reloaded and no teacher file is read.

    Returns:
        dict: the checkpoint's extra entries (e.g. "iteration").
    """
    checkpointer = DistillationCheckpointer(model, save_dir=output_dir, restore_teacher=False)
    return load_checkpoint(checkpointer, weights, resume=resume, key=key)


def with_project_hooks(
    hooks: Sequence[Optional[HookBase]],
    model: nn.Module,
    *,
    log_period: int,
    vis_period: int,
    figure_dataset: Optional[str] = None,
    figure_mapper: Optional[Callable[[dict], dict]] = None,
) -> List[Optional[HookBase]]:
    """
    ``hooks``, an engine's detectron2 hooks (timer, LR schedule, checkpoints, evaluation,
    ``PeriodicWriter``), with this project's added when ``model`` is a distiller, on the main
    process (where detectron2's writers run):

    - before the first ``PeriodicWriter``, every ``vis_period`` iterations (0: never), a
      figure of the masks for TensorBoard (:class:`MaskVisualizationHook`), so the writer
      writes it at the iteration it is made;
    - right after it, the per-level mask-statistics table in the console and ``log.txt``
      (:class:`ACAMStatsPrinter`), every ``log_period`` iterations;
    - last, the mask-collapse warning (:class:`MaskCollapseHook`), checked every
      ``log_period`` iterations.

    Args:
        hooks (list[HookBase or None]): detectron2's hooks (None entries are kept; trainers
            skip them).
        model (nn.Module): the trained model, DistributedDataParallel or not.
        log_period (int): detectron2's logging period (20 in ``DefaultTrainer``,
            ``train.log_period`` in a LazyConfig).
        vis_period (int): ``VIS_PERIOD`` or ``train.vis_period``.
        figure_dataset (str): the dataset whose first image the figure shows.
        figure_mapper (callable): its test-time mapper (record -> model input).

    Returns:
        list[HookBase or None]: the hooks to register, in order.
    """
    ret = list(hooks)
    if not comm.is_main_process() or unwrap_distiller(model) is None:
        return ret
    writers = [i for i, h in enumerate(ret) if isinstance(h, PeriodicWriter)]
    at = writers[0] if writers else len(ret)
    if vis_period > 0:
        if figure_dataset is None or figure_mapper is None:
            logger.warning(
                "The mask figure (VIS_PERIOD, train.vis_period) needs a dataset and its "
                "test-time mapper (DATASETS.TEST or .TRAIN, dataloader.test.mapper and "
                "dataset.names): none found, no figure is made."
            )
        else:
            ret.insert(at, MaskVisualizationHook(vis_period, figure_dataset, figure_mapper))
            at += 1
    # After detectron2's writers, whose console line comes first; without them, last.
    printer = PeriodicWriter([ACAMStatsPrinter()], period=log_period)
    ret.insert(at + 1 if writers else len(ret), printer)
    ret.append(MaskCollapseHook(period=log_period))
    return ret
