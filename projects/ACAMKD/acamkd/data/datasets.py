"""Dataset registration: the synthetic streets under the project's names, and your own COCO data.

Every split of the synthetic streets (``{split}`` is ``train`` or ``val``) is registered with
detectron2's own loaders, in the four ways detectron2 itself reads COCO and Cityscapes:

- ``streets_coco_{split}``: ``load_coco_json``, evaluator_type ``coco``;
- ``streets_cityscapes_instance_{split}``: ``load_cityscapes_instances``, evaluator_type
  ``cityscapes_instance``;
- ``streets_cityscapes_sem_seg_{split}``: ``load_cityscapes_semantic``, evaluator_type
  ``cityscapes_sem_seg``;
- ``streets_sem_seg_{split}``: ``load_sem_seg`` on the labelTrainIds, evaluator_type
  ``sem_seg`` (detectron2's SemSegEvaluator).

Registration is lazy, as for detectron2's builtin datasets: nothing is read until
``DatasetCatalog.get``, so the names exist before the data are generated
(``tools/generate_data.py``).
"""

import argparse
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from cityscapesscripts.helpers.labels import name2label

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_sem_seg, register_coco_instances
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.cityscapes import load_cityscapes_instances, load_cityscapes_semantic

from .streets_meta import STREETS_CITIES, STREETS_SPLITS, streets_coco_categories, streets_dir

__all__ = [
    "streets_dataset_names",
    "register_all_streets",
    "register_coco_datasets",
    "add_register_coco_argument",
]

# What this module registered: name -> the files it points at. Lets a second call with the
# same files be a no-op, and a call with another root re-point the project's own names.
_REGISTERED: Dict[str, Tuple] = {}


def streets_dataset_names(prefix: str = "streets") -> Dict[str, str]:
    """The names ``register_all_streets`` registers, with their evaluator types.

    Args:
        prefix (str): the names' common prefix.

    Returns:
        Dict[str, str]: dataset name -> ``evaluator_type``.
    """
    names = {}
    for split in STREETS_SPLITS:
        names["{}_coco_{}".format(prefix, split)] = "coco"
        names["{}_cityscapes_instance_{}".format(prefix, split)] = "cityscapes_instance"
        names["{}_cityscapes_sem_seg_{}".format(prefix, split)] = "cityscapes_sem_seg"
        names["{}_sem_seg_{}".format(prefix, split)] = "sem_seg"
    return names


def _register_once(name: str, key: Tuple, register: Callable[[], None]) -> bool:
    """Run ``register`` unless ``name`` already points at ``key``; True if it ran."""
    if name in DatasetCatalog.list():
        if _REGISTERED.get(name) == key:
            return False
        if name not in _REGISTERED:
            raise ValueError(
                "Dataset '{}' is already registered by someone else (metadata: {}). Pass another "
                "prefix to register_all_streets().".format(
                    name, MetadataCatalog.get(name).as_dict()
                )
            )
        # One of ours, under another root: point it at the new files.
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register()
    _REGISTERED[name] = key
    return True


def _generated(directory: str, load: Callable[[], List[Dict]]) -> Callable[[], List[Dict]]:
    """``load``, which first checks that the streets were generated in ``directory``.

    Without the check a missing set fails deep in pycocotools or cityscapesscripts; with it the
    error names the folder, ``$DETECTRON2_DATASETS`` and the command that makes the data.
    """

    def load_generated() -> List[Dict]:
        if not os.path.isfile(os.path.join(directory, "manifest.json")):
            raise FileNotFoundError(
                f"The generated street scenes are not in {directory} (no manifest.json): "
                "generate the benchmark's scenes with 'python tools/generate_data.py' (or "
                "'make demo'), or point $DETECTRON2_DATASETS (now "
                f"{os.getenv('DETECTRON2_DATASETS', 'unset: ./datasets')}) at the folder that "
                "holds acamkd_streets/."
            )
        return load()

    return load_generated


def _cityscapes_meta() -> Dict:
    meta = dict(_get_builtin_metadata("cityscapes"))  # thing_classes, stuff_classes
    train_labels = sorted(
        (l for l in cityscapes_labels if 0 <= l.trainId < 255), key=lambda l: l.trainId
    )
    meta["stuff_colors"] = [l.color for l in train_labels]
    meta["thing_colors"] = [name2label[n].color for n in meta["thing_classes"]]
    return meta


