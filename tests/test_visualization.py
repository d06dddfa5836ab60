"""Mask figures: the visualisation tool, the loss shares in the metrics, the TensorBoard hook."""

import glob
import json
import logging
import os
import runpy

import cv2
import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

from acamkd import DistillationCheckpointer, DistillationTrainer
from acamkd.pictures.mask_maps import compute_level_maps, feature_energy, load_images
from acamkd.pictures.visualization import mask_figure_size

from tiny_models import REPO, distill_cfg, register_tiny_dataset, tensorboard_images

LEVELS = ["p3", "p4", "p5", "p6", "p7"]
# The finest grid and the coarsest (1 x 1, wider than the image): fewer figures to draw.
VIS_LEVELS = ["p3", "p7"]
NUM_MASKS = 3  # distill_cfg's MODEL.ACAMKD.NUM_MASKS
IMAGE_HW = (64, 96)  # distill_cfg's test size keeps these images as they are
DPI, PANEL_WIDTH = 40, 2.0


def _tool_main():
    return runpy.run_path(os.path.join(REPO, "tools", "visualize_masks.py"))["main"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny distiller's config as YAML, two checkpoints (the ACAM modules differ) and images."""
    root = tmp_path_factory.mktemp("vis")
    torch.manual_seed(0)
    cfg = distill_cfg("RetinaNet", extra=["MODEL.ACAMKD.IN_FEATURES", str(VIS_LEVELS)])
    config_file = root / "config.yaml"
    config_file.write_text(cfg.dump())
    model = build_model(cfg)
    DistillationCheckpointer(model, save_dir=str(root)).save("model_0000000", iteration=0)
    with torch.no_grad():
        for level in model.acam.values():  # what training would do: masks far from 0.5
            level.ascm.spatial_units.mul_(300.0)
    DistillationCheckpointer(model, save_dir=str(root)).save("model_0000099", iteration=99)

    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        image = rng.integers(0, 256, IMAGE_HW + (3,), dtype=np.uint8)
        image[10:50, 8 + 30 * i : 40 + 30 * i] = (0, 0, 255)
        cv2.imwrite(str(images / f"street{i}.png"), image)
    (images / "notes.txt").write_text("not an image")
    return cfg, root


def test_tool_writes_one_figure_per_image_and_level_with_a_row_per_checkpoint(run):
    cfg, root = run
    args = ["--config-file", str(root / "config.yaml"), "--images", str(root / "images")]
    args += ["--dpi", str(DPI), "--panel-width", str(PANEL_WIDTH)]
    ckpts = [str(root / "model_0000000.pth"), str(root / "model_0000099.pth")]
    main = _tool_main()

    written = main(args + ["--checkpoints", *ckpts, "--output", str(root / "two")])
    expected = {f"street{i}_{level}.png" for i in range(2) for level in VIS_LEVELS}
    assert {os.path.basename(p) for p in written} == expected
    assert {os.path.basename(p) for p in glob.glob(str(root / "two" / "*.png"))} == expected
    two_rows = mask_figure_size(2, NUM_MASKS, IMAGE_HW, PANEL_WIDTH, DPI)
    for path in written:
        figure = cv2.imread(path)
        assert figure.shape == two_rows + (3,), path
        assert figure.astype(np.float32).var() > 500, f"{path} is (nearly) blank"

    # One checkpoint, one image file; trailing overrides right after the checkpoint list.
    args[3] = str(root / "images" / "street0.png")
    opts = ["MODEL.DEVICE", "cpu"]
    one = main(args + ["--output", str(root / "one"), "--checkpoints", ckpts[1]] + opts)
    assert [os.path.basename(p) for p in one] == [f"street0_{level}.png" for level in VIS_LEVELS]
    one_row = mask_figure_size(1, NUM_MASKS, IMAGE_HW, PANEL_WIDTH, DPI)
    assert one_row[1] == two_rows[1] and one_row[0] < two_rows[0]
    for path in one:
        single = cv2.imread(path).astype(int)
        double = cv2.imread(str(root / "two" / os.path.basename(path))).astype(int)
        assert single.shape == one_row + (3,)
        # Rows follow the checkpoints: the two-row figure ends with the single figure's row
        # (the same checkpoint) and starts with another one (the masks evolved).
        k = one_row[0] * 3 // 4  # the row, without the title
        assert np.abs(double[-k:] - single[-k:]).mean() < 1.0, path
        assert np.abs(double[:k] - single[:k]).mean() > 3.0, path


def test_tool_refuses_a_checkpoint_without_acam_modules(run, tmp_path):
    cfg, root = run
    saved = torch.load(root / "model_0000000.pth", weights_only=False)["model"]
    student = {k[len("student.") :]: v for k, v in saved.items() if k.startswith("student.")}
    torch.save({"model": student}, tmp_path / "student.pth")
    with pytest.raises(ValueError, match="Not a distillation checkpoint"):
        _tool_main()(
            ["--config-file", str(root / "config.yaml"), "--images", str(root / "images")]
            + ["--checkpoints", str(tmp_path / "student.pth"), "--output", str(tmp_path)]
        )


def test_level_maps_without_annotations_match_the_features(run):
    cfg, root = run
    register_tiny_dataset("tiny_vis", str(root / "dataset"), num_images=2)
    inputs = load_images(cfg, dataset="tiny_vis", num_images=1)
    assert len(inputs) == 1 and "annotations" not in inputs[0] and "instances" not in inputs[0]

    model = build_model(cfg)
    model.train()
    maps = compute_level_maps(model, inputs)[0]
    assert model.student.training  # restored after the inference-path forward
    assert list(maps) == VIS_LEVELS
    with torch.no_grad():
        teacher = model.teacher_features(inputs, IMAGE_HW)  # 96 is a multiple of 32
    for level, stride in zip(VIS_LEVELS, (8, 128)):
        m = maps[level]
        h, w = -(-IMAGE_HW[0] // stride), -(-IMAGE_HW[1] // stride)
        assert m.spatial.shape == (NUM_MASKS, h, w) and m.channel.shape == (NUM_MASKS, 64)
        assert m.extent == (w * stride, h * stride)
        expected = feature_energy(teacher[level])[0, :h, :w].numpy()
        np.testing.assert_allclose(m.energy["teacher"], expected, rtol=1e-5, atol=1e-7)
        assert set(m.energy) == {"fused", "teacher", "student", "discrepancy"}
        assert ((m.spatial > 0) & (m.spatial < 1)).all()


def test_training_logs_loss_shares_and_mask_statistics_and_writes_a_mask_image(tmp_path):
    register_tiny_dataset("tiny_vis_train", str(tmp_path / "images"))
    cfg = distill_cfg("RetinaNet")
    cfg.merge_from_list(
        ["DATASETS.TRAIN", ("tiny_vis_train",), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", "2"]
        + ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1"]
        + ["VIS_PERIOD", "2", "OUTPUT_DIR", str(tmp_path / "out"), "SEED", "1"]
    )
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    events_logger = logging.getLogger("detectron2.utils.events")
    events_logger.addHandler(handler)
    try:
        trainer = DistillationTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        events_logger.removeHandler(handler)

    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")][-1]
    shares = {k: v for k, v in metrics.items() if "/share_" in k}
    assert len(shares) == 3 * len(LEVELS)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-4)
    for level in LEVELS:
        for stat in ("spatial_mask_mean", "spatial_mask_coverage", "spatial_mask_dice"):
            assert f"acam/{level}/{stat}" in metrics
        assert 0 < metrics[f"acam/{level}/share_spatial"] < 1
    table = [r.getMessage() for r in records if "acam p3:" in r.getMessage()]
    assert table and "loss share channel/spatial/div" in table[-1]

    assert len(glob.glob(str(tmp_path / "out" / "events.out.tfevents.*"))) == 1
    ((step, decoded),) = tensorboard_images(str(tmp_path / "out"), "acam/masks")
    assert step == 1  # made after the second iteration (index 1)
    rows = mask_figure_size(len(LEVELS), NUM_MASKS, IMAGE_HW, 1.6, 60)
    assert decoded.shape == rows + (3,) and decoded.astype(np.float32).var() > 500
