#!/usr/bin/env python
"""
Plot a logged scalar (default ``total_loss``) of several runs against the iteration, from
their ``metrics.json``: runs given the same label (e.g. seeds) are drawn as their mean with the
min-max band. See ``acamkd.experiments.curves``.

    python tools/plot_curves.py --output docs/figures/detectors_streets_loss.png \\
        --run RetinaNet=output/detectors/retinanet/runs/* --run FCOS=output/detectors_fcos/runs/*
"""
import argparse
import glob
import json
from collections import defaultdict

from acamkd.experiments.curves import gain_over_last, plot_curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="LABEL=DIR",
        help="a run folder (glob patterns allowed) and its label; repeat",
    )
    parser.add_argument("--key", default="total_loss", help="the scalar to draw")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--title", default="")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    parser.add_argument("--json", default="", help="also write the drawn values here")
    parser.add_argument(
        "--plateau",
        type=float,
        default=None,
        metavar="GAIN",
        help="also say per label whether the mean gains less than GAIN over the last 20%% of "
        "its iterations (e.g. 0.5 with --key bbox/AP)",
    )
    args = parser.parse_args()

    runs = defaultdict(list)
    for text in args.run:
        label, sep, pattern = text.partition("=")
        if not sep or not label or not pattern:
            parser.error(f"--run {text!r}: expected LABEL=DIR")
        dirs = sorted(glob.glob(pattern)) or [pattern]
        runs[label].extend(dirs)
    drawn = plot_curves(runs, args.key, args.output, title=args.title, log_y=args.log_y)
    for label, curve in drawn.items():
        first, last = curve["iteration"][0], curve["iteration"][-1]
        print(
            f"{label}: {args.key} {curve['mean'][0]:.3f} -> {curve['mean'][-1]:.3f} "
            f"(iterations {first}-{last}, {len(runs[label])} run{'s' * (len(runs[label]) != 1)})"
        )
        if args.plateau is not None:
            gain, since = gain_over_last(curve["iteration"], curve["mean"])
            verdict = "plateaued" if gain < args.plateau else "still learning"
            print(
                f"  gain since iteration {since}: {gain:+.2f} ({verdict}, threshold {args.plateau})"
            )
    print(f"wrote {args.output}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(drawn, f, indent=2)


if __name__ == "__main__":
    main()
