"""The synthetic streets: file layouts, determinism, idempotence, and detectron2 reading them.

Everything runs on a handful of tiny scenes generated into a temporary folder.
"""

import argparse
import collections
import glob
import importlib.util
import json
import os
import sys
import uuid

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.labels import id2label, labels
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from PIL import Image
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.cityscapes import load_cityscapes_instances
from detectron2.evaluation import COCOEvaluator, SemSegEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from acamkd.data import (
    STREETS_THING_CLASSES,
    add_register_coco_argument,
    generate_streets,
    register_all_streets,
    register_coco_datasets,
    streets_dataset_names,
    streets_dir,
)
from acamkd.data.street_scene import render_street_scene

NUM_TRAIN, NUM_VAL, WIDTH, HEIGHT = 6, 3, 128, 64
SMALL = dict(num_train=NUM_TRAIN, num_val=NUM_VAL, width=WIDTH, height=HEIGHT, progress=False)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def streets(tmp_path_factory):
    """The dataset folder of a small generated set (shared: tests only read it)."""
    return generate_streets(str(tmp_path_factory.mktemp("datasets")), **SMALL)


@pytest.fixture
def unique_names():
    """Register under a fresh prefix; remove the names afterwards."""
    prefix = "test_" + uuid.uuid4().hex[:8]
    yield prefix
    for name in list(DatasetCatalog.list()):
        if name.startswith(prefix):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _files(directory):
    with open(os.path.join(directory, "manifest.json")) as f:
        return sorted(json.load(f)["files"])


def _read(path):
    return np.asarray(Image.open(path))


def _stems(streets, split):
    pattern = os.path.join(streets, "cityscapes", "leftImg8bit", split, "*", "*_leftImg8bit.png")
    return sorted(p[: -len("_leftImg8bit.png")] for p in glob.glob(pattern))


def _gt(stem, kind):
    return stem.replace("leftImg8bit", "gtFine") + "_gtFine_" + kind


def _coco(streets, split):
    with open(os.path.join(streets, "coco", "annotations", "instances_{}.json".format(split))) as f:
        return json.load(f)


def test_layouts_have_every_file_at_one_size(streets):
    for split, n in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        stems = _stems(streets, split)
        assert len(stems) == n
        coco = _coco(streets, split)
        assert len(coco["images"]) == n
        for stem in stems:
            assert _read(stem + "_leftImg8bit.png").shape == (HEIGHT, WIDTH, 3)
            for kind in ("labelIds.png", "instanceIds.png", "labelTrainIds.png"):
                assert _read(_gt(stem, kind)).shape == (HEIGHT, WIDTH)
            with open(_gt(stem, "polygons.json")) as f:
                polygons = json.load(f)
            assert (polygons["imgHeight"], polygons["imgWidth"]) == (HEIGHT, WIDTH)
        for image in coco["images"]:
            path = os.path.join(streets, "coco", split, image["file_name"])
            assert _read(path).shape == (image["height"], image["width"], 3) == (HEIGHT, WIDTH, 3)


