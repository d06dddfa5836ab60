"""Semantic-segmentation distillation: the paper's three Cityscapes pairs and the streets pair
built from their YAML files (shrunk), a training step, logits-grid resampling, the teacher's
crop, a few trainer steps, the eval contract and SemSegEvaluator's mIoU by hand."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from acamkd import DistillationTrainer, get_acamkd_cfg
from acamkd.modeling.teacher import build_teacher_cfg
from acamkd.training.evaluation import build_evaluator

from tiny_models import REPO, assert_same_network

CITYSCAPES = os.path.join(REPO, "configs", "Cityscapes-SemanticSegmentation")
STREETS = os.path.join(REPO, "configs", "Streets-SemanticSegmentation")
PAIRS = {
    "deeplabv3_R_18": "acamkd_deeplabv3_R_18_OS8_from_deeplabv3_R_101_OS8_40k",
    "deeplabv3_MobileNetV2": "acamkd_deeplabv3_MobileNetV2_OS8_from_deeplabv3_R_101_OS8_40k",
    "pspnet_R_18": "acamkd_pspnet_R_18_OS8_from_deeplabv3_R_101_OS8_40k",
}
ACAM_KEYS = {"loss_acam_channel", "loss_acam_spatial", "loss_acam_diversity"}
H, W = 64, 128  # tiny crops, divisible by every stride here
NUM_CLASSES = 19  # the configs' own: 19 logits channels and 19 masks

# The R101 teacher keeps its 101 layers and head; narrower, and on the students' tiny crops
# (given through TEACHER.OPTS, as its ASPP image pooling requires).
TEACHER_SHRINK = ["INPUT.CROP.SIZE", f"({H}, {W})", "MODEL.RESNETS.STEM_OUT_CHANNELS", "16"]
TEACHER_SHRINK += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "32", "MODEL.RESNETS.WIDTH_PER_GROUP", "8"]
TEACHER_SHRINK += ["MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "16", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16"]
_NARROW_RESNET = ["MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16"]
_NARROW_HEAD = ["MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "16", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16"]
STUDENT_SHRINK = {
    "deeplabv3_R_18": _NARROW_RESNET + _NARROW_HEAD,
    "deeplabv3_MobileNetV2": ["MODEL.ACAMKD.MOBILENETV2.NAME", "mobilenetv2_035"] + _NARROW_HEAD,
    "pspnet_R_18": _NARROW_RESNET + _NARROW_HEAD,
}


# Tiny models: one thread is as fast, and far faster when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def _pair_cfg(student: str, extra=(), teacher_extra=()) -> CfgNode:
    """The student's distillation YAML, shrunk, with a random (explicitly allowed) teacher."""
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(os.path.join(CITYSCAPES, PAIRS[student] + ".yaml"))
    cfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", "INPUT.CROP.SIZE", f"({H}, {W})"]
        + STUDENT_SHRINK[student]
        + ["MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT", "True"]
        + ["MODEL.ACAMKD.TEACHER.OPTS", TEACHER_SHRINK + list(teacher_extra)]
        + list(extra)
    )
    return cfg


