#!/usr/bin/env python
"""
Time a distillation step against its floor (the student's training step plus the teacher's
forward) for a YAML config, image size and batch, in one process with interleaved rounds, with
random weights and synthetic images and boxes; break ACAM's part down per level (forward and
backward); print the ratio distill / floor and the peak memory growth; write JSON (one entry
per implementation). See ``acamkd.experiments.benchmark``.

Usage:
    python tools/benchmark_step.py \\
        --config-file configs/Streets-Detection/acamkd_retinanet_R_18_from_R_50_streets.yaml \\
        --batch 8 --height 160 --width 320 --threads 2 --impl before after \\
        --output output/benchmark_step/streets.json
    # --impl before after: this code and the one before issue 16 (SDPA heads, teacher under
    # no_grad), interleaved in one process on one model; --impl after (default): this code only
    # on a GPU: --device cuda [--amp fp16|bf16]
    # the distillation methods interleaved on one student, teacher and batch:
    python tools/benchmark_step.py \\
        --config-file configs/COCO-Detection/acamkd_retinanet_R_50_from_R_101_FPN_2x.yaml \\
        --batch 2 --height 640 --width 640 --impl MSE FGD MGD CWD PKD ACAMKD \\
        --output output/benchmark_step/methods_640.json
"""
import argparse
import json
import os

import torch

from acamkd.experiments.benchmark import benchmark_step, format_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="distillation YAML config")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--height", type=int, default=640, help="image height")
    parser.add_argument("--width", type=int, default=640, help="image width")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--impl",
        nargs="+",
        default=["after"],
        help="after: this code; before: STCA-FF via SDPA heads and the teacher under no_grad; "
        "a MODEL.ACAMKD.METHOD name (MSE, FGD, ...): that method's level modules on the same "
        "student and teacher; several are interleaved in one process",
    )
    parser.add_argument("--amp", choices=("none", "fp16", "bf16"), default="none")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per part per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per part first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--no-levels", action="store_true", help="skip the per-level timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="", help="JSON result (default: print only)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = benchmark_step(
        args.config_file,
        batch=args.batch,
        height=args.height,
        width=args.width,
        device=args.device,
        impls=args.impl,
        rounds=args.rounds,
        repeats=args.repeats,
        warmup=args.warmup,
        amp=args.amp,
        opts=args.opts,
        seed=args.seed,
        levels=not args.no_levels,
    )
    print("\n\n".join(format_report(r) for r in result.values()))
    if {"before", "after"} <= set(result):
        before, after = result["before"], result["after"]
        print(
            f"after / before, same process: distill step "
            f"{after['median_s']['distill_step'] / before['median_s']['distill_step']:.3f}, "
            f"ACAM overhead {after['acam_overhead_s']:.3f} s vs {before['acam_overhead_s']:.3f} s"
        )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
