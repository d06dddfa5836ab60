"""The software stack works on the CPU with no network and no weights.

These tests guard the ground everything else stands on: detectron2 (either install route of
``tools/setup_env.sh``) imports and works with or without its compiled ``_C`` extension, the
environment report runs, detectron2's own model-zoo RetinaNet and Faster R-CNN train and infer
at toy size, and ``COCOEvaluator`` with the pure-Python COCOeval scores hand-made predictions
exactly.
"""

import copy
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Set, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import acamkd
from acamkd.training import env as acamkd_env

NUM_CLASSES = 3
IMAGE_SIZE = 64


def _has_detectron2_c() -> bool:
    """Whether detectron2's compiled extension imports (never, with the cp310 PyPI wheel)."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Imports and the environment report
# --------------------------------------------------------------------------------------------


def test_imports() -> None:
    import detectron2

    assert detectron2.__version__
    cfg = get_cfg()
    acamkd.add_acamkd_config(cfg)
    assert "ACAMKD" in cfg.MODEL


def test_collect_acamkd_env_names_source_and_c_status() -> None:
    rows = acamkd_env.collect_acamkd_env()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in rows)
    info = dict(rows)
    assert not any(v.startswith("<error") for v in info.values()), info

    try:
        sal_version = importlib.metadata.version("sal-detectron2")
    except importlib.metadata.PackageNotFoundError:
        sal_version = None
    if sal_version == "0.7.2":
        assert info["detectron2 source"] == (
            "PyPI wheel sal-detectron2==0.7.2 (same sources as upstream a59f0563)"
        )
    else:
        assert info["detectron2 source"].startswith("detectron2 ")

    if _has_detectron2_c():
        assert info["detectron2._C"] == "available"
        assert "without detectron2._C" not in info
    else:
        assert info["detectron2._C"].startswith("unavailable")
        assert "use_fast_impl=False" in info["without detectron2._C"]

    assert info["torch"] == torch.__version__
    assert info["CUDA available"] == str(torch.cuda.is_available())
    assert info["acamkd"].startswith(importlib.metadata.version("acamkd"))
    assert info["acamkd path"] == os.path.dirname(os.path.abspath(acamkd.__file__))


def test_one_pinned_detectron2_commit() -> None:
    """tools/setup_env.sh installs the commit that the report calls the pinned one, and the
    evaluator's probe of the compiled ops agrees with the report."""
    script = (Path(__file__).resolve().parents[1] / "tools" / "setup_env.sh").read_text()
    assert re.findall(r'^D2_COMMIT="(\w+)"$', script, re.M) == [acamkd_env.UPSTREAM_COMMIT]
    assert acamkd_env.has_compiled_ops() == _has_detectron2_c()


@pytest.mark.parametrize(
    "name, version, direct_url, expected",
    [
        (
            "detectron2",
            "0.6",
            {
                "url": "https://github.com/facebookresearch/detectron2.git",
                "vcs_info": {"vcs": "git", "commit_id": "a59f0563" + "0" * 32},
            },
            "detectron2 0.6: git https://github.com/facebookresearch/detectron2.git @ "
            "a59f0563" + "0" * 32 + " (the pinned commit)",
        ),
        (
            "detectron2",
            "0.6",
            {"url": "https://github.com/x/detectron2.git", "vcs_info": {"commit_id": "1234"}},
            "detectron2 0.6: vcs https://github.com/x/detectron2.git @ 1234 "
            "(not the pinned a59f0563)",
        ),
        (
            "detectron2",
            "0.6",
            {"url": "file:///src/detectron2", "dir_info": {"editable": True}},
            "detectron2 0.6: local source file:///src/detectron2 (editable)",
        ),
        (
            "sal-detectron2",
            "0.7.2",
            {"url": "file:///tmp/x.whl", "archive_info": {}},
            "PyPI wheel sal-detectron2==0.7.2 (same sources as upstream a59f0563)",
        ),
        (
            "sal-detectron2",
            "0.8",
            None,
            "PyPI wheel sal-detectron2==0.8 (not the verified 0.7.2; sources unchecked)",
        ),
    ],
)
def test_describe_detectron2_distribution(
    name: str, version: str, direct_url: Dict, expected: str
) -> None:
    assert acamkd_env.describe_detectron2_distribution(name, version, direct_url) == expected


