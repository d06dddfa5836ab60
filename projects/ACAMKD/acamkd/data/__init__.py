"""Data: the synthetic streets (generator and dataset registration) and your own COCO data."""

from .datasets import (
    add_register_coco_argument,
    register_all_streets,
    register_coco_datasets,
    streets_dataset_names,
)
from .street_scene import STREETS_THING_CLASSES, StreetScene, render_street_scene
from .synthetic_streets import (
    GENERATOR_VERSION,
    STREETS_DIRNAME,
    default_datasets_root,
    generate_streets,
    streets_dir,
)

__all__ = [
    "add_register_coco_argument",
    "register_all_streets",
    "register_coco_datasets",
    "streets_dataset_names",
    "STREETS_THING_CLASSES",
    "StreetScene",
    "render_street_scene",
    "GENERATOR_VERSION",
    "STREETS_DIRNAME",
    "default_datasets_root",
    "generate_streets",
    "streets_dir",
]

# Registration happens on import, as for detectron2's builtin datasets: the streets_* names
# (see datasets.py) point at $DETECTRON2_DATASETS/acamkd_streets (default: datasets/), lazily,
# so no file needs to exist yet.
register_all_streets()