def test_label_maps_use_cityscapes_ids(streets):
    ids = {label.id for label in labels if label.id >= 0}
    to_train = np.full(256, 255, np.uint8)
    for label in labels:
        if label.id >= 0 and 0 <= label.trainId < 255:
            to_train[label.id] = label.trainId
    for stem in _stems(streets, "train") + _stems(streets, "val"):
        label_ids = _read(_gt(stem, "labelIds.png"))
        assert set(np.unique(label_ids).tolist()) <= ids
        # Road, building and sky are in every scene.
        assert {7, 11, 23} <= set(np.unique(label_ids).tolist())
        np.testing.assert_array_equal(_read(_gt(stem, "labelTrainIds.png")), to_train[label_ids])
        instance_ids = _read(_gt(stem, "instanceIds.png")).astype(np.int64)
        things = instance_ids >= 1000
        np.testing.assert_array_equal(
            np.where(things, instance_ids // 1000, instance_ids), label_ids
        )
        assert all(id2label[int(i) // 1000].hasInstances for i in np.unique(instance_ids[things]))


def test_pngs_are_cityscapes_rasterisation_of_the_polygons(streets):
    """cityscapesscripts' json2labelImg/json2instanceImg reproduce the PNGs from the json."""
    for stem in _stems(streets, "val"):
        annotation = Annotation()
        annotation.fromJsonFile(_gt(stem, "polygons.json"))
        for encoding, kind in (("ids", "labelIds.png"), ("trainIds", "labelTrainIds.png")):
            official = np.asarray(createLabelImage(annotation, encoding))
            np.testing.assert_array_equal(official, _read(_gt(stem, kind)))
        official = np.asarray(createInstanceImage(annotation, "ids"))
        np.testing.assert_array_equal(official, _read(_gt(stem, "instanceIds.png")))


def test_coco_annotations_are_valid(streets):
    for split in ("train", "val"):
        coco = _coco(streets, split)
        assert [c["name"] for c in coco["categories"]] == list(STREETS_THING_CLASSES)
        assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5]
        images = {image["id"]: image for image in coco["images"]}
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"]) > 0
        for a in coco["annotations"]:
            image = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and a["area"] > 0 and a["iscrowd"] == 0
            assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
            assert a["category_id"] in range(1, 6)
            assert a["segmentation"] and all(len(p) >= 6 for p in a["segmentation"])
            # The polygons rasterise to a mask inside the box.
            rles = mask_util.frPyObjects(a["segmentation"], image["height"], image["width"])
            mask = mask_util.decode(mask_util.merge(rles))
            ys, xs = np.nonzero(mask)
            assert len(xs) and xs.min() >= x and xs.max() < x + w and ys.max() < y + h


def test_instance_ids_match_coco_instances(streets):
    for split in ("train", "val"):
        coco = _coco(streets, split)
        per_image = collections.defaultdict(list)
        for a in coco["annotations"]:
            per_image[a["image_id"]].append(a)
        for image in coco["images"]:
            stem = image["file_name"][: -len(".png")]
            city = stem.split("_")[0]
            path = os.path.join(streets, "cityscapes", "gtFine", split, city, stem)
            instance_ids = _read(path + "_gtFine_instanceIds.png").astype(np.int64)
            ids = np.unique(instance_ids[instance_ids >= 1000])
            from_png = sorted(
                (id2label[int(i) // 1000].name, int((instance_ids == i).sum())) for i in ids
            )
            from_json = sorted(
                (STREETS_THING_CLASSES[a["category_id"] - 1], a["area"])
                for a in per_image[image["id"]]
            )
            assert from_png == from_json
            for a in per_image[image["id"]]:
                # The polygons run along pixel edges: they rasterise back to the instance's
                # pixels, plus its holes (a COCO polygon has none).
                rles = mask_util.frPyObjects(a["segmentation"], HEIGHT, WIDTH)
                polygon = mask_util.decode(mask_util.merge(rles)).astype(bool)
                instance = instance_ids == np.bincount(instance_ids[polygon]).argmax()
                assert (instance & ~polygon).sum() == 0
                assert a["area"] == instance.sum()


def test_generator_is_deterministic(streets, tmp_path):
    again = generate_streets(str(tmp_path / "same"), **SMALL)
    assert _files(again) == _files(streets)
    for rel in _files(streets):
        with open(os.path.join(streets, rel), "rb") as f, open(os.path.join(again, rel), "rb") as g:
            assert f.read() == g.read(), rel
    other = generate_streets(str(tmp_path / "other"), seed=1, **SMALL)
    assert _files(other) == _files(streets)
    rel = "coco/train/synthtown_000000_000000.png"
    with open(os.path.join(streets, rel), "rb") as f, open(os.path.join(other, rel), "rb") as g:
        assert f.read() != g.read()


def test_second_run_is_a_no_op_and_new_parameters_regenerate(tmp_path, log_records):
    root = str(tmp_path)
    params = dict(num_train=3, num_val=2, width=64, height=32, progress=False)
    directory = generate_streets(root, **params)
    paths = [os.path.join(directory, rel) for rel in _files(directory)]
    paths.append(os.path.join(directory, "manifest.json"))
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    messages = log_records("acamkd.data.synthetic_streets")
    assert generate_streets(root, **params) == directory
    assert any("up to date" in m for m in messages)
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes

    # Fewer images: the extra ones of the old set are gone, not left for the loaders to find.
    generate_streets(root, **dict(params, num_train=2))
    assert not os.path.exists(os.path.join(directory, "coco/train/synthtown_000000_000002.png"))
    assert len(glob.glob(os.path.join(directory, "cityscapes/gtFine/train/*/*"))) == 2 * 4
    with open(os.path.join(directory, "manifest.json")) as f:
        assert json.load(f)["params"]["num_train"] == 2

    # A missing file makes the set incomplete: it is generated again.
    os.remove(os.path.join(directory, "coco/val/synthville_000000_000001.png"))
    generate_streets(root, **dict(params, num_train=2))
    assert os.path.exists(os.path.join(directory, "coco/val/synthville_000000_000001.png"))


def test_generators_of_one_set_take_turns(tmp_path, log_records):
    """A second generator of the same folder waits for the first instead of deleting its files
    mid-write (two pretraining runs started side by side), then finds the set complete."""
    import threading

    import portalocker

    root = str(tmp_path)
    params = dict(num_train=2, num_val=1, width=64, height=32, progress=False)
    directory = streets_dir(root)
    os.makedirs(directory)
    messages = log_records("acamkd.data.synthetic_streets")
    with portalocker.Lock(os.path.join(directory, ".generating.lock"), flags=portalocker.LOCK_EX):
        waiting = threading.Thread(target=generate_streets, args=(root,), kwargs=params)
        waiting.start()
        waiting.join(timeout=2.0)  # three 64x32 images take far less when nothing holds it
        assert waiting.is_alive() and not os.path.exists(os.path.join(directory, "manifest.json"))
        assert any("waiting for it" in m for m in messages)
    waiting.join(timeout=60.0)
    assert not waiting.is_alive()
    assert generate_streets(root, **params) == directory
    assert any("up to date" in m for m in messages)


def test_detectron2_loaders_read_the_registered_splits(streets, unique_names):
    names = register_all_streets(os.path.dirname(streets), prefix=unique_names)
    assert sorted(names) == sorted(streets_dataset_names(unique_names))
    for name, evaluator_type in streets_dataset_names(unique_names).items():
        assert MetadataCatalog.get(name).evaluator_type == evaluator_type

    for split, n in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        coco = _coco(streets, split)
        records = DatasetCatalog.get("{}_coco_{}".format(unique_names, split))
        assert len(records) == n
        assert sum(len(r["annotations"]) for r in records) == len(coco["annotations"])
        meta = MetadataCatalog.get("{}_coco_{}".format(unique_names, split))
        assert meta.thing_classes == list(STREETS_THING_CLASSES)
        coco_classes = {
            os.path.basename(r["file_name"])[: -len(".png")]: sorted(
                meta.thing_classes[a["category_id"]] for a in r["annotations"]
            )
            for r in records
        }

        name = "{}_cityscapes_instance_{}".format(unique_names, split)
        records = DatasetCatalog.get(name)
        meta = MetadataCatalog.get(name)
        assert len(records) == n and os.path.isdir(meta.gt_dir)
        for r in records:
            assert os.path.isfile(r["file_name"]) and (r["height"], r["width"]) == (HEIGHT, WIDTH)
            classes = sorted(meta.thing_classes[a["category_id"]] for a in r["annotations"])
            stem = os.path.basename(r["file_name"])[: -len("_leftImg8bit.png")]
            assert classes == coco_classes[stem]

        for kind in ("cityscapes_sem_seg", "sem_seg"):
            records = DatasetCatalog.get("{}_{}_{}".format(unique_names, kind, split))
            assert len(records) == n
            for r in records:
                assert os.path.isfile(r["file_name"]) and os.path.isfile(r["sem_seg_file_name"])
                stem = os.path.basename(r["file_name"])[: -len("leftImg8bit.png")]
                assert os.path.basename(r["sem_seg_file_name"]) == stem + "gtFine_labelTrainIds.png"


def test_cityscapes_json_loader_reads_the_polygons(streets):
    pytest.importorskip("shapely", reason="detectron2 reads Cityscapes polygons with shapely")
    image_dir = os.path.join(streets, "cityscapes", "leftImg8bit", "val")
    gt_dir = os.path.join(streets, "cityscapes", "gtFine", "val")
    from_json = load_cityscapes_instances(image_dir, gt_dir, from_json=True)
    from_png = load_cityscapes_instances(image_dir, gt_dir, from_json=False)
    count = {r["file_name"]: sorted(a["category_id"] for a in r["annotations"]) for r in from_png}
    for r in from_json:
        assert sorted(a["category_id"] for a in r["annotations"]) == count[r["file_name"]]


def test_detectron2_evaluators_score_ground_truth_as_perfect(streets, unique_names):
    register_all_streets(os.path.dirname(streets), prefix=unique_names)
    name = unique_names + "_coco_val"
    evaluator = COCOEvaluator(name, tasks=("bbox",), output_dir=None)
    evaluator.reset()
    for r in DatasetCatalog.get(name):
        instances = Instances((r["height"], r["width"]))
        boxes = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in r["annotations"]
        ]
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.scores = torch.ones(len(boxes))
        instances.pred_classes = torch.tensor([a["category_id"] for a in r["annotations"]])
        evaluator.process([r], [{"instances": instances}])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)

    name = unique_names + "_sem_seg_val"
    evaluator = SemSegEvaluator(name, distributed=False)
    evaluator.reset()
    for r in DatasetCatalog.get(name):
        target = torch.from_numpy(_read(r["sem_seg_file_name"]).astype(np.int64))
        logits = torch.nn.functional.one_hot(target.clamp(max=18), 19).permute(2, 0, 1).float()
        evaluator.process([r], [{"sem_seg": logits}])
    assert evaluator.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)


def test_registration_is_lazy_idempotent_and_follows_the_root(tmp_path, unique_names):
    missing = str(tmp_path / "not_generated")
    names = register_all_streets(missing, prefix=unique_names)
    assert register_all_streets(missing, prefix=unique_names) == names
    instance = unique_names + "_cityscapes_instance_train"
    assert MetadataCatalog.get(instance).gt_dir.startswith(missing)
    # The project's own names follow a new root (e.g. a demo's --root after import).
    elsewhere = str(tmp_path / "elsewhere")
    register_all_streets(elsewhere, prefix=unique_names)
    assert MetadataCatalog.get(instance).gt_dir.startswith(elsewhere)
    # A name somebody else registered is not taken over.
    DatasetCatalog.register(unique_names + "x_coco_train", lambda: [])
    with pytest.raises(ValueError, match="already registered"):
        register_all_streets(missing, prefix=unique_names + "x")


def _tiny_coco(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.new("RGB", (40, 30)).save(image_dir / "a.png")
    Image.new("RGB", (40, 30)).save(image_dir / "b.png")
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                "bbox": [2, 3, 10, 8],
                "area": 80,
                "iscrowd": 0,
                "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]],
            },
            {
                "id": 2,
                "image_id": 2,
                "category_id": 9,
                "bbox": [5, 5, 4, 4],
                "area": 16,
                "iscrowd": 0,
                "segmentation": [[5, 5, 9, 5, 9, 9, 5, 9]],
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 7,
                "bbox": [20, 5, 6, 6],
                "area": 36,
                "iscrowd": 0,
                "segmentation": [[20, 5, 26, 5, 26, 11, 20, 11]],
            },
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
    }
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(coco))
    return str(json_file), str(image_dir)