def test_env_report_survives_failing_collect_env_info(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from detectron2.utils import collect_env

    def broken() -> str:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(collect_env, "collect_env_info", broken)
    acamkd_env.main()
    out = capsys.readouterr().out
    assert "collect_env_info() failed: <error: RuntimeError: no compiler>" in out
    assert "detectron2 source" in out and "acamkd path" in out


def test_env_module_runs_as_script() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "acamkd.training.env"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr
    # detectron2's own table first, then the project section.
    assert proc.stdout.index("sys.platform") < proc.stdout.index("ACAM-KD project")
    info = dict(acamkd_env.collect_acamkd_env())
    assert info["detectron2 source"] in proc.stdout
    assert info["detectron2._C"] in proc.stdout


# --------------------------------------------------------------------------------------------
# detectron2 model-zoo detectors at toy size
# --------------------------------------------------------------------------------------------


def _tiny_cfg(zoo_config: str) -> CfgNode:
    """A model-zoo config shrunk to run in well under a second per step on the CPU."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_config))
    cfg.MODEL.DEVICE = "cpu"
    # No download: random initialisation.
    cfg.MODEL.WEIGHTS = ""
    # ResNet-18 (BasicBlock) requires 64 res2 channels.
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    # Randomly initialised RetinaNet scores sit near the prior 0.01, below the default 0.05
    # threshold; a zero threshold makes inference return boxes to check.
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 100
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    cfg.SOLVER.BASE_LR = 0.01
    return cfg


def _training_inputs() -> List[Dict]:
    """Two random 64x64 images in detectron2's dataset-mapper format, with 1-2 boxes each."""
    boxes = [
        [[4.0, 6.0, 30.0, 40.0]],
        [[10.0, 10.0, 50.0, 34.0], [32.0, 30.0, 60.0, 62.0]],
    ]
    inputs = []
    for i, image_boxes in enumerate(boxes):
        instances = Instances((IMAGE_SIZE, IMAGE_SIZE))
        instances.gt_boxes = Boxes(torch.tensor(image_boxes))
        instances.gt_classes = torch.arange(len(image_boxes)) + i
        image = torch.randint(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
        inputs.append(
            {"image": image, "instances": instances, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
    return inputs


ZOO_DETECTORS = [
    pytest.param(
        "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
        {"loss_cls", "loss_box_reg"},
        "num_pos_anchors",
        id="retinanet",
    ),
    pytest.param(
        "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
        {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"},
        "fast_rcnn/cls_accuracy",
        id="faster_rcnn",
    ),
]


@pytest.mark.parametrize("zoo_config, loss_keys, logged_metric", ZOO_DETECTORS)
def test_zoo_detector_train_step(zoo_config: str, loss_keys: Set[str], logged_metric: str) -> None:
    cfg = _tiny_cfg(zoo_config)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    # BACKBONE.FREEZE_AT = 2 (detectron2's default) freezes the stem and res2.
    assert frozen and all(".stem." in n or ".res2." in n for n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    with EventStorage() as storage:
        losses = model(_training_inputs())
        # detectron2 sums whatever the model returns; metrics belong in the storage.
        assert set(losses) == loss_keys
        for name, value in losses.items():
            assert value.dim() == 0 and torch.isfinite(value), (name, value)
        assert logged_metric in storage.latest()
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()

    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    # The loss reaches both ends of the network: the first trainable backbone stage and the
    # last layer of the head.
    early = next(p for n, p in trainable.items() if ".res3." in n)
    last_layer = list(trainable.values())[-1]
    assert early.grad.abs().sum() > 0 and last_layer.grad.abs().sum() > 0

    optimizer.step()
    with_signal = [n for n, p in trainable.items() if p.grad.abs().sum() > 0]
    assert len(with_signal) > len(trainable) // 2
    assert all(not torch.equal(trainable[n], before[n]) for n in with_signal)
    assert all(torch.equal(p, before[n]) for n, p in frozen.items())


@pytest.mark.parametrize(
    "zoo_config",
    [
        pytest.param("COCO-Detection/retinanet_R_50_FPN_1x.yaml", id="retinanet"),
        pytest.param("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", id="faster_rcnn"),
    ],
)
def test_zoo_detector_inference(zoo_config: str) -> None:
    cfg = _tiny_cfg(zoo_config)
    model = build_model(cfg)
    model.eval()
    image = torch.randint(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    # The requested output size differs from the input tensor's, as after a resize
    # augmentation: detectron2 must rescale its boxes to it.
    height, width = 96, 128
    with torch.no_grad():
        outputs = model([{"image": image, "height": height, "width": width}])

    assert len(outputs) == 1 and set(outputs[0]) == {"instances"}
    instances = outputs[0]["instances"]
    assert instances.image_size == (height, width)
    assert instances.has("pred_boxes") and instances.has("scores")
    assert instances.has("pred_classes")
    n = len(instances)
    assert 0 < n <= cfg.TEST.DETECTIONS_PER_IMAGE
    boxes = instances.pred_boxes.tensor
    assert boxes.shape == (n, 4) and torch.isfinite(boxes).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2:] >= boxes[:, :2]).all()
    assert ((instances.scores >= 0) & (instances.scores <= 1)).all()
    assert instances.scores.shape == (n,)
    assert instances.pred_classes.dtype == torch.int64
    assert ((instances.pred_classes >= 0) & (instances.pred_classes < NUM_CLASSES)).all()


# --------------------------------------------------------------------------------------------
# COCOEvaluator (pure-Python COCOeval) on a COCO json written here
# --------------------------------------------------------------------------------------------

# Ground truth, XYWH as in COCO json: image id -> [(category id, box)]. All boxes are
# "small" (< 32x32 pixels), so APm and APl have no ground truth.
_GT: Dict[int, List[Tuple[int, List[float]]]] = {
    1: [(1, [4.0, 4.0, 20.0, 20.0]), (2, [28.0, 10.0, 24.0, 12.0])],
    2: [(1, [10.0, 30.0, 30.0, 20.0])],
}
_CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}]


@pytest.fixture(scope="module")
def coco_dataset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Register a two-image, two-category COCO dataset; yields its name."""
    root = tmp_path_factory.mktemp("coco")
    images, annotations = [], []
    for image_id, objects in _GT.items():
        file_name = f"{image_id:06d}.png"
        Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)).save(root / file_name)
        images.append(
            {"id": image_id, "file_name": file_name, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        for category_id, box in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    json_file = root / "instances.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": _CATEGORIES})
    )
    # A unique name: the catalogs are global and other tests may register datasets too.
    name = f"acamkd_test_stack_coco_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(json_file), str(root))
    try:
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _exact(box: List[float]) -> List[float]:
    return list(box)


def _shift_half(box: List[float]) -> List[float]:
    """Shift right by half the width: overlap w/2*h, union 3/2*w*h, so IoU = 1/3 < 0.5."""
    x, y, w, h = box
    return [x + w / 2, y, w, h]


def _shift_fifth(box: List[float]) -> List[float]:
    """Shift right by a fifth of the width: IoU = 0.8 / 1.2 = 2/3, between 0.65 and 0.70."""
    x, y, w, h = box
    return [x + w / 5, y, w, h]


# A prediction rule: (image id, category id, ground-truth XYWH box) -> (predicted XYWH box,
# score); each ground-truth box gets exactly one prediction of its own category.
Rule = Callable[[int, int, List[float]], Tuple[List[float], float]]

# COCO AP, by hand. For one category and IoU threshold, detections are sorted by score and
# precision is made non-increasing in recall; AP is the mean of that precision at the 101
# recall thresholds 0, 0.01, ..., 1 (0 beyond the highest recall reached). "AP" averages
# over the ten IoU thresholds 0.50, 0.55, ..., 0.95 and over the categories with ground truth.
#
# "square_half_right": square has two ground-truth boxes. The exact box (IoU 1, a true
# positive at every threshold) scores 0.9; the other is shifted to IoU 1/3 (a false positive
# at every threshold) and scores 0.8. Ranked: TP (recall 1/2, precision 1), FP (recall 1/2,
# precision 1/2). Recall thresholds 0..0.50 (51 of 101) get precision 1, the other 50 get 0:
# AP(square) = 100 * 51/101. bar is exact: AP(bar) = 100.
#
# "square_half_right_ranked_last": the same boxes with the scores swapped. Ranked: FP
# (recall 0, precision 0), TP (recall 1/2, precision 1/2); the non-increasing envelope is 1/2
# at recall 0..0.50: AP(square) = 100 * 51/101 * 1/2.
#
# "all_two_thirds": every box shifted to IoU 2/3, a true positive at the four thresholds
# 0.50-0.65 (AP 100) and a false positive at the six 0.70-0.95 (AP 0): AP = 40, AP50 = 100,
# AP75 = 0.
_CASES: Dict[str, Tuple[Rule, Dict[str, float]]] = {
    "exact": (
        lambda img, cat, box: (_exact(box), 1.0),
        {"AP": 100.0, "AP50": 100.0, "AP75": 100.0, "AP-square": 100.0, "AP-bar": 100.0},
    ),
    "all_iou_one_third": (
        lambda img, cat, box: (_shift_half(box), 1.0),
        {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AP-square": 0.0, "AP-bar": 0.0},
    ),
    "all_two_thirds": (
        lambda img, cat, box: (_shift_fifth(box), 1.0),
        {"AP": 40.0, "AP50": 100.0, "AP75": 0.0, "AP-square": 40.0, "AP-bar": 40.0},
    ),
    "square_half_right": (
        lambda img, cat, box: (_shift_half(box), 0.8) if img == 2 else (_exact(box), 0.9),
        {
            "AP": (100 * 51 / 101 + 100) / 2,
            "AP50": (100 * 51 / 101 + 100) / 2,
            "AP-square": 100 * 51 / 101,
            "AP-bar": 100.0,
        },
    ),
    "square_half_right_ranked_last": (
        lambda img, cat, box: (_shift_half(box), 0.9) if img == 2 else (_exact(box), 0.8),
        {"AP-square": 100 * 51 / 101 / 2, "AP-bar": 100.0},
    ),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_coco_evaluator_exact_ap(coco_dataset: str, case: str, tmp_path: Path) -> None:
    rule, expected = _CASES[case]
    # Loading the dataset, as a test loader does, sets the category id -> contiguous id map
    # that the evaluator inverts; predictions use contiguous ids like a model's.
    dataset_dicts = copy.deepcopy(DatasetCatalog.get(coco_dataset))
    metadata = MetadataCatalog.get(coco_dataset)
    to_contiguous = metadata.thing_dataset_id_to_contiguous_id
    assert metadata.thing_classes == ["square", "bar"]

    outputs = []
    for record in dataset_dicts:
        boxes, scores, classes = [], [], []
        for category_id, box in _GT[record["image_id"]]:
            (x, y, w, h), score = rule(record["image_id"], category_id, box)
            boxes.append([x, y, x + w, y + h])
            scores.append(score)
            classes.append(to_contiguous[category_id])
        instances = Instances((record["height"], record["width"]))
        instances.pred_boxes = Boxes(torch.tensor(boxes))
        instances.scores = torch.tensor(scores)
        instances.pred_classes = torch.tensor(classes)
        outputs.append({"instances": instances})

    evaluator = COCOEvaluator(coco_dataset, output_dir=str(tmp_path), use_fast_impl=False)
    evaluator.reset()
    evaluator.process(dataset_dicts, outputs)
    results = evaluator.evaluate()

    bbox = results["bbox"]
    for key, value in expected.items():
        assert bbox[key] == pytest.approx(value, abs=1e-6), (key, bbox[key], value)
    assert bbox["APs"] == pytest.approx(bbox["AP"])
    assert math.isnan(bbox["APm"]) and math.isnan(bbox["APl"])
    # The predictions are saved in COCO format, with dataset category ids restored.
    saved = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert len(saved) == sum(len(v) for v in _GT.values())
    assert {r["category_id"] for r in saved} == {c["id"] for c in _CATEGORIES}
