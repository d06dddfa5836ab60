"""
MasKD in two stages: the stage-2 loss against a float64 reference written from the formulas
(explicit loops), frozen tokens and gradients, stage 1's token learner on a frozen teacher, the
tokens' way from a stage-1 checkpoint into a stage-2 distiller (strict, recorded, checked on
resume), one training step per detector family and on the segmentation logits, and the error
for a missing stage 1.
"""

import copy
import hashlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from acamkd import DistillationCheckpointer, get_acamkd_cfg
from acamkd.modeling.methods import MasKD, MasKDTokenLearner, ReceptiveTokens, build_distill_method
from acamkd.modeling.methods.maskd import dice_diversity
from acamkd.modeling.teacher import build_teacher_cfg
from acamkd.training.checkpoint_files import WeightsError
from acamkd.training.checkpointer import FROZEN_SOURCES_KEY, TEACHER_SOURCE_KEY
from acamkd.training.frozen_weights import FrozenWeightsError
from acamkd.training.trainer import is_semantic_segmentation

from test_seg_distill import CITYSCAPES, STUDENT_SHRINK, TEACHER_SHRINK, H, W
from test_seg_distill import _batch as seg_batch
from tiny_models import REPO, batched_inputs, distill_cfg

# Tiny models: one thread is as fast, and far faster when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS_KEY = "MODEL.ACAMKD.MASKD.TOKENS"
TEACHER_KEY = "MODEL.ACAMKD.TEACHER.WEIGHTS"


# ---- references, from the formulas (explicit loops, float64) ----


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _ref_masks(tokens, x):
    """m[n,t,h,w] = sigmoid(sum_c K[t,c] F[n,c,h,w])."""
    n_, c_, h_, w_ = x.shape
    t_ = tokens.shape[0]
    out = torch.zeros(n_, t_, h_, w_, dtype=torch.float64)
    for n in range(n_):
        for t in range(t_):
            for h in range(h_):
                for w in range(w_):
                    dot = sum(float(tokens[t, c]) * float(x[n, c, h, w]) for c in range(c_))
                    out[n, t, h, w] = _sigmoid(dot)
    return out


