"""Distillation methods: ACAM-KD's rivals and plain MSE, one registry (MODEL.ACAMKD.METHOD)."""

# Importing the method modules registers them; ACAM-KD itself (ACAMLevel, "ACAMKD") registers
# from modeling/acam.py.
from .cwd import CWD
from .fgd import FGD
from .maskd import MasKD, MasKDTokenLearner, ReceptiveTokens
from .mgd import MGD
from .mse import FeatureMSE
from .pkd import PKD
from .registry import (
    DISTILL_METHOD_REGISTRY,
    LevelContext,
    LevelOutput,
    build_distill_method,
    family_setting,
    method_names,
)

__all__ = [
    "CWD",
    "DISTILL_METHOD_REGISTRY",
    "MGD",
    "MasKD",
    "MasKDTokenLearner",
    "PKD",
    "ReceptiveTokens",
    "FGD",
    "FeatureMSE",
    "LevelContext",
    "LevelOutput",
    "build_distill_method",
    "family_setting",
    "method_names",
]
