"""The keys detectron2's dense detectors read from ``MODEL.RETINANET``, for YAML-built FCOS and
RepPoints."""

from typing import Any, Dict

from detectron2.config import CfgNode

__all__ = ["dense_detector_kwargs"]


def dense_detector_kwargs(cfg: CfgNode) -> Dict[str, Any]:
    """
    The constructor arguments a RetinaNet-style detector shares with RetinaNet: class count,
    focal loss, test-time filtering and pixel normalisation, from ``MODEL.RETINANET``,
    ``TEST`` and ``MODEL.PIXEL_*``.
    """
    retinanet = cfg.MODEL.RETINANET
    return {
        "num_classes": retinanet.NUM_CLASSES,
        "focal_loss_alpha": retinanet.FOCAL_LOSS_ALPHA,
        "focal_loss_gamma": retinanet.FOCAL_LOSS_GAMMA,
        "test_score_thresh": retinanet.SCORE_THRESH_TEST,
        "test_topk_candidates": retinanet.TOPK_CANDIDATES_TEST,
        "test_nms_thresh": retinanet.NMS_THRESH_TEST,
        "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        "pixel_mean": cfg.MODEL.PIXEL_MEAN,
        "pixel_std": cfg.MODEL.PIXEL_STD,
    }