def _ref_weights(module: ReceptiveTokens, x):
    """p[n,:] = softmax_t(Conv1x1(GAP(Conv3x3(F)))), the convs applied from their weights."""
    conv3, _, conv1 = module.weights
    pooled = F.conv2d(x, conv3.weight.double(), conv3.bias.double(), padding=1).mean(dim=(2, 3))
    n_, t_ = x.shape[0], conv1.out_channels
    out = torch.zeros(n_, t_, dtype=torch.float64)
    w1 = conv1.weight.double()[:, :, 0, 0]
    for n in range(n_):
        logits = [float(conv1.bias[t]) + float(w1[t] @ pooled[n]) for t in range(t_)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        for t in range(t_):
            out[n, t] = exps[t] / sum(exps)
    return out


def _ref_loss(t, s, m, p=None, eps=0.0):
    """l[n,t,c] = sum_hw m^2 (S-T)^2 / (sum_hw m + eps); sum_t p mean_c, mean_n (or mean n,t,c)."""
    n_, c_, h_, w_ = t.shape
    t_ = m.shape[1]
    per_image = []
    for n in range(n_):
        per_token = []
        for k in range(t_):
            mass = sum(float(m[n, k, h, w]) for h in range(h_) for w in range(w_)) + eps
            channels = []
            for c in range(c_):
                num = sum(
                    float(m[n, k, h, w]) ** 2 * (float(s[n, c, h, w]) - float(t[n, c, h, w])) ** 2
                    for h in range(h_)
                    for w in range(w_)
                )
                channels.append(num / mass)
            per_token.append(channels)
        if p is None:
            per_image.append(sum(sum(ch) for ch in per_token) / (t_ * c_))
        else:
            per_image.append(sum(float(p[n, k]) * sum(per_token[k]) / c_ for k in range(t_)))
    return sum(per_image) / n_


def _ref_dice(m):
    """Mean over images and ordered pairs i != j of 2<m_i,m_j> / (|m_i|^2+1e-12 + |m_j|^2+1e-12)."""
    n_, t_ = m.shape[:2]
    flat = m.flatten(2)
    total, count = 0.0, 0
    for n in range(n_):
        for i in range(t_):
            for j in range(t_):
                if i == j:
                    continue
                a = sum(float(u) * float(v) for u, v in zip(flat[n, i], flat[n, j]))
                b = sum(float(u) ** 2 for u in flat[n, i]) + 1e-12
                c = sum(float(u) ** 2 for u in flat[n, j]) + 1e-12
                total += 2 * a / (b + c)
                count += 1
    return total / count


def _maskd(**kwargs) -> MasKD:
    """A MasKD level in float64 with tokens large enough for masks far from 0.5."""
    args = dict(teacher_channels=4, student_channels=3, num_tokens=3, loss_weight=2.0)
    args.update(allow_random_tokens=True, **kwargs)
    module = MasKD(**args).double()
    with torch.no_grad():
        module.tokens.tokens.normal_(0.0, 0.7)
    return module


def _features(c_t=4, c_s=3, b=2, h=3, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, c_t, h, w, generator=g, dtype=torch.float64)
    student = torch.randn(b, c_s, h, w, generator=g, dtype=torch.float64)
    return teacher, student.requires_grad_(True)


def _aligned(module: MasKD, s):
    """f_align(S) for the 1x1 conv, as a matrix product per position."""
    weight, bias = module.align.weight.double()[:, :, 0, 0], module.align.bias.double()
    return torch.einsum("oc,nchw->nohw", weight, s.detach()) + bias[None, :, None, None]


# ---- (a) the stage-2 loss ----


@pytest.mark.parametrize("weight_masks", [True, False])
def test_detection_loss_matches_the_formula_before_and_after_the_warmup(weight_masks):
    module = _maskd(warmup_iters=1, weight_masks=weight_masks)
    module.train()
    t, s = _features()
    k = module.tokens.tokens.detach()
    m_t = _ref_masks(k, t)
    p = _ref_weights(module.tokens, t) if weight_masks else None
    aligned = _aligned(module, s)

    first = module(t, s)  # step 0 < warmup: the teacher's masks alone
    assert float(first.stats["student_masks_on"]) == 0
    expected = 2.0 * _ref_loss(t, aligned, m_t, p)
    assert float(first.losses["loss_maskd"]) == pytest.approx(expected, rel=1e-9)
    assert int(module.num_steps) == 1

    second = module(t, s, return_masks=True)  # step 1 >= warmup: times the student's masks
    assert float(second.stats["student_masks_on"]) == 1
    m = m_t * _ref_masks(k, aligned)
    expected = 2.0 * _ref_loss(t, aligned, m, p)
    assert float(second.losses["loss_maskd"]) == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(second.masks["tokens"], m)
    assert second.masks["discrepancy"].shape == (2, 3, 4)
    assert second.masks["student"].shape == t.shape
    assert float(second.stats["token_mask_mean"]) == pytest.approx(float(m.mean()))


def test_segmentation_loss_matches_the_formula_and_never_uses_student_masks():
    module = _maskd(
        teacher_channels=5,
        student_channels=5,
        num_tokens=4,
        loss_weight=0.5,
        warmup_iters=-1,
        weight_masks=False,
        form="segmentation",
    )
    assert isinstance(module.align, torch.nn.Identity)  # same classes: no alignment
    module.train()
    t, s = _features(c_t=5, c_s=5)
    m = _ref_masks(module.tokens.tokens.detach(), t)
    for _ in range(3):
        out = module(t, s)
        expected = 0.5 * _ref_loss(t, s.detach(), m, eps=1e-5)
        assert float(out.losses["loss_maskd"]) == pytest.approx(expected, rel=1e-9)
        assert float(out.stats["student_masks_on"]) == 0


def test_detection_always_aligns_and_the_counter_is_a_checkpointed_buffer():
    module = MasKD(teacher_channels=8, student_channels=8, allow_random_tokens=True)
    assert isinstance(module.align, torch.nn.Conv2d)  # even for equal widths (the authors')
    assert "num_steps" in module.state_dict() and "tokens.tokens" in module.state_dict()
    t, s = _features(8, 8)
    module.float()
    module.eval()
    module(t.float(), s.float())
    module.train()
    with torch.no_grad():  # e.g. the mask figure: not a training step
        module(t.float(), s.float())
    assert int(module.num_steps) == 0
    module(t.float(), s.float())
    assert int(module.num_steps) == 1


def test_masked_feature_and_dice_diversity_match_their_formulas():
    tokens = ReceptiveTokens(4, 3, weight_masks=True).double()
    with torch.no_grad():
        tokens.tokens.normal_(0.0, 0.7)
    x, _ = _features()
    masked, masks = tokens.masked_feature(x)
    m = _ref_masks(tokens.tokens.detach(), x)
    p = _ref_weights(tokens, x)
    torch.testing.assert_close(masks, m)
    expected = torch.zeros_like(x)
    for k in range(3):
        expected += p[:, k, None, None, None] * m[:, k, None] * x
    torch.testing.assert_close(masked, expected)
    assert float(dice_diversity(m)) == pytest.approx(_ref_dice(m), rel=1e-9)
    assert float(ReceptiveTokens.dice_diversity(m[:, :1])) == 0  # one mask: no pair
    # The authors' initialisation: tokens N(0, 0.01), convs N(0, sqrt(2 / (k*k*out))), bias 0.
    fresh = ReceptiveTokens(64, 6, weight_masks=True)
    assert fresh.tokens.std().item() == pytest.approx(0.01, rel=0.2)
    conv3, _, conv1 = fresh.weights
    assert conv3.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.1)
    assert conv1.weight.std().item() == pytest.approx(math.sqrt(2 / 6), rel=0.3)
    assert not conv3.bias.any() and not conv1.bias.any()


