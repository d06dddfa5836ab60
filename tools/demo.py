#!/usr/bin/env python
"""
The one-command demo on generated data (the README's main command runs it):

    python tools/demo.py --output-dir output/demo

Generates the street scenes under $DETECTRON2_DATASETS (default ./datasets), trains a wide FCOS
R-18-FPN teacher (600 iterations, every core), then three FCOS R-18-FPN students side by side
(200 iterations each, same schedule and seed): alone, distilled with plain feature MSE
(MODEL.ACAMKD.MASKS none) and with ACAM-KD; evaluates the four with the COCO evaluator, and
prints and saves (results.md, results.json) a model-zoo style table. Rerunning it skips finished
stages and resumes an interrupted one. `--task segmentation` does the same for
DeepLabV3 on the Cityscapes-layout copy of the scenes (mIoU):

    python tools/demo.py --task segmentation --output-dir output/demo_seg
"""
import warnings

# detectron2, fvcore and timm decorate functions with torch.jit.script (or .interface) as they
# are imported, and this torch marks both deprecated: a FutureWarning per function that a user
# cannot act on. Only those are silenced, before the imports that raise them.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit\._script")

import argparse
import logging
import shlex
import sys

from detectron2.utils.logger import setup_logger

from acamkd.data import add_scene_arguments
from acamkd.experiments.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument(
        "--task",
        choices=["detection", "segmentation"],
        default="detection",
        help="detection: FCOS wide R-18 -> R-18, COCO AP; segmentation: DeepLabV3, mIoU",
    )
    add_scene_arguments(parser)
    parser.add_argument(
        "--teacher-iters", type=int, default=None, help="default: 600 (detection), 300 (seg.)"
    )
    parser.add_argument(
        "--student-iters", type=int, default=None, help="default: 200 (detection), 180 (seg.)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=3,
        help="student trainings at once after the teacher's, each with max(1, cores/jobs) "
        "threads and its console in its folder (default: the 3 students side by side)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every training stage"
    )
    args = parser.parse_args()
    setup_logger(name="acamkd")
    logging.getLogger("acamkd").setLevel(logging.INFO)
    table = run_demo(
        args.output_dir,
        num_train=args.num_train,
        num_val=args.num_val,
        width=args.width,
        height=args.height,
        max_depth=args.max_depth,
        teacher_iters=args.teacher_iters,
        student_iters=args.student_iters,
        extra_opts=args.opts,
        task=args.task,
        jobs=args.jobs,
        command=shlex.join(["python", *sys.argv]),
    )
    print(table)


if __name__ == "__main__":
    main()