def _batch(num_images: int = 2, seed: int = 0, size=(H, W)):
    """Per-image dicts of a semantic-segmentation training batch, ignored pixels included."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_images):
        sem_seg = torch.randint(0, NUM_CLASSES, size, generator=g)
        sem_seg[:, :8] = 255
        image = torch.rand(3, *size, generator=g) * 255
        out.append({"image": image, "sem_seg": sem_seg, "height": size[0], "width": size[1]})
    return out


@pytest.fixture(scope="module", params=sorted(PAIRS))
def pair(request):
    torch.manual_seed(0)
    return request.param, build_model(_pair_cfg(request.param))


def test_yaml_pair_is_the_papers_setting(pair):
    student, model = pair
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(os.path.join(CITYSCAPES, PAIRS[student] + ".yaml"))
    assert cfg.MODEL.ACAMKD.STUDENT_META_ARCHITECTURE == "SemanticSegmentor"
    assert cfg.MODEL.ACAMKD.DISTILL_TARGET == "sem_seg_logits" and cfg.MODEL.ACAMKD.NUM_MASKS == 19
    assert not cfg.MODEL.ACAMKD.INHERIT_TEACHER and cfg.MODEL.ACAMKD.TEACHER.WEIGHTS == ""
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.MAX_ITER) == (0.02, 5e-4, 40000)
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR"
    tcfg = build_teacher_cfg(cfg)
    assert tcfg.MODEL.RESNETS.DEPTH == 101 and tcfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE == 8
    # Same crop as the student: the teacher's ASPP image pooling is a global pool on it.
    assert tuple(tcfg.INPUT.CROP.SIZE) == tuple(cfg.INPUT.CROP.SIZE) == (512, 1024)
    # The shrunk model keeps the structure: 101-layer teacher, the student's head, 19 logits.
    assert type(model.student.sem_seg_head).__name__ == (
        "PSPHead" if student.startswith("pspnet") else "DeepLabV3Head"
    )
    assert len(model.teacher.backbone.res4) == 23
    assert model.teacher.sem_seg_head.aspp.pool_kernel_size == (H // 8, W // 8)
    assert list(model.acam) == ["logits"]
    assert model.acam["logits"].align.weight.shape[:2] == (NUM_CLASSES, NUM_CLASSES)


def test_training_step_losses_and_gradients(pair):
    _, model = pair
    model.train()
    with EventStorage() as storage:
        losses = model(_batch())
    assert set(losses) == {"loss_sem_seg"} | ACAM_KEYS
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert losses["loss_acam_channel"] > 0 and losses["loss_acam_spatial"] > 0
    assert "acam/logits/spatial_mask_coverage" in storage.latest()

    # The ACAM losses alone already reach the student's classifier (through f_align(S)).
    sum(losses[k] for k in ACAM_KEYS).backward(retain_graph=True)
    predictor = model.student.sem_seg_head.predictor.weight
    assert predictor.grad is not None and predictor.grad.abs().sum() > 0
    losses["loss_sem_seg"].backward()
    assert all(p.grad is not None for p in model.acam.parameters())
    student_grads = [p.grad for p in model.student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in student_grads)
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not any(m.training for m in model.teacher.modules())
    model.zero_grad(set_to_none=True)


def test_eval_returns_exactly_the_students_sem_seg(pair):
    _, model = pair
    model.eval()
    # Predictions are resized to the requested output size, as the student does it.
    inputs = [{"image": x["image"], "height": 2 * H, "width": 2 * W} for x in _batch(seed=1)]
    with torch.no_grad():
        ours, theirs = model(inputs), model.student(inputs)
    assert [set(r) for r in ours] == [{"sem_seg"}] * len(inputs)
    for a, b in zip(ours, theirs):
        assert a["sem_seg"].shape == (NUM_CLASSES, 2 * H, 2 * W)
        assert torch.equal(a["sem_seg"], b["sem_seg"])


# The teacher at output stride 16 (the R101 OS16 file's settings), the student at 8.
TEACHER_OS16 = ["MODEL.RESNETS.RES4_DILATION", "1", "MODEL.RESNETS.RES5_DILATION", "2"]
TEACHER_OS16 += ["MODEL.SEM_SEG_HEAD.ASPP_DILATIONS", "[6, 12, 18]"]
TEACHER_OS16 += ["MODEL.SEM_SEG_HEAD.COMMON_STRIDE", "16"]


@pytest.mark.parametrize("grid,stride", [("student", 8), ("teacher", 16)])
def test_stride_mismatch_is_resampled_to_logits_grid(grid, stride):
    cfg = _pair_cfg(
        "deeplabv3_R_18", ["MODEL.ACAMKD.LOGITS_GRID", grid], teacher_extra=TEACHER_OS16
    )
    model = build_model(cfg)
    model.train()
    batch = _batch()
    teacher_logits = model.teacher_features(batch, (H, W))["logits"]
    assert teacher_logits.shape == (2, NUM_CLASSES, H // 16, W // 16)
    out = model.distill(batch, return_masks=True).levels["logits"]
    assert out.masks["spatial"].shape == (2, NUM_CLASSES, H // stride, W // stride)
    # ACAM saw the teacher's logits bilinearly resampled to the chosen grid (or as they are).
    expected = F.interpolate(
        teacher_logits, size=(H // stride, W // stride), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(out.masks["teacher"], expected)
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_teacher_crop_must_match_the_students():
    # The teacher keeps its YAML's 512x1024 crop: its 64x128 pooling kernel would not fit the
    # student's 8x16 logits grid, so building refuses and names the override.
    opts = TEACHER_SHRINK[2:]
    with pytest.raises(ValueError, match=r"TEACHER.OPTS \['INPUT.CROP.SIZE', '\(64, 128\)'\]"):
        build_model(_pair_cfg("deeplabv3_R_18", ["MODEL.ACAMKD.TEACHER.OPTS", opts]))
    # A student without crops needs a teacher with a global pool.
    no_crop = ["INPUT.CROP.ENABLED", "False"]
    with pytest.raises(ValueError, match=r"\['INPUT.CROP.ENABLED', 'False'\]"):
        build_model(_pair_cfg("deeplabv3_R_18", no_crop))
    model = build_model(_pair_cfg("deeplabv3_R_18", no_crop, teacher_extra=no_crop))
    model.train()
    with EventStorage():  # on a size no fixed kernel would divide
        losses = model(_batch(size=(72, 120)))
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("student", sorted(PAIRS))
def test_yaml_and_lazy_twins_build_the_same_model(student):
    name = PAIRS[student]
    from_yaml = build_model(_pair_cfg(student))
    lcfg = LazyConfig.load(os.path.join(CITYSCAPES, name + ".py"))
    lcfg.model.student.overrides = ["INPUT.CROP.SIZE", f"({H}, {W})"] + STUDENT_SHRINK[student]
    lcfg.model.teacher.overrides = TEACHER_SHRINK
    lcfg.model.teacher.weights = ""
    lcfg.model.teacher.allow_random_init = True
    from_lazy = instantiate(lcfg.model)
    assert_same_network(from_yaml, from_lazy)


# --- the streets configs ------------------------------------------------------------------

STREETS_FILES = {
    "teacher": "deeplabv3_R_18_wide_OS8_streets.yaml",
    "baseline": "deeplabv3_R_18_OS8_streets.yaml",
    "acamkd": "acamkd_deeplabv3_R_18_OS8_from_deeplabv3_R_18_wide_OS8_streets.yaml",
}


def _streets_cfg(role: str) -> CfgNode:
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(os.path.join(STREETS, STREETS_FILES[role]))
    return cfg


def test_streets_configs_share_solver_seed_and_data_the_teacher_trains_longer():
    cfgs = {role: _streets_cfg(role) for role in STREETS_FILES}

    def shared(cfg, schedule=True):
        solver = cfg.SOLVER.clone()
        if not schedule:  # the teacher trains longer, as model-zoo teachers do
            solver.MAX_ITER = solver.CHECKPOINT_PERIOD = None
        return solver, cfg.SEED, cfg.INPUT, cfg.DATASETS, cfg.DATALOADER

    assert shared(cfgs["baseline"]) == shared(cfgs["acamkd"])
    assert shared(cfgs["teacher"], False) == shared(cfgs["baseline"], False)
    assert cfgs["teacher"].SOLVER.MAX_ITER == 3 * cfgs["baseline"].SOLVER.MAX_ITER
    kd = cfgs["acamkd"]
    assert kd.DATASETS.TEST == ("streets_sem_seg_val",) and kd.SEED != -1  # -1: a random seed
    assert kd.MODEL.ACAMKD.TEACHER.CONFIG_FILE.endswith(STREETS_FILES["teacher"])
    # The baseline is exactly the distilled student without the distiller.
    student = kd.clone()
    student.MODEL.META_ARCHITECTURE = kd.MODEL.ACAMKD.STUDENT_META_ARCHITECTURE
    student.MODEL.ACAMKD = cfgs["baseline"].MODEL.ACAMKD
    assert student == cfgs["baseline"]
    for cfg in cfgs.values():
        assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.RESNETS.NORM == "BN"
        assert cfg.MODEL.SEM_SEG_HEAD.NORM == "BN"


def test_streets_pair_trains_a_step_at_its_own_crop():
    cfg = _streets_cfg("acamkd")
    cfg.MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT = True
    model = build_model(cfg)
    assert type(model.teacher.backbone.res4[0].conv1.norm) is torch.nn.BatchNorm2d  # not SyncBN
    # Twice as wide as the student: about 4 times its parameters, as R101 -> R18.
    teacher_size, student_size = (
        sum(p.numel() for p in m.parameters()) for m in (model.teacher, model.student)
    )
    assert 3 * student_size < teacher_size < 5 * student_size
    model.train()
    with EventStorage():
        out = model.distill(_batch(size=tuple(cfg.INPUT.CROP.SIZE)), return_masks=True)
    h, w = cfg.INPUT.CROP.SIZE
    assert out.levels["logits"].masks["spatial"].shape == (2, NUM_CLASSES, h // 8, w // 8)
    assert all(torch.isfinite(v) for v in out.student.values())
    assert all(torch.isfinite(v) for v in out.levels["logits"].losses.values())


# --- trainer and evaluator ----------------------------------------------------------------

STUFF = [f"class{i}" for i in range(NUM_CLASSES)]


def _register_sem_seg(name: str, records, num_classes: int = NUM_CLASSES) -> str:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(
        stuff_classes=STUFF[:num_classes], ignore_label=255, evaluator_type="sem_seg"
    )
    return name


def _write_tiny_sem_seg(root: str, num_images: int = 4):
    """Images of coloured bands and their label PNGs (train ids, 255 ignored), 64x128."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(num_images):
        label = np.full((H, W), 255, dtype=np.uint8)
        label[: H // 2], label[H // 2 :, : W // 2], label[H // 2 :, W // 2 :] = 0, 13, 2 + i
        image = rng.integers(0, 40, size=(H, W, 3), dtype=np.uint8)
        image[label == 13] += np.uint8(200)
        paths = [os.path.join(root, f"{i}_{kind}.png") for kind in ("image", "label")]
        cv2.imwrite(paths[0], image)
        cv2.imwrite(paths[1], label)
        records.append(
            {"file_name": paths[0], "sem_seg_file_name": paths[1], "height": H, "width": W}
        )
    return records


def _state(module: torch.nn.Module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_trainer_keeps_the_teacher_and_trains_the_student(tmp_path):
    name = _register_sem_seg("seg_distill_tiny_train", _write_tiny_sem_seg(str(tmp_path / "d")))
    cfg = _pair_cfg("deeplabv3_R_18")
    cfg.merge_from_list(
        ["DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "DATALOADER.NUM_WORKERS", "0"]
        + ["INPUT.MIN_SIZE_TRAIN", f"({H},)", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice"]
        + ["INPUT.MAX_SIZE_TRAIN", str(W), "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3"]
        + ["OUTPUT_DIR", str(tmp_path / "out"), "SEED", "1"]
        # One process with its own batch, not the paper's 8 GPUs rescaled.
        + ["SOLVER.REFERENCE_WORLD_SIZE", "0"]
    )
    trainer = DistillationTrainer(cfg)
    trainer.resume_or_load(resume=False)
    teacher0, student0 = _state(trainer.model.teacher), _state(trainer.model.student)
    trainer.train()
    teacher1, student1 = _state(trainer.model.teacher), _state(trainer.model.student)
    assert all(torch.equal(teacher0[k], teacher1[k]) for k in teacher0)  # bitwise, BN included
    changed = {k for k in student0 if not torch.equal(student0[k], student1[k])}
    assert {"sem_seg_head.predictor.weight", "backbone.stem.conv1.weight"} <= changed
    assert all(torch.isfinite(v).all() for v in student1.values())
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")]
    assert "loss_acam_spatial" in metrics[-1] and "loss_sem_seg" in metrics[-1]
    assert "acam/logits/mask_discrepancy_corr" in metrics[-1]
    # The DeepLab poly schedule with no warm-up: lr 0.02 * (1 - 2/3) ** 0.9 at the last step.
    assert metrics[-1]["lr"] == pytest.approx(0.02 * (1 - 2 / 3) ** 0.9)


def test_sem_seg_evaluator_miou_by_hand(tmp_path):
    # Ground truth (4 x 6, classes 0-2, 255 ignored) and prediction; class 3 is predicted but
    # absent from the ground truth.
    gt = np.array(
        [
            [0, 0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1, 1],
            [2, 2, 2, 2, 255, 255],
            [2, 2, 2, 2, 255, 255],
        ],
        dtype=np.uint8,
    )
    pred = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1],
            [2, 2, 2, 3, 0, 0],
            [2, 2, 2, 3, 0, 0],
        ]
    )
    # By hand, over the 20 labelled pixels (the 4 ignored ones count nowhere, whatever their
    # prediction):
    #   class 0: 6 pixels, 4 found, 4 predicted -> IoU 4 / (6 + 4 - 4) = 2/3, acc 4/6
    #   class 1: 6 pixels, 6 found, 8 predicted -> IoU 6 / (6 + 8 - 6) = 3/4, acc 1
    #   class 2: 8 pixels, 6 found, 6 predicted -> IoU 6 / (8 + 6 - 6) = 3/4, acc 6/8
    #   class 3: no pixel: left out of every mean (its 2 false positives cost class 2).
    # mIoU = (2/3 + 3/4 + 3/4) / 3, pACC = 16/20, mACC = (4/6 + 1 + 6/8) / 3,
    # fwIoU = (6 * 2/3 + 6 * 3/4 + 8 * 3/4) / 20.
    label_path = str(tmp_path / "gt.png")
    cv2.imwrite(label_path, gt)
    record = {"file_name": str(tmp_path / "image.png"), "sem_seg_file_name": label_path}
    name = _register_sem_seg("seg_distill_tiny_eval", [record], num_classes=4)
    evaluator = build_evaluator(name, str(tmp_path))
    assert isinstance(evaluator, SemSegEvaluator)
    evaluator.reset()
    logits = F.one_hot(pred, 4).permute(2, 0, 1).float()  # (C, H, W) scores, argmax = pred
    evaluator.process([{"file_name": record["file_name"]}], [{"sem_seg": logits}])
    res = evaluator.evaluate()["sem_seg"]
    assert res["mIoU"] == pytest.approx(100 * (2 / 3 + 3 / 4 + 3 / 4) / 3)
    assert res["pACC"] == pytest.approx(100 * 16 / 20)
    assert res["mACC"] == pytest.approx(100 * (4 / 6 + 1 + 6 / 8) / 3)
    assert res["fwIoU"] == pytest.approx(100 * (6 * 2 / 3 + 6 * 3 / 4 + 8 * 3 / 4) / 20)
    assert res["IoU-class1"] == pytest.approx(75.0) and np.isnan(res["IoU-class3"])
