"""Every YAML under configs/ merges. Every one but the Base-* files builds (no weights, CPU); every
Base-* file is the base of another config, and a distillation base refuses to build without its
pair file's teacher."""

import glob
import os
import re

import pytest

from detectron2.modeling import build_model

from acamkd import get_acamkd_cfg

from tiny_models import REPO

CONFIG_ROOT = os.path.join(REPO, "configs")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_ROOT, "**", "*.yaml"), recursive=True))
# The YAML files there were when this was written: more may come, none may go unnoticed.
KNOWN_MINIMUM = 44

# Overrides for building without downloads: the teacher gets random weights, explicitly allowed.
NO_WEIGHTS = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.WEIGHTS",
    "",
    "MODEL.ACAMKD.TEACHER.WEIGHTS",
    "",
    "MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT",
    "True",
]


def _is_base(path: str) -> bool:
    return os.path.basename(path).startswith("Base-")


def _bases_used():
    """Every file some config names as its ``_BASE_``, as an absolute path."""
    used = set()
    for path in CONFIGS:
        with open(path) as f:
            for base in re.findall(r"^_BASE_:\s*[\"']?([^\"'\s#]+)", f.read(), re.M):
                used.add(os.path.normpath(os.path.join(os.path.dirname(path), base)))
    return used


BASES_USED = _bases_used()


def test_configs_are_found():
    walked = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(CONFIG_ROOT)
        for name in names
        if name.endswith(".yaml")
    )
    assert CONFIGS == walked  # the glob sees every YAML, in every folder
    assert len(CONFIGS) >= KNOWN_MINIMUM
    assert 0 < len([p for p in CONFIGS if _is_base(p)]) < len(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_merges_and_builds(path):
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(NO_WEIGHTS)
    if _is_base(path):
        # Bases are partial by design (no teacher, or no head): they must be some config's base
        # and set something; a distillation base names the teacher it lacks.
        assert os.path.normpath(path) in BASES_USED, f"no config has {path} as its _BASE_"
        defaults = get_acamkd_cfg()
        defaults.merge_from_list(NO_WEIGHTS)
        assert cfg.dump() != defaults.dump()
        if cfg.MODEL.META_ARCHITECTURE == "ACAMDistiller":
            assert cfg.MODEL.ACAMKD.TEACHER.CONFIG_FILE == ""
            with pytest.raises(ValueError, match="TEACHER.CONFIG_FILE is empty"):
                build_model(cfg)
        return
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 1e6
    if cfg.MODEL.META_ARCHITECTURE == "ACAMDistiller":
        assert len(model.acam) >= 1
        assert not any(p.requires_grad for p in model.teacher.parameters())


# ---- the GPU count of the paper's schedules (SOLVER.REFERENCE_WORLD_SIZE) ----

PAPER_FOLDERS = ("COCO-Detection", "Cityscapes-SemanticSegmentation")
PAPER_GPUS, PAPER_IMAGES_PER_GPU = 8, 2
# The configs that train on COCO or Cityscapes: the paper's pairs, their teachers and baselines.
PAPER_CONFIGS = [
    p for p in CONFIGS if os.path.basename(os.path.dirname(p)) in PAPER_FOLDERS and not _is_base(p)
]
STREETS_CONFIGS = [p for p in CONFIGS if "Streets-" in os.path.basename(os.path.dirname(p))]


def _merged(path: str):
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(path)
    return cfg


def test_paper_and_streets_configs_are_found():
    assert len(PAPER_CONFIGS) >= 22 and len(STREETS_CONFIGS) >= 11


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_paper_config_states_its_gpu_count(path):
    solver = _merged(path).SOLVER
    assert solver.REFERENCE_WORLD_SIZE == PAPER_GPUS
    # detectron2 requires a batch divisible by it; the paper puts 2 images on each GPU.
    assert solver.IMS_PER_BATCH == PAPER_GPUS * PAPER_IMAGES_PER_GPU


@pytest.mark.parametrize("path", STREETS_CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_streets_configs_run_as_written(path):
    assert _merged(path).SOLVER.REFERENCE_WORLD_SIZE == 0  # one CPU process: no rescaling


def test_fewer_gpus_rescale_the_paper_schedule():
    from acamkd import DistillationTrainer

    path = os.path.join(
        CONFIG_ROOT, "COCO-Detection", "acamkd_retinanet_R_50_from_R_101_FPN_2x.yaml"
    )
    cfg = _merged(path)
    scaled = DistillationTrainer.auto_scale_workers(cfg, 2)  # what the trainer does on 2 GPUs
    s = scaled.SOLVER
    assert (s.IMS_PER_BATCH, s.REFERENCE_WORLD_SIZE) == (4, 2)  # 2 images per GPU, as the paper
    assert s.BASE_LR == pytest.approx(cfg.SOLVER.BASE_LR / 4)  # linear in the batch
    assert s.MAX_ITER == 4 * cfg.SOLVER.MAX_ITER == 720000  # the same 24 epochs
    assert s.STEPS == (480000, 640000) and s.WARMUP_ITERS == 4 * cfg.SOLVER.WARMUP_ITERS
    assert s.CHECKPOINT_PERIOD == 4 * cfg.SOLVER.CHECKPOINT_PERIOD
    assert DistillationTrainer.auto_scale_workers(cfg, 8) is cfg  # the paper's 8: unchanged