def register_all_streets(root: Optional[str] = None, prefix: str = "streets") -> List[str]:
    """Register every split of the synthetic streets (see the module docstring), lazily.

    Safe to call again: names already pointing at the same files are left alone, and the
    project's own names registered under another root are re-pointed to this one.

    Args:
        root (str or None): the datasets root that holds ``acamkd_streets/``; None means
            ``$DETECTRON2_DATASETS`` or ``datasets``, as for detectron2's builtin datasets.
        prefix (str): the names' common prefix (tests use a unique one).

    Returns:
        List[str]: the names (newly registered or already there).
    """
    directory = streets_dir(root)
    cs_meta = _cityscapes_meta()
    categories = streets_coco_categories()
    coco_meta = {
        "thing_classes": [c["name"] for c in categories],
        "thing_colors": [name2label[c["name"]].color for c in categories],
        # The same mapping load_coco_json sets when it reads the json (ids 1..K).
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }
    names = []
    for split in STREETS_SPLITS:
        json_file = os.path.join(
            directory, "coco", "annotations", "instances_{}.json".format(split)
        )
        image_root = os.path.join(directory, "coco", split)
        image_dir = os.path.join(directory, "cityscapes", "leftImg8bit", split)
        gt_dir = os.path.join(directory, "cityscapes", "gtFine", split)
        city = STREETS_CITIES[split]

        name = "{}_coco_{}".format(prefix, split)

        def register_coco(n=name, j=json_file, r=image_root):
            # register_coco_instances, with the check that the set was generated.
            DatasetCatalog.register(n, _generated(directory, lambda: load_coco_json(j, r, n)))
            MetadataCatalog.get(n).set(
                json_file=j, image_root=r, evaluator_type="coco", **coco_meta
            )

        _register_once(name, ("coco", json_file, image_root), register_coco)
        names.append(name)

        name = "{}_cityscapes_instance_{}".format(prefix, split)

        def register_instances(n=name, x=image_dir, y=gt_dir):
            # From the instanceIds PNGs, not the polygons json as detectron2's builtin
            # registration does: the PNGs are exactly what the Cityscapes evaluator scores,
            # and reading the json needs shapely.
            DatasetCatalog.register(
                n,
                _generated(
                    directory,
                    lambda: load_cityscapes_instances(x, y, from_json=False, to_polygons=True),
                ),
            )
            MetadataCatalog.get(n).set(
                image_dir=x, gt_dir=y, evaluator_type="cityscapes_instance", **cs_meta
            )

        _register_once(name, ("cityscapes_instance", image_dir, gt_dir), register_instances)
        names.append(name)

        name = "{}_cityscapes_sem_seg_{}".format(prefix, split)

        def register_semantic(n=name, x=image_dir, y=gt_dir):
            DatasetCatalog.register(
                n, _generated(directory, lambda: load_cityscapes_semantic(x, y))
            )
            MetadataCatalog.get(n).set(
                image_dir=x,
                gt_dir=y,
                evaluator_type="cityscapes_sem_seg",
                ignore_label=255,
                **cs_meta,
            )

        _register_once(name, ("cityscapes_sem_seg", image_dir, gt_dir), register_semantic)
        names.append(name)

        name = "{}_sem_seg_{}".format(prefix, split)
        # load_sem_seg lists one folder and pairs files by name less the given endings, so it
        # reads the one city folder of the split, labelTrainIds beside leftImg8bit.
        city_images = os.path.join(image_dir, city)
        city_labels = os.path.join(gt_dir, city)

        def register_sem_seg(n=name, x=city_images, y=city_labels):
            DatasetCatalog.register(
                n,
                _generated(
                    directory,
                    lambda: load_sem_seg(
                        y, x, gt_ext="gtFine_labelTrainIds.png", image_ext="leftImg8bit.png"
                    ),
                ),
            )
            MetadataCatalog.get(n).set(
                image_root=x,
                sem_seg_root=y,
                evaluator_type="sem_seg",
                ignore_label=255,
                stuff_classes=cs_meta["stuff_classes"],
                stuff_colors=cs_meta["stuff_colors"],
            )

        _register_once(name, ("sem_seg", city_images, city_labels), register_sem_seg)
        names.append(name)
    return names


