"""Every bad input of docs/TROUBLESHOOTING.md: provoked here, with the message the table shows."""

import importlib.util
import json
import os
import types

import pytest
import torch
from torch import nn

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from acamkd import DistillationTrainer
from acamkd.data import register_all_streets, register_coco_datasets
from acamkd.data.checks import UnreadableImageError, check_datasets_registered, check_num_classes
from acamkd.lazy import build_lazy_teacher

from test_seg_distill import _pair_cfg
from tiny_models import REPO, batched_inputs, distill_cfg, plain_cfg, register_tiny_dataset
from troubleshooting import assert_documented, documented_messages

STREETS_SEG = os.path.join(REPO, "configs", "Streets-SemanticSegmentation")
LAZY_DEMO = os.path.join(
    REPO, "configs", "Streets-Detection", "acamkd_retinanet_R_18_from_R_50_streets.py"
)


# Tiny models: one thread is as fast, and far faster when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def _message(excinfo) -> str:
    return str(excinfo.value.args[0]) if excinfo.value.args else str(excinfo.value)


# ---- --register-coco ----


def _coco(tmp_path, content) -> str:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(content))
    (tmp_path / "images").mkdir(exist_ok=True)
    return str(path)


def test_register_coco_missing_json(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        register_coco_datasets([("mine", str(tmp_path / "missing.json"), str(tmp_path))])
    assert_documented("register-coco-missing-json", _message(e))


def test_register_coco_missing_image_folder(tmp_path):
    json_file = _coco(tmp_path, {"images": [], "annotations": [], "categories": []})
    with pytest.raises(FileNotFoundError) as e:
        register_coco_datasets([("mine", json_file, str(tmp_path / "no_images"))])
    assert_documented("register-coco-missing-images", _message(e))


@pytest.mark.parametrize(
    "content,what",
    [
        ({"images": [], "categories": []}, "has no annotations"),
        ({"info": {}, "licenses": []}, "has no images, annotations, categories"),
        ([{"file_name": "a.jpg", "annotations": []}], "is not a JSON object"),
    ],
)
def test_register_coco_json_that_is_not_coco(tmp_path, content, what):
    json_file = _coco(tmp_path, content)
    with pytest.raises(ValueError) as e:
        register_coco_datasets([("mine", json_file, str(tmp_path / "images"))])
    assert_documented("register-coco-not-coco", _message(e))
    assert what in _message(e)
    assert "mine" not in DatasetCatalog.list()


def test_register_coco_scans_keys_across_chunks(tmp_path):
    from acamkd.data.datasets import _check_coco_json

    json_file = _coco(tmp_path, {"images": [], "annotations": [], "categories": []})
    _check_coco_json("mine", json_file, chunk_size=5)  # every key split across chunks


def _fake_segmentor(num_classes: int):
    head = types.SimpleNamespace(predictor=nn.Conv2d(8, num_classes, 1))
    return types.SimpleNamespace(sem_seg_head=head)


@pytest.mark.parametrize(
    "arch,key",
    [
        ("RetinaNet", "MODEL.RETINANET.NUM_CLASSES"),
        ("GeneralizedRCNN", "MODEL.ROI_HEADS.NUM_CLASSES"),
        ("FCOS", "MODEL.RETINANET.NUM_CLASSES"),
        ("SemanticSegmentor", "MODEL.SEM_SEG_HEAD.NUM_CLASSES"),
    ],
)
def test_dataset_classes_differ_from_the_models(arch, key):
    name = "bad_inputs_classes"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [])
    if arch == "SemanticSegmentor":
        model = _fake_segmentor(num_classes=19)
        MetadataCatalog.get(name).set(stuff_classes=["road", "sky", "car"])
    else:
        model = build_model(plain_cfg(arch, num_classes=80))
        MetadataCatalog.get(name).set(thing_classes=["road", "sky", "car"])
    with pytest.raises(ValueError) as e:
        check_num_classes([name], model)
    assert_documented("num-classes-mismatch", _message(e))
    assert f"({key}): set {key} 3." in _message(e)


