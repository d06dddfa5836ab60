"""Evaluator choice by the dataset's ``evaluator_type``, as detectron2's tools do it."""

import os
from typing import Optional

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    DatasetEvaluator,
    SemSegEvaluator,
)

from .env import has_compiled_ops

__all__ = ["build_evaluator"]


def build_evaluator(
    dataset_name: str, output_dir: str, output_folder: Optional[str] = None
) -> DatasetEvaluator:
    """
    The evaluator for ``dataset_name`` by its ``evaluator_type``: COCO, Cityscapes instance,
    generic semantic segmentation or Cityscapes semantic segmentation. The one choice of both
    config styles: the YAML trainer's ``build_evaluator`` and the ``.py`` configs'
    ``acamkd.lazy.build_dataset_evaluator`` call it.

    Args:
        dataset_name (str): a registered dataset.
        output_dir (str): the run's folder (``OUTPUT_DIR``, ``train.output_dir``).
        output_folder (str): where the COCO and generic semantic-segmentation evaluators
            write their results; default ``{output_dir}/inference/{dataset_name}``.

    Returns:
        DatasetEvaluator: the evaluator.
    """
    output_folder = output_folder or os.path.join(output_dir, "inference", dataset_name)
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if kind == "coco":
        # The C++ COCOeval needs detectron2's _C extension; pycocotools' is the reference.
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops()
        )
    if kind == "cityscapes_instance":
        return CityscapesInstanceEvaluator(dataset_name)
    if kind == "sem_seg":
        return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
    if kind == "cityscapes_sem_seg":
        return CityscapesSemSegEvaluator(dataset_name)
    raise NotImplementedError(
        f"No evaluator for dataset {dataset_name!r} with evaluator_type={kind!r}; supported: "
        "coco, cityscapes_instance, sem_seg, cityscapes_sem_seg. Register the dataset's metadata "
        "with one of these (MetadataCatalog.get(name).set(evaluator_type=...))."
    )
