"""Backbone pretraining on generated object crops: the crops, a resumable run, and a backbone
file that MODEL.WEIGHTS loads into a student as detectron2's ImageNet files are loaded."""

import hashlib
import importlib.util
import json
import os

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from acamkd import get_acamkd_cfg
from acamkd.data import STREETS_THING_CLASSES, generate_streets
from acamkd.experiments.pretrain import CropClassifier, object_crops, pretrain_backbone

from tiny_models import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

STUDENT = os.path.join(REPO, "configs/Streets-Detection/fcos_R_18_FPN_streets.yaml")
TINY = ["MODEL.RESNETS.STEM_OUT_CHANNELS", "16"]
TINY += ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.DEVICE", "cpu"]


def _cfg():
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(STUDENT)
    cfg.merge_from_list(TINY)
    return cfg


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pretrain_scenes"))
    kw = dict(num_train=6, num_val=3, width=160, height=80, max_depth=14.0, progress=False)
    return generate_streets(root, seed=7, **kw), kw


def test_crops_are_objects_and_backgrounds_of_the_set(scenes):
    dataset_dir, _ = scenes
    crops = object_crops(dataset_dir, "train", size=32, min_side=4.0)
    n = len(crops.labels)
    assert crops.images.shape == (n, 3, 32, 32) and crops.images.dtype == torch.uint8
    background = len(STREETS_THING_CLASSES)
    with open(os.path.join(dataset_dir, "coco/annotations/instances_train.json")) as f:
        objects = [a for a in json.load(f)["annotations"] if max(a["bbox"][2:]) >= 4.0]
    assert int((crops.labels < background).sum()) == len(objects)
    assert 0 < int((crops.labels == background).sum()) <= 2 * 6
    assert int(crops.labels.max()) <= background


def test_pretraining_scenes_share_none_with_the_benchmark(scenes, tmp_path):
    dataset_dir, kw = scenes
    benchmark = generate_streets(str(tmp_path), seed=0, **kw)

    def digests(folder):
        out = set()
        for split in ("train", "val"):
            d = os.path.join(folder, "coco", split)
            for name in os.listdir(d):
                out.add(hashlib.sha256(open(os.path.join(d, name), "rb").read()).hexdigest())
        return out

    assert digests(dataset_dir).isdisjoint(digests(benchmark))
    spec = importlib.util.spec_from_file_location(
        "pretrain_tool", os.path.join(REPO, "tools", "pretrain_backbone.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit, match="benchmark's generator seed"):
        tool.main(["--config-file", STUDENT, "--output-dir", str(tmp_path), "--seed", "0"])


def test_pretraining_resumes_and_its_backbone_loads_as_model_weights(scenes, tmp_path):
    dataset_dir, _ = scenes
    train = object_crops(dataset_dir, "train", size=32, min_side=4.0)
    val = object_crops(dataset_dir, "val", size=32, min_side=4.0, seed=1)
    out = str(tmp_path / "pretrain")
    kw = dict(batch_size=4, eval_period=2, checkpoint_period=2)
    pretrain_backbone(_cfg(), train, val, out, max_iter=2, **kw)
    result = pretrain_backbone(_cfg(), train, val, out, max_iter=4, **kw)
    history = json.load(open(os.path.join(out, "metrics.json")))
    assert [h["iteration"] for h in history] == [2, 4]  # the second call resumed at 2
    assert 0.0 <= result["val_accuracy"] <= 1.0

    trained = CropClassifier(_cfg(), len(STREETS_THING_CLASSES) + 1)
    DetectionCheckpointer(trained).load(os.path.join(out, "last.pth"))
    student = build_model(_cfg())
    rest = {k: v.clone() for k, v in student.state_dict().items() if ".bottom_up." not in k}
    DetectionCheckpointer(student).load(os.path.join(out, "backbone.pkl"))
    loaded = student.backbone.bottom_up.state_dict()
    for k, v in trained.bottom_up.state_dict().items():
        assert torch.equal(loaded[k], v), k
    # Only the backbone: the FPN and the head keep their initialisation.
    after = student.state_dict()
    assert rest and all(torch.equal(after[k], v) for k, v in rest.items())
