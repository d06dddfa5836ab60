#!/usr/bin/env python
"""
Pretrain a student's backbone without downloads, as ImageNet weights would be: generate a
street set with another generator seed than the benchmark's (so it shares no scene with it),
classify its object crops (5 classes and background) with the config's bottom-up backbone, and
write ``OUTPUT_DIR/backbone.pkl`` in detectron2's ImageNet format. Rerunning resumes.

    python tools/pretrain_backbone.py \\
        --config-file configs/Streets-Detection/fcos_R_18_FPN_streets.yaml \\
        --output-dir output/pretrain_R18
    python train_net.py --config-file configs/Streets-Detection/fcos_R_18_FPN_streets.yaml \\
        MODEL.WEIGHTS output/pretrain_R18/backbone.pkl
"""
import warnings

# See train_net.py: the dependencies' import-time deprecation warnings, nothing else.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit\._script")

import argparse
import logging
import os

from detectron2.utils.logger import setup_logger

from acamkd import get_acamkd_cfg
from acamkd.data import BENCHMARK_SCENES, default_datasets_root, generate_streets
from acamkd.experiments.pretrain import object_crops, pretrain_backbone

# The benchmark's scenes are generated with seed 0 (tools/demo.py, tools/generate_data.py).
BENCHMARK_SEED = 0


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="the student's config")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=1000, help="generator seed (not 0)")
    parser.add_argument("--num-scenes", type=int, default=2000, help="generated scenes")
    parser.add_argument(
        "--max-depth", type=float, default=BENCHMARK_SCENES["max_depth"], help="as the benchmark's"
    )
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--max-iter", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--datasets-root",
        default=None,
        help="where the set is generated (default: $DETECTRON2_DATASETS/pretrain_seed<SEED>)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    setup_logger(name="acamkd")
    logging.getLogger("acamkd").setLevel(logging.INFO)
    if args.seed == BENCHMARK_SEED:
        raise SystemExit(
            f"--seed {args.seed} is the benchmark's generator seed: the pretraining scenes would "
            "be the benchmark's own. Choose another seed (default 1000)."
        )
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"
    root = args.datasets_root or os.path.join(default_datasets_root(), f"pretrain_seed{args.seed}")
    dataset_dir = generate_streets(
        root,
        num_train=args.num_scenes,
        num_val=max(1, args.num_scenes // 10),
        max_depth=args.max_depth,
        seed=args.seed,
    )
    train = object_crops(dataset_dir, "train", size=args.crop_size, seed=args.seed)
    val = object_crops(dataset_dir, "val", size=args.crop_size, seed=args.seed + 1)
    logging.getLogger("acamkd").info(
        "Pretraining on %d crops (%d held out) of %s", len(train.labels), len(val.labels), root
    )
    result = pretrain_backbone(
        cfg,
        train,
        val,
        args.output_dir,
        max_iter=args.max_iter,
        batch_size=args.batch_size,
        base_lr=args.lr,
        seed=args.seed,
    )
    print(
        f"val accuracy {result['val_accuracy']:.3f}; use it with "
        f"MODEL.WEIGHTS {os.path.join(args.output_dir, 'backbone.pkl')}"
    )
    return result


if __name__ == "__main__":
    main()
