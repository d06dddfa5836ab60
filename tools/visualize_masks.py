#!/usr/bin/env python
"""
Figures of ACAM-KD's masks: for every image and distilled level (FPN level, or "logits" for
segmentation) one PNG, ``<output>/<image>_<level>.png``, with one row per checkpoint: the M
spatial masks over the image, the energy (mean of squares over channels) of the fused, teacher,
aligned student features and of their difference, and the M x C channel masks.

    python tools/visualize_masks.py --config-file <distill config>.yaml \\
        --checkpoints output/model_0004999.pth output/model_final.pth \\
        --images path/to/images_or_folder --output output/masks [KEY VALUE ...]

    python tools/visualize_masks.py --config-file <distill config>.yaml \\
        --checkpoints output/model_final.pth --dataset coco_2017_val --num-images 4 \\
        --output output/masks MODEL.DEVICE cpu

``--dataset`` takes any name in detectron2's DatasetCatalog: the builtin ones, the generated
``streets_*`` sets, or your own COCO data with ``--register-coco NAME JSON IMAGE_DIR``.

Images are resized as at test time (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) and need no
annotations. The checkpoints must be distillation checkpoints of the config's run: they hold
the student and the ACAM modules, and the teacher is reloaded from the config's teacher weights
(MODEL.ACAMKD.TEACHER.WEIGHTS), which must be the file the run was distilled from (same SHA-256).
Older checkpoints, which hold the teacher's tensors, restore it themselves.
"""
import argparse
import re
import sys
from typing import List, Optional

from detectron2.utils.logger import setup_logger

import acamkd  # noqa: F401  (registers the distiller, backbones, heads and datasets)
from acamkd import get_acamkd_cfg
from acamkd.data import add_register_coco_argument, register_coco_datasets
from acamkd.pictures.mask_maps import load_images
from acamkd.pictures.visualization import visualize_checkpoints

# A config key such as MODEL.DEVICE: where the file lists of --checkpoints/--images end and the
# trailing KEY VALUE overrides begin (argparse would take them as more files).
_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="the distillation config")
    parser.add_argument(
        "--checkpoints", nargs="+", required=True, help="checkpoints of that run, one row each"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files or folders of images")
    source.add_argument("--dataset", help="a dataset registered in detectron2's DatasetCatalog")
    parser.add_argument("--num-images", type=int, default=None, help="at most this many images")
    parser.add_argument("--output", required=True, help="output directory for the PNGs")
    parser.add_argument("--panel-width", type=float, default=2.0, help="inches per panel")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument(
        "--stretch-masks",
        action="store_true",
        help="colour each row's masks over their own range instead of [0, 1]",
    )
    add_register_coco_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def main(argv: Optional[List[str]] = None) -> List[str]:
    """
    Returns:
        list[str]: the written PNG files.
    """
    args = build_argument_parser().parse_args(argv)
    for name in ("checkpoints", "images"):
        values = getattr(args, name) or []
        keys = [i for i, v in enumerate(values) if _CONFIG_KEY.match(v)]
        if keys:
            setattr(args, name, values[: keys[0]])
            args.opts = values[keys[0] :] + args.opts
    setup_logger(name="detectron2")
    register_coco_datasets(args.register_coco)
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    inputs = load_images(cfg, args.images or (), args.dataset, args.num_images)
    written = visualize_checkpoints(
        cfg,
        args.checkpoints,
        inputs,
        args.output,
        panel_width=args.panel_width,
        dpi=args.dpi,
        stretch_masks=args.stretch_masks,
    )
    print(f"Wrote {len(written)} figures to {args.output}")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
