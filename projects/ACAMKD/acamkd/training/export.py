"""Export a distilled student as a plain detectron2 checkpoint and config."""

import logging
import os
from typing import Dict, Tuple

import torch

from detectron2.config import CfgNode, get_cfg
from detectron2.projects.deeplab import add_deeplab_config

from ..modeling.meta_arch.reppoints import add_reppoints_config
from .checkpointer import is_distiller_state

__all__ = ["export_student", "student_state_dict", "plain_student_cfg"]

logger = logging.getLogger(__name__)

# Meta-architectures that stock detectron2 can build from a YAML config.
_STOCK_YAML_ARCHS = ("RetinaNet", "GeneralizedRCNN", "SemanticSegmentor", "PanopticFPN")


def student_state_dict(distiller_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ``student.*`` entries of a distiller's state dict, with the prefix removed."""
    if not is_distiller_state(distiller_state):
        raise ValueError(
            "This checkpoint has no 'student.*' weights: it is not an ACAMDistiller checkpoint "
            "(a plain detectron2 checkpoint needs no export)."
        )
    prefix = "student."
    return {k[len(prefix) :]: v for k, v in distiller_state.items() if k.startswith(prefix)}


def _restrict_to(cfg: CfgNode, reference: CfgNode) -> CfgNode:
    """A copy of ``cfg`` with only the keys that ``reference`` knows (recursively)."""
    out = CfgNode()
    for key, value in cfg.items():
        if key not in reference:
            continue
        if isinstance(value, CfgNode):
            out[key] = _restrict_to(value, reference[key])
        else:
            out[key] = value
    return out


def plain_student_cfg(cfg: CfgNode, weights: str) -> CfgNode:
    """
    The student's config as stock detectron2 reads it: the student's meta-architecture, no
    ``MODEL.ACAMKD`` node, ``MODEL.WEIGHTS`` pointing at the exported checkpoint. Semantic
    segmentors keep the DeepLab project's keys (load them with ``add_deeplab_config``), RepPoints
    its ``MODEL.REPPOINTS`` keys (load them with ``acamkd.get_acamkd_cfg()``).
    """
    arch = cfg.MODEL.ACAMKD.STUDENT_META_ARCHITECTURE
    if arch not in _STOCK_YAML_ARCHS:
        logger.warning(
            "Stock detectron2 cannot build %s from a YAML config; the exported YAML needs "
            "`import acamkd` to build it (and, for RepPoints, acamkd.get_acamkd_cfg() to read "
            "its MODEL.REPPOINTS keys).",
            arch,
        )
    reference = get_cfg()
    if arch == "SemanticSegmentor":
        add_deeplab_config(reference)
    elif arch == "RepPoints":
        add_reppoints_config(reference)
    scfg = _restrict_to(cfg, reference)
    scfg.MODEL.META_ARCHITECTURE = arch
    scfg.MODEL.WEIGHTS = weights
    return scfg


def export_student(cfg: CfgNode, checkpoint_path: str, output_dir: str) -> Tuple[str, str]:
    """
    Write ``student_model.pth`` (student weights only) and ``student_config.yaml``.

    Args:
        cfg (CfgNode): the distiller's config.
        checkpoint_path (str): a checkpoint saved while training the distiller.
        output_dir (str): where to write the two files.

    Returns:
        tuple[str, str]: the checkpoint path and the config path.
    """
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    os.makedirs(output_dir, exist_ok=True)
    weights_path = os.path.join(output_dir, "student_model.pth")
    config_path = os.path.join(output_dir, "student_config.yaml")
    torch.save({"model": student_state_dict(state), "__author__": "ACAM-KD export"}, weights_path)
    with open(config_path, "w") as f:
        f.write(plain_student_cfg(cfg, os.path.abspath(weights_path)).dump())
    logger.info("Exported the student to %s and %s", weights_path, config_path)
    return weights_path, config_path
