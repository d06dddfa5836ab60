"""
STCA-FF's attention implementations (MODEL.ACAMKD.ATTENTION) against a reference: "chunked" and
"sdpa" give the one-head attention of the explicit N x N softmax, and ACAM's losses and
gradients with either equal the reference's in float64; the chunked path never holds an
N x N buffer; the teacher's inference-mode forward changes no loss.
"""

import copy

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from acamkd import get_acamkd_cfg
from acamkd.experiments.benchmark import _teacher_features_no_grad
from acamkd.modeling import stca_ff
from acamkd.modeling.acam import ACAMLevel
from acamkd.modeling.stca_ff import STCAFusion, chunked_attention, chunked_attention_and_column_mean

from tiny_models import batched_inputs, distill_cfg


def reference_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v with the N x N matrix built: the definition."""
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


class ReferenceFusion(STCAFusion):
    """STCA-FF with the explicit N x N softmax (the implementation before any kernel)."""

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return reference_attention(q, k, v, self.scale)

    def attention_impl(self, device: torch.device) -> str:
        return "reference"  # ACAMLevel then forms F with _attend, as the definition does


def _reference_level(level: ACAMLevel) -> ACAMLevel:
    """A copy of ``level`` whose STCA-FF is :class:`ReferenceFusion`, same weights."""
    ref = copy.deepcopy(level)
    fusion = level.fusion
    ref.fusion = ReferenceFusion(fusion.channels, query_source=fusion.query_source)
    ref.fusion.query_channels, ref.fusion.scale = fusion.query_channels, fusion.scale
    ref.fusion.load_state_dict(fusion.state_dict())
    ref.fusion.double()
    return ref


def _assert_rel_close(actual: Tensor, expected: Tensor, rel: float = 1e-5) -> None:
    err = (actual - expected).abs().max().item()
    assert err <= rel * max(expected.abs().max().item(), 1e-30), (err, expected.abs().max())


# ---------------------------------------------------------------------------------------------
# chunked_attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("saved_probs_elements", [0, 10**9], ids=["recomputed", "kept"])
@pytest.mark.parametrize("chunk_elements", [1, 7 * 11 * 2, 10**9])
def test_chunked_attention_matches_reference_values_and_gradients(
    chunk_elements, saved_probs_elements
):
    # One query per chunk, uneven chunks (7 queries; 13 = 7 + 6), and one chunk for all; the
    # backward recomputing the probabilities, or reusing those the forward kept.
    q = (3 * torch.randn(2, 13, 3, dtype=torch.float64)).requires_grad_(True)
    k = (3 * torch.randn(2, 11, 3, dtype=torch.float64)).requires_grad_(True)
    v = torch.randn(2, 11, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 13, 5, dtype=torch.float64)

    out = chunked_attention(
        q, k, v, 0.7, chunk_elements=chunk_elements, saved_probs_elements=saved_probs_elements
    )
    grads = torch.autograd.grad(out, (q, k, v), grad)
    expected = reference_attention(q, k, v, 0.7)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)

    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("saved_probs_elements", [0, 10**9], ids=["recomputed", "kept"])
def test_chunked_attention_gradcheck(saved_probs_elements):
    q = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 6, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: chunked_attention(
            a, b, c, 0.5, chunk_elements=12, saved_probs_elements=saved_probs_elements
        ),
        (q, k, v),
    )


@pytest.mark.parametrize("saved_probs_elements", [0, 10**9], ids=["recomputed", "kept"])
@pytest.mark.parametrize("value_width", [0, 5])
def test_chunked_attention_column_mean_matches_reference(value_width, saved_probs_elements):
    # Both outputs feed the loss; the value may have no column (channel masks only).
    q = (3 * torch.randn(2, 13, 3, dtype=torch.float64)).requires_grad_(True)
    k = (3 * torch.randn(2, 11, 3, dtype=torch.float64)).requires_grad_(True)
    v = torch.randn(2, 11, value_width, dtype=torch.float64, requires_grad=True)
    grad_out, grad_mean = torch.randn(2, 13, value_width), torch.randn(2, 11)
    grad_out, grad_mean = grad_out.double(), grad_mean.double()

    out, mean = chunked_attention_and_column_mean(
        q, k, v, 0.7, chunk_elements=2 * 11 * 4, saved_probs_elements=saved_probs_elements
    )
    probs = torch.softmax(q @ k.transpose(1, 2) * 0.7, dim=-1)
    expected, expected_mean = probs @ v, probs.mean(dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-12)
    inputs = (q, k, v) if value_width else (q, k)
    grads = torch.autograd.grad((out * grad_out).sum() + (mean * grad_mean).sum(), inputs)
    expected_grads = torch.autograd.grad(
        (expected * grad_out).sum() + (expected_mean * grad_mean).sum(), inputs
    )
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_chunked_attention_column_mean_gradcheck():
    q = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 6, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: chunked_attention_and_column_mean(a, b, c, 0.5, chunk_elements=12),
        (q, k, v),
    )


def test_chunked_attention_keeps_probabilities_only_within_budget_and_for_a_backward():
    b, n, l = 2, 9, 7
    q, k, v = (torch.randn(b, m, w, requires_grad=True) for m, w in ((n, 3), (l, 3), (l, 4)))
    inputs_and_output = b * n * 3 + b * l * 3 + b * l * 4 + b * n * 4
    for budget, grad_enabled, saved in (
        (b * n * l, True, inputs_and_output + b * n * l),  # 3 chunks of probabilities kept
        (b * n * l - 1, True, inputs_and_output),
        (b * n * l, False, 0),
    ):
        saved_elements = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved_elements.append(t.numel()) or t, lambda t: t
        ), torch.set_grad_enabled(grad_enabled):
            chunked_attention(q, k, v, 0.5, chunk_elements=b * 3 * l, saved_probs_elements=budget)
        assert sum(saved_elements) == saved, (budget, grad_enabled)


def test_chunked_attention_half_precision_computes_in_float32():
    q, k, v = (torch.randn(1, 40, w) for w in (4, 4, 8))
    out = chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.5)
    assert out.dtype == torch.bfloat16
    expected = reference_attention(
        q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), 0.5
    )
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# STCA-FF and ACAM with each implementation against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["chunked", "sdpa"])
@pytest.mark.parametrize("query_source", ["teacher", "student"])
@pytest.mark.parametrize("channels", [16, 19])
def test_fusion_matches_reference(attention, query_source, channels):
    fusion = STCAFusion(channels, query_source=query_source, attention=attention).double()
    ref = ReferenceFusion(channels, query_source=query_source).double()
    ref.load_state_dict(fusion.state_dict())
    teacher = 3 * torch.randn(2, channels, 5, 7, dtype=torch.float64)
    student = 3 * torch.randn(2, channels, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(
        fusion(teacher, student), ref(teacher, student), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("with_units,spatial_mean", [(True, True), (True, False), (False, True)])
def test_fusion_project_equals_reading_the_fused_feature(with_units, spatial_mean):
    # What ASCM reads of F (m_s F and F's spatial mean), with its gradients, computed without
    # forming F, equals reading the reference F (the explicit N x N softmax).
    c, m = 16, 4
    fusion = STCAFusion(c).double()
    ref = ReferenceFusion(c).double()
    ref.load_state_dict(fusion.state_dict())
    teacher = 3 * torch.randn(2, c, 5, 7, dtype=torch.float64)
    student = 3 * torch.randn(2, c, 5, 7, dtype=torch.float64, requires_grad=True)
    units = torch.randn(m, c, dtype=torch.float64, requires_grad=True) if with_units else None
    weights = [torch.randn(2, m, 5, 7, dtype=torch.float64), torch.randn(2, c).double()]

    def read_reference_f():
        fused = ref(teacher, student)
        projected = torch.einsum("mc,bchw->bmhw", units, fused) if with_units else None
        return projected, (fused.mean(dim=(2, 3)) if spatial_mean else None)

    results = []
    for module, read, dtype in (
        (fusion, lambda: fusion.project(teacher, student, units, spatial_mean), torch.float32),
        (ref, read_reference_f, torch.float64),
    ):
        projected, mean = read()
        assert (projected is not None) == with_units and (mean is not None) == spatial_mean
        outputs = [o for o in (projected, mean) if o is not None]
        assert all(o.dtype == dtype for o in outputs)
        loss = sum((o * w).sum() for o, w in zip((projected, mean), weights) if o is not None)
        leaves = [student] + ([units] if with_units else []) + list(module.parameters())
        results.append((outputs, torch.autograd.grad(loss, leaves, allow_unused=True)))
    (outputs, grads), (ref_outputs, ref_grads) = results
    for o, e in zip(outputs, ref_outputs):
        _assert_rel_close(o, e)
    for g, e in zip(grads, ref_grads):
        assert (g is None) == (e is None)
        if g is not None:
            _assert_rel_close(g, e)


@pytest.mark.parametrize("attention", ["chunked", "sdpa"])
@pytest.mark.parametrize(
    "query_source,mask_objective,normalizer,masks,channel_mask_form",
    [
        ("teacher", "descend", "sum", "spatial_channel", "scalar"),
        ("student", "ascend", "sum_sq", "spatial_channel", "per_channel"),
        ("teacher", "descend", "sum_sq", "spatial", "scalar"),
        ("teacher", "descend", "sum_sq", "channel", "per_channel"),
    ],
)
def test_acam_losses_and_gradients_equal_reference(
    attention, query_source, mask_objective, normalizer, masks, channel_mask_form
):
    level = ACAMLevel(
        teacher_channels=16,
        student_channels=12,
        num_masks=4,
        query_source=query_source,
        mask_objective=mask_objective,
        normalizer=normalizer,
        masks=masks,
        channel_mask_form=channel_mask_form,
        mask_init_std=0.5,  # masks away from 0.5, so the losses depend on the fusion
        attention=attention,
    )
    # STCA-FF (and the alignment before it) in float64; ASCM and the losses run in float32
    # by design, on a fused feature that agrees with the reference's to float64 precision.
    level.fusion.double()
    level.align.double()
    ref = _reference_level(level)
    teacher = 2 * torch.randn(2, 16, 9, 11, dtype=torch.float64)
    student = 2 * torch.randn(2, 12, 9, 11, dtype=torch.float64)
    results = []
    for module in (level, ref):
        s = student.clone().requires_grad_(True)
        out = module(teacher, s)
        params = [p for _, p in sorted(module.named_parameters())]
        grads = torch.autograd.grad(sum(out.losses.values()), [s] + params)
        results.append((out.losses, grads))
    (losses, grads), (ref_losses, ref_grads) = results
    kinds = {"spatial_channel": ("spatial", "channel")}.get(masks, (masks,))
    expected = {f"loss_acam_{kind}" for kind in kinds} | {"loss_acam_diversity"}
    assert set(losses) == set(ref_losses) == expected
    for name in losses:
        _assert_rel_close(losses[name], ref_losses[name])
    for g, e in zip(grads, ref_grads):
        _assert_rel_close(g, e)


def test_auto_is_chunked_on_cpu_and_sdpa_elsewhere():
    fusion = STCAFusion(8)
    assert fusion.attention == "auto"
    assert fusion.attention_impl(torch.device("cpu")) == "chunked"
    assert fusion.attention_impl(torch.device("cuda")) == "sdpa"
    assert STCAFusion(8, attention="sdpa").attention_impl(torch.device("cpu")) == "sdpa"


def test_config_key_reaches_the_fusion_and_bad_values_name_it():
    cfg = get_acamkd_cfg()
    assert cfg.MODEL.ACAMKD.ATTENTION == "auto"
    cfg.MODEL.ACAMKD.ATTENTION = "sdpa"
    assert ACAMLevel(cfg, teacher_channels=8, student_channels=8).fusion.attention == "sdpa"
    cfg.MODEL.ACAMKD.ATTENTION = "bogus"
    with pytest.raises(ValueError, match="MODEL.ACAMKD.ATTENTION.*'bogus'"):
        ACAMLevel(cfg, teacher_channels=8, student_channels=8)


# ---------------------------------------------------------------------------------------------
# Memory: no N x N buffer on the chunked path, at the real COCO level shapes
# ---------------------------------------------------------------------------------------------
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements) any aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("name,hw", [("RetinaNet p3", (100, 168)), ("Faster R-CNN p2", (200, 336))])
def test_chunked_path_holds_no_n_by_n_buffer_at_coco_shapes(name, hw):
    # Shapes only (meta tensors): forward and backward of STCA-FF at the level of a 1333x800
    # image. Apart from the (B, N, C) features, no tensor exceeds one score chunk (16 MB in
    # float32), and at most three chunks are alive at once, far below 1 GB; the N x N matrix
    # would be 1.1 GB (p3) and 18 GB (p2).
    h, w = hw
    n, c = h * w, 256
    fusion = STCAFusion(c, attention="chunked").to("meta")
    teacher = torch.empty(1, c, h, w, device="meta")
    student = torch.empty(1, c, h, w, device="meta", requires_grad=True)
    with _LargestTensor() as mode:
        fusion(teacher, student).sum().backward()
    assert mode.largest <= max(stca_ff._CHUNK_ELEMENTS, n * c), (name, mode.largest)
    assert mode.largest < n * n / 16
    assert stca_ff._CHUNK_ELEMENTS * 4 * 3 < 2**30


# ---------------------------------------------------------------------------------------------
# The teacher under inference mode
# ---------------------------------------------------------------------------------------------
def test_teacher_inference_mode_changes_no_loss_and_gradients_flow():
    cfg = distill_cfg("RetinaNet")
    model = build_model(cfg)
    model.train()
    inputs = batched_inputs()
    padded = (64, 96)
    features = model.teacher_features(inputs, padded)
    assert all(not f.is_inference() and not f.requires_grad for f in features.values())

    # RetinaNet keeps running state (its loss normaliser): each pass starts from a fresh copy.
    base = model
    results = []
    for teacher_features in (None, _teacher_features_no_grad):
        model = copy.deepcopy(base)
        if teacher_features is not None:  # the forward before issue 16, for comparison
            model.teacher_features = teacher_features.__get__(model)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with EventStorage(0):
            losses = model(inputs)
        sum(losses.values()).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in losses.items()}, grads))
    (losses, grads), (ref_losses, ref_grads) = results
    assert set(losses) == set(ref_losses)
    for k in losses:
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=1e-6, atol=0)
    assert set(grads) == set(ref_grads) and any(k.startswith("acam.") for k in grads)
    assert not any(k.startswith("teacher.") for k in grads)
    for k in grads:
        # float32 rounding, which depends on the threads and buffer alignment of the kernels:
        # relative to the tensor's largest gradient.
        scale = float(ref_grads[k].abs().max())
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-5 * scale)
