"""Data: the synthetic streets (generator and dataset registration) and your own COCO data.

Importing this package registers the ``streets_*`` names; the generator (``street_scene``,
``synthetic_streets``) is imported only when one of its names is first used.
"""

from .. import _deferred
from .datasets import (
    add_register_coco_argument,
    register_all_streets,
    register_coco_datasets,
    streets_dataset_names,
)
from .streets_meta import (
    BENCHMARK_SCENES,
    STREETS_DIRNAME,
    STREETS_THING_CLASSES,
    add_scene_arguments,
    default_datasets_root,
    streets_dir,
)

# The generator's names, imported on first use: name -> submodule.
__getattr__, __dir__ = _deferred.deferred_names(
    __name__,
    {
        "StreetScene": "street_scene",
        "render_street_scene": "street_scene",
        "GENERATOR_VERSION": "synthetic_streets",
        "generate_streets": "synthetic_streets",
    },
)

__all__ = [
    "add_register_coco_argument",
    "register_all_streets",
    "register_coco_datasets",
    "streets_dataset_names",
    "BENCHMARK_SCENES",
    "add_scene_arguments",
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
