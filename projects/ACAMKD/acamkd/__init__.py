"""ACAM-KD for detectron2: Adaptive and Cooperative Attention Masking for Knowledge Distillation.

Importing the package registers everything in detectron2's registries: the ACAMDistiller
meta-architecture, a YAML-buildable FCOS, the segmentation backbones and heads, and the
generated ``streets_*`` datasets.
"""

from . import data, modeling  # noqa: F401  (registration happens on import)
from .checkpoint import DistillationCheckpointer
from .config import add_acamkd_config, get_acamkd_cfg
from .engine import DistillationTrainer
from .modeling import ACAMDistiller, ACAMLevel

__version__ = "0.1.0"
__all__ = [
    "ACAMDistiller",
    "ACAMLevel",
    "DistillationCheckpointer",
    "DistillationTrainer",
    "add_acamkd_config",
    "get_acamkd_cfg",
]
