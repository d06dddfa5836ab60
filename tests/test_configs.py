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
