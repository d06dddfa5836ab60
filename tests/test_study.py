"""The variants x seeds study: run keys, summary statistics, and a tiny study end to end."""

import json
import os
import statistics

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from acamkd import get_acamkd_cfg
from acamkd.data import generate_streets
from acamkd.experiments.study import (
    VARIANT_SETS,
    StudySpec,
    Variant,
    make_stage,
    parse_variant,
    run_study,
    summarize,
)

from tiny_models import REPO

DET = "configs/Streets-Detection"
SHRINK = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
    # 64 wide: the RetinaNet head's GroupNorm has 32 groups, and p7 is 1x1 at this size.
    "MODEL.FPN.OUT_CHANNELS", "64",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
SCHEDULE = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1"]
SCHEDULE += ["SOLVER.STEPS", "(3,)", "SOLVER.CHECKPOINT_PERIOD", "100"]
# An untrained detector scores below the default threshold: keep every box, so AP is a number.
SCHEDULE += ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]


def _spec(**kw) -> StudySpec:
    base = dict(
        config=f"{DET}/acamkd_retinanet_R_18_from_R_50_streets.yaml",
        variants=list(VARIANT_SETS["objective"]),
        seeds=[0, 1],
        teacher_weights="/tmp/teacher.pth",
        teacher_config=f"{DET}/retinanet_R_50_FPN_streets.yaml",
    )
    base.update(kw)
    return StudySpec(**base)


def test_runs_are_keyed_by_what_they_train():
    spec = _spec(acam={"NORMALIZER": "sum_sq"})
    names = {v.name: v for v in VARIANT_SETS["objective"] + VARIANT_SETS["paper-ablation"]}
    stage = {n: make_stage(spec, v, 0).name for n, v in names.items()}
    # "full" under the common NORMALIZER sum_sq is the objective set's "sum_sq" row.
    assert stage["full"] == stage["sum_sq"]
    # The baseline and "no mask" ignore the mask settings: shared with a plain study.
    plain = _spec()
    assert stage["baseline"] == make_stage(plain, names["baseline"], 0).name
    assert stage["no_mask"] == make_stage(plain, names["no_mask"], 0).name
    # Seeds and settings that matter give other runs.
    assert make_stage(spec, names["full"], 1).name != stage["full"]
    assert len({stage[n] for n in ("literal", "ascend", "sum_sq", "ascend_sum_sq", "detach")}) == 5
    base = make_stage(plain, names["baseline"], 0)
    assert base.opts[:2] == ["MODEL.META_ARCHITECTURE", "RetinaNet"]
    assert "MODEL.ACAMKD.TEACHER.WEIGHTS" not in base.opts


def test_parse_variant():
    assert parse_variant("no_mask") == Variant("no_mask", {"MASKS": "none"})
    custom = parse_variant("m4:num_masks=4,MODEL.ACAMKD.NORMALIZER=sum_sq")
    assert custom.acam == {"NUM_MASKS": "4", "NORMALIZER": "sum_sq"}
    with pytest.raises(ValueError, match="no built-in variant"):
        parse_variant("fulll")
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        parse_variant("x:NUM_MASKS")


def test_lazy_study_without_baseline_config_is_refused():
    spec = _spec(config=f"{DET}/acamkd_retinanet_R_18_from_R_50_streets.py")
    with pytest.raises(ValueError, match="--baseline-config"):
        make_stage(spec, VARIANT_SETS["objective"][0], 0)
    full = make_stage(spec, Variant("full"), 3)
    assert "train.seed=3" in full.opts and "model.teacher.weights=/tmp/teacher.pth" in full.opts


def test_summary_statistics_by_hand():
    runs = [
        {"variant": v, "seed": s, "task": "bbox", "metrics": {"AP": ap}, "train_s_per_iter": t,
         "masks": m, "collapsed": c}
        for v, s, ap, t, m, c in [
            ("baseline", 0, 10.0, 1.0, {}, False),
            ("baseline", 1, 12.0, 1.2, {}, False),
            ("full", 0, 15.0, 2.0, {"spatial_mask_mean": 0.2}, False),
            ("full", 1, 16.0, 2.2, {"spatial_mask_mean": 0.4}, True),
        ]
    ]  # fmt: skip
    rows = summarize(runs, ["baseline", "full"], {"metrics": {"AP": 31.0}})
    base, full = rows
    assert base["mean"] == 11.0 and base["std"] == pytest.approx(2**0.5)
    assert full["mean"] == 15.5 and full["delta"] == 4.5
    assert full["gap_closed"] == pytest.approx(4.5 / 20.0)
    assert full["masks"]["spatial_mask_mean"] == pytest.approx(0.3)
    assert full["collapsed"] and not base["collapsed"]
    assert full["train_s_per_iter"] == pytest.approx(2.1)


