"""ACAM-KD for detectron2: Adaptive and Cooperative Attention Masking for Knowledge Distillation.

Importing the package registers everything in detectron2's registries, and nothing more: the
ACAMDistiller meta-architecture, a YAML-buildable FCOS, RepPoints, the segmentation backbones
and heads, and the generated ``streets_*`` dataset names. The trainer (``acamkd.training``,
with its hooks and matplotlib figures), the tools' modules (``acamkd.experiments``,
``acamkd.pictures``, the environment report and the Slurm launcher) and the street generator are
imported where they are used; ``acamkd.DistillationTrainer`` is imported on first access.
"""

from . import _deferred, data, modeling  # noqa: F401  (registration happens on import)
from .config import add_acamkd_config, get_acamkd_cfg
from .modeling import ACAMDistiller, ACAMLevel
from .training.checkpointer import DistillationCheckpointer

__version__ = "0.1.0"
__all__ = [
    "ACAMDistiller",
    "ACAMLevel",
    "DistillationCheckpointer",
    "DistillationTrainer",
    "add_acamkd_config",
    "get_acamkd_cfg",
]

# Imported on first access: name -> submodule.
__getattr__, __dir__ = _deferred.deferred_names(
    __name__, {"DistillationTrainer": "training.trainer"}
)
