"""tools/benchmark_step.py on a tiny distiller: it runs and writes the JSON it documents."""

import json
import os
import subprocess
import sys

import pytest

from tiny_models import REPO, distill_cfg

TOP_KEYS = {
    "config",
    "impl",
    "attention",
    "teacher_mode",
    "device",
    "batch",
    "height",
    "width",
    "padded_hw",
    "times_s",
    "median_s",
    "floor_s",
    "ratio",
    "acam_overhead_s",
    "levels",
    "peak_memory_growth_mb",
    "memory_kind",
    "losses",
    "losses_finite",
}
PARTS = {"student_step", "teacher_forward", "distill_step"}


def _run_tool(tmp_path, impls, repeats):
    config = tmp_path / "tiny_distill.yaml"
    config.write_text(distill_cfg("RetinaNet").dump())
    output = tmp_path / f"{'_'.join(impls)}.json"
    cmd = [sys.executable, os.path.join(REPO, "tools", "benchmark_step.py")]
    cmd += ["--config-file", str(config), "--batch", "1", "--height", "64", "--width", "96"]
    cmd += ["--rounds", "1", "--repeats", str(repeats), "--warmup", "0", "--threads", "1"]
    cmd += ["--impl", *impls, "--output", str(output), "MODEL.ACAMKD.IN_FEATURES", "['p3','p4']"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distill / floor" in proc.stdout and "p3" in proc.stdout
    return proc.stdout, json.loads(output.read_text())


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    """One run with both implementations: (stdout, results)."""
    return _run_tool(tmp_path_factory.mktemp("interleaved"), ["before", "after"], repeats=2)


def test_benchmark_step_writes_json_with_the_expected_fields(tmp_path, interleaved):
    stdout, results = _run_tool(tmp_path, ["after"], repeats=1)
    assert list(results) == ["after"] and "after / before" not in stdout
    results.update(before=interleaved[1]["before"])

    for impl, r in results.items():
        assert TOP_KEYS <= set(r)
        assert r["impl"] == impl and r["device"] == "cpu" and r["batch"] == 1
        assert r["padded_hw"] == [64, 96]
        assert set(r["median_s"]) == set(r["times_s"]) == set(r["peak_memory_growth_mb"]) == PARTS
        assert all(len(ts) == r["repeats"] and ts[0] > 0 for ts in r["times_s"].values())
        floor = r["median_s"]["student_step"] + r["median_s"]["teacher_forward"]
        assert abs(r["floor_s"] - floor) < 1e-12
        assert abs(r["ratio"] - r["median_s"]["distill_step"] / floor) < 1e-12
        assert set(r["levels"]) == {"p3", "p4"}
        assert r["levels"]["p3"]["N"] == 8 * 12 and r["levels"]["p4"]["shape"][-2:] == [4, 6]
        assert all(v["forward_s"] > 0 and v["backward_s"] > 0 for v in r["levels"].values())
        assert r["losses_finite"] and {"loss_acam_channel", "loss_cls"} <= set(r["losses"])
    assert results["after"]["attention"] == "chunked"
    assert results["after"]["teacher_mode"] == "inference_mode"
    assert results["before"]["attention"] == "sdpa"
    assert results["before"]["teacher_mode"] == "no_grad"


def test_benchmark_step_interleaves_implementations_on_one_student_step(interleaved):
    stdout, results = interleaved
    assert "after / before, same process" in stdout
    before, after = results["before"], results["after"]
    assert before["interleaved_with"] == after["interleaved_with"] == ["before", "after"]
    # The student step is timed once per round and shared; the other parts are each impl's own.
    assert before["times_s"]["student_step"] == after["times_s"]["student_step"]
    assert len(before["times_s"]["student_step"]) == 2
    assert before["times_s"]["distill_step"] != after["times_s"]["distill_step"]
    assert (before["attention"], after["attention"]) == ("sdpa", "chunked")
    for r in (before, after):
        floor = r["median_s"]["student_step"] + r["median_s"]["teacher_forward"]
        assert abs(r["ratio"] - r["median_s"]["distill_step"] / floor) < 1e-12
    # Same weights (learning rate 0) and images: both compute the same ACAM losses. (The
    # detector's own losses differ: RetinaNet's loss normaliser is a running average over steps.)
    acam = [k for k in after["losses"] if k.startswith("loss_acam")]
    assert acam and set(after["losses"]) == set(before["losses"])
    for k in acam:
        assert abs(after["losses"][k] - before["losses"][k]) <= 1e-4 * abs(after["losses"][k]), k


def test_benchmark_step_interleaves_distillation_methods_on_one_model(tmp_path):
    stdout, results = _run_tool(tmp_path, ["MSE", "FGD", "CWD", "ACAMKD"], repeats=1)
    assert list(results) == ["MSE", "FGD", "CWD", "ACAMKD"]
    shared = results["MSE"]["times_s"]["student_step"]
    expected = {
        "MSE": {"loss_mse"},
        "FGD": {"loss_fgd_fg", "loss_fgd_bg", "loss_fgd_attention", "loss_fgd_global"},
        "CWD": {"loss_cwd"},
        "ACAMKD": {"loss_acam_channel", "loss_acam_spatial", "loss_acam_diversity"},
    }
    for method, keys in expected.items():
        r = results[method]
        assert r["times_s"]["student_step"] == shared  # one student step per round, shared
        distill_losses = {k for k in r["losses"] if k not in ("loss_cls", "loss_box_reg")}
        assert distill_losses == keys, method
        assert r["losses_finite"] and set(r["levels"]) == {"p3", "p4"}
    assert results["ACAMKD"]["attention"] == "chunked" and results["MSE"]["attention"] is None
    config = "configs/Streets-Detection/acamkd_fcos_R_18_from_fcos_R_18_wide_streets.yaml"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "benchmark_step.py")]
        + ["--config-file", config, "--impl", "NOPE"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode != 0 and "impls must be among" in proc.stderr
