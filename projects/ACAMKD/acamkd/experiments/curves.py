"""
Training curves from detectron2's ``metrics.json`` (one JSON object per logging period), for
comparing runs: per label the mean over its runs (e.g. seeds) with the min-max band.
``import acamkd`` does not import this module (it needs matplotlib).
"""

import os
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .stages import read_metrics

__all__ = ["read_metric", "mean_curve", "gain_over_last", "plot_curves"]


def read_metric(run_dir: str, key: str) -> Tuple[np.ndarray, np.ndarray]:
    """
    Args:
        run_dir (str): a run's output folder (with ``metrics.json``).
        key (str): a scalar's name, e.g. "total_loss".

    Returns:
        ndarray: (K,) the iterations that logged ``key``, increasing; the last record of an
            iteration wins (a resumed run logs some twice).
        ndarray: (K,) its values.

    Raises:
        FileNotFoundError: no ``metrics.json`` in ``run_dir``.
        KeyError: no record of ``key``, naming the keys there are.
    """
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; pass a run's OUTPUT_DIR")
    values: Dict[int, float] = {}
    seen = set()
    for record in read_metrics(run_dir):
        seen.update(record)
        if key in record and "iteration" in record:
            values[int(record["iteration"])] = float(record[key])
    if not values:
        known = ", ".join(sorted(k for k in seen if "/" not in k)[:20])
        raise KeyError(f"{path} has no {key!r}; top-level keys include: {known}")
    iterations = np.array(sorted(values))
    return iterations, np.array([values[i] for i in iterations])


def mean_curve(
    curves: Sequence[Tuple[np.ndarray, np.ndarray]]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """
    Args:
        curves: (iterations, values) per run.

    Returns:
        The iterations every run logged, and there the mean, min and max over the runs.
    """
    common = sorted(set.intersection(*(set(it.tolist()) for it, _ in curves)))
    if not common:
        raise ValueError("the runs share no logged iteration")
    stacked = np.stack([np.interp(common, it, v) for it, v in curves])
    return np.array(common), stacked.mean(0), stacked.min(0), stacked.max(0)


def gain_over_last(iterations: Sequence[int], values: Sequence[float], fraction: float = 0.2):
    """
    How much a curve still gains over the last ``fraction`` of its iterations: the last value
    minus the value logged at the latest iteration at or before ``(1 - fraction)`` of the last
    one (for an evaluation curve, e.g. "bbox/AP": has the run plateaued?).

    Args:
        iterations (sequence[int]): (K,) increasing.
        values (sequence[float]): (K,).
        fraction (float): the end of the schedule to look at, in (0, 1).

    Returns:
        tuple[float, int]: the gain, and the iteration it is measured from.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    cut = (1 - fraction) * iterations[-1]
    before = [i for i, it in enumerate(iterations) if it <= cut]
    if not before:
        raise ValueError(
            f"no value logged at or before iteration {cut:g} ({1 - fraction:.0%} of "
            f"{iterations[-1]}): evaluate more often (TEST.EVAL_PERIOD)"
        )
    start = before[-1]
    return float(values[-1] - values[start]), int(iterations[start])


def plot_curves(
    runs: Mapping[str, List[str]], key: str, output: str, title: str = "", log_y: bool = False
) -> Dict[str, Dict[str, List[float]]]:
    """
    Draw ``key`` against the iteration, one line per label (the mean over its runs, with the
    min-max band when there are several), and save it to ``output`` (PNG).

    Args:
        runs: label -> its run folders.
        key (str): the scalar to draw.
        output (str): the figure's path.
        title (str): the figure's title (default: ``key``).
        log_y (bool): logarithmic y axis.

    Returns:
        dict: label -> {"iteration", "mean", "min", "max"} as lists, what was drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, dirs in runs.items():
        it, mean, low, high = mean_curve([read_metric(d, key) for d in dirs])
        line = ax.plot(it, mean, label=f"{label} ({len(dirs)} run{'s' * (len(dirs) > 1)})")
        if len(dirs) > 1:
            ax.fill_between(it, low, high, color=line[0].get_color(), alpha=0.2, linewidth=0)
        drawn[label] = {
            "iteration": it.tolist(),
            "mean": mean.tolist(),
            "min": low.tolist(),
            "max": high.tolist(),
        }
    ax.set_xlabel("iteration")
    ax.set_ylabel(key)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    return drawn
