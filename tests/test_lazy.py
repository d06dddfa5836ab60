"""LazyConfig: every ``.py`` config builds and round-trips through LazyConfig.save, the pairs
match their YAML twins, train_net.py trains/resumes/evaluates a ``.py`` config with overrides,
and the comparison table is made from checkpoints the tests write."""

import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.fcos import FCOS

from acamkd import ACAMDistiller, DistillationCheckpointer, get_acamkd_cfg
from acamkd.experiments.compare import METRICS, ModelSpec, compare_models
from acamkd.lazy import build_acam_levels, build_lazy_teacher
from acamkd.pictures.visualization import mask_figure_size
from acamkd.training.checkpointer import load_checkpoint
from acamkd.training.lazy_train import with_gradient_clipping
from acamkd.training.teacher_weights import load_teacher_weights

from tiny_models import (
    REPO,
    assert_same_network,
    distill_cfg,
    plain_cfg,
    register_tiny_dataset,
    tensorboard_images,
)

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True))
DEMO = os.path.join(REPO, "configs", "Streets-Detection", "acamkd_retinanet_R_18_from_R_50_streets")
# Makes any ResNet teacher a plain ResNet-50 (X101 included; DeepLab's builder stops at 50).
TEACHER_R50 = ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.NUM_GROUPS", "1"]
TEACHER_R50 += ["MODEL.RESNETS.WIDTH_PER_GROUP", "64"]
# A tiny teacher for the demo pair; GroupNorm keeps a random teacher's features at a sane scale.
TEACHER_TINY = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
TEACHER_TINY += ["MODEL.RESNETS.NORM", "GN"]
UNREACHABLE = "detectron2://ACAMKD-tests/nowhere/model_final.pkl"
UNREACHABLE_HTTPS = "https://dl.fbaipublicfiles.com/detectron2/ACAMKD-tests/nowhere/model_final.pkl"


# Tiny models: one thread is as fast, and far faster when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(path: str) -> str:
    return os.path.relpath(path, REPO)


def _random_teacher(cfg, overrides):
    cfg.model.teacher.weights = ""
    cfg.model.teacher.allow_random_init = True
    cfg.model.teacher.overrides = list(overrides)


def test_configs_are_found():
    names = {_rel(p) for p in CONFIGS}
    assert len(names) >= 14
    assert "configs/COCO-Detection/acamkd_retinanet_R_50_from_R_101_FPN_2x.py" in names


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_config_saves_and_loads_back_equal(path, tmp_path):
    cfg = LazyConfig.load(path)
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg.keys())
    first, second = str(tmp_path / "first.yaml"), str(tmp_path / "second.yaml")
    LazyConfig.save(cfg, first)
    assert not os.path.exists(first + ".pkl")  # LazyConfig.save falls back to pickle
    again = LazyConfig.load(first)
    LazyConfig.save(again, second)
    assert open(first).read() == open(second).read()
    # The interpolations survive the round trip and resolve to the same values.
    for key in ("dataloader.evaluator.dataset_name", "model.acam.levels"):
        assert _select(again, key) == _select(cfg, key)


def _select(cfg, key: str):
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_config_builds_on_cpu_with_its_optimizer_and_schedule(path):
    cfg = LazyConfig.load(path)
    if "teacher" in cfg.model:
        _random_teacher(cfg, TEACHER_R50)
    model = instantiate(cfg.model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) > 1e6
    if isinstance(model, ACAMDistiller):
        assert len(model.acam) >= 1
        assert not any(p.requires_grad for p in model.teacher.parameters())
        assert not model.teacher.training
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in trainable}  # no teacher weights
    multiplier = instantiate(cfg.lr_multiplier)
    assert 0 < multiplier(0.5) <= 1.0 and multiplier(0.999) < multiplier(0.5)