def test_register_coco_flag(tmp_path, unique_names):
    json_file, image_dir = _tiny_coco(tmp_path)
    parser = add_register_coco_argument(argparse.ArgumentParser())
    first, second = unique_names + "_a", unique_names + "_b"
    args = parser.parse_args(
        [
            "--register-coco",
            first,
            json_file,
            image_dir,
            "--register-coco",
            second,
            json_file,
            image_dir,
        ]
    )
    assert args.register_coco == [[first, json_file, image_dir], [second, json_file, image_dir]]
    assert parser.parse_args([]).register_coco == []
    assert register_coco_datasets(args.register_coco) == [first, second]

    records = DatasetCatalog.get(first)
    assert [len(r["annotations"]) for r in records] == [1, 2]
    assert os.path.isfile(records[0]["file_name"])
    meta = MetadataCatalog.get(first)
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == ["cat", "dog"]
    assert meta.thing_dataset_id_to_contiguous_id == {7: 0, 9: 1}

    # Same files again: nothing happens. Other files under a taken name: a clear error.
    assert register_coco_datasets([(first, json_file, image_dir)]) == [first]
    (tmp_path / "other").mkdir()
    other_json, _ = _tiny_coco(tmp_path / "other")
    with pytest.raises(ValueError, match="already registered"):
        register_coco_datasets([(first, other_json, image_dir)])


