"""Names of the generated street scenes: classes, splits, cities, folders, COCO categories.

What the dataset registration needs, without the generator (:mod:`.street_scene`,
:mod:`.synthetic_streets`), so that ``import acamkd`` registers the ``streets_*`` names cheaply.
"""

import argparse
import os
from typing import Dict, List, Optional, Tuple

from cityscapesscripts.helpers.labels import name2label

__all__ = [
    "BENCHMARK_SCENES",
    "add_scene_arguments",
    "STREETS_THING_CLASSES",
    "STREETS_DIRNAME",
    "STREETS_SPLITS",
    "STREETS_CITIES",
    "default_datasets_root",
    "streets_dir",
    "streets_coco_categories",
]

# Cityscapes label names of the classes drawn as instances, in COCO category order.
STREETS_THING_CLASSES: Tuple[str, ...] = ("person", "rider", "car", "truck", "bicycle")
STREETS_DIRNAME = "acamkd_streets"
STREETS_SPLITS = ("train", "val")
# One city per split, as in Cityscapes (no city in two splits). Cityscapes file names are
# split on "_", so the names have none.
STREETS_CITIES: Dict[str, str] = {"train": "synthtown", "val": "synthville"}
# The embedded benchmark's scenes (generator seed 0): every study and number in the docs was
# measured on these; `tools/generate_data.py` and `make demo` generate them by default.
BENCHMARK_SCENES: Dict[str, float] = {
    "num_train": 320,
    "num_val": 80,
    "width": 320,
    "height": 160,
    "max_depth": 14.0,
}


def add_scene_arguments(parser: argparse.ArgumentParser) -> None:
    """``--num-train``, ``--num-val``, ``--width``, ``--height``, ``--max-depth`` of the generated
    scenes, defaulting to the benchmark's (``BENCHMARK_SCENES``)."""
    for flag, kind, what in (
        ("num-train", int, "generated training images"),
        ("num-val", int, "generated validation images"),
        ("width", int, "generated image width in pixels"),
        ("height", int, "generated image height in pixels"),
        ("max-depth", float, "farthest object depth in metres"),
    ):
        default = kind(BENCHMARK_SCENES[flag.replace("-", "_")])
        parser.add_argument(
            "--" + flag, type=kind, default=default, help=f"{what} (default: {default})"
        )


def default_datasets_root() -> str:
    """``$DETECTRON2_DATASETS``, or ``datasets`` as for detectron2's builtin datasets."""
    return os.getenv("DETECTRON2_DATASETS", "datasets")


def streets_dir(root: Optional[str] = None) -> str:
    """The folder of the synthetic streets under ``root`` (default: see default_datasets_root)."""
    return os.path.join(default_datasets_root() if root is None else root, STREETS_DIRNAME)


def streets_coco_categories() -> List[Dict]:
    """COCO categories of the synthetic streets: ids 1..5 in STREETS_THING_CLASSES order.

    Returns:
        List[Dict]: ``{"id", "name", "supercategory"}`` per class; the supercategory is the
        Cityscapes category ("human", "vehicle").
    """
    return [
        {"id": i + 1, "name": name, "supercategory": name2label[name].category}
        for i, name in enumerate(STREETS_THING_CLASSES)
    ]