@pytest.fixture(scope="module")
def tiny_streets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    generate_streets(str(root), num_train=4, num_val=2, width=128, height=64, progress=False)
    return str(root)


def _tiny_teacher(path: str) -> None:
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(os.path.join(REPO, DET, "retinanet_R_50_FPN_streets.yaml"))
    cfg.merge_from_list(SHRINK)
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=os.path.dirname(path)).save(
        os.path.basename(path)[: -len(".pth")]
    )


def test_tiny_study_end_to_end_and_resumed(tmp_path, tiny_streets, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", tiny_streets)
    teacher = str(tmp_path / "teacher.pth")
    _tiny_teacher(teacher)
    spec = _spec(
        variants=[VARIANT_SETS["objective"][0], Variant("sum_sq", {"NORMALIZER": "sum_sq"})],
        teacher_weights=teacher,
        opts=SHRINK + SCHEDULE + ["MODEL.ACAMKD.TEACHER.OPTS", repr(SHRINK)],
    )
    out = str(tmp_path / "study")
    teacher_row = {"metrics": {"AP": 50.0}}
    study = run_study(spec, out, teacher_row=teacher_row)
    assert {(r["variant"], r["seed"]) for r in study["runs"]} == {
        (v, s) for v in ("baseline", "sum_sq") for s in (0, 1)
    }
    # The table's numbers are those of the runs' own metrics.json files.
    for row in study["variants"]:
        values = []
        for run in (r for r in study["runs"] if r["variant"] == row["variant"]):
            with open(os.path.join(out, run["dir"], "metrics.json")) as f:
                records = [json.loads(line) for line in f]
            values.append([r["bbox/AP"] for r in records if "bbox/AP" in r][-1])
        assert row["values"] == values
        assert row["mean"] == pytest.approx(statistics.fmean(values))
        assert row["std"] == pytest.approx(statistics.stdev(values))
    sum_sq = study["variants"][1]
    assert "spatial_mask_mean" in sum_sq["masks"] and study["variants"][0]["masks"] == {}
    table = open(os.path.join(out, "study.md")).read()
    assert "| baseline |" in table and "| sum_sq |" in table and "Teacher: AP 50.0" in table
    assert os.path.getsize(os.path.join(out, "study.png")) > 5000
    # A second invocation trains nothing and gives the same table.
    mtimes = {r["dir"]: os.path.getmtime(os.path.join(out, r["dir"], "model_final.pth"))
              for r in study["runs"]}  # fmt: skip
    again = run_study(spec, out, teacher_row=teacher_row)
    assert study["trained_now"] == 4 and again["trained_now"] == 0
    assert [r["values"] for r in again["variants"]] == [r["values"] for r in study["variants"]]
    for d, t in mtimes.items():
        assert os.path.getmtime(os.path.join(out, d, "model_final.pth")) == t


def test_stage_is_finished_only_when_readable_and_trained_as_asked(tmp_path, monkeypatch):
    import acamkd.experiments.stages as stages

    calls = []

    def fake_train(cmd, check, cwd):  # what train_net.py leaves behind
        out = cmd[cmd.index("OUTPUT_DIR") + 1]
        calls.append(cmd)
        torch.save({"model": {}, "iteration": 3}, os.path.join(out, "model_final.pth"))

    monkeypatch.setattr(stages.subprocess, "run", fake_train)
    root = str(tmp_path)
    stage = stages.Stage("s", f"{DET}/retinanet_R_18_FPN_streets.yaml", ["SOLVER.MAX_ITER", "4"])
    assert not stage.is_finished(root)
    assert stage.run(root) and stage.is_finished(root) and len(calls) == 1
    assert not stage.run(root) and len(calls) == 1  # finished: skipped
    # Another schedule: not finished, and the old folder is not resumed but set aside whole.
    (tmp_path / "s" / "model_0000001.pth").write_bytes(b"old")
    longer = stages.Stage("s", stage.config, ["SOLVER.MAX_ITER", "8"])
    assert not longer.is_finished(root)
    assert longer.run(root) and len(calls) == 2
    assert not (tmp_path / "s" / "model_0000001.pth").exists()
    assert (tmp_path / "s.replaced-1" / "model_0000001.pth").read_bytes() == b"old"
    assert stage.run(root) and len(calls) == 3  # back to 4 iterations: the next free name
    assert (tmp_path / "s.replaced-2" / "stage.json").exists()
    assert longer.run(root) and len(calls) == 4
    # A truncated final checkpoint is not finished: the stage trains (resumes) again.
    final = tmp_path / "s" / "model_final.pth"
    final.write_bytes(final.read_bytes()[:20])
    assert not longer.is_finished(root)
    assert longer.run(root) and len(calls) == 5 and longer.is_finished(root)


def test_stage_retrains_when_its_config_resolves_differently(tmp_path, monkeypatch):
    import acamkd.experiments.stages as stages

    monkeypatch.setattr(
        stages.subprocess,
        "run",
        lambda cmd, check, cwd: torch.save(
            {"model": {}}, os.path.join(cmd[cmd.index("OUTPUT_DIR") + 1], "model_final.pth")
        ),
    )
    root = str(tmp_path / "runs")
    config = tmp_path / "student.yaml"
    config.write_text(f'_BASE_: "{REPO}/{DET}/retinanet_R_18_FPN_streets.yaml"\nSEED: 3\n')
    stage = stages.Stage("s", str(config), ["SOLVER.MAX_ITER", "4"])
    assert stage.run(root) and stage.is_finished(root)
    # The same file name and overrides, but the file now resolves to another config.
    config.write_text(f'_BASE_: "{REPO}/{DET}/retinanet_R_18_FPN_streets.yaml"\nSEED: 4\n')
    assert not stage.is_finished(root)
    # A record from before the digest existed is judged by the file name and overrides alone.
    record = tmp_path / "runs" / "s" / "stage.json"
    record.write_text(json.dumps({"config": str(config), "opts": ["SOLVER.MAX_ITER", "4"]}))
    assert stage.is_finished(root)
    # The digest follows what train_net.py would build: defaults, file, overrides.
    digest = stages.resolved_config_digest
    assert digest(str(config), []) != digest(str(config), ["SOLVER.MAX_ITER", "4"])
    py = f"{DET}/retinanet_R_18_FPN_streets.py"
    assert digest(py, []) == digest(py, []) != digest(py, ["train.max_iter=4"])


def test_a_run_trained_before_a_key_existed_is_kept(tmp_path, monkeypatch, log_records):
    import yaml

    import acamkd.experiments.stages as stages

    def fake_train(cmd, check, cwd):  # train_net.py saves the config it trains with
        out = cmd[cmd.index("OUTPUT_DIR") + 1]
        torch.save({"model": {}}, os.path.join(out, "model_final.pth"))
        text = stages.resolved_config_text(str(config), opts)
        with open(os.path.join(out, "config.yaml"), "w") as f:
            f.write(text.replace("OUTPUT_DIR: ./output", f"OUTPUT_DIR: {out}"))

    monkeypatch.setattr(stages.subprocess, "run", fake_train)
    root, opts = str(tmp_path / "runs"), ["SOLVER.MAX_ITER", "4"]
    config = tmp_path / "student.yaml"
    config.write_text(f'_BASE_: "{REPO}/{DET}/retinanet_R_18_FPN_streets.yaml"\n')
    stage = stages.Stage("s", str(config), opts)
    assert stage.run(root) and stage.is_finished(root)
    run = tmp_path / "runs" / "s"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    record = json.loads((run / "stage.json").read_text())
    messages = log_records("acamkd.experiments.stages")

    # As an older version of the package trained it: without MASK_BUDGET, another digest.
    del saved["MODEL"]["ACAMKD"]["MASK_BUDGET"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / "stage.json").write_text(json.dumps(dict(record, resolved_sha256="0" * 64)))
    assert stage.is_finished(root) and not stage.run(root)
    assert any("MODEL.ACAMKD.MASK_BUDGET (now 0.0)" in m for m in messages)
    # Any other difference (here a value) still retrains; so does a run without its config.
    saved["SOLVER"]["BASE_LR"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert not stage.is_finished(root)
    (run / "config.yaml").unlink()
    assert not stage.is_finished(root)


def test_study_trains_seed_major_and_tables_what_finished_so_far(
    tmp_path, monkeypatch, log_records
):
    import acamkd.experiments.stages as stages

    messages = log_records("acamkd.experiments.study")
    out = str(tmp_path / "study")
    order, tables = [], []

    def fake_train(cmd, check, cwd):  # a finished run: final checkpoint and an evaluation
        run_dir = cmd[cmd.index("OUTPUT_DIR") + 1]
        seed = int(cmd[cmd.index("SEED") + 1])
        student_only = "MODEL.META_ARCHITECTURE" in cmd  # the baseline trains the student alone
        order.append(("baseline" if student_only else "sum_sq", seed))
        if os.path.exists(os.path.join(out, "study.json")):
            with open(os.path.join(out, "study.json")) as f:
                tables.append([(r["variant"], r["seed"]) for r in json.load(f)["runs"]])
        torch.save({"model": {}, "iteration": 3}, os.path.join(run_dir, "model_final.pth"))
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            f.write(json.dumps({"iteration": 3, "bbox/AP": 10.0 + seed}) + "\n")

    monkeypatch.setattr(stages.subprocess, "run", fake_train)
    variants = [VARIANT_SETS["objective"][0], Variant("sum_sq", {"NORMALIZER": "sum_sq"})]
    study = run_study(_spec(variants=variants), out, teacher_row={"metrics": {"AP": 50.0}})
    assert order == [("baseline", 0), ("sum_sq", 0), ("baseline", 1), ("sum_sq", 1)]
    # Before each later run, study.json held exactly the runs finished until then.
    assert tables == [order[:1], order[:2], order[:3]]
    assert [r["values"] for r in study["variants"]] == [[10.0, 11.0], [10.0, 11.0]]
    # Each finished run is logged by its main metric, not by the whole evaluation dict.
    finished = [m for m in messages if m.startswith("Study [")]
    assert finished[1].startswith("Study [2/4] sum_sq seed 0: bbox/AP 10.00 in ")
    assert finished[3].startswith("Study [4/4] sum_sq seed 1: bbox/AP 11.00 in ")


def test_jobs_train_runs_side_by_side_with_their_threads_and_tables_them(tmp_path, monkeypatch):
    import acamkd.experiments.stages as stages

    out = str(tmp_path / "study")
    started, tables = [], []

    class FakeProcess:  # what train_net.py leaves behind, at once
        def __init__(self, cmd, cwd, env, stdout, stderr):
            run_dir = cmd[cmd.index("OUTPUT_DIR") + 1]
            seed = int(cmd[cmd.index("SEED") + 1])
            started.append((os.path.basename(run_dir), env["OMP_NUM_THREADS"]))
            if os.path.exists(os.path.join(out, "study.json")):
                with open(os.path.join(out, "study.json")) as f:
                    tables.append(len(json.load(f)["runs"]))
            torch.save({"model": {}, "iteration": 3}, os.path.join(run_dir, "model_final.pth"))
            with open(os.path.join(run_dir, "metrics.json"), "w") as f:
                f.write(json.dumps({"iteration": 3, "bbox/AP": 10.0 + seed}) + "\n")

        def poll(self):
            return 0

    monkeypatch.setattr(stages.subprocess, "Popen", FakeProcess)
    variants = [VARIANT_SETS["objective"][0], Variant("sum_sq", {"NORMALIZER": "sum_sq"})]
    spec = _spec(variants=variants, seeds=[0, 1, 2])
    teacher_row = {"metrics": {"AP": 50.0}}
    study = run_study(spec, out, teacher_row=teacher_row, jobs=2, threads=3)
    assert len(started) == 6 and {threads for _, threads in started} == {"3"}
    assert len({name for name, _ in started}) == 6
    # Two at a time: the first pair starts before any table exists, each later pair finds the
    # table of every run finished before it.
    assert tables == [2, 2, 4, 4]
    assert [r["values"] for r in study["variants"]] == [[10.0, 11.0, 12.0]] * 2
    again = run_study(spec, out, teacher_row=teacher_row, jobs=2, threads=3)
    assert again["trained_now"] == 0 and len(started) == 6
    with pytest.raises(ValueError, match="jobs"):
        run_study(spec, out, teacher_row=teacher_row, jobs=0)


def test_a_run_keeps_its_key_when_a_default_changes(monkeypatch):
    import acamkd.experiments.study as study

    names = {v.name: v for v in VARIANT_SETS["objective"] + VARIANT_SETS["paper-ablation"]}
    spec = _spec()
    before = {
        n: make_stage(spec, names[n], 0) for n in ("literal", "sum_sq", "ascend_sum_sq", "full")
    }
    assert before["full"].name == before["sum_sq"].name  # the defaults: descend, sum_sq
    opts = before["literal"].opts
    assert opts[opts.index("MODEL.ACAMKD.NORMALIZER") + 1] == "sum"  # stated, not implied

    yaml_cfg = study._yaml_cfg

    def new_defaults(s):  # as if config.py's defaults became ascend / sum_sq
        cfg = yaml_cfg(s)
        cfg.MODEL.ACAMKD.MASK_OBJECTIVE, cfg.MODEL.ACAMKD.NORMALIZER = "ascend", "sum_sq"
        return cfg

    monkeypatch.setattr(study, "_yaml_cfg", new_defaults)
    after = {n: make_stage(spec, names[n], 0) for n in before}
    assert after["literal"].name == before["literal"].name
    assert after["literal"].opts == before["literal"].opts
    assert after["ascend_sum_sq"].name == before["ascend_sum_sq"].name
    assert after["full"].name == before["ascend_sum_sq"].name  # "full" follows the defaults


def test_table_only_trains_nothing_and_tables_the_finished_runs(tmp_path, monkeypatch):
    import acamkd.experiments.stages as stages

    out = str(tmp_path / "study")
    trained = []

    def fake_train(cmd, check, cwd):
        run_dir = cmd[cmd.index("OUTPUT_DIR") + 1]
        trained.append(run_dir)
        torch.save({"model": {}, "iteration": 3}, os.path.join(run_dir, "model_final.pth"))
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            f.write(json.dumps({"iteration": 3, "bbox/AP": 10.0}) + "\n")

    monkeypatch.setattr(stages.subprocess, "run", fake_train)
    baseline, sum_sq = VARIANT_SETS["objective"][0], Variant("sum_sq", {"NORMALIZER": "sum_sq"})
    teacher_row = {"metrics": {"AP": 50.0}}
    run_study(_spec(variants=[baseline], seeds=[0, 1]), out, teacher_row=teacher_row)
    assert len(trained) == 2
    # Another process trains sum_sq elsewhere; a table of both trains nothing more.
    study = run_study(
        _spec(variants=[baseline, sum_sq], seeds=[0, 1]), out, teacher_row, train=False
    )
    assert len(trained) == 2 and study["trained_now"] == 0
    assert [r["variant"] for r in study["variants"]] == ["baseline"]
    table = open(os.path.join(out, "study.md")).read()
    assert "| baseline | 2 | 10.00 ± 0.00 | s0 10.00, s1 10.00 |" in table and "sum_sq" not in table


def test_methods_set_keys_each_method_by_its_own_settings():
    rows = {v.name: v for v in VARIANT_SETS["methods"]}
    assert list(rows) == [
        "baseline", "mse", "fgd", "mgd", "cwd", "pkd", "maskd", "acamkd",
        "acamkd_teacher_adaptive",
    ]  # fmt: skip
    spec = _spec(acam={"NORMALIZER": "sum", "MASKD.TOKENS": "/tmp/tokens.pth"})
    fgd = make_stage(spec, rows["fgd"], 0)
    # A rival's run states its method and none of ACAM-KD's keys or other methods' tokens.
    assert fgd.opts[fgd.opts.index("MODEL.ACAMKD.METHOD") + 1] == "FGD"
    assert not any(k in fgd.opts for k in ("MODEL.ACAMKD.NORMALIZER", "MODEL.ACAMKD.MASKS"))
    assert "MODEL.ACAMKD.MASKD.TOKENS" not in fgd.opts
    maskd = make_stage(spec, rows["maskd"], 0)
    assert maskd.opts[maskd.opts.index("MODEL.ACAMKD.MASKD.TOKENS") + 1] == "/tmp/tokens.pth"
    mse = make_stage(spec, Variant("mse_w2", {"METHOD": "MSE", "LOSS_WEIGHT": "2.0"}), 0)
    assert mse.opts[mse.opts.index("MODEL.ACAMKD.LOSS_WEIGHT") + 1] == "2.0"
    # ACAM-KD's rows keep the keys they had before METHOD existed: "acamkd" states the
    # defaults in full and is the objective study's sum_sq row.
    sum_sq = next(v for v in VARIANT_SETS["objective"] if v.name == "sum_sq")
    assert make_stage(_spec(), rows["acamkd"], 0).name == make_stage(_spec(), sum_sq, 0).name
    assert "MODEL.ACAMKD.METHOD" not in make_stage(_spec(), rows["acamkd"], 0).opts
    assert len({make_stage(spec, v, 0).name for v in rows.values()}) == len(rows)


def test_budget_set_adds_only_the_budget_switches_to_the_default_reading():
    rows = {v.name: v for v in VARIANT_SETS["budget"]}
    assert list(rows) == ["baseline", "mse", "acamkd", "acamkd_budget"]
    budget = make_stage(_spec(), rows["acamkd_budget"], 0)
    assert budget.opts[budget.opts.index("MODEL.ACAMKD.MASK_BUDGET") + 1] == "0.25"
    assert budget.opts[budget.opts.index("MODEL.ACAMKD.MASK_OBJECTIVE") + 1] == "ascend"
    # The other rows are the methods study's own runs, reused where both studies share a folder.
    methods = {v.name: v for v in VARIANT_SETS["methods"]}
    for name in ("baseline", "mse", "acamkd"):
        assert make_stage(_spec(), rows[name], 0).name == make_stage(_spec(), methods[name], 0).name


def test_methods_study_leaves_fgd_out_of_segmentation_and_needs_maskd_tokens():
    from acamkd.experiments.study import applicable_variants

    seg = "configs/Streets-SemanticSegmentation"
    spec = _spec(
        config=f"{seg}/acamkd_deeplabv3_R_18_OS8_from_deeplabv3_R_18_wide_OS8_streets.yaml",
        variants=[v for v in VARIANT_SETS["methods"] if v.name != "maskd"],
    )
    names = [v.name for v in applicable_variants(spec)]
    assert "fgd" not in names and "mgd" in names and "acamkd" in names
    det = _spec(variants=list(VARIANT_SETS["methods"]))
    with pytest.raises(ValueError, match=r"MASKD.TOKENS=<its model_final.pth>"):
        applicable_variants(det)
    det = _spec(variants=list(VARIANT_SETS["methods"]), acam={"MASKD.TOKENS": "/tmp/t.pth"})
    assert "fgd" in [v.name for v in applicable_variants(det)]


def test_study_tool_evaluates_the_teacher_with_its_overrides(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "study_tool", os.path.join(REPO, "tools/study.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config = os.path.join(REPO, DET, "acamkd_fcos_R_18_from_fcos_R_18_wide_streets.yaml")
    args = tool.get_parser().parse_args(
        ["--config-file", config, "--output-dir", str(tmp_path), "--set", "methods"]
        + ["MODEL.ACAMKD.TEACHER.OPTS", "['MODEL.RETINANET.NUM_CONVS', '4']"]
    )
    teacher_config, teacher_opts = tool._teacher_config(args)
    assert teacher_config.endswith("fcos_R_18_FPN_wide_streets.yaml")
    assert teacher_opts[-2:] == ["MODEL.RETINANET.NUM_CONVS", "4"]


def test_the_teacher_is_evaluated_once_per_weights_and_config(tmp_path, monkeypatch):
    import acamkd.experiments.compare as compare
    from acamkd.experiments.study import _evaluate_teacher

    evaluated = []

    def fake_evaluate(model_spec, output_dir):
        evaluated.append(model_spec)
        return {"metrics": {"AP": 40.0 + len(evaluated)}, "gflops": float("nan")}

    monkeypatch.setattr(compare, "evaluate_model", fake_evaluate)
    weights = tmp_path / "teacher.pth"
    weights.write_bytes(b"first")
    spec = _spec(teacher_weights=str(weights))
    out = str(tmp_path / "study")
    first = _evaluate_teacher(spec, out)
    assert first["metrics"] == {"AP": 41.0} and len(evaluated) == 1
    assert _evaluate_teacher(spec, out) == {"metrics": {"AP": 41.0}, "gflops": None}
    assert len(evaluated) == 1  # kept from the first time
    weights.write_bytes(b"another")  # another teacher file at the same path
    assert _evaluate_teacher(spec, out)["metrics"] == {"AP": 42.0}
    other_config = _spec(teacher_weights=str(weights), teacher_opts=["SOLVER.MAX_ITER", "7"])
    assert _evaluate_teacher(other_config, out)["metrics"] == {"AP": 43.0}
    assert _evaluate_teacher(other_config, out)["metrics"] == {"AP": 43.0}
    assert len(evaluated) == 3
