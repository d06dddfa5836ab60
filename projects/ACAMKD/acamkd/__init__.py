"""ACAM-KD for detectron2: Adaptive and Cooperative Attention Masking for Knowledge Distillation."""
from .config import add_acamkd_config

__all__ = ["add_acamkd_config"]