# ---- (b) stage 2: frozen tokens, trained student, untouched teacher ----


def test_tokens_get_no_gradient_the_student_does():
    module = _maskd(weight_masks=True)
    module.train()
    assert not module.tokens.training
    t, s = _features()
    module(t, s).losses["loss_maskd"].backward()
    assert all(p.grad is None and not p.requires_grad for p in module.tokens.parameters())
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert module.align.weight.grad is not None


def test_an_optimizer_step_leaves_teacher_and_tokens_bitwise_unchanged():
    cfg = distill_cfg("RetinaNet", extra=["MODEL.ACAMKD.METHOD", "MasKD"])
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    tokens = [p for level in model.acam.values() for p in level.tokens.parameters()]
    assert tokens and not any(id(p) in in_optimizer for p in tokens)
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    tokens_before = [p.detach().clone() for p in tokens]
    student_before = copy.deepcopy(model.student.state_dict())
    model.train()
    with EventStorage():
        losses = model(batched_inputs())
        sum(losses.values()).backward()
    optimizer.step()
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert all(torch.equal(a, b) for a, b in zip(tokens_before, tokens))
    after = model.student.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in student_before.items())


# ---- (c) stage 1: the token learner ----


def _learner_cfg(arch="RetinaNet", teacher_weights="", extra=()):
    """A tiny stage-1 config: the tiny distiller's teacher (R-18, FPN 16; BatchNorm where
    detectron2 does not freeze it), its tokens."""
    fpn = 32 if arch == "FCOS" else 16  # FCOS's GroupNorm head needs 32 channels
    cfg = distill_cfg(
        arch,
        teacher_depth=18,
        teacher_fpn=fpn,
        student_fpn=fpn,
        extra=["MODEL.META_ARCHITECTURE", "MasKDTokenLearner"]
        + [TEACHER_KEY, teacher_weights]
        + ["MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT", str(not teacher_weights)]
        + list(extra),
    )
    cfg.MODEL.ACAMKD.TEACHER.OPTS += ["MODEL.RESNETS.NORM", "BN"]
    return cfg


def _stage2_cfg(tokens: str, teacher_weights: str = "", extra=()):
    """The tiny stage-2 RetinaNet distiller of :func:`_learner_cfg`'s teacher."""
    cfg = distill_cfg(
        "RetinaNet",
        teacher_depth=18,
        teacher_fpn=16,
        student_fpn=16,
        extra=["MODEL.ACAMKD.METHOD", "MasKD", TOKENS_KEY, tokens]
        + [TEACHER_KEY, teacher_weights]
        + ["MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT", str(not teacher_weights)]
        + ["SOLVER.MAX_ITER", "10"]
        + list(extra),
    )
    cfg.MODEL.ACAMKD.TEACHER.OPTS += ["MODEL.RESNETS.NORM", "BN"]
    return cfg