@pytest.mark.parametrize(
    "name,full_teacher",
    [
        ("COCO-Detection/acamkd_retinanet_R_50_from_R_101_FPN_2x", True),
        ("COCO-Detection/acamkd_faster_rcnn_R_50_from_R_101_FPN_2x", False),
        ("COCO-Detection/acamkd_fcos_R_50_from_R_101_FPN_2x", False),
        ("COCO-Detection/fgd_retinanet_R_50_from_R_101_FPN_2x", True),
        ("Streets-Detection/acamkd_retinanet_R_18_from_R_50_streets", True),
        ("Streets-Detection/acamkd_retinanet_R_18_from_R_18_wide_streets", True),
    ],
)
def test_yaml_and_lazy_twins_build_the_same_model(name, full_teacher):
    base = os.path.join(REPO, "configs", name)
    teacher_opts = [] if full_teacher else TEACHER_R50
    ycfg = get_acamkd_cfg()
    ycfg.merge_from_file(base + ".yaml")
    ycfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", "MODEL.ACAMKD.TEACHER.WEIGHTS", ""]
        + ["MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT", "True"]
        + ["MODEL.ACAMKD.TEACHER.OPTS", teacher_opts]
    )
    from_yaml = build_model(ycfg)
    lcfg = LazyConfig.load(base + ".py")
    _random_teacher(lcfg, teacher_opts)
    from_lazy = instantiate(lcfg.model)
    assert_same_network(from_yaml, from_lazy)


@pytest.mark.parametrize(
    "name",
    [
        "Streets-Detection/retinanet_R_18_FPN_streets",
        "Streets-Detection/reppoints_R_18_FPN_streets",
        "Streets-Detection/acamkd_retinanet_R_18_from_R_50_streets",
        "Streets-Detection/acamkd_retinanet_R_18_from_R_18_wide_streets",
    ],
)
def test_streets_twins_train_with_the_same_lr_and_gradient_clipping(name):
    base = os.path.join(REPO, "configs", name)
    ycfg = get_acamkd_cfg()
    ycfg.merge_from_file(base + ".yaml")
    lcfg = LazyConfig.load(base + ".py")
    assert lcfg.optimizer.lr == ycfg.SOLVER.BASE_LR
    assert lcfg.dataloader.train.total_batch_size == ycfg.SOLVER.IMS_PER_BATCH
    yclip = ycfg.SOLVER.CLIP_GRADIENTS
    assert yclip.ENABLED and dict(lcfg.train.clip_gradients) == {
        "enabled": True,
        "clip_type": yclip.CLIP_TYPE,
        "clip_value": yclip.CLIP_VALUE,
    }


def test_lazy_gradient_clipping_clips_each_tensor_and_names_unknown_keys():
    weights = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
    optimizer = with_gradient_clipping(
        torch.optim.SGD(weights, lr=1.0), {"enabled": True, "clip_type": "norm", "clip_value": 0.5}
    )
    weights[0].grad = torch.tensor([30.0, 40.0, 0.0])  # norm 50: scaled to 0.5
    weights[1].grad = torch.tensor([0.3, 0.0])  # norm 0.3: kept
    optimizer.step()
    torch.testing.assert_close(weights[0].detach(), torch.tensor([-0.3, -0.4, 0.0]))
    torch.testing.assert_close(weights[1].detach(), torch.tensor([-0.3, 0.0]))
    plain = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    assert with_gradient_clipping(plain, None) is plain
    assert type(with_gradient_clipping(plain, {"enabled": False})) is torch.optim.SGD
    with pytest.raises(KeyError, match="train.clip_gradients.max_norm.*clip_value"):
        with_gradient_clipping(plain, {"enabled": True, "max_norm": 1.0})


def test_build_acam_levels_per_level_channels_and_errors():
    acam = build_acam_levels(["p3", "p4"], {"p3": 64, "p4": 32}, 16, num_masks=3)
    assert list(acam) == ["p3", "p4"]
    assert (acam["p3"].teacher_channels, acam["p4"].teacher_channels) == (64, 32)
    assert acam["p4"].student_channels == 16 and acam["p4"].ascm is not None
    with pytest.raises(ValueError, match=r"teacher_channels for levels \['p4'\]"):
        build_acam_levels(["p3", "p4"], {"p3": 64}, 16)
    with pytest.raises(ValueError, match="empty"):
        build_acam_levels([], 8, 8)


def test_wrong_acam_channels_are_named():
    cfg = LazyConfig.load(DEMO + ".py")
    _random_teacher(cfg, TEACHER_TINY)
    cfg.model.acam.teacher_channels = 64  # the teacher's FPN has 128
    with pytest.raises(ValueError, match="'p3' was built for 64 teacher channels.*gives 128"):
        instantiate(cfg.model)


