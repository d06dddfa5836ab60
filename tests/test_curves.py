"""Training curves from metrics.json: reading, averaging over runs, the figure."""

import json
import os

import numpy as np
import pytest

from acamkd.experiments.curves import mean_curve, plot_curves, read_metric


def _run(root, name, records):
    run = os.path.join(str(root), name)
    os.makedirs(run)
    with open(os.path.join(run, "metrics.json"), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return run


def test_read_metric_keeps_the_last_record_of_an_iteration(tmp_path):
    run = _run(
        tmp_path,
        "a",
        [
            {"iteration": 19, "total_loss": 4.0},
            {"iteration": 39, "total_loss": 3.0},
            {"iteration": 39, "total_loss": 2.5},  # logged again after a resume
            {"iteration": 39, "bbox/AP": 7.0},  # an evaluation record without the key
        ],
    )
    iterations, values = read_metric(run, "total_loss")
    assert iterations.tolist() == [19, 39] and values.tolist() == [4.0, 2.5]
    with pytest.raises(KeyError, match="no 'loss_cls'.*total_loss"):
        read_metric(run, "loss_cls")
    with pytest.raises(FileNotFoundError, match="OUTPUT_DIR"):
        read_metric(str(tmp_path), "total_loss")


def test_mean_curve_over_runs_on_their_common_iterations():
    a = (np.array([19, 39, 59]), np.array([4.0, 2.0, 1.0]))
    b = (np.array([19, 39]), np.array([6.0, 3.0]))
    it, mean, low, high = mean_curve([a, b])
    assert it.tolist() == [19, 39]
    assert (
        mean.tolist() == [5.0, 2.5] and low.tolist() == [4.0, 2.0] and high.tolist() == [6.0, 3.0]
    )
    with pytest.raises(ValueError, match="no logged iteration"):
        mean_curve([a, (np.array([5]), np.array([1.0]))])


def test_plot_curves_draws_each_label_and_returns_what_it_drew(tmp_path):
    seeds = [
        _run(tmp_path, f"s{i}", [{"iteration": k, "total_loss": 10.0 / (k + i)} for k in (1, 2, 3)])
        for i in (1, 2)
    ]
    other = _run(tmp_path, "o", [{"iteration": k, "total_loss": 1.0} for k in (1, 2, 3)])
    output = str(tmp_path / "fig" / "loss.png")
    drawn = plot_curves({"two seeds": seeds, "other": [other]}, "total_loss", output)
    with open(output, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert drawn["other"]["mean"] == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(
        drawn["two seeds"]["mean"], [(5 + 10 / 3) / 2, (10 / 3 + 2.5) / 2, 2.25]
    )
    np.testing.assert_allclose(drawn["two seeds"]["max"], [5.0, 10 / 3, 2.5])


def test_gain_over_the_last_fifth_of_a_schedule():
    from acamkd.experiments.curves import gain_over_last

    iterations, ap = [250, 500, 750, 1000, 1250, 1500, 1750, 2000], [
        5,
        9,
        12,
        14,
        15,
        15.6,
        15.8,
        16,
    ]
    assert gain_over_last(iterations, ap) == (16 - 15.6, 1500)  # 80% of 2000 is 1600
    assert gain_over_last(iterations, ap, fraction=0.5) == (16 - 14, 1000)
    with pytest.raises(ValueError, match="TEST.EVAL_PERIOD"):
        gain_over_last([2000], [16.0])


def test_plot_curves_tool_says_which_runs_plateaued(tmp_path):
    import subprocess
    import sys

    from tiny_models import REPO

    its = [500, 1000, 1500, 2000]
    flat = _run(
        tmp_path, "flat", [{"iteration": k, "bbox/AP": a} for k, a in zip(its, [8, 12, 15.8, 16])]
    )
    rising = _run(
        tmp_path, "rising", [{"iteration": k, "bbox/AP": a} for k, a in zip(its, [4, 8, 12, 16])]
    )
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools/plot_curves.py"), "--key", "bbox/AP"]
        + ["--run", f"flat={flat}", "--run", f"rising={rising}", "--plateau", "0.5"]
        + ["--output", str(tmp_path / "ap.png")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "gain since iteration 1500: +0.20 (plateaued" in out
    assert "gain since iteration 1500: +4.00 (still learning" in out
