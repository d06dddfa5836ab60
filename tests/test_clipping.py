"""Gradient clipping of both engines: detectron2's per-tensor types, and "full_model", which
clips the norm of all gradients together (the FGD, MGD and MasKD authors' max_norm 35)."""

import math
import os

import pytest
import torch
from torch import nn

from detectron2.config import LazyConfig

from acamkd import DistillationTrainer, get_acamkd_cfg
from acamkd.training.clipping import add_gradient_clipping
from acamkd.training.lazy_train import with_gradient_clipping

from tiny_models import REPO


def _weights_with_grads():
    weights = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
    weights[0].grad = torch.tensor([30.0, 40.0, 0.0])
    weights[1].grad = torch.tensor([0.0, 120.0])  # joint norm sqrt(50^2 + 120^2) = 130
    return weights


def _clip(max_norm, clip_type="full_model"):
    return {"ENABLED": True, "CLIP_TYPE": clip_type, "CLIP_VALUE": max_norm, "NORM_TYPE": 2.0}


def test_full_model_scales_every_gradient_by_the_joint_norm():
    weights = _weights_with_grads()
    optimizer = add_gradient_clipping(torch.optim.SGD(weights, lr=1.0), _clip(13.0))
    optimizer.step()
    scale = 13.0 / math.hypot(50.0, 120.0)  # 0.1: both tensors, not each to its own norm
    torch.testing.assert_close(weights[0].detach(), -scale * torch.tensor([30.0, 40.0, 0.0]))
    torch.testing.assert_close(weights[1].detach(), -scale * torch.tensor([0.0, 120.0]))


def test_full_model_keeps_gradients_below_the_norm_and_per_tensor_norm_differs():
    weights = _weights_with_grads()
    add_gradient_clipping(torch.optim.SGD(weights, lr=1.0), _clip(1000.0)).step()
    torch.testing.assert_close(weights[1].detach(), torch.tensor([0.0, -120.0]))
    weights = _weights_with_grads()
    add_gradient_clipping(torch.optim.SGD(weights, lr=1.0), _clip(13.0, "norm")).step()
    torch.testing.assert_close(weights[1].detach(), torch.tensor([0.0, -13.0]))  # its own norm


def test_unknown_clip_type_names_the_key_and_the_choices():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=r"SOLVER.CLIP_GRADIENTS.CLIP_TYPE 'global'.*full_model"):
        add_gradient_clipping(optimizer, _clip(1.0, "global"))


def test_yaml_trainer_and_lazy_loop_clip_the_whole_model_alike():
    cfg = get_acamkd_cfg()
    cfg.merge_from_list(["SOLVER.BASE_LR", "1.0", "SOLVER.MOMENTUM", "0.0"])
    cfg.merge_from_list(["SOLVER.WEIGHT_DECAY", "0.0", "SOLVER.CLIP_GRADIENTS.ENABLED", "True"])
    cfg.merge_from_list(["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model"])
    cfg.merge_from_list(["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "13.0"])
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    optimizer = DistillationTrainer.build_optimizer(cfg, model)
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED  # the caller's config is left as it was
    model.weight.grad = torch.tensor([[50.0, 120.0]])
    optimizer.step()
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[-5.0, -12.0]]))

    weights = _weights_with_grads()
    lazy = with_gradient_clipping(
        torch.optim.SGD(weights, lr=1.0),
        {"enabled": True, "clip_type": "full_model", "clip_value": 13.0},
    )
    lazy.step()
    torch.testing.assert_close(weights[1].detach(), torch.tensor([0.0, -12.0]))


@pytest.mark.parametrize("method", ["fgd", "mgd", "maskd"])
def test_rivals_coco_configs_clip_as_their_authors(method):
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(
        os.path.join(REPO, f"configs/COCO-Detection/{method}_retinanet_R_50_from_R_101_FPN_2x.yaml")
    )
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert (clip.ENABLED, clip.CLIP_TYPE, clip.CLIP_VALUE, clip.NORM_TYPE) == (
        True,
        "full_model",
        35.0,
        2.0,
    )
    if method == "fgd":  # its LazyConfig twin clips alike
        lazy = LazyConfig.load(
            os.path.join(REPO, "configs/COCO-Detection/fgd_retinanet_R_50_from_R_101_FPN_2x.py")
        )
        assert {k.upper(): v for k, v in lazy.train.clip_gradients.items()} == dict(clip)
