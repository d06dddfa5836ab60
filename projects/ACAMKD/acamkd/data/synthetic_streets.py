"""The embedded default data: synthetic street scenes written in real COCO and Cityscapes layouts.

``generate_streets`` renders ``num_train + num_val`` scenes (see :mod:`.street_scene`) and writes
each of them twice under ``<root>/acamkd_streets/``, so that detectron2's own loaders and
evaluators read them unchanged::

    coco/annotations/instances_{train,val}.json
    coco/{train,val}/<city>_000000_<frame>.png
    cityscapes/leftImg8bit/{train,val}/<city>/<city>_000000_<frame>_leftImg8bit.png
    cityscapes/gtFine/{train,val}/<city>/<city>_000000_<frame>_gtFine_labelIds.png
    cityscapes/gtFine/{train,val}/<city>/<city>_000000_<frame>_gtFine_instanceIds.png
    cityscapes/gtFine/{train,val}/<city>/<city>_000000_<frame>_gtFine_labelTrainIds.png
    cityscapes/gtFine/{train,val}/<city>/<city>_000000_<frame>_gtFine_polygons.json
    manifest.json

Image ``i`` of a split depends only on ``(seed, split, i)``, so the first images of a large set
are those of a small one. ``manifest.json`` is written last and records the parameters, the
generator version and every file with its size; a run whose parameters match a complete
manifest does nothing.
"""

import hashlib
import json
import logging
import os
import shutil
from typing import Dict, List, Optional

import cv2
import numpy as np
import portalocker
from cityscapesscripts.helpers.labels import name2label
from tqdm import tqdm

from .street_scene import StreetScene, render_street_scene
from .streets_meta import (  # re-exported: the generator's callers find them here too
    STREETS_CITIES,
    STREETS_DIRNAME,
    STREETS_SPLITS,
    STREETS_THING_CLASSES,
    default_datasets_root,
    streets_coco_categories,
    streets_dir,
)

__all__ = [
    "GENERATOR_VERSION",
    "STREETS_DIRNAME",
    "STREETS_CITIES",
    "STREETS_SPLITS",
    "default_datasets_root",
    "streets_dir",
    "streets_coco_categories",
    "mask_to_polygons",
    "generate_streets",
]

logger = logging.getLogger(__name__)

