"""``import acamkd`` registers the model parts and the dataset names, and imports nothing else:
the trainer, matplotlib, the tools' modules (``acamkd.experiments``, ``acamkd.pictures``) and
the street generator come when they are used."""

import subprocess
import sys

import pytest

import acamkd

# Each check runs in a fresh interpreter: this one has imported much more by now.
_REGISTERS_AND_STAYS_SLIM = """
import sys
import acamkd
from detectron2.data import DatasetCatalog
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

assert "matplotlib" not in sys.modules, "matplotlib was imported"
# The layout rule: the experiments and the pictures (the tools' modules) and the trainer come
# only when they are used. Of acamkd.training, the package imports the checkpointer alone (with
# the weights it loads, which modeling/ declares).
layers = [m for m in sys.modules if m.startswith(("acamkd.experiments", "acamkd.pictures"))]
assert not layers, layers
training = sorted(m for m in sys.modules if m.startswith("acamkd.training."))
assert training == [
    "acamkd.training.checkpoint_files",
    "acamkd.training.checkpointer",
    "acamkd.training.frozen_weights",
    "acamkd.training.teacher_weights",
], training
heavy = [
    m
    for m in (
        "acamkd.training.trainer", "acamkd.training.lazy_train", "acamkd.training.common",
        "acamkd.training.hooks", "acamkd.training.nonfinite", "acamkd.training.mask_collapse",
        "acamkd.training.evaluation", "acamkd.training.env", "acamkd.training.slurm",
        "acamkd.training.export", "acamkd.experiments.stages", "acamkd.experiments.study",
        "acamkd.experiments.demo", "acamkd.experiments.compare", "acamkd.experiments.curves",
        "acamkd.experiments.benchmark", "acamkd.pictures.mask_maps",
        "acamkd.pictures.visualization", "acamkd.lazy", "acamkd.data.street_scene",
        "acamkd.data.synthetic_streets",
    )
    if m in sys.modules
]
assert not heavy, heavy
assert {"ACAMDistiller", "RepPoints", "FCOS"} <= set(META_ARCH_REGISTRY._obj_map)
assert {"build_mobilenetv2_backbone", "build_resnet_basic_deeplab_backbone"} <= set(
    BACKBONE_REGISTRY._obj_map
)
assert "PSPHead" in SEM_SEG_HEADS_REGISTRY._obj_map
assert {"streets_coco_train", "streets_sem_seg_val"} <= set(DatasetCatalog.list())
"""


_MASK_MAPS_WITHOUT_MATPLOTLIB = """
import sys
import acamkd.training.trainer, acamkd.training.lazy_train, acamkd.pictures.mask_maps

assert "matplotlib" not in sys.modules, "matplotlib was imported"
import acamkd.pictures.visualization

assert "matplotlib" in sys.modules
"""


def _python(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_import_acamkd_registers_and_imports_no_matplotlib():
    _python(_REGISTERS_AND_STAYS_SLIM)


def test_trainer_and_mask_maps_import_no_matplotlib_drawing_does():
    _python(_MASK_MAPS_WITHOUT_MATPLOTLIB)


def test_public_names_resolve_on_first_use():
    from acamkd import DistillationTrainer
    from acamkd.data import GENERATOR_VERSION, StreetScene, generate_streets
    from acamkd.data.street_scene import StreetScene as scene_class
    from acamkd.data.synthetic_streets import generate_streets as generate
    from acamkd.training.trainer import DistillationTrainer as trainer_class

    assert DistillationTrainer is trainer_class and "DistillationTrainer" in dir(acamkd)
    assert set(acamkd.__all__) <= set(dir(acamkd))
    assert StreetScene is scene_class and generate_streets is generate and GENERATOR_VERSION >= 1
    with pytest.raises(AttributeError, match="NoSuchName"):
        acamkd.NoSuchName
