#!/usr/bin/env python
"""
Compare models on one dataset in one table (Markdown and JSON): AP (or mIoU), parameters,
GFLOPs and inference seconds per image. Typically a teacher, the student trained alone and the
distilled student; each is a config (YAML or LazyConfig ``.py``, a path or a detectron2
model-zoo name) plus a checkpoint, optionally followed by overrides in the config's own syntax:

    python tools/compare_models.py --output-dir output/compare \\
        --model teacher COCO-Detection/retinanet_R_101_FPN_3x.yaml \\
            detectron2://COCO-Detection/retinanet_R_101_FPN_3x/190397697/model_final_971ab9.pkl \\
        --model baseline configs/COCO-Detection/retinanet_R_50_FPN_2x.py \\
            output/retinanet_R_50_FPN_2x/model_final.pth model.test_score_thresh=0.05 \\
        --model acamkd configs/COCO-Detection/acamkd_retinanet_R_50_from_R_101_FPN_2x.yaml \\
            output/acamkd_retinanet/model_final.pth

A distiller is measured as its student alone. See ``acamkd.experiments.compare`` for what each
column is.
"""
import argparse
import logging
from typing import List, Optional

import torch

from detectron2.utils.logger import setup_logger

import acamkd  # noqa: F401  (registers the meta-architecture, backbones and heads)
from acamkd.data import add_register_coco_argument, register_coco_datasets
from acamkd.experiments.compare import ModelSpec, compare_models, format_markdown


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        nargs="+",
        action="append",
        required=True,
        metavar="ARG",
        help="a model to compare (repeatable): its name in the table, its config, its "
        "checkpoint (path or URL), then optional overrides (KEY VALUE for a YAML, key=value "
        "for a .py)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="the dataset every model is evaluated on (default: the first config's test set)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda where available)",
    )
    parser.add_argument("--output-dir", default="./output/compare", help="where the table goes")
    add_register_coco_argument(parser)
    return parser


def parse_specs(values: List[List[str]]) -> List[ModelSpec]:
    """``--model`` values as :class:`ModelSpec` s."""
    specs = []
    for value in values:
        if len(value) < 3:
            raise SystemExit(f"--model needs NAME CONFIG WEIGHTS [OVERRIDE ...], got {value}")
        specs.append(ModelSpec(value[0], value[1], value[2], list(value[3:])))
    return specs


def main(argv: Optional[List[str]] = None) -> list:
    args = build_argument_parser().parse_args(argv)
    setup_logger(name="acamkd")
    setup_logger(name="detectron2")
    logging.getLogger("fvcore").setLevel(logging.ERROR)  # FLOP counting is noisy
    register_coco_datasets(args.register_coco or [])
    rows = compare_models(
        parse_specs(args.model),
        dataset=args.dataset,
        device=args.device,
        output_dir=args.output_dir,
    )
    print(format_markdown(rows))
    return rows


if __name__ == "__main__":
    main()