# Bump whenever the pictures or the files change, so that old data are regenerated.
GENERATOR_VERSION = 1
_MANIFEST = "manifest.json"
_LOCK = ".generating.lock"
_THING_NAMES = {name2label[name].id: name for name in STREETS_THING_CLASSES}


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons that pycocotools rasterises back to ``mask`` (except for its holes).

    Contours through pixel centres (what ``cv2.findContours`` gives) lie half a pixel inside
    the mask and rasterise to a thinner one: a 12-pixel person comes back with 2 pixels. These
    run along the pixel edges instead, 1/8 pixel inside, found on a 4x upsampled mask.

    Args:
        mask (np.ndarray): (H, W) bool or uint8.

    Returns:
        List[List[float]]: flat ``[x0, y0, x1, y1, ...]`` lists, one per connected part; holes
        are filled, as in any COCO polygon.
    """
    k = 4
    upsampled = np.kron(mask.astype(np.uint8), np.ones((k, k), np.uint8))
    contours = cv2.findContours(upsampled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[-2]
    # The centre of upsampled pixel c is at (c + 0.5) / k in original pixel units.
    return [((c.reshape(-1) + 0.5) / k).tolist() for c in contours if len(c) >= 3]


def _frame_stem(split: str, index: int) -> str:
    return "{}_000000_{:06d}".format(STREETS_CITIES[split], index)


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok, "PNG encoding failed"
    return buf.tobytes()


class _Writer:
    """Writes files under the dataset folder and keeps the manifest's record of them."""

    def __init__(self, directory: str):
        self.directory = directory
        self.files: Dict[str, int] = {}
        self.digest = hashlib.sha256()

    def write(self, relpath: str, data: bytes) -> None:
        path = os.path.join(self.directory, relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        self.files[relpath] = len(data)
        self.digest.update(relpath.encode() + b"\0" + hashlib.sha256(data).digest())


def _write_cityscapes(writer: _Writer, split: str, index: int, scene: StreetScene) -> None:
    city, stem = STREETS_CITIES[split], _frame_stem(split, index)
    h, w = scene.label_ids.shape
    image_dir = "cityscapes/leftImg8bit/{}/{}".format(split, city)
    gt = "cityscapes/gtFine/{}/{}/{}_gtFine_".format(split, city, stem)
    writer.write("{}/{}_leftImg8bit.png".format(image_dir, stem), _png(scene.image[:, :, ::-1]))
    writer.write(gt + "labelIds.png", _png(scene.label_ids))
    # Cityscapes stores instance ids (up to 33999) as 16-bit PNGs.
    writer.write(gt + "instanceIds.png", _png(scene.instance_ids.astype(np.uint16)))
    writer.write(gt + "labelTrainIds.png", _png(scene.train_ids))
    polygons = {
        "imgHeight": h,
        "imgWidth": w,
        "objects": [{"label": label, "polygon": poly.tolist()} for label, poly in scene.objects],
    }
    writer.write(gt + "polygons.json", json.dumps(polygons).encode())


def _coco_annotations(scene: StreetScene, image_id: int, first_id: int) -> List[Dict]:
    """One COCO annotation per instance in the instanceIds map, in instance-id order."""
    annotations = []
    ids = np.unique(scene.instance_ids[scene.instance_ids >= 1000])
    for instance_id in ids.tolist():
        label = _THING_NAMES[instance_id // 1000]
        mask = scene.instance_ids == instance_id
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        annotations.append(
            {
                "id": first_id + len(annotations),
                "image_id": image_id,
                "category_id": STREETS_THING_CLASSES.index(label) + 1,
                # The pixel extent, as pycocotools' toBbox gives for a mask.
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "area": int(mask.sum()),
                "segmentation": mask_to_polygons(mask),
                "iscrowd": 0,
            }
        )
    return annotations


def _read_manifest(directory: str) -> Optional[Dict]:
    try:
        with open(os.path.join(directory, _MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_complete(directory: str, manifest: Dict) -> bool:
    return all(
        os.path.isfile(os.path.join(directory, rel))
        and os.path.getsize(os.path.join(directory, rel)) == size
        for rel, size in manifest.get("files", {}).items()
    )


def generate_streets(
    root: Optional[str] = None,
    *,
    num_train: int = 240,
    num_val: int = 60,
    width: int = 320,
    height: int = 160,
    max_depth: float = 65.0,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> str:
    """Render the synthetic streets and write them in COCO and Cityscapes layouts.

    Does nothing (and logs so) when ``<root>/acamkd_streets/manifest.json`` records the same
    parameters and generator version and every file it lists is there with its size. Otherwise
    the folders ``coco/`` and ``cityscapes/`` inside ``<root>/acamkd_streets/`` are deleted
    and written anew; nothing else under ``root`` is touched. Processes generating into one
    folder at once take turns (a lock file in it), so the later ones find the set done.

    Args:
        root (str or None): datasets root; None means ``$DETECTRON2_DATASETS`` or ``datasets``.
        num_train (int): number of training images (at least 1).
        num_val (int): number of validation images (at least 1).
        width (int): image width in pixels (at least 32).
        height (int): image height in pixels (at least 32); Cityscapes' aspect is 2:1.
        max_depth (float): farthest depth of the annotated objects in metres (at least 10);
            smaller means larger objects on average (see :func:`render_street_scene`).
        seed (int): seed of the whole set; image i of a split depends only on (seed, split, i).
        force (bool): regenerate even when the manifest matches.
        progress (bool): show a tqdm progress bar (on a terminal).

    Returns:
        str: the dataset folder, ``<root>/acamkd_streets``.
    """
    counts = {"train": int(num_train), "val": int(num_val)}
    if min(counts.values()) < 1 or max(counts.values()) > 999999:
        raise ValueError("num_train and num_val must be in [1, 999999], got {}".format(counts))
    if width < 32 or height < 32:
        raise ValueError("width and height must be at least 32, got {}x{}".format(width, height))
    if max_depth < 10:
        raise ValueError("max_depth must be at least 10 (metres), got {}".format(max_depth))
    params = {
        "seed": int(seed),
        "width": int(width),
        "height": int(height),
        "max_depth": float(max_depth),
        "num_train": counts["train"],
        "num_val": counts["val"],
    }
    directory = streets_dir(root)
    os.makedirs(directory, exist_ok=True)
    # Processes asking for one set at once (two pretraining runs started side by side) take
    # turns: the one that waited finds the set complete instead of deleting it mid-write.
    lock = portalocker.Lock(os.path.join(directory, _LOCK), fail_when_locked=True)
    try:
        lock.acquire()
    except portalocker.AlreadyLocked:
        logger.info("Another process is generating %s; waiting for it ...", directory)
        lock = portalocker.Lock(os.path.join(directory, _LOCK), flags=portalocker.LOCK_EX)
        lock.acquire()
    try:
        return _generate_locked(directory, params, counts, force, progress)
    finally:
        lock.release()


def _generate_locked(
    directory: str, params: Dict, counts: Dict[str, int], force: bool, progress: bool
) -> str:
    """The body of :func:`generate_streets`, run while holding the set's lock."""
    width, height = params["width"], params["height"]
    manifest = _read_manifest(directory)
    if (
        not force
        and manifest is not None
        and manifest.get("version") == GENERATOR_VERSION
        and manifest.get("params") == params
        and _is_complete(directory, manifest)
    ):
        logger.info(
            "Synthetic streets in %s are up to date (%s); nothing to do.", directory, params
        )
        return directory

    logger.info("Generating synthetic streets in %s (%s) ...", directory, params)
    # The manifest goes first and comes back last: an interrupted run is never taken as done.
    if os.path.exists(os.path.join(directory, _MANIFEST)):
        os.remove(os.path.join(directory, _MANIFEST))
    for sub in ("coco", "cityscapes"):
        shutil.rmtree(os.path.join(directory, sub), ignore_errors=True)

    writer = _Writer(directory)
    # disable=None: a bar on a terminal only, not a log full of carriage returns.
    bar = tqdm(
        total=sum(counts.values()),
        desc=STREETS_DIRNAME,
        unit="img",
        disable=None if progress else True,
    )
    for split_index, split in enumerate(STREETS_SPLITS):
        images, annotations = [], []
        for i in range(counts[split]):
            rng = np.random.default_rng([params["seed"], split_index, i])
            scene = render_street_scene(rng, width, height, params["max_depth"])
            _write_cityscapes(writer, split, i, scene)
            file_name = _frame_stem(split, i) + ".png"
            writer.write("coco/{}/{}".format(split, file_name), _png(scene.image[:, :, ::-1]))
            image_id = i + 1
            images.append(
                {"id": image_id, "file_name": file_name, "width": width, "height": height}
            )
            annotations += _coco_annotations(scene, image_id, len(annotations) + 1)
            bar.update(1)
        coco = {
            "info": {
                "description": "ACAM-KD synthetic streets, {} split".format(split),
                "version": str(GENERATOR_VERSION),
            },
            "images": images,
            "annotations": annotations,
            "categories": streets_coco_categories(),
        }
        relpath = "coco/annotations/instances_{}.json".format(split)
        writer.write(relpath, json.dumps(coco).encode())
    bar.close()

    manifest = {
        "generator": __name__,
        "version": GENERATOR_VERSION,
        "params": params,
        "num_files": len(writer.files),
        "sha256": writer.digest.hexdigest(),
        "files": writer.files,
    }
    with open(os.path.join(directory, _MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    logger.info("Wrote %d files to %s.", len(writer.files), directory)
    return directory
