#!/usr/bin/env python
"""Generate the synthetic street scenes in COCO and Cityscapes layouts.

Writes ``<root>/acamkd_streets/{coco,cityscapes,manifest.json}``, which the ``streets_*``
datasets registered by ``import acamkd.data`` read. Running it again with the same parameters
does nothing; other parameters (or ``--force``) regenerate the set.

Example::

    python tools/generate_data.py      # the benchmark's scenes: 320 train / 80 val, 320x160
    python tools/generate_data.py --num-train 24 --num-val 6 --width 160 --height 80
"""
import argparse
import time

from detectron2.utils.logger import setup_logger

from acamkd.data import add_scene_arguments, default_datasets_root, generate_streets


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root",
        default=None,
        help="datasets root (default: $DETECTRON2_DATASETS or 'datasets', now '{}')".format(
            default_datasets_root()
        ),
    )
    # The defaults are the benchmark's scenes (what `make demo` and every study use).
    add_scene_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole set")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main() -> None:
    args = get_parser().parse_args()
    setup_logger(name="acamkd")
    start = time.perf_counter()
    directory = generate_streets(
        args.root,
        num_train=args.num_train,
        num_val=args.num_val,
        width=args.width,
        height=args.height,
        max_depth=args.max_depth,
        seed=args.seed,
        force=args.force,
        progress=not args.no_progress,
    )
    print("{} ({:.1f} s)".format(directory, time.perf_counter() - start))


if __name__ == "__main__":
    main()
