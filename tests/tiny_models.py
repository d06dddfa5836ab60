"""Tiny teacher/student configs and a tiny on-disk detection dataset for the tests."""

import glob
import os
from typing import List, Optional, Tuple

import cv2
import numpy as np
import torch

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from acamkd import get_acamkd_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_CONFIGS = os.path.join(REPO, "configs", "COCO-Detection")

_BASES = {"RetinaNet": "Base-RetinaNet.yaml", "GeneralizedRCNN": "Base-RCNN-FPN.yaml"}
_BASES["FCOS"] = "Base-FCOS.yaml"
_BASES["RepPoints"] = "Base-RepPoints.yaml"


def _shrink(depth: int, fpn_channels: int, num_classes: int) -> List[str]:
    """Overrides that make a model-zoo-style detector tiny (CPU, 64-128 px images)."""
    opts = [
        "MODEL.DEVICE",
        "cpu",
        "MODEL.WEIGHTS",
        "",
        "MODEL.RESNETS.DEPTH",
        str(depth),
        "MODEL.FPN.OUT_CHANNELS",
        str(fpn_channels),
        "MODEL.RETINANET.NUM_CLASSES",
        str(num_classes),
        "MODEL.RETINANET.NUM_CONVS",
        "1",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        str(num_classes),
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "32",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
        "32",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        "64",
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM",
        "64",
        "MODEL.MASK_ON",
        "False",
        # Random weights with FrozenBN leave activations unnormalised and huge in a deep
        # network; GroupNorm keeps a random teacher's features at a sane scale.
        "MODEL.RESNETS.NORM",
        "GN",
    ]
    if depth in (18, 34):
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    else:  # a narrow bottleneck network: deeper than R18 but still fast
        opts += ["MODEL.RESNETS.WIDTH_PER_GROUP", "32", "MODEL.RESNETS.RES2_OUT_CHANNELS", "128"]
    return opts


def plain_cfg(arch: str, depth: int = 18, fpn_channels: int = 32, num_classes: int = 2) -> CfgNode:
    """A tiny plain detector config of ``arch`` ("RetinaNet", "GeneralizedRCNN", "FCOS",
    "RepPoints")."""
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(os.path.join(COCO_CONFIGS, _BASES[arch]))
    cfg.merge_from_list(_shrink(depth, fpn_channels, num_classes) + _input_opts())
    return cfg


def _input_opts() -> List[str]:
    return [
        "INPUT.MIN_SIZE_TRAIN",
        "(64,)",
        "INPUT.MAX_SIZE_TRAIN",
        "96",
        "INPUT.MIN_SIZE_TEST",
        "64",
        "INPUT.MAX_SIZE_TEST",
        "96",
        "DATALOADER.NUM_WORKERS",
        "0",
    ]


def distill_cfg(
    arch: str,
    *,
    teacher_depth: int = 50,
    teacher_fpn: int = 64,
    student_depth: int = 18,
    student_fpn: int = 32,
    num_classes: int = 2,
    extra: Optional[List[str]] = None,
) -> CfgNode:
    """
    A tiny distillation config: a deeper, wider teacher (random, explicitly allowed) and a
    small student of the same architecture.
    """
    cfg = plain_cfg(arch, student_depth, student_fpn, num_classes)
    teacher_opts = _shrink(teacher_depth, teacher_fpn, num_classes)
    cfg.merge_from_list(
        [
            "MODEL.META_ARCHITECTURE",
            "ACAMDistiller",
            "MODEL.ACAMKD.STUDENT_META_ARCHITECTURE",
            arch,
            "MODEL.ACAMKD.TEACHER.CONFIG_FILE",
            os.path.join(COCO_CONFIGS, _BASES[arch]),
            "MODEL.ACAMKD.TEACHER.OPTS",
            teacher_opts,
            "MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT",
            "True",
            "MODEL.ACAMKD.NUM_MASKS",
            "3",
        ]
        + (extra or [])
    )
    return cfg


def batched_inputs(num_images: int = 2, size=(64, 96), seed: int = 0) -> List[dict]:
    """detectron2 per-image dicts with random images and 1-2 boxes each."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    h, w = size
    for i in range(num_images):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]))
        inst.gt_classes = torch.tensor([0, 1])
        out.append({"image": image, "instances": inst, "height": h, "width": w})
    return out


def register_tiny_dataset(name: str, root: str, num_images: int = 4) -> str:
    """Write ``num_images`` PNGs with boxes under ``root`` and register them as ``name``."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(num_images):
        image = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
        image[10:50, 8:40] = (0, 0, 255)
        image[20:60, 50:90] = (0, 255, 0)
        path = os.path.join(root, f"{i}.png")
        cv2.imwrite(path, image)
        records.append(
            {
                "file_name": path,
                "image_id": i,
                "height": 64,
                "width": 96,
                "annotations": [
                    {"bbox": [8, 10, 40, 50], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},
                    {"bbox": [50, 20, 90, 60], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1},
                ],
            }
        )
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["red", "green"])
    return name


def assert_same_network(a, b) -> None:
    """Two distillers (e.g. built from a YAML and from its LazyConfig twin) are the same network:
    parameter and buffer names, shapes and trainable flags, settings and module classes."""

    def layout(model):
        params = {k: (tuple(v.shape), v.requires_grad) for k, v in model.named_parameters()}
        return params, {k: tuple(v.shape) for k, v in model.named_buffers()}

    assert layout(a) == layout(b)
    for attr in ("distill_target", "student_input_format", "teacher_input_format", "logits_grid"):
        assert getattr(a, attr) == getattr(b, attr)
    # By name: for FCOS the YAML builds acamkd's subclass, LazyConfig detectron2's own class.
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]


def tensorboard_images(folder: str, tag: str) -> List[Tuple[int, np.ndarray]]:
    """The images ``tag`` of every TensorBoard event file in ``folder``, as (step, decoded
    BGR uint8 array), in the order written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = []
    for event_file in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        events = EventAccumulator(event_file, size_guidance={"images": 0})
        events.Reload()
        if tag not in events.Tags()["images"]:
            continue
        for image in events.Images(tag):
            encoded = np.frombuffer(image.encoded_image_string, np.uint8)
            images.append((image.step, cv2.imdecode(encoded, cv2.IMREAD_COLOR)))
    return images
