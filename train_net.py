#!/usr/bin/env python
"""
ACAM-KD training script, on detectron2's ``tools/train_net.py`` template.

Trains a distiller (``MODEL.META_ARCHITECTURE: ACAMDistiller``, or ``model = L(ACAMDistiller)``)
or a plain detectron2 model (the teacher or the student baseline) from a YAML or a LazyConfig
``.py`` config, on one or many GPUs, on one or many machines, or on CPU processes:

    python train_net.py --config-file configs/COCO-Detection/<config>.yaml --num-gpus 8
    python train_net.py --config-file <config>.yaml --eval-only MODEL.WEIGHTS <checkpoint>
    python train_net.py --config-file <config>.yaml --resume
    python train_net.py --config-file configs/COCO-Detection/<config>.py --num-gpus 8 \
        train.max_iter=1000 model.acam.num_masks=4
    python train_net.py --config-file <config>.py --eval-only train.init_checkpoint=<checkpoint>

Overrides after the options are ``KEY VALUE`` pairs for a YAML config and ``key=value`` for a
``.py`` one (detectron2's ``LazyConfig.apply_overrides``).

Datasets: detectron2's builtin names (``coco_2017_train``, ``cityscapes_fine_sem_seg_val``,
...) under ``$DETECTRON2_DATASETS``, the project's generated ``streets_*`` sets, or your own COCO
data with ``--register-coco NAME JSON IMAGE_DIR``.
"""
import warnings

# detectron2, fvcore and timm decorate functions with torch.jit.script (or .interface) as they
# are imported, and this torch marks both deprecated: a FutureWarning per function that a user
# cannot act on. Only those are silenced, before the imports that raise them.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit\._script")
# detectron2's anchor generator calls torch.meshgrid without `indexing`, which this torch warns
# about at the first training step: nothing a user can act on either.
warnings.filterwarnings(
    "ignore",
    message=r"torch\.meshgrid: in an upcoming release",
    category=UserWarning,
    module=r"torch\.functional",
)

import logging

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import acamkd  # noqa: F401  (registers the meta-architecture, backbones, heads and datasets)
from acamkd import DistillationTrainer, get_acamkd_cfg
from acamkd.data import add_register_coco_argument, register_coco_datasets
from acamkd.data.checks import check_datasets_registered
from acamkd.training import lazy_train
from acamkd.training.common import load_for_evaluation

logger = logging.getLogger("acamkd")


class Trainer(DistillationTrainer):
    """Everything distillation needs lives in :class:`DistillationTrainer`."""


def setup(args) -> CfgNode:
    """Config from ``--config-file`` and trailing ``KEY VALUE`` overrides; logging; output dir."""
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # This package's warnings (e.g. a checkpoint skipped on --resume) go where detectron2's go.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="acamkd")
    return cfg


def main(args):
    register_coco_datasets(args.register_coco or [])
    if lazy_train.is_lazy_config(args.config_file):
        return lazy_train.main(args)
    cfg = setup(args)
    used = {"DATASETS.TEST": cfg.DATASETS.TEST}
    if not args.eval_only:
        used["DATASETS.TRAIN"] = cfg.DATASETS.TRAIN
    check_datasets_registered(used)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # The student alone: a teacher-less checkpoint's teacher is not reloaded.
        load_for_evaluation(
            model, cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS, resume=args.resume, key="MODEL.WEIGHTS"
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def build_argument_parser():
    parser = default_argument_parser()
    add_register_coco_argument(parser)
    return parser


if __name__ == "__main__":
    args = build_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