def test_lazy_teacher_from_a_model_zoo_py_config():
    teacher = build_lazy_teacher(
        "COCO-Detection/fcos_R_50_FPN_1x.py",
        allow_random_init=True,
        overrides=["model.num_classes=3", "model.backbone.out_channels=64"],
    )
    assert type(teacher) is FCOS and not teacher.training
    assert teacher.num_classes == 3 and teacher.backbone.output_shape()["p7"].channels == 64
    assert not any(p.requires_grad for p in teacher.parameters())
    # Its weights are loaded by the checkpointer, which refuses empty ones without leave.
    no_leave = dataclasses.replace(teacher.acamkd_weights, allow_random_init=False)
    with pytest.raises(ValueError, match="model.teacher.weights is empty.*allow_random_init=True"):
        load_teacher_weights(teacher, no_leave)
    with pytest.raises(ValueError, match="describes a distiller"):
        build_lazy_teacher(DEMO + ".py", allow_random_init=True)


# ---- train_net.py with a .py config, and the comparison tool ----


def _write_coco_json(name: str, root: str) -> str:
    """The tiny dataset of tiny_models as a COCO json, for --register-coco."""
    register_tiny_dataset(name, root)
    images, annotations = [], []
    for r in DatasetCatalog.get(name):
        file_name = os.path.basename(r["file_name"])
        images.append(dict(id=r["image_id"], file_name=file_name, height=64, width=96))
        for a in r["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            box = [x0, y0, x1 - x0, y1 - y0]
            annotations.append(
                dict(id=len(annotations) + 1, image_id=r["image_id"], bbox=box, iscrowd=0)
            )
            annotations[-1].update(category_id=a["category_id"] + 1, area=box[2] * box[3])
    DatasetCatalog.remove(name)  # --register-coco registers it again, from the json
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


def _train_net_args(out_dir: str, data: str):
    json_file = os.path.join(data, "instances.json")
    return (
        ["--config-file", DEMO + ".py"]
        + ["--register-coco", "lazy_tiny_train", json_file, data]
        + ["--register-coco", "lazy_tiny_val", json_file, data]
    ), [
        "dataloader.train.dataset.names=lazy_tiny_train",
        "dataloader.test.dataset.names=lazy_tiny_val",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
        "dataloader.train.mapper.augmentations.0.max_size=96",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "dataloader.test.mapper.augmentations.0.max_size=96",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "model.student.num_classes=2",
        "model.student.test_score_thresh=0.0",  # an untrained head still predicts something
        "model.teacher.allow_random_init=True",
        "model.teacher.overrides=[" + ",".join(TEACHER_TINY) + "]",
        "model.acam.num_masks=4",
        f"train.output_dir={out_dir}",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train_net.py, in a subprocess, trains the demo's .py pair 1 iteration on tiny data, with
    a mask figure after every iteration (train.vis_period=1)."""
    root = tmp_path_factory.mktemp("lazy_train")
    data, out = str(root / "data"), str(root / "out")
    _write_coco_json("lazy_tiny_data", data)
    options, overrides = _train_net_args(out, data)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py")]
        + options
        + overrides
        + ["train.max_iter=1", "train.vis_period=1"],
        capture_output=True,
        text=True,
        cwd=str(root),  # config paths resolve against the repository, not the working dir
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"data": data, "out": out, "log": proc.stdout + proc.stderr}


def _load_train_net():
    spec = importlib.util.spec_from_file_location(
        "acamkd_train_net", os.path.join(REPO, "train_net.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_net_trains_a_py_config_with_overrides(trained):
    out = trained["out"]
    checkpoint = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu")
    assert checkpoint["iteration"] == 0  # train.max_iter=1
    state = checkpoint["model"]
    # A randomly initialised teacher has no file to be reloaded from: it is saved, and
    # recorded as such (a teacher from a file is not saved, only the file and its SHA-256).
    assert any(k.startswith("teacher.") for k in state)
    assert any(k.startswith("student.") for k in state)
    assert checkpoint["teacher_source"] == {
        "path": "",
        "setting": "model.teacher.weights",
        "random_init": True,
    }
    masks = [v for k, v in state.items() if k.startswith("acam.p3.ascm.") and v.dim() == 2]
    assert masks and all(v.shape[0] == 4 for v in masks)  # model.acam.num_masks=4
    assert state["student.head.cls_score.weight"].shape[0] == 9 * 2  # model.student.num_classes=2
    saved = LazyConfig.load(os.path.join(out, "config.yaml"))  # written by default_setup
    assert saved.model.acam.num_masks == 4 and saved.train.max_iter == 1
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    assert "loss_acam_spatial" in metrics[0] and "acam/p3/spatial_mask_mean" in metrics[0]
    assert "Evaluation results for bbox" in trained["log"]  # the EvalHook ran after training
    # The package's records reach the run's log.txt, INFO included: train_net.py sets up the
    # "acamkd" logger beside detectron2's (default_setup configures only detectron2 and fvcore).
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert re.search(r"\] acamkd(\.[\w.]+)? INFO: ", log), log[-3000:]
    assert re.search(r"\] acamkd\.[\w.]+ (INFO|WARNING): ", log), log[-3000:]  # a module's logger


def test_a_py_config_run_logs_the_mask_table_and_draws_the_mask_figure(trained):
    # The YAML trainer's hooks (acamkd.training.common.with_project_hooks): the per-level table
    # at the logging period (here the last iteration), in the console and in log.txt ...
    table = [
        line for line in trained["log"].splitlines() if "acam p3: spatial mean/cover/dice" in line
    ]
    assert table and "loss share channel/spatial/div" in table[-1], trained["log"][-3000:]
    with open(os.path.join(trained["out"], "log.txt")) as f:
        assert "acam p7: spatial mean/cover/dice" in f.read()
    # ... and the TensorBoard figure of the masks, one row per level, of the first test image.
    ((step, figure),) = tensorboard_images(trained["out"], "acam/masks")
    assert step == 0  # made after the first (and only) iteration
    rows = mask_figure_size(5, 4, (64, 96), 1.6, 60)  # p3-p7, num_masks=4, the 64x96 images
    assert figure.shape == rows + (3,) and figure.astype(np.float32).var() > 500


def test_train_net_resumes_and_evaluates_a_py_config(trained):
    train_net = _load_train_net()
    options, overrides = _train_net_args(trained["out"], trained["data"])
    parser = train_net.build_argument_parser()
    # Resuming reads the last checkpoint, never train.init_checkpoint (it would fail here).
    resume = overrides + ["train.max_iter=2", "train.init_checkpoint=/nonexistent/never_read.pth"]
    train_net.main(parser.parse_args(options + ["--resume"] + resume))
    final = os.path.join(trained["out"], "model_final.pth")
    assert torch.load(final, map_location="cpu")["iteration"] == 1  # went on from the first run's
    # Evaluation runs the student alone: the teacher's checkpoint is not read either.
    evaluate = overrides + [f"train.init_checkpoint={final}", "model.teacher.weights=/no/such.pth"]
    results = train_net.main(parser.parse_args(options + ["--eval-only"] + evaluate))
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def _save(model: nn.Module, tmp_path, name: str) -> str:
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save(name)
    return str(tmp_path / f"{name}.pth")


def _write_yaml(cfg, tmp_path, name: str) -> str:
    path = str(tmp_path / f"{name}.yaml")
    with open(path, "w") as f:
        f.write(cfg.dump())
    return path


def test_compare_models_tool_writes_one_table(trained, tmp_path):
    teacher_cfg = plain_cfg("RetinaNet", depth=50, fpn_channels=64)
    baseline_cfg = plain_cfg("RetinaNet")
    argv = ["--output-dir", str(tmp_path / "table"), "--dataset", "lazy_tiny_val"]
    argv += ["--register-coco", "lazy_tiny_val", os.path.join(trained["data"], "instances.json")]
    argv += [trained["data"]]
    params_m = {}
    for name, cfg in (("teacher", teacher_cfg), ("baseline", baseline_cfg)):
        model = build_model(cfg)
        params_m[name] = sum(p.numel() for p in model.parameters()) / 1e6
        argv += ["--model", name, _write_yaml(cfg, tmp_path, name), _save(model, tmp_path, name)]
    argv += ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]  # keeps every (random) detection
    # The distiller train_net.py trained from the .py config, with the same overrides.
    _, overrides = _train_net_args(trained["out"], trained["data"])
    argv += ["--model", "acamkd", DEMO + ".py", os.path.join(trained["out"], "model_final.pth")]
    argv += [o for o in overrides if o.startswith(("model.", "dataloader.test.mapper"))]

    spec = importlib.util.spec_from_file_location(
        "compare_models", os.path.join(REPO, "tools", "compare_models.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rows = {row["name"]: row for row in tool.main(argv)}

    assert list(rows) == ["teacher", "baseline", "acamkd"]
    assert all(r["dataset"] == "lazy_tiny_val" and r["images"] == 4 for r in rows.values())
    assert all(
        r["task"] == "bbox" and set(r["metrics"]) == set(METRICS["bbox"]) for r in rows.values()
    )
    assert {k: rows[k]["params_m"] for k in params_m} == params_m
    # A distiller is measured as its student.
    assert rows["acamkd"]["params_m"] == pytest.approx(_student_params_m(trained["out"]))
    assert all(r["gflops"] > 0 and r["seconds_per_image"] > 0 for r in rows.values())
    assert rows["teacher"]["gflops"] != rows["baseline"]["gflops"]
    assert not math.isnan(rows["baseline"]["metrics"]["AP"])  # score threshold 0: it predicts
    table = open(tmp_path / "table" / "comparison.md").read()
    assert "| model | config | AP | AP50 | AP75 | APs | APm | APl | params (M) |" in table
    assert "| acamkd | `acamkd_retinanet_R_18_from_R_50_streets.py` |" in table
    saved = json.load(open(tmp_path / "table" / "comparison.json"))  # strict JSON: no NaN
    assert [r["name"] for r in saved] == list(rows)


def _student_params_m(out_dir: str) -> float:
    """Parameters (millions) of the student of the config train_net.py saved."""
    student = instantiate(LazyConfig.load(os.path.join(out_dir, "config.yaml")).model.student)
    return sum(p.numel() for p in student.parameters()) / 1e6


# ---- unreachable weights: the error names the URL and how to pass a local file ----


@pytest.fixture
def no_download_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))


def test_unreachable_weights_in_the_comparison_are_explained(no_download_cache, tmp_path):
    register_tiny_dataset("lazy_tiny_unreachable", str(tmp_path / "images"))
    cfg = plain_cfg("RetinaNet")
    spec = ModelSpec("baseline", _write_yaml(cfg, tmp_path, "baseline"), UNREACHABLE)
    with pytest.raises(RuntimeError) as e:
        compare_models([spec], dataset="lazy_tiny_unreachable", output_dir=str(tmp_path))
    assert UNREACHABLE in str(e.value) and UNREACHABLE_HTTPS in str(e.value)
    assert "local path as the WEIGHTS of --model baseline" in str(e.value)


def test_unreachable_student_weights_are_explained(no_download_cache, tmp_path):
    from acamkd import DistillationTrainer

    register_tiny_dataset("lazy_tiny_student", str(tmp_path / "images"))
    cfg = distill_cfg("RetinaNet", extra=["MODEL.WEIGHTS", UNREACHABLE])
    cfg.merge_from_list(["DATASETS.TRAIN", ("lazy_tiny_student",), "DATASETS.TEST", ()])
    cfg.merge_from_list(["OUTPUT_DIR", str(tmp_path / "out"), "SOLVER.IMS_PER_BATCH", "2"])
    trainer = DistillationTrainer(cfg)
    with pytest.raises(RuntimeError, match=f"{UNREACHABLE_HTTPS} elsewhere.*as MODEL.WEIGHTS"):
        trainer.resume_or_load(resume=False)
    # The lazy path (train.init_checkpoint) goes through the same function.
    with pytest.raises(RuntimeError, match="local path as train.init_checkpoint"):
        load_checkpoint(
            DistillationCheckpointer(trainer.model), UNREACHABLE, key="train.init_checkpoint"
        )
