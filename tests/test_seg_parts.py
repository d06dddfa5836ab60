"""Segmentation student parts: MobileNetV2 and dilated ResNet-18 backbones, the PSP head, the
Cityscapes YAML configs (built and trained one step on tiny inputs) and the poly schedule."""

import glob
import os
import re

import pytest
import torch
from torch import nn

from detectron2.config import CfgNode, get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.projects.deeplab.resnet import DeepLabStem

from acamkd.config import add_acamkd_config
from acamkd.modeling.backbone import MobileNetV2Backbone  # noqa: F401  (registers)
from acamkd.modeling.heads import PSPHead
from acamkd.training.trainer import DistillationTrainer

CONFIG_DIR = os.path.join(
    os.path.dirname(__file__), "..", "configs", "Cityscapes-SemanticSegmentation"
)
H, W = 64, 128  # tiny inputs, divisible by every stride used here
NUM_CLASSES = 5


def _cfg(config_file: str = "") -> CfgNode:
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_acamkd_config(cfg)
    if config_file:
        cfg.merge_from_file(os.path.join(CONFIG_DIR, config_file))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _tiny(cfg: CfgNode) -> CfgNode:
    """Shrink a Cityscapes config to CPU-test size: tiny crops, few classes, narrow head."""
    cfg.INPUT.CROP.SIZE = (H, W)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 32
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.SOLVER.MAX_ITER = 10
    return cfg


