#!/usr/bin/env python
"""
Variants x seeds study of a distillation config: which ACAM-KD settings, or which distillation
method, make the student better?

Trains every (variant, seed) with train_net.py, evaluates each with the dataset's evaluator and
writes study.md, study.json and study.png (mean ± std over seeds per variant, difference to the
baseline, fraction of the teacher-baseline gap closed, train s/iter, final mask statistics).
Rerunning skips finished runs and resumes an interrupted one; runs shared with another study
in the same --output-dir (same config, settings and seed) are reused. --jobs 2 --threads 1
trains two runs at once (a two-core CPU), each logging to its own <run>/console.log.

Examples (the embedded benchmark; its teacher first: `python train_net.py --config-file
configs/Streets-Detection/retinanet_R_18_FPN_wide_streets.yaml
OUTPUT_DIR output/retinanet_teacher`):

    python tools/study.py --set objective --seeds 0 1 2 \\
        --config-file configs/Streets-Detection/acamkd_retinanet_R_18_from_R_18_wide_streets.yaml \\
        --teacher-weights output/retinanet_teacher/model_final.pth --output-dir output/study_det

    python tools/study.py --set paper-ablation --seeds 0 1 2 --acam NORMALIZER=sum_sq \\
        --config-file configs/COCO-Detection/acamkd_retinanet_R_50_from_R_101_FPN_2x.yaml \\
        --teacher-weights /path/to/retinanet_R_101_FPN_3x/model_final.pkl \\
        --num-gpus 8 --output-dir output/study_coco

    # own variants: NAME:KEY=VALUE,... with MODEL.ACAMKD keys; trailing KEY VALUE overrides
    # apply to every run:
    python tools/study.py --variant baseline --variant full --variant m4:NUM_MASKS=4 ... \\
        SOLVER.MAX_ITER 1000
"""
import warnings

# detectron2, fvcore and timm decorate functions with torch.jit.script (or .interface) as they
# are imported, and this torch marks both deprecated: a FutureWarning per function that a user
# cannot act on. Only those are silenced, before the imports that raise them.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit\._script")

import argparse
import logging
import os

from detectron2.utils.logger import setup_logger

from acamkd.experiments.stages import Stage
from acamkd.experiments.study import VARIANT_SETS, StudySpec, parse_variant, run_study


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="the distillation config")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--set", choices=sorted(VARIANT_SETS), help="a built-in set of variants")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="a variant: a built-in name (baseline, no_mask, full, ...) or NAME:KEY=VALUE,...",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--acam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="MODEL.ACAMKD setting of every distilled variant (e.g. NORMALIZER=sum_sq)",
    )
    parser.add_argument("--teacher-weights", default="", help="the teacher's checkpoint")
    parser.add_argument(
        "--teacher-config",
        default="",
        help="the teacher's config: evaluated for the table (default: the distillation "
        "config's MODEL.ACAMKD.TEACHER.CONFIG_FILE); with --train-teacher, trained first",
    )
    parser.add_argument(
        "--train-teacher",
        action="store_true",
        help="train the teacher config first, with its own schedule (in OUTPUT_DIR/teacher)",
    )
    parser.add_argument(
        "--baseline-config",
        default="",
        help="the student's own config for the baseline (needed for a .py config)",
    )
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each with its console output in <run>/console.log "
        "(e.g. 2 on a two-core CPU, with --threads 1)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of each run with --jobs > 1 (default: the cores shared among the jobs)",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: tabulate the runs finished so far (e.g. while others still train)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="overrides of every student run, config syntax"
    )
    return parser


def _teacher_config(args):
    """The teacher's config and its overrides: --teacher-config as it is, or the distillation
    config's MODEL.ACAMKD.TEACHER.CONFIG_FILE with its TEACHER.OPTS (and the study's own)."""
    if args.teacher_config:
        return args.teacher_config, []
    if args.config_file.endswith(".py"):
        raise SystemExit("A .py config needs --teacher-config for the table's teacher row.")
    from acamkd import get_acamkd_cfg

    cfg = get_acamkd_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    return cfg.MODEL.ACAMKD.TEACHER.CONFIG_FILE, list(cfg.MODEL.ACAMKD.TEACHER.OPTS)


def main() -> None:
    args = get_parser().parse_args()
    setup_logger(name="acamkd")
    logging.getLogger("acamkd").setLevel(logging.INFO)
    variants = list(VARIANT_SETS[args.set]) if args.set else []
    variants += [parse_variant(v) for v in args.variant]
    if not variants:
        raise SystemExit("No variants: give --set and/or --variant.")
    acam = {}
    for item in args.acam:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--acam {item!r} is not KEY=VALUE.")
        key = key.upper().removeprefix("MODEL.ACAMKD.")
        # A file the runs read: absolute, as they run from the repository's root.
        acam[key] = os.path.abspath(value) if key == "MASKD.TOKENS" and value else value
    teacher_config, teacher_opts = _teacher_config(args)
    teacher_weights = args.teacher_weights
    if args.train_teacher:
        Stage("teacher", teacher_config, teacher_opts, args.num_gpus).run(args.output_dir)
        teacher_weights = os.path.join(args.output_dir, "teacher", "model_final.pth")
    if not teacher_weights and not all(v.student_only for v in variants):
        raise SystemExit("Give --teacher-weights, or --train-teacher to train one first.")
    spec = StudySpec(
        config=args.config_file,
        variants=variants,
        seeds=args.seeds,
        teacher_weights=teacher_weights,
        teacher_config=teacher_config,
        teacher_opts=teacher_opts,
        acam=acam,
        opts=args.opts,
        baseline_config=args.baseline_config,
        num_gpus=args.num_gpus,
    )
    if args.jobs < 1 or args.threads < 0:
        raise SystemExit(
            f"--jobs must be at least 1 and --threads at least 0, got {args.jobs}, {args.threads}."
        )
    study = run_study(
        spec,
        args.output_dir,
        train=not args.table_only,
        jobs=args.jobs,
        threads=args.threads or None,
    )
    logging.getLogger("acamkd").info(
        "Wrote study.md, study.json and study.png to %s", os.path.abspath(args.output_dir)
    )
    return study


if __name__ == "__main__":
    main()