def test_dataset_classes_differ_from_the_distillers_student_in_training(tmp_path):
    register_tiny_dataset("bad_inputs_tiny", str(tmp_path / "images"))  # 2 classes
    cfg = distill_cfg("RetinaNet", teacher_depth=18, teacher_fpn=32, num_classes=3)
    cfg.merge_from_list(["DATASETS.TRAIN", ("bad_inputs_tiny",), "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(ValueError) as e:
        DistillationTrainer(cfg)
    assert_documented("num-classes-mismatch", _message(e))
    # A LazyConfig run names its own key.
    with pytest.raises(ValueError, match=r"\(model.student.num_classes\): set model.student."):
        check_num_classes(["bad_inputs_tiny"], build_model(cfg), yaml=False)


# ---- dataset names, images ----


def test_unregistered_dataset_lists_close_matches():
    with pytest.raises(KeyError) as e:
        check_datasets_registered({"DATASETS.TRAIN": ["streets_coco_trian"]})
    assert_documented("unregistered-dataset", _message(e))
    assert "Close matches: streets_coco_train" in _message(e)


def test_streets_that_were_not_generated_name_the_fix(tmp_path):
    missing = str(tmp_path / "not_generated")
    names = register_all_streets(missing, prefix="bad_inputs_streets")
    try:
        for name in names:  # the four layouts of both splits
            with pytest.raises(FileNotFoundError) as e:
                DatasetCatalog.get(name)
            assert_documented("streets-not-generated", _message(e))
            assert os.path.join(missing, "acamkd_streets") in _message(e)
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _load_train_net():
    spec = importlib.util.spec_from_file_location(
        "bad_train_net", os.path.join(REPO, "train_net.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_net_checks_dataset_names_before_building_anything(tmp_path):
    train_net = _load_train_net()
    parser = train_net.build_argument_parser()
    config = tmp_path / "config.yaml"
    config.write_text(distill_cfg("RetinaNet").dump())
    args = ["--config-file", str(config), "DATASETS.TRAIN", "('streets_coco_trian',)"]
    with pytest.raises(KeyError) as e:
        train_net.main(parser.parse_args(args + ["OUTPUT_DIR", str(tmp_path / "out")]))
    assert_documented("unregistered-dataset", _message(e))
    lazy = ["--config-file", LAZY_DEMO, "dataloader.test.dataset.names=streets_coco_vla"]
    with pytest.raises(KeyError) as e:
        train_net.main(parser.parse_args(lazy + [f"train.output_dir={tmp_path / 'lazy'}"]))
    assert "(dataloader.test.dataset.names)" in _message(e)
    assert "Close matches: streets_coco_val" in _message(e)


@pytest.mark.parametrize("kind", ["missing", "undecodable"])
def test_unreadable_image_stops_training_naming_the_file(tmp_path, kind):
    name = f"bad_inputs_{kind}"
    register_tiny_dataset(name, str(tmp_path / "images"), num_images=2)
    broken = str(tmp_path / "images" / "1.png")
    if kind == "missing":
        os.remove(broken)
    else:
        with open(broken, "wb") as f:
            f.write(b"not a png")
    cfg = plain_cfg("RetinaNet")
    cfg.merge_from_list(["DATASETS.TRAIN", (name,), "DATASETS.TEST", ()])
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 2])
    cfg.merge_from_list(["OUTPUT_DIR", str(tmp_path / "out")])
    trainer = DistillationTrainer(cfg)
    with pytest.raises(UnreadableImageError) as e:
        trainer.train()  # the first batch holds both images
    assert_documented("unreadable-image", _message(e))
    assert broken in _message(e)


# ---- the teacher ----


def test_teacher_of_another_task():
    cfg = distill_cfg("RetinaNet")
    cfg.MODEL.ACAMKD.TEACHER.CONFIG_FILE = os.path.join(
        STREETS_SEG, "deeplabv3_R_18_OS8_streets.yaml"
    )
    cfg.MODEL.ACAMKD.TEACHER.OPTS = []
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    assert_documented("teacher-other-task", _message(e))


def test_logits_distillation_needs_a_segmentor_student():
    cfg = distill_cfg("RetinaNet", extra=["MODEL.ACAMKD.DISTILL_TARGET", "sem_seg_logits"])
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    assert_documented("logits-target-detector", _message(e))


def test_logits_teacher_with_other_classes():
    cfg = _pair_cfg("deeplabv3_R_18", teacher_extra=["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5"])
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    assert_documented("logits-num-classes", _message(e))


def test_teacher_opts_with_an_odd_number_of_items():
    cfg = distill_cfg("RetinaNet")
    cfg.MODEL.ACAMKD.TEACHER.OPTS = list(cfg.MODEL.ACAMKD.TEACHER.OPTS) + ["MODEL.RESNETS.DEPTH"]
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    assert_documented("teacher-opts-odd", _message(e))


def test_teacher_opts_with_a_key_the_teachers_config_lacks():
    cfg = distill_cfg("RetinaNet")
    cfg.MODEL.ACAMKD.TEACHER.OPTS = ["MODEL.RESNET.DEPTH", "50"]
    with pytest.raises(KeyError) as e:
        build_model(cfg)
    assert_documented("teacher-opts-unknown-key", _message(e))
    assert "Close matches: MODEL.RESNETS.DEPTH" in _message(e)


def test_lazy_teacher_overrides_are_checked_too():
    teacher = os.path.join(REPO, "configs", "Streets-Detection", "retinanet_R_18_FPN_streets.py")
    with pytest.raises(KeyError) as e:
        build_lazy_teacher(teacher, allow_random_init=True, overrides=["model.num_clases=3"])
    assert "model.teacher.overrides sets model.num_clases, which the teacher's" in _message(e)
    assert "Close matches: model.num_classes" in _message(e)
    with pytest.raises(ValueError, match="item 'model.num_classes' is not key=value"):
        build_lazy_teacher(teacher, allow_random_init=True, overrides=["model.num_classes"])
    yaml_teacher = os.path.join(
        REPO, "configs", "Streets-Detection", "retinanet_R_50_FPN_streets.yaml"
    )
    with pytest.raises(ValueError, match="model.teacher.overrides has 1 items"):
        build_lazy_teacher(yaml_teacher, allow_random_init=True, overrides=["MODEL.DEVICE"])


# ---- image sizes ----


def test_images_smaller_than_the_largest_fpn_stride_train():
    model = build_model(distill_cfg("RetinaNet", teacher_depth=18, teacher_fpn=32))
    model.train()
    inputs = batched_inputs(2, size=(16, 24))  # p6 and p7 have strides 64 and 128
    for x in inputs:
        x["instances"].gt_boxes.tensor.clamp_(0, 16)
    with EventStorage():
        outputs = model.distill(inputs)
        losses = model(inputs)
    assert documented_messages()["small-images"] == []  # nothing to see: it trains
    assert outputs.levels["p7"].stats["teacher_feature_absmax"] > 0
    assert all(torch.isfinite(v) for v in losses.values())


def test_teacher_size_divisibility_the_student_does_not_give():
    model = build_model(distill_cfg("RetinaNet"))
    model.teacher.backbone._size_divisibility = 64  # the student pads 64x96 images to 64x96
    model.train()
    with EventStorage(), pytest.raises(ValueError) as e:
        model(batched_inputs())
    assert_documented("teacher-size-divisibility", _message(e))


def test_every_row_of_the_table_is_provoked_by_a_test():
    tests = ""
    for f in os.listdir(os.path.join(REPO, "tests")):
        if f.startswith("test_") and f.endswith(".py"):
            tests += open(os.path.join(REPO, "tests", f), encoding="utf-8").read()
    rows = documented_messages()
    assert len(rows) >= 19  # the table parses
    assert [r for r in rows if f'"{r}"' not in tests] == []
