#!/usr/bin/env python
"""
Benchmark one ACAM-KD level (forward + backward) on the CPU: the fused SDPA path
(``MODEL.ACAMKD.ATTENTION sdpa``), the chunked path (``chunked``, the CPU default) and a naive
path that materialises the N x N attention matrix.

Cases: RetinaNet p3 of a 1333x800 image (C=256, 100x168, N=16,800) and Faster R-CNN p2 (C=256,
200x336, N=67,200), batch 1. Each (case, path) runs in a fresh subprocess, so its peak RSS growth
(``ru_maxrss`` after the runs minus before them, with the module and inputs already built) is
its own. The fused path runs inside ``sdpa_kernel([SDPBackend.FLASH_ATTENTION])``: the math
fallback is excluded, so a run that finishes proves the fused kernel was used. The naive path
is skipped where its attention matrix alone would exceed ``--naive-limit-gb``.

Usage:
    python tools/benchmark_acam.py --threads 2 --repeats 1 --output output/benchmark_acam.json
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from acamkd.modeling.acam import ACAMLevel
from acamkd.modeling.stca_ff import STCAFusion

CASES: Dict[str, Dict[str, int]] = {
    "p4": {"channels": 256, "height": 50, "width": 84},  # small, for a quick check
    "p3": {"channels": 256, "height": 100, "width": 168},
    "p2": {"channels": 256, "height": 200, "width": 336},
}


class NaiveSTCAFusion(STCAFusion):
    """STCA-FF with the explicit N x N softmax: the memory the fused path avoids."""

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)  # (B, 1, N, N)
        return attn @ v


def attention_matrix_gb(case: Dict[str, int], batch: int = 1) -> float:
    """Size in GB (1e9 bytes) of one fp32 N x N attention matrix per image."""
    n = case["height"] * case["width"]
    return batch * n * n * 4 / 1e9


def _max_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(case_name: str, path: str, threads: int, repeats: int) -> Dict:
    """Runs one (case, path) in this process and returns its measurements."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    case = CASES[case_name]
    c, h, w = case["channels"], case["height"], case["width"]
    # Same inputs and weights on both paths, so their losses must agree.
    teacher = torch.randn(1, c, h, w)
    student = torch.randn(1, c, h, w, requires_grad=True)
    attention = "chunked" if path == "chunked" else "sdpa"
    level = ACAMLevel(teacher_channels=c, student_channels=c, attention=attention)
    if path == "naive":
        naive = NaiveSTCAFusion(c)
        naive.load_state_dict(level.fusion.state_dict())
        level.fusion = naive

    if path == "fused":
        # Only the fused kernel is allowed: an unsupported input raises instead of falling back.
        backend_ctx, backend = sdpa_kernel([SDPBackend.FLASH_ATTENTION]), "FLASH_ATTENTION"
    elif path == "chunked":
        backend_ctx, backend = contextlib.nullcontext(), "chunked (one head, full width)"
    else:
        backend_ctx, backend = contextlib.nullcontext(), "explicit softmax (N x N)"

    rss_before = _max_rss_mb()
    times: List[float] = []
    with backend_ctx:
        for _ in range(repeats):
            level.zero_grad(set_to_none=True)
            student.grad = None
            start = time.perf_counter()
            out = level(teacher, student)
            sum(out.losses.values()).backward()
            times.append(time.perf_counter() - start)
    rss_after = _max_rss_mb()
    return {
        "case": case_name,
        "path": path,
        "backend": backend,
        "shape": [1, c, h, w],
        "N": h * w,
        "threads": threads,
        "repeats": repeats,
        "time_s": times,
        "time_median_s": statistics.median(times),
        "peak_rss_growth_mb": rss_after - rss_before,
        "rss_before_mb": rss_before,
        "loss": {k: float(v) for k, v in out.losses.items()},
    }


def _run_subprocess(case_name: str, path: str, args: argparse.Namespace) -> Dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        f"{case_name}:{path}",
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"case": case_name, "path": path, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_table(rows: List[Dict]) -> None:
    header = (
        f"{'case':<5} {'N':>7} {'path':<6} {'backend':<26} {'time (s)':>9} {'peak RSS +MB':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        n = r.get("N", "")
        if "skipped" in r:
            print(f"{r['case']:<5} {n:>7} {r['path']:<6} skipped: {r['skipped']}")
        elif "error" in r:
            print(f"{r['case']:<5} {n:>7} {r['path']:<6} error: {r['error']}")
        else:
            print(
                f"{r['case']:<5} {n:>7} {r['path']:<6} {r['backend']:<26} "
                f"{r['time_median_s']:>9.2f} {r['peak_rss_growth_mb']:>13.0f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=1, help="timed forward+backward runs")
    parser.add_argument("--output", default="output/benchmark_acam.json", help="JSON result")
    parser.add_argument(
        "--cases", default="p3,p2", help=f"comma-separated subset of {sorted(CASES)}"
    )
    parser.add_argument(
        "--naive-limit-gb",
        type=float,
        default=4.0,
        help="skip the naive path where one fp32 N x N matrix exceeds this",
    )
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        case_name, path = args.worker.split(":")
        print(json.dumps(run_worker(case_name, path, args.threads, args.repeats)))
        return

    rows: List[Dict] = []
    for case_name in args.cases.split(","):
        case = CASES[case_name]
        n = case["height"] * case["width"]
        for path in ("fused", "chunked", "naive"):
            a_gb = attention_matrix_gb(case)
            if path == "naive" and a_gb > args.naive_limit_gb:
                reason = (
                    f"the N x N matrix alone is {a_gb:.1f} GB fp32 (> {args.naive_limit_gb} GB)"
                )
                rows.append({"case": case_name, "path": path, "N": n, "skipped": reason})
            else:
                rows.append(_run_subprocess(case_name, path, args))
            _print_table(rows[-1:])
    print()
    _print_table(rows)

    result = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "repeats": args.repeats,
        # The machine may be shared: the load at the end of the run, for context.
        "loadavg_1_5_15min": list(os.getloadavg()),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
