"""
A pretrained backbone without downloads: the student's bottom-up network learns to classify
object crops of a generated street set made with another generator seed than the benchmark's,
and is saved as detectron2's ImageNet ``.pkl`` files are (backbone keys only, matched by name),
so that ``MODEL.WEIGHTS`` loads it into any student with that backbone.

The crops are the set's annotated objects (5 classes) plus background crops that overlap no
object (a 6th class), square around each box with some context, resized to a fixed size. The
training is resumable: ``output_dir/last.pth`` holds the model, the optimiser and the iteration.
"""

import json
import logging
import os
import pickle
import time
from dataclasses import dataclass
from typing import Dict, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.config import CfgNode
from detectron2.modeling import build_backbone
from fvcore.common.checkpoint import Checkpointer

from ..data.streets_meta import STREETS_THING_CLASSES
from ..training.checkpoint_files import write_atomically

__all__ = ["CropSet", "CropClassifier", "object_crops", "pretrain_backbone", "save_backbone_pkl"]

logger = logging.getLogger(__name__)


@dataclass
class CropSet:
    """
    Attributes:
        images (Tensor): (N, 3, S, S) uint8 crops, in the files' channel order (BGR).
        labels (Tensor): (N,) int64: a thing class index, or ``len(STREETS_THING_CLASSES)``
            for background.
    """

    images: Tensor
    labels: Tensor


def _square(box, width: int, height: int, context: float) -> Tuple[int, int, int, int]:
    """A square around an XYWH box, ``context`` times its longer side, clipped to the image."""
    x, y, w, h = box
    side = max(w, h) * context
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    x1, y1 = int(min(width, cx + side / 2)), int(min(height, cy + side / 2))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def object_crops(
    dataset_dir: str,
    split: str = "train",
    size: int = 64,
    context: float = 1.3,
    min_side: float = 6.0,
    backgrounds_per_image: int = 2,
    seed: int = 0,
) -> CropSet:
    """
    Args:
        dataset_dir (str): a generated set, ``<root>/acamkd_streets``.
        split (str): "train" or "val".
        size (int): side of the square crops, in pixels.
        context (float): side of a crop over the box's longer side.
        min_side (float): boxes whose longer side is shorter (in pixels) are skipped.
        backgrounds_per_image (int): background crops drawn per image (random squares of the
            objects' sizes that overlap no box; fewer where none fits).
        seed (int): seed of the background draws.

    Returns:
        CropSet: every crop of the split.
    """
    with open(os.path.join(dataset_dir, "coco", "annotations", f"instances_{split}.json")) as f:
        coco = json.load(f)
    category_index = {c["id"]: i for i, c in enumerate(coco["categories"])}
    by_image: Dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    background = len(STREETS_THING_CLASSES)
    for image in coco["images"]:
        pixels = cv2.imread(os.path.join(dataset_dir, "coco", split, image["file_name"]))
        height, width = pixels.shape[:2]
        boxes = [a["bbox"] for a in by_image.get(image["id"], [])]
        for ann in by_image.get(image["id"], []):
            if max(ann["bbox"][2:]) < min_side:
                continue
            x0, y0, x1, y1 = _square(ann["bbox"], width, height, context)
            crops.append(cv2.resize(pixels[y0:y1, x0:x1], (size, size)))
            labels.append(category_index[ann["category_id"]])
        sides = [max(b[2:]) * context for b in boxes if max(b[2:]) >= min_side] or [size]
        for _ in range(backgrounds_per_image):
            for _attempt in range(20):
                side = float(rng.choice(sides))
                if side >= min(width, height):
                    break
                x0 = float(rng.uniform(0, width - side))
                y0 = float(rng.uniform(0, height - side))
                if all(
                    x0 + side <= bx or bx + bw <= x0 or y0 + side <= by or by + bh <= y0
                    for bx, by, bw, bh in boxes
                ):
                    patch = pixels[int(y0) : int(y0 + side), int(x0) : int(x0 + side)]
                    crops.append(cv2.resize(patch, (size, size)))
                    labels.append(background)
                    break
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return CropSet(images=images, labels=torch.tensor(labels, dtype=torch.int64))


class CropClassifier(nn.Module):
    """
    The student's bottom-up backbone (the FPN's ``bottom_up``, or the backbone itself), global
    average pooling of its coarsest output, and a linear classifier.
    """

    def __init__(self, cfg: CfgNode, num_classes: int):
        """
        Args:
            cfg (CfgNode): the student's config (its MODEL.BACKBONE, MODEL.RESNETS, pixel mean
                and std).
            num_classes (int): classes of the crops.
        """
        super().__init__()
        backbone = build_backbone(cfg)
        self.bottom_up = getattr(backbone, "bottom_up", backbone)
        shapes = self.bottom_up.output_shape()
        self.feature = max(shapes, key=lambda k: shapes[k].stride)
        self.classifier = nn.Linear(shapes[self.feature].channels, num_classes)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        """
        Args:
            images (Tensor): (N, 3, S, S) uint8 or float pixels, in the config's format.

        Returns:
            Tensor: (N, num_classes) logits.
        """
        x = (images.float() - self.pixel_mean) / self.pixel_std
        pooled = self.bottom_up(x)[self.feature].mean(dim=(2, 3))
        return self.classifier(pooled)