def register_coco_datasets(specs: Sequence[Sequence[str]]) -> List[str]:
    """Register your own COCO-format instance datasets, lazily (evaluator_type "coco").

    Registering the same name with the same files again is a no-op, so this is safe to call
    from every process of a launch. Class names and ids are read from the json when the
    dataset is first loaded (``load_coco_json``).

    Args:
        specs (Sequence[Sequence[str]]): ``(name, json_file, image_root)`` triples, e.g. from
            ``--register-coco`` (see add_register_coco_argument) or from config keys.

    Returns:
        List[str]: the names, in the order given.

    Raises:
        FileNotFoundError: the json file or the image folder does not exist.
        ValueError: a malformed triple, a json that is not COCO instances (no "images",
            "annotations" or "categories"), or a name already registered with other files.
    """
    names = []
    for spec in specs:
        if len(spec) != 3 or not all(isinstance(s, str) and s for s in spec):
            raise ValueError(
                "Expected (NAME, JSON, IMAGE_DIR) as three non-empty strings, got {!r}".format(spec)
            )
        name, json_file, image_root = spec
        json_file = os.path.abspath(os.path.expanduser(json_file))
        image_root = os.path.abspath(os.path.expanduser(image_root))
        if not os.path.isfile(json_file):
            raise FileNotFoundError(
                "COCO dataset '{}': annotation file {} does not exist. Pass the path of a COCO "
                "instances json (e.g. .../annotations/instances_val2017.json) as the second "
                "value of --register-coco NAME JSON IMAGE_DIR.".format(name, json_file)
            )
        if not os.path.isdir(image_root):
            raise FileNotFoundError(
                "COCO dataset '{}': image folder {} does not exist. Pass the folder that the "
                "json's file_name entries are relative to as the third value of "
                "--register-coco NAME JSON IMAGE_DIR.".format(name, image_root)
            )
        _check_coco_json(name, json_file)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            same = (getattr(meta, "json_file", None), getattr(meta, "image_root", None)) == (
                json_file,
                image_root,
            )
            if not same:
                raise ValueError(
                    "Dataset '{}' is already registered with json_file={}, image_root={}; "
                    "cannot register it again with json_file={}, image_root={}. Choose another "
                    "name.".format(
                        name,
                        getattr(meta, "json_file", None),
                        getattr(meta, "image_root", None),
                        json_file,
                        image_root,
                    )
                )
        else:
            register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
    return names


_COCO_KEYS = ("images", "annotations", "categories")


def _check_coco_json(name: str, json_file: str, chunk_size: int = 1 << 22) -> None:
    """
    Fail early, before any model is built, for a file that is not a COCO instances json: an
    object with "images", "annotations" and "categories". The file is scanned for the keys
    rather than parsed: a COCO training json takes seconds and gigabytes to parse, and
    ``load_coco_json`` parses it when the dataset is loaded.
    """
    found = set()
    pattern = re.compile(rb'"(%s)"\s*:' % b"|".join(k.encode() for k in _COCO_KEYS))
    first = None
    tail = b""
    with open(json_file, "rb") as f:
        while len(found) < len(_COCO_KEYS):
            chunk = f.read(chunk_size)
            if not chunk:
                break
            if first is None:
                first = chunk.lstrip()[:1]
            text = tail + chunk
            found.update(m.group(1).decode() for m in pattern.finditer(text))
            tail = text[-64:]
    missing = [k for k in _COCO_KEYS if k not in found]
    if first != b"{" or missing:
        what = "is not a JSON object" if first != b"{" else f"has no {', '.join(missing)}"
        raise ValueError(
            "COCO dataset '{}': {} {}, so it is not a COCO instances json. --register-coco NAME "
            "JSON IMAGE_DIR takes a file with 'images', 'annotations' and 'categories', such as "
            "detectron2's instances_val2017.json; convert other formats to it first.".format(
                name, json_file, what
            )
        )


def add_register_coco_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add a repeatable ``--register-coco NAME JSON IMAGE_DIR`` flag to ``parser``.

    Its value, ``args.register_coco``, is a list of triples for register_coco_datasets. With
    detectron2's ``default_argument_parser``, give the flag before the trailing config
    overrides (``opts``), which take every argument after them.

    Args:
        parser (argparse.ArgumentParser): the parser to extend.

    Returns:
        argparse.ArgumentParser: the same parser.
    """
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_DIR"),
        help="register a COCO-format dataset under NAME, to use in DATASETS.TRAIN/TEST "
        "(repeatable)",
    )
    return parser
