"""
Checks of the training data that turn detectron2's late, generic failures into early messages
naming the input, the setting and the fix: dataset names that are not registered, a dataset
whose number of classes is not the model's, and images that cannot be read.

An image that is missing or cannot be decoded stops training, naming the file, rather than being
skipped: a distilled student and the baseline it is compared with must see the same images.
"""

import difflib
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils

__all__ = [
    "UnreadableImageError",
    "StopOnUnreadableImage",
    "check_datasets_registered",
    "check_num_classes",
    "model_num_classes",
]


def _as_list(names: Union[str, Sequence[str], None]) -> list:
    if not names:
        return []
    return [names] if isinstance(names, str) else list(names)


def check_datasets_registered(names_by_key: Mapping[str, Union[str, Sequence[str]]]) -> None:
    """
    Every dataset name is registered in detectron2's ``DatasetCatalog``.

    Args:
        names_by_key (dict[str, str or list[str]]): the setting (e.g. "DATASETS.TRAIN",
            "dataloader.train.dataset.names") -> the names it gives.

    Raises:
        KeyError: naming the first unregistered name, its setting and the registered names
            closest to it.
    """
    registered = DatasetCatalog.list()
    for key, names in names_by_key.items():
        for name in _as_list(names):
            if name in registered:
                continue
            close = difflib.get_close_matches(name, registered, n=5, cutoff=0.6)
            hint = (
                f"Close matches: {', '.join(close)}." if close else "No registered name is close."
            )
            raise KeyError(
                f"Dataset {name!r} ({key}) is not registered. {hint} Register your own COCO "
                "data with --register-coco NAME JSON IMAGE_DIR (before the config overrides), or "
                "use a detectron2 builtin name with its files under $DETECTRON2_DATASETS."
            )


def model_num_classes(model: nn.Module) -> Optional[Tuple[int, str, str]]:
    """
    The number of classes a detector or semantic segmentor predicts, with the YAML and the
    LazyConfig setting that sets it (for a distiller, the student's).

    Returns:
        tuple or None: (num_classes, YAML key, LazyConfig key relative to the model node,
        e.g. "num_classes"), or None for a model of unknown layout.
    """
    predictor = getattr(getattr(model, "sem_seg_head", None), "predictor", None)
    if isinstance(getattr(predictor, "out_channels", None), int):  # the head's 1x1 classifier
        num = predictor.out_channels
        return num, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "sem_seg_head.num_classes"
    if hasattr(model, "roi_heads") and hasattr(model.roi_heads, "num_classes"):
        return model.roi_heads.num_classes, "MODEL.ROI_HEADS.NUM_CLASSES", "roi_heads.num_classes"
    if isinstance(getattr(model, "num_classes", None), int):
        # RetinaNet, and this project's FCOS and RepPoints, read MODEL.RETINANET.NUM_CLASSES.
        return model.num_classes, "MODEL.RETINANET.NUM_CLASSES", "num_classes"
    return None


def check_num_classes(
    dataset_names: Union[str, Sequence[str]],
    model: nn.Module,
    *,
    yaml: bool = True,
    dataset_key: str = "DATASETS.TRAIN",
) -> None:
    """
    The datasets (already loaded, so that their metadata is complete) have as many classes as
    the model predicts: ``thing_classes`` for a detector, ``stuff_classes`` for a semantic
    segmentor.

    Args:
        dataset_names (str or list[str]): the training datasets.
        model (nn.Module): the model (DistributedDataParallel or not; for a distiller, its
            student is checked).
        yaml (bool): name the YAML setting (else the LazyConfig one).
        dataset_key (str): where the names were given, for the message.

    Raises:
        ValueError: naming the dataset, its classes, the model's setting and the value to give.
    """
    model = getattr(model, "module", model)
    student = getattr(model, "student", None)
    found = model_num_classes(student if student is not None else model)
    if found is None:
        return
    num, yaml_key, lazy_key = found
    if yaml:
        key, fix = yaml_key, f"set {yaml_key} {{}}"
    else:
        lazy_key = ("model.student." if student is not None else "model.") + lazy_key
        key, fix = lazy_key, f"set {lazy_key}={{}}"
    semantic = yaml_key.startswith("MODEL.SEM_SEG_HEAD")
    field = "stuff_classes" if semantic else "thing_classes"
    for name in _as_list(dataset_names):
        classes = MetadataCatalog.get(name).get(field, None)
        if classes is None or len(classes) == num:
            continue
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise ValueError(
            f"Dataset {name!r} ({dataset_key}) has {len(classes)} "
            f"{'classes' if semantic else 'categories'} ({shown}) but the model predicts {num} "
            f"({key}): {fix.format(len(classes))}."
        )


class UnreadableImageError(RuntimeError):
    """An image of the training data is missing or cannot be decoded."""


class StopOnUnreadableImage:
    """
    Wraps a dataset mapper (e.g. detectron2's ``DatasetMapper``): when it fails and the record's
    image (or its ``sem_seg_file_name``) cannot be read, raise :class:`UnreadableImageError`
    naming the file, instead of the decoder's bare error. Other errors pass unchanged.
    """

    def __init__(self, mapper: Callable[[Dict[str, Any]], Any], dataset_key: str):
        """
        Args:
            mapper (callable): the wrapped mapper.
            dataset_key (str): the setting that names the training datasets, for the message.
        """
        self.mapper = mapper
        self.dataset_key = dataset_key

    def __call__(self, dataset_dict: Dict[str, Any]) -> Any:
        try:
            return self.mapper(dataset_dict)
        except Exception as e:
            for field in ("file_name", "sem_seg_file_name"):
                path = dataset_dict.get(field)
                if path is None:
                    continue
                try:
                    utils.read_image(path)
                except Exception as unreadable:
                    raise UnreadableImageError(
                        f"Cannot read {path} ({field} of image_id "
                        f"{dataset_dict.get('image_id', '?')} in {self.dataset_key}): "
                        f"{type(unreadable).__name__}: {unreadable}. Restore or replace the "
                        "file, or remove its record from the dataset. Training stops rather than "
                        "skip it, so that every model compared sees the same images."
                    ) from e
            raise

    def __repr__(self) -> str:
        return f"StopOnUnreadableImage({self.mapper!r})"