# --- MobileNetV2 -------------------------------------------------------------------------


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_mobilenetv2_shapes_match_output_shape(output_stride):
    cfg = _cfg()
    cfg.MODEL.BACKBONE.NAME = "build_mobilenetv2_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.ACAMKD.MOBILENETV2.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.ACAMKD.MOBILENETV2.OUTPUT_STRIDE = output_stride
    backbone = build_backbone(cfg)
    assert isinstance(backbone, MobileNetV2Backbone)

    shapes = backbone.output_shape()
    expected_channels = {"res2": 24, "res3": 32, "res4": 96, "res5": 320}
    expected_strides = {k: min(s, output_stride) for k, s in zip(expected_channels, (4, 8, 16, 32))}
    assert {k: v.channels for k, v in shapes.items()} == expected_channels
    assert {k: v.stride for k, v in shapes.items()} == expected_strides
    assert backbone.size_divisibility == output_stride

    with torch.no_grad():
        out = backbone(torch.randn(1, 3, H, W))
    assert set(out) == set(shapes)
    for name, feat in out.items():
        s = shapes[name]
        assert tuple(feat.shape) == (1, s.channels, H // s.stride, W // s.stride), name


def test_mobilenetv2_truncates_unused_blocks_and_freezes():
    cfg = _cfg()
    cfg.MODEL.BACKBONE.NAME = "build_mobilenetv2_backbone"
    cfg.MODEL.ACAMKD.MOBILENETV2.OUT_FEATURES = ["res3"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 2  # stem + res2
    backbone = build_backbone(cfg)
    # "res3" is the output of the third block: nothing after it is built.
    assert len(backbone.body.blocks) == 3
    body = backbone.body
    frozen = [body.conv_stem, body.blocks[0], body.blocks[1]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in body.blocks[2].parameters())
    # Frozen stages hold no batch norm that would update its statistics.
    for m in frozen:
        assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())


def test_mobilenetv2_loads_local_weights_and_reports_bad_files(tmp_path):
    import timm

    # A full timm classification model: the state dict a user would download and save.
    reference = timm.create_model("mobilenetv2_100", pretrained=False)
    path = str(tmp_path / "mobilenetv2_100.pth")
    torch.save(reference.state_dict(), path)

    backbone = MobileNetV2Backbone(out_features=["res5"], output_stride=8, weights=path)
    for key, value in backbone.body.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key

    with pytest.raises(FileNotFoundError, match="MOBILENETV2.WEIGHTS"):
        MobileNetV2Backbone(weights=str(tmp_path / "missing.pth"))

    bad = dict(reference.state_dict())
    bad.pop("conv_stem.weight")
    bad["blocks.1.0.conv_pw.weight"] = torch.zeros(1)
    torch.save(bad, path)
    with pytest.raises(
        ValueError, match=r"1 missing keys \['conv_stem.weight'\].*1 shape mismatch"
    ):
        MobileNetV2Backbone(weights=path)


# --- ResNet-18, DeepLab stem, dilated --------------------------------------------------------


@pytest.mark.parametrize("output_stride,res4_dilation,res5_dilation", [(8, 2, 4), (16, 1, 2)])
def test_resnet18_deeplab_shapes(output_stride, res4_dilation, res5_dilation):
    cfg = _cfg("deeplabv3_R_18_OS8.yaml")
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.RES4_DILATION = res4_dilation
    cfg.MODEL.RESNETS.RES5_DILATION = res5_dilation
    backbone = build_backbone(cfg)

    assert isinstance(backbone, ResNet) and isinstance(backbone.stem, DeepLabStem)
    blocks = [b for stage in backbone.stages for b in stage]
    assert len(blocks) == 8 and all(isinstance(b, BasicBlock) for b in blocks)
    # Full-width ResNet-18 without its classifier: about 11.2M parameters.
    num_params = sum(p.numel() for p in backbone.parameters())
    assert 11.0e6 < num_params < 11.4e6, num_params
    # The dilation reaches the convolutions of res5 (and of res4 at output stride 8).
    assert backbone.res5[0].conv1.dilation == (res5_dilation, res5_dilation)
    assert backbone.res4[1].conv2.dilation == (res4_dilation, res4_dilation)

    shapes = backbone.output_shape()
    expected = {"res2": (64, 4), "res3": (128, 8), "res4": (256, 16), "res5": (512, 32)}
    expected = {k: (c, min(s, output_stride)) for k, (c, s) in expected.items()}
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == expected
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, H, W))
    for name, feat in out.items():
        c, s = expected[name]
        assert tuple(feat.shape) == (1, c, H // s, W // s), name


def test_resnet18_deeplab_rejects_three_block_multi_grid():
    cfg = _cfg("deeplabv3_R_18_OS8.yaml")
    cfg.MODEL.RESNETS.RES5_MULTI_GRID = [1, 2, 4]
    with pytest.raises(ValueError, match="RES5_MULTI_GRID"):
        build_backbone(cfg)


def test_resnet18_basic_stem():
    cfg = _cfg("deeplabv3_R_18_OS8.yaml")
    cfg.MODEL.RESNETS.STEM_TYPE = "basic"
    cfg.MODEL.RESNETS.NORM = "BN"
    backbone = build_backbone(cfg)
    assert backbone.stem.conv1.kernel_size == (7, 7)
    assert backbone.output_shape()["res5"] == ShapeSpec(channels=512, stride=8)


# --- PSP head ----------------------------------------------------------------------------


def test_psp_head_logits_on_input_grid_and_upsampled_in_eval():
    stride, channels = 8, 16
    head = PSPHead(
        {"res5": ShapeSpec(channels=channels, stride=stride)},
        num_classes=NUM_CLASSES,
        conv_dims=12,
        common_stride=stride,
        pool_scales=(1, 2, 3, 6),
        ignore_value=255,
    )
    logits = []
    head.predictor.register_forward_hook(lambda m, i, o: logits.append(o))
    feat = {"res5": torch.randn(2, channels, H // stride, W // stride)}

    head.eval()
    out, losses = head(feat)
    assert losses == {}
    assert tuple(logits[-1].shape) == (2, NUM_CLASSES, H // stride, W // stride)
    assert tuple(out.shape) == (2, NUM_CLASSES, H, W)
    # Each branch reduces to C / number of scales; the bottleneck reads input + branches.
    assert head.branches[0][1].out_channels == channels // 4
    assert head.bottleneck.in_channels == 2 * channels

    head.train()
    targets = torch.randint(0, NUM_CLASSES, (2, H, W))
    targets[:, :8] = 255  # ignored pixels
    out, losses = head(feat, targets)
    assert out is None and set(losses) == {"loss_sem_seg"}
    # Near-uniform initial logits: the loss is about log(C).
    assert abs(losses["loss_sem_seg"].item() - torch.log(torch.tensor(5.0)).item()) < 0.05

    with pytest.raises(ValueError, match="COMMON_STRIDE"):
        PSPHead(
            {"res5": ShapeSpec(channels=channels, stride=16)},
            num_classes=NUM_CLASSES,
            conv_dims=12,
            common_stride=8,
        )


# --- whole models from the YAML files ----------------------------------------------------

MODELS = {
    "deeplabv3_R_18_OS8.yaml": ("DeepLabV3Head", 8),
    "deeplabv3_MobileNetV2_OS8.yaml": ("DeepLabV3Head", 8),
    "pspnet_R_18_OS8.yaml": ("PSPHead", 8),
    "deeplabv3_R_101_OS16.yaml": ("DeepLabV3Head", 16),
}


@pytest.mark.parametrize("config_file", sorted(MODELS))
def test_model_trains_and_infers(config_file):
    head_name, stride = MODELS[config_file]
    cfg = _tiny(_cfg(config_file))
    if "R_101" in config_file:
        # Keep the 101-layer structure, shrink its widths to stay fast on a CPU.
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
        cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    model = build_model(cfg)
    assert type(model.sem_seg_head).__name__ == head_name
    assert model.sem_seg_head.common_stride == stride

    logits = []
    model.sem_seg_head.predictor.register_forward_hook(lambda m, i, o: logits.append(o))
    images = [torch.rand(3, H, W) * 255 for _ in range(2)]
    batch = [
        {"image": img, "sem_seg": torch.randint(0, NUM_CLASSES, (H, W)), "height": H, "width": W}
        for img in images
    ]

    model.train()
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    # The distiller taps the predictor's output: the logits at the head's stride.
    assert tuple(logits[-1].shape) == (2, NUM_CLASSES, H // stride, W // stride)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    before = model.sem_seg_head.predictor.weight.detach().clone()
    first_conv = next(model.backbone.parameters())
    first_before = first_conv.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.sem_seg_head.predictor.weight)
    assert not torch.equal(first_before, first_conv)

    model.eval()
    with torch.no_grad():
        out = model([{"image": images[0], "height": 2 * H, "width": 2 * W}])
    assert tuple(out[0]["sem_seg"].shape) == (NUM_CLASSES, 2 * H, 2 * W)


def test_every_yaml_merges():
    files = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
    assert len(files) >= 8
    for path in files:
        cfg = _cfg(os.path.basename(path))
        assert cfg.DATASETS.TRAIN == ("cityscapes_fine_sem_seg_train",)
        assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR"
        assert cfg.SOLVER.IMS_PER_BATCH == 16
        if cfg.MODEL.META_ARCHITECTURE == "MasKDTokenLearner":  # MasKD's first stage
            assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR) == (10000, 0.1), path
            assert cfg.SOLVER.WEIGHT_DECAY == 0.001, path
        else:
            assert cfg.SOLVER.MAX_ITER == 40000 and cfg.SOLVER.BASE_LR == 0.02, path
            assert cfg.SOLVER.WEIGHT_DECAY == 0.0005, path
        assert tuple(cfg.INPUT.CROP.SIZE) == (512, 1024)
        stride = re.search(r"OS(\d+)", os.path.basename(path))
        if stride:
            assert cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE == int(stride.group(1)), path


def test_poly_schedule():
    cfg = _cfg("Base-Cityscapes-Semantic-40k.yaml")
    cfg.SOLVER.MAX_ITER = 100
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.SOLVER.BASE_LR)
    scheduler = DistillationTrainer.build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.02 * (1 - i / 100) ** 0.9 for i in range(100)]
    assert lrs == pytest.approx(expected, rel=1e-6)

    # Other names go to detectron2's builder.
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    cfg.SOLVER.STEPS = (50,)
    optimizer = torch.optim.SGD([param], lr=0.02)
    scheduler = DistillationTrainer.build_lr_scheduler(cfg, optimizer)
    for _ in range(60):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.002)