def test_register_coco_reports_missing_files(tmp_path, unique_names):
    json_file, image_dir = _tiny_coco(tmp_path)
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        register_coco_datasets([(unique_names, missing, image_dir)])
    with pytest.raises(FileNotFoundError, match="no_images"):
        register_coco_datasets([(unique_names, json_file, str(tmp_path / "no_images"))])
    with pytest.raises(ValueError, match="three"):
        register_coco_datasets([(unique_names, json_file)])
    assert unique_names not in DatasetCatalog.list()


def test_generate_data_tool(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "generate_data", os.path.join(REPO, "tools", "generate_data.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = [
        "generate_data.py",
        "--root",
        str(tmp_path),
        "--num-train",
        "2",
        "--num-val",
        "1",
        "--width",
        "64",
        "--height",
        "32",
        "--max-depth",
        "30",
        "--no-progress",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    tool.main()
    assert os.path.join(str(tmp_path), "acamkd_streets") in capsys.readouterr().out
    with open(os.path.join(str(tmp_path), "acamkd_streets", "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["params"] == {
        "seed": 0,
        "width": 64,
        "height": 32,
        "max_depth": 30.0,
        "num_train": 2,
        "num_val": 1,
    }


def test_max_depth_brings_the_objects_nearer():
    def median_box_area(max_depth):
        areas = []
        for i in range(12):
            scene = render_street_scene(np.random.default_rng([7, i]), 320, 160, max_depth)
            for label, poly in scene.objects:
                if label in STREETS_THING_CLASSES:
                    areas.append(np.ptp(poly[:, 0]) * np.ptp(poly[:, 1]))
        return np.median(areas), len(areas)

    far_area, far_count = median_box_area(65.0)
    near_area, near_count = median_box_area(20.0)
    assert near_area > 1.3 * far_area
    assert near_count > 0.5 * far_count  # nearer, not fewer
    with pytest.raises(ValueError, match="max_depth must be at least 10"):
        generate_streets("/nonexistent", num_train=1, num_val=1, max_depth=5)
