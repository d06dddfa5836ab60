"""A shrunk demo runs end to end (generate, train three models, compare) and writes its table."""

import json
import os
import re
import subprocess
import sys

import pytest

from acamkd.data import generate_streets
from acamkd.experiments.demo import demo_stages, read_training_log
from acamkd.experiments.stages import Stage, run_side_by_side

from tiny_models import REPO

SHRINK = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def test_acamkd_stage_builds_its_teacher_as_the_teacher_stage_trained_it(tmp_path):
    stages = demo_stages(str(tmp_path), 10, 5, SHRINK)
    assert [s.name for s in stages] == [
        "teacher", "student_baseline", "student_mse", "student_acamkd"
    ]  # fmt: skip
    teacher, baseline, mse, acamkd = (dict(zip(s.opts[::2], s.opts[1::2])) for s in stages)
    assert (teacher["SOLVER.MAX_ITER"], baseline["SOLVER.MAX_ITER"]) == ("10", "5")
    for distilled in (mse, acamkd):
        assert distilled["SOLVER.MAX_ITER"] == "5"
        assert distilled["MODEL.ACAMKD.TEACHER.WEIGHTS"].endswith(
            os.path.join("teacher", "model_final.pth")
        )
        assert eval(distilled["MODEL.ACAMKD.TEACHER.OPTS"]) == SHRINK
    # The plain-MSE row differs from the ACAM-KD row in its masks only.
    assert mse.pop("MODEL.ACAMKD.MASKS") == "none" and "MODEL.ACAMKD.MASKS" not in acamkd
    assert mse == acamkd and stages[2].config == stages[3].config
    cmd = stages[1].command(str(tmp_path))
    assert cmd[cmd.index("DATASETS.TEST") + 1] == "()" and "--resume" in cmd


def test_segmentation_stages_pair_the_wide_teacher_with_the_baseline_student(tmp_path):
    teacher, baseline, _, acamkd = demo_stages(str(tmp_path), 10, 5, task="segmentation")
    assert "Streets-SemanticSegmentation" in teacher.config
    assert acamkd.config.endswith(
        "acamkd_deeplabv3_R_18_OS8_from_deeplabv3_R_18_wide_OS8_streets.yaml"
    )
    with pytest.raises(ValueError, match="Unknown demo task 'panoptic'"):
        demo_stages(str(tmp_path), 1, 1, task="panoptic")


DET_BASELINE = "configs/Streets-Detection/retinanet_R_18_FPN_streets.yaml"

SEG_SHRINK = [
    "INPUT.MIN_SIZE_TRAIN", "(64, 128)",  # a range, as the config samples it
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
    "INPUT.CROP.SIZE", "(64, 128)",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def test_shrunk_segmentation_demo_end_to_end(tmp_path):
    out = tmp_path / "demo_seg"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    args = ["--task", "segmentation", "--num-train", "4", "--num-val", "2"]
    args += ["--width", "128", "--height", "64", "--output-dir", str(out)]
    args += ["--teacher-iters", "4", "--student-iters", "4", "--jobs", "1"]
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "demo.py"), *args, *SEG_SHRINK],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert all(
        r["task"] == "sem_seg" and set(r["metrics"]) == {"mIoU", "pACC"} for r in rows.values()
    )
    assert rows["teacher"]["params_m"] > rows["student_acamkd"]["params_m"]
    assert "| mIoU | pACC |" in (out / "results.md").read_text()
    assert not list(out.glob("*/console.log"))  # one at a time: the console shows each run


def test_shrunk_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    args = ["--num-train", "4", "--num-val", "2", "--width", "128", "--height", "64"]
    # 4 iterations: detectron2 times iterations after its 3 warm-up ones (train s/iter).
    args += ["--teacher-iters", "4", "--student-iters", "4", "--output-dir", str(out)]
    args += ["--jobs", "2"]  # 3 students, 2 at a time
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "demo.py"), *args, *SHRINK],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = (out / "results.md").read_text()
    names = ("teacher", "student_baseline", "student_mse", "student_acamkd")
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(names)
    for name in names:
        assert f"| {name} |" in table and f"| {name} |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == set(names) == set(results["stage_seconds"])
    assert rows["teacher"]["params_m"] > rows["student_baseline"]["params_m"]
    assert rows["teacher"]["gflops"] > rows["student_baseline"]["gflops"] > 0
    # The distilled students deploy exactly the baseline's architecture.
    assert rows["student_acamkd"]["params_m"] == rows["student_baseline"]["params_m"]
    assert rows["student_mse"]["params_m"] == rows["student_baseline"]["params_m"]
    assert all(set(r["metrics"]) >= {"AP", "AP50"} for r in rows.values())
    for stage in rows:  # every stage left a normal detectron2 output folder
        assert (out / stage / "model_final.pth").is_file()
        assert list((out / stage).glob("events.out.tfevents.*"))
    log = read_training_log(str(out / "student_acamkd"))
    assert log["train_s_per_iter"] > 0 and "acam/p3/spatial_mask_coverage" in log
    # The students trained side by side, each one's console output in its folder.
    assert all((out / n / "console.log").is_file() for n in names[1:])
    assert not (out / "teacher" / "console.log").exists()


def test_side_by_side_names_the_failed_stage_and_its_log(tmp_path, monkeypatch, log_records):
    """A run that fails among runs side by side is named with its exit code and console log,
    and the other one still finishes."""
    ok = Stage("ok", DET_BASELINE, SHRINK + ["SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()"])
    broken = Stage("broken", DET_BASELINE, ["DATASETS.TRAIN", "('no_such_dataset',)"])
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))  # the runs' data
    generate_streets(str(tmp_path / "datasets"), num_train=2, num_val=1, width=128, height=64)
    messages = log_records("acamkd.experiments.stages")
    with pytest.raises(RuntimeError, match=r"broken \(exit 1, see .*broken/console\.log\)"):
        run_side_by_side([ok, broken], str(tmp_path), jobs=2, threads=1, poll_seconds=0.5)
    progress = [m for m in messages if m.startswith("[ok] ")]
    assert any(m.startswith("[ok] starting") for m in progress)  # polled before its first log
    assert re.fullmatch(r"\[ok\] finished in \d+ s", progress[-1])
    assert "no_such_dataset" in (tmp_path / "broken" / "console.log").read_text()
    assert ok.is_finished(str(tmp_path))