def save_backbone_pkl(model: CropClassifier, path: str) -> str:
    """
    Save the bottom-up backbone as detectron2's ImageNet ``.pkl`` files are: its own key names
    (``stem.conv1.weight``, ``res2.0.conv1.weight``, ...), numpy arrays, and
    ``matching_heuristics`` so that detectron2 matches them by name to the student's
    (``backbone.bottom_up.stem.conv1.weight`` in an FPN, ``backbone.stem.conv1.weight`` else).

    Returns:
        str: ``path``.
    """
    state = {k: v.detach().cpu().numpy() for k, v in model.bottom_up.state_dict().items()}
    data = {"model": state, "__author__": "acamkd pretrain_backbone", "matching_heuristics": True}
    write_atomically(path, lambda f: pickle.dump(data, f), "wb")
    return path


def _accuracy(model: nn.Module, crops: CropSet, batch: int = 256) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(crops.labels), batch):
            logits = model(crops.images[i : i + batch])
            correct += int((logits.argmax(dim=1) == crops.labels[i : i + batch]).sum())
    model.train(was_training)
    return correct / max(1, len(crops.labels))


def pretrain_backbone(
    cfg: CfgNode,
    train: CropSet,
    val: CropSet,
    output_dir: str,
    *,
    max_iter: int = 3000,
    batch_size: int = 64,
    base_lr: float = 0.05,
    weight_decay: float = 1e-4,
    eval_period: int = 500,
    checkpoint_period: int = 250,
    seed: int = 0,
) -> Dict[str, float]:
    """
    Train :class:`CropClassifier` on ``train`` (SGD with momentum 0.9, cosine learning rate,
    random horizontal flips), resuming from ``output_dir/last.pth`` if present; evaluate on
    ``val`` every ``eval_period`` iterations and at the end; write ``output_dir/backbone.pkl``
    (:func:`save_backbone_pkl`) and ``output_dir/metrics.json`` (accuracy per evaluation).

    Returns:
        dict[str, float]: the final "train_accuracy" and "val_accuracy".
    """
    os.makedirs(output_dir, exist_ok=True)
    torch.manual_seed(seed)
    num_classes = len(STREETS_THING_CLASSES) + 1
    model = CropClassifier(cfg, num_classes)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=base_lr, momentum=0.9, weight_decay=weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_iter)
    checkpointer = Checkpointer(model, output_dir, optimizer=optimizer, scheduler=scheduler)
    # The last checkpoint of output_dir if there is one, else nothing (a fresh start).
    start = checkpointer.resume_or_load("", resume=True).get("iteration", 0)
    if start:
        logger.info("Resumed backbone pretraining at iteration %d", start)
    metrics_path = os.path.join(output_dir, "metrics.json")
    history = json.load(open(metrics_path)) if start and os.path.isfile(metrics_path) else []
    generator = torch.Generator().manual_seed(seed + start)
    model.train()
    began = time.perf_counter()
    for iteration in range(start, max_iter):
        index = torch.randint(len(train.labels), (batch_size,), generator=generator)
        images, labels = train.images[index], train.labels[index]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        done = iteration + 1
        if done % 50 == 0 or done == max_iter:
            rate = (time.perf_counter() - began) / (done - start)
            logger.info(
                "pretrain iter %d/%d loss %.3f lr %.4f eta %ds",
                done,
                max_iter,
                float(loss.detach()),
                scheduler.get_last_lr()[0],
                int(rate * (max_iter - done)),
            )
        if done % eval_period == 0 or done == max_iter:
            history.append({"iteration": done, "val_accuracy": _accuracy(model, val)})
            logger.info("pretrain iter %d: val accuracy %.3f", done, history[-1]["val_accuracy"])
            with open(metrics_path, "w") as f:
                json.dump(history, f, indent=1)
        if done % checkpoint_period == 0 or done == max_iter:
            checkpointer.save("last", iteration=done)
    result = {"train_accuracy": _accuracy(model, train), "val_accuracy": _accuracy(model, val)}
    save_backbone_pkl(model, os.path.join(output_dir, "backbone.pkl"))
    logger.info("Backbone written to %s (%s)", os.path.join(output_dir, "backbone.pkl"), result)
    return result
