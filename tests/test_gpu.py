"""
CUDA-only checks, run by ``make gpu-check`` (skipped on the CPU, so CI runs them as skips; with
``ACAMKD_GPU_CHECK=1``, as ``make gpu-check`` sets it, a missing GPU fails instead):

* a distillation step in float32 and under AMP (float16, bfloat16) gives finite losses that
  match the float32 step: ACAM's losses within 5% (float16) and 10% (bfloat16) relative, the
  tolerances of half-precision features through a randomly initialised network;
* STCA-FF's SDPA call runs on a fused kernel, never the math path that builds the N x N matrix,
  at the COCO level shapes (RetinaNet p3 and Faster R-CNN p2 of a 1333x800 image, batch 2), in
  float32 and under both autocasts: the math backend is forbidden, so a fallback raises.
"""

import copy
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from acamkd.modeling.acam import ACAMLevel

from tiny_models import batched_inputs, distill_cfg

if os.environ.get("ACAMKD_GPU_CHECK") == "1" and not torch.cuda.is_available():
    raise RuntimeError("ACAMKD_GPU_CHECK=1 but torch sees no CUDA device")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

AMP_TOLERANCE = {torch.float16: 0.05, torch.bfloat16: 0.10}
FUSED_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
]


def _distill_step(model, inputs, dtype):
    model.zero_grad(set_to_none=True)
    with EventStorage(0), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        losses = model(inputs)
    total = sum(losses.values())
    total.backward()
    return {k: float(v.detach()) for k, v in losses.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_distillation_step_matches_float32(dtype):
    cfg = distill_cfg("RetinaNet")
    cfg.MODEL.DEVICE = "cuda"
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    assert model.acam["p3"].fusion.attention_impl(model.device) == "sdpa"
    inputs = batched_inputs(num_images=2, size=(128, 192))
    # RetinaNet keeps running state (its loss normaliser): each step starts from a fresh copy.
    reference = _distill_step(copy.deepcopy(model), inputs, torch.float32)
    with sdpa_kernel(FUSED_BACKENDS):
        losses = _distill_step(model, inputs, dtype)
    assert set(losses) == set(reference)
    for name, value in losses.items():
        assert torch.isfinite(torch.tensor(value)), (name, value)
    grads = [p.grad for p in model.acam.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for name in ("loss_acam_channel", "loss_acam_spatial", "loss_acam_diversity"):
        rel = abs(losses[name] - reference[name]) / max(abs(reference[name]), 1e-12)
        assert rel <= AMP_TOLERANCE[dtype], (name, losses[name], reference[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,hw", [("RetinaNet p3", (100, 168)), ("Faster R-CNN p2", (200, 336))])
def test_stca_ff_uses_a_fused_kernel_at_coco_shapes(dtype, name, hw):
    level = ACAMLevel(teacher_channels=256, student_channels=256).cuda()
    teacher = torch.randn(2, 256, *hw, device="cuda")
    student = torch.randn(2, 256, *hw, device="cuda", requires_grad=True)
    # The math backend is excluded: an input no fused kernel takes raises instead of silently
    # building the N x N matrix (14 GB per image at p2 in float32).
    with sdpa_kernel(FUSED_BACKENDS), torch.autocast(
        "cuda", dtype=dtype, enabled=dtype != torch.float32
    ):
        out = level(teacher, student)
        sum(out.losses.values()).backward()
    torch.cuda.synchronize()
    assert all(torch.isfinite(v) for v in out.losses.values()), name
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_sdpa_kernel_context_forbids_the_math_path():
    # No fused CUDA kernel takes float64: with math forbidden this must raise, which shows the
    # check above can fail.
    q = torch.randn(1, 1, 64, 16, device="cuda", dtype=torch.float64)
    with sdpa_kernel(FUSED_BACKENDS), pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