def _bn_statistics(model):
    return {
        k: v.clone()
        for k, v in model.teacher.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def test_learner_trains_its_tokens_on_a_frozen_teacher_with_frozen_statistics():
    cfg = _learner_cfg()
    learner = build_model(cfg)
    assert isinstance(learner, MasKDTokenLearner)
    assert list(learner.tokens) == ["p3", "p4", "p5", "p6", "p7"]  # every teacher FPN level
    assert all(t.num_tokens == 6 and t.weight_masks for t in learner.tokens.values())
    stats = _bn_statistics(learner)
    assert any(k.endswith("running_mean") for k in stats)  # the test has BatchNorm to watch
    teacher_before = copy.deepcopy(learner.teacher.state_dict())
    tokens_before = copy.deepcopy(learner.tokens.state_dict())
    optimizer = build_optimizer(cfg, learner)
    learner.train()
    assert learner.teacher.training  # its heads return their losses
    bns = [m for m in learner.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    with EventStorage() as storage:
        losses = learner(batched_inputs())
        sum(losses.values()).backward()
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_maskd_dice"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert 0 < float(losses["loss_maskd_dice"]) <= 5  # the sum over 5 levels of values in [0, 1]
    assert "maskd/p3/dice" in storage.latest()
    # Every token learns; the weight branch is in the graph, but at the init (tokens N(0, 0.01):
    # every mask near 0.5) the weights barely change the masked feature, nor its loss.
    assert all(t.tokens.grad.abs().sum() > 0 for t in learner.tokens.values())
    assert all(p.grad is not None for p in learner.tokens.parameters())
    assert all(p.grad is None and not p.requires_grad for p in learner.teacher.parameters())
    optimizer.step()
    assert all(torch.equal(v, learner.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert all(torch.equal(v, _bn_statistics(learner)[k]) for k, v in stats.items())
    assert any(not torch.equal(v, learner.tokens.state_dict()[k]) for k, v in tokens_before.items())


def test_learner_evaluates_the_teacher_on_masked_features():
    learner = build_model(_learner_cfg())
    learner.eval()
    assert not any(m.training for m in learner.teacher.modules())
    seen = {}
    hook = learner.teacher.head.register_forward_pre_hook(
        lambda _m, inputs: seen.update(head=inputs[0])
    )
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batched_inputs()]
    try:
        with torch.no_grad():
            outputs = learner(inputs)
            features = learner.teacher.backbone(learner.teacher.preprocess_image(inputs).tensor)
    finally:
        hook.remove()
    assert len(outputs) == 2 and "instances" in outputs[0]
    for level, head_input in zip(["p3", "p4", "p5", "p6", "p7"], seen["head"]):
        masked, _ = learner.tokens[level].masked_feature(features[level])
        torch.testing.assert_close(head_input, masked)


# ---- (d) the tokens from stage 1 to stage 2 ----


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _teacher_file(tmp_path) -> str:
    torch.manual_seed(1)
    state = build_model(build_teacher_cfg(_learner_cfg())).state_dict()
    path = str(tmp_path / "teacher.pth")
    torch.save({"model": state}, path)
    return path


def _stage1_checkpoint(tmp_path, teacher: str, seed: int = 3) -> str:
    """A stage-1 learner started as train_net.py starts it, its tokens changed as training
    would, saved by the project's checkpointer: <tmp>/stage1_<seed>/model_final.pth."""
    out = str(tmp_path / f"stage1_{seed}")
    os.makedirs(out, exist_ok=True)
    learner = build_model(_learner_cfg(teacher_weights=teacher))
    checkpointer = DistillationCheckpointer(learner, out)
    checkpointer.resume_or_load("", resume=False)  # the teacher's weights
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.tokens.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    checkpointer.save("model_final")
    return os.path.join(out, "model_final.pth")


def _started(cfg, out: str, resume: bool = False):
    os.makedirs(out, exist_ok=True)
    model = build_model(cfg)
    checkpointer = DistillationCheckpointer(model, out)
    checkpointer.resume_or_load("", resume=resume)
    return model, checkpointer


def test_tokens_go_from_a_stage1_checkpoint_into_stage2_strictly(tmp_path):
    teacher = _teacher_file(tmp_path)
    tokens = _stage1_checkpoint(tmp_path, teacher)
    saved = torch.load(tokens, map_location="cpu")
    assert not any(k.startswith("teacher.") for k in saved["model"])  # reloaded from its file
    assert saved[TEACHER_SOURCE_KEY]["sha256"] == _sha256(teacher)
    assert "tokens.p3.tokens" in saved["model"] and "tokens.p7.weights.2.bias" in saved["model"]

    # A stage-1 run resumes: its teacher is reloaded from its file, the tokens restored.
    learner, _ = _started(_learner_cfg(teacher_weights=teacher), os.path.dirname(tokens), True)
    assert torch.equal(learner.tokens["p3"].tokens, saved["model"]["tokens.p3.tokens"])
    teacher_state = torch.load(teacher, map_location="cpu")["model"]
    assert all(torch.equal(v, teacher_state[k]) for k, v in learner.teacher.state_dict().items())

    out = str(tmp_path / "stage2")
    model, checkpointer = _started(_stage2_cfg(tokens, teacher), out)
    for level, module in model.acam.items():
        for name, value in module.tokens.state_dict().items():
            assert torch.equal(value, saved["model"][f"tokens.{level}.{name}"]), (level, name)
    checkpointer.save("model_0000004", iteration=4)
    stage2 = torch.load(os.path.join(out, "model_0000004.pth"), map_location="cpu")
    assert stage2[FROZEN_SOURCES_KEY] == {
        TOKENS_KEY: {"path": tokens, "setting": TOKENS_KEY, "sha256": _sha256(tokens)}
    }
    assert "acam.p3.tokens.tokens" in stage2["model"]  # a resumed run takes them from here

    # Resuming with the same file: the tokens come from the checkpoint.
    again, _ = _started(_stage2_cfg(tokens, teacher), out, resume=True)
    assert torch.equal(again.acam["p5"].tokens.tokens, model.acam["p5"].tokens.tokens)

    # The TOKENS file changed (e.g. stage 1 rerun into the same folder): refused, both named.
    recorded = _sha256(tokens)
    os.replace(_stage1_checkpoint(tmp_path, teacher, seed=4), tokens)
    current = _sha256(tokens)
    assert current != recorded
    with pytest.raises(FrozenWeightsError) as e:
        _started(_stage2_cfg(tokens, teacher), out, resume=True)
    message = str(e.value)
    assert f"'{tokens}' ({TOKENS_KEY}, sha256 {recorded})" in message
    assert f"now gives '{tokens}' ({TOKENS_KEY}, sha256 {current})" in message


def test_a_tokens_file_missing_a_level_or_of_other_shapes_is_refused(tmp_path):
    tokens = _stage1_checkpoint(tmp_path, teacher="")  # a random teacher, kept in the file
    data = torch.load(tokens, map_location="cpu")
    data["model"] = {k: v for k, v in data["model"].items() if not k.startswith("tokens.p7.")}
    partial = str(tmp_path / "no_p7.pth")
    torch.save(data, partial)
    with pytest.raises(FrozenWeightsError) as e:
        _started(_stage2_cfg(partial), str(tmp_path / "a"))
    message = str(e.value)
    assert f"'{partial}' ({TOKENS_KEY})" in message and "tokens.p7.tokens" in message
    assert "MasKDTokenLearner" in message  # how to make a fitting file

    with pytest.raises(
        FrozenWeightsError, match=r"tokens.p3.tokens \(6, 16\) in the file, \(4, 16\)"
    ):
        _started(
            _stage2_cfg(tokens, extra=["MODEL.ACAMKD.MASKD.NUM_TOKENS", "4"]), str(tmp_path / "b")
        )


def test_the_learner_takes_only_its_own_checkpoints(tmp_path):
    teacher = _teacher_file(tmp_path)
    learner = build_model(_learner_cfg(teacher_weights=teacher))
    with pytest.raises(WeightsError, match="is not a checkpoint of this MasKDTokenLearner"):
        DistillationCheckpointer(learner).load(teacher)


# ---- (e) one distiller training step per family ----


@pytest.mark.parametrize("arch", ["RetinaNet", "GeneralizedRCNN", "FCOS"])
def test_one_training_step_per_detector_family(arch):
    torch.manual_seed(0)
    model = build_model(distill_cfg(arch, extra=["MODEL.ACAMKD.METHOD", "MasKD"]))
    authors = {"RetinaNet": (7.0, 7000), "GeneralizedRCNN": (1.0, 7330), "FCOS": (10.0, 5000)}
    level = next(iter(model.acam.values()))
    assert isinstance(level, MasKD) and (level.loss_weight, level.warmup_iters) == authors[arch]
    assert level.tokens.num_tokens == 6 and level.tokens.weight_masks
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    with EventStorage() as storage:
        losses = model(batched_inputs())
        sum(losses.values()).backward()
    assert "loss_maskd" in losses and float(losses["loss_maskd"]) > 0
    assert all(torch.isfinite(v) for v in losses.values())
    assert f"acam/{next(iter(model.acam))}/token_mask_mean" in storage.latest()
    assert all(p.grad is not None for lv in model.acam.values() for p in lv.align.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    optimizer.step()
    after = model.teacher.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in teacher_before.items())


def _cityscapes_cfg(name: str):
    """A Cityscapes MasKD config of this project, shrunk as test_seg_distill shrinks the pair."""
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(os.path.join(CITYSCAPES, name))
    cfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", "INPUT.CROP.SIZE", f"({H}, {W})"]
        + (STUDENT_SHRINK["deeplabv3_R_18"] if "from" in name else TEACHER_SHRINK)
        + ["MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT", "True"]
        + ["MODEL.ACAMKD.TEACHER.OPTS", TEACHER_SHRINK]
    )
    return cfg


def test_segmentation_leg_stage1_and_stage2_train_a_step():
    learner_cfg = _cityscapes_cfg("maskd_tokens_deeplabv3_R_101_OS8.yaml")
    assert is_semantic_segmentation(learner_cfg)  # the DeepLab crops and schedule
    learner = build_model(learner_cfg)
    assert list(learner.tokens) == ["logits"]
    assert (
        learner.tokens["logits"].tokens.shape == (8, 19)
        and not learner.tokens["logits"].weight_masks
    )
    learner.train()
    with EventStorage():
        losses = learner(seg_batch())
        sum(losses.values()).backward()
    assert set(losses) == {"loss_sem_seg", "loss_maskd_dice"}
    assert learner.tokens["logits"].tokens.grad.abs().sum() > 0
    dropouts = [m for m in learner.teacher.modules() if isinstance(m, torch.nn.Dropout)]
    assert not any(m.training for m in dropouts)

    torch.manual_seed(0)
    model = build_model(
        _cityscapes_cfg("maskd_deeplabv3_R_18_OS8_from_deeplabv3_R_101_OS8_40k.yaml")
    )
    level = model.acam["logits"]
    assert (level.form, level.loss_weight, level.warmup_iters) == ("segmentation", 0.5, -1)
    assert isinstance(level.align, torch.nn.Identity)
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    model.train()
    with EventStorage():
        losses = model(seg_batch())
        sum(losses.values()).backward()
    assert set(losses) == {"loss_sem_seg", "loss_maskd"} and float(losses["loss_maskd"]) > 0
    predictor = model.student.sem_seg_head.predictor.weight
    assert predictor.grad is not None and predictor.grad.abs().sum() > 0
    assert all(p.grad is None for p in level.tokens.parameters())
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher_before.items())


# ---- (f) no stage 1 ----


def test_empty_tokens_are_refused_with_the_stage1_hint():
    cfg = distill_cfg(
        "FCOS",
        extra=["MODEL.ACAMKD.METHOD", "MasKD", "MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT", "False"],
    )
    with pytest.raises(ValueError) as e:
        build_distill_method(cfg, teacher_channels=64, student_channels=32)
    message = str(e.value)
    assert "MODEL.ACAMKD.MASKD.TOKENS is empty" in message
    assert "configs/Streets-Detection/maskd_tokens_fcos_R_18_wide_streets.yaml" in message
    assert os.path.isfile(
        os.path.join(REPO, "configs/Streets-Detection/maskd_tokens_fcos_R_18_wide_streets.yaml")
    )
    cfg.MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT = True  # tests and smoke runs
    assert isinstance(build_distill_method(cfg, teacher_channels=64, student_channels=32), MasKD)
