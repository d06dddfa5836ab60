"""Semantic-segmentation heads detectron2 lacks: PSPNet's pyramid pooling head."""

# Importing psp_head registers PSPHead in detectron2's SEM_SEG_HEADS_REGISTRY.
from .psp_head import PSPHead

__all__ = ["PSPHead"]
