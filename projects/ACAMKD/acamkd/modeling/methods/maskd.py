"""
MasKD: masked distillation with receptive tokens (Huang et al., ICLR 2023), in two stages.

- Stage 1, :class:`MasKDTokenLearner` (``MODEL.META_ARCHITECTURE: "MasKDTokenLearner"``): a
  :class:`ReceptiveTokens` per distilled level learns, on the frozen teacher, masks under which
  the teacher's own task losses stay low, plus a Dice diversity loss between the masks.
- Stage 2, :class:`MasKD` (``MODEL.ACAMKD.METHOD: "MasKD"`` in an ``ACAMDistiller``): those
  tokens, frozen, weight a feature-imitation loss per mask. They are loaded from
  ``MODEL.ACAMKD.MASKD.TOKENS`` (stage 1's checkpoint) by the checkpointer when a run starts,
  strictly (see :class:`~acamkd.training.frozen_weights.FrozenWeights`).

Written from the specification in ``RIVALS.md`` ("5. MasKD", from the authors' code
hunto/MasKD).
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ...training.frozen_weights import FrozenWeights
from ...training.teacher_weights import TeacherWeights
from ..teacher import build_frozen_teacher, build_teacher_cfg, teacher_weights_from_cfg
from .common import AlignedFeatureLoss, current_storage
from .registry import DISTILL_METHOD_REGISTRY, family_setting

__all__ = [
    "MasKD",
    "MasKDTokenLearner",
    "ReceptiveTokens",
    "dice_diversity",
    "masked_feature_loss",
]

# The authors' settings per student family (their stage-2 configs; for segmentation their
# Cityscapes scripts): tokens per level, loss weight, calls of the loss before the student's
# masks multiply the teacher's (-1: never), and the softmax weighting of the tokens.
_DETECTION_TOKENS = {"NUM_TOKENS": 6, "WEIGHT_MASKS": True}
_AUTHORS = {
    "RetinaNet": dict(_DETECTION_TOKENS, LOSS_WEIGHT=7.0, WARMUP_ITERS=7000),
    "GeneralizedRCNN": dict(_DETECTION_TOKENS, LOSS_WEIGHT=1.0, WARMUP_ITERS=7330),
    "FCOS": dict(_DETECTION_TOKENS, LOSS_WEIGHT=10.0, WARMUP_ITERS=5000),
    "RepPoints": dict(_DETECTION_TOKENS, LOSS_WEIGHT=10.0, WARMUP_ITERS=5000),
    "SemanticSegmentor": {
        "NUM_TOKENS": 8,
        "LOSS_WEIGHT": 0.5,
        "WARMUP_ITERS": -1,
        "WEIGHT_MASKS": False,
    },
}

_FORMS = ("detection", "segmentation")
# Added to the mask sum of the segmentation loss (the authors' Cityscapes code); the detection
# loss divides by the plain sum.
_SEGMENTATION_EPS = 1e-5
# Stage-1 configs, named by the error about an empty MODEL.ACAMKD.MASKD.TOKENS.
_STAGE1_EXAMPLE = {
    "detection": "configs/Streets-Detection/maskd_tokens_fcos_R_18_wide_streets.yaml",
    "segmentation": (
        "configs/Streets-SemanticSegmentation/maskd_tokens_deeplabv3_R_18_wide_OS8_streets.yaml"
    ),
}
_TOKENS_KEY = "MODEL.ACAMKD.MASKD.TOKENS"
_ALLOW_KEY = "MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT True"
_LOGITS = "logits"
# Where the distilled output is produced, per MODEL.ACAMKD.DISTILL_TARGET (as in the distiller).
_FEATURE_MODULE = {"fpn": "backbone", "sem_seg_logits": "sem_seg_head.predictor"}
# Teacher submodules whose mode would change what it computes in training: their statistics
# and dropout stay as in evaluation while its heads run their training path (task losses).
_EVAL_MODE_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd,
)


def dice_diversity(masks: Tensor) -> Tensor:
    """
    The Dice coefficient between every two different masks of an image, averaged over images
    and ordered pairs ``i != j``: ``D_ij = 2 <m_i, m_j> / ((|m_i|^2 + 1e-12) + (|m_j|^2 +
    1e-12))``. Minimising it makes the masks cover different places.

    Args:
        masks (Tensor): (B, T, H, W).

    Returns:
        Tensor: 0-dim, in [0, 1]; 0 for a single mask (no pair).
    """
    b, t = masks.shape[:2]
    if t < 2:
        return masks.sum() * 0.0
    flat = masks.flatten(2)
    inner = flat @ flat.transpose(1, 2)  # (B, T, T)
    sq = torch.diagonal(inner, dim1=1, dim2=2) + 1e-12  # (B, T)
    dice = 2 * inner / (sq.unsqueeze(2) + sq.unsqueeze(1))
    off_diagonal = ~torch.eye(t, dtype=torch.bool, device=masks.device)
    return dice[:, off_diagonal].sum() / (b * t * (t - 1))


class ReceptiveTokens(nn.Module):
    """
    One level's mask module: ``T`` receptive tokens ``K`` (T x C) and, optionally, a branch
    that weighs them per image.

    - masks ``m[n,t,h,w] = sigmoid(sum_c K[t,c] F[n,c,h,w])`` (a raw dot product, no scaling,
      no softmax over tokens);
    - weights ``p[n,:] = softmax_t(Conv1x1_(C->T)(GAP(Conv3x3_(C->C)(F))))`` (no activation
      between), convs initialised N(0, sqrt(2 / (k*k*out_channels))) with zero bias.
    """

    def __init__(self, channels: int, num_tokens: int, weight_masks: bool) -> None:
        """
        Args:
            channels (int): C of the level's feature.
            num_tokens (int): T.
            weight_masks (bool): build the weight branch.
        """
        super().__init__()
        if channels < 1 or num_tokens < 1:
            raise ValueError(
                f"ReceptiveTokens: channels and num_tokens (MODEL.ACAMKD.MASKD.NUM_TOKENS) must "
                f"be >= 1, got {channels} and {num_tokens}"
            )
        self.channels = channels
        self.num_tokens = num_tokens
        self.tokens = nn.Parameter(torch.empty(num_tokens, channels).normal_(0.0, 0.01))
        self.weights: Optional[nn.Sequential] = None
        if weight_masks:
            self.weights = nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size=3, padding=1),
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(channels, num_tokens, kernel_size=1),
            )
            for m in self.weights.modules():
                if isinstance(m, nn.Conv2d):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                    nn.init.zeros_(m.bias)

    @property
    def weight_masks(self) -> bool:
        return self.weights is not None

    def masks(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor): (B, C, H, W).

        Returns:
            Tensor: (B, T, H, W) masks in (0, 1).
        """
        return torch.einsum("tc,bchw->bthw", self.tokens.to(x.dtype), x).sigmoid()

    def mask_weights(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor): (B, C, H, W).

        Returns:
            Tensor: (B, T) ``p``, summing to 1 over the tokens.
        """
        if self.weights is None:
            raise RuntimeError("ReceptiveTokens was built without weights (weight_masks=False)")
        return self.weights(x).flatten(1).softmax(dim=1)

    def masked_feature(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """
        The feature under its masks, summed over the tokens: ``sum_t p[n,t] m[n,t] F`` with
        the weights, else ``sum_t m[n,t] F``.

        Args:
            x (Tensor): (B, C, H, W).

        Returns:
            tuple: the (B, C, H, W) masked feature and the (B, T, H, W) masks.
        """
        masks = self.masks(x)
        if self.weights is not None:
            coverage = torch.einsum("bthw,bt->bhw", masks, self.mask_weights(x).to(masks.dtype))
        else:
            coverage = masks.sum(dim=1)
        return x * coverage.unsqueeze(1), masks

    dice_diversity = staticmethod(dice_diversity)


def masked_feature_loss(
    teacher: Tensor,
    student: Tensor,
    masks: Tensor,
    weights: Optional[Tensor] = None,
    eps: float = 0.0,
) -> Tensor:
    """
    MasKD's loss of one level: per image, token and channel
    ``l[n,t,c] = sum_hw m^2 (S - T)^2 / (sum_hw m + eps)`` (the mask inside the square, a plain
    mask sum as normaliser); with ``weights`` ``mean_n sum_t p[n,t] mean_c l[n,t,c]``, else
    ``mean_(n,t,c) l``.

    A mask sum of exactly 0 (every mask underflowed) is taken as the smallest positive number,
    where the authors' code gives NaN; its numerator is then 0 too, and so is the term.

    Args:
        teacher (Tensor): (B, C, H, W), detached.
        student (Tensor): (B, C, H, W) the aligned student.
        masks (Tensor): (B, T, H, W).
        weights (Tensor or None): (B, T) ``p``.
        eps (float): added to the mask sums (0 for detection, 1e-5 for segmentation).

    Returns:
        Tensor: 0-dim loss (not yet multiplied by the loss weight).
    """
    squared = (student - teacher).square()
    numerator = torch.einsum("nthw,nchw->ntc", masks.square(), squared)
    denominator = (masks.sum(dim=(2, 3)) + eps).clamp_min(torch.finfo(masks.dtype).tiny)
    per_channel = numerator / denominator.unsqueeze(-1)  # (B, T, C)
    if weights is None:
        return per_channel.mean()
    return (per_channel.mean(dim=-1) * weights).sum(dim=-1).mean()


@DISTILL_METHOD_REGISTRY.register("MasKD")
class MasKD(AlignedFeatureLoss):
    """
    MasKD's stage-2 loss on one level, ``loss_maskd``:

    ``L = w * masked_feature_loss(T, f_align(S), m, p)`` (see :func:`masked_feature_loss`),
    with the frozen tokens of stage 1 (:class:`ReceptiveTokens`, loaded from
    ``MODEL.ACAMKD.MASKD.TOKENS``):

    - detection: ``m = masks(T)``, and after ``warmup_iters`` training calls
      ``m = masks(T) * masks(f_align(S))`` (student masks without gradient); weighted by
      ``p[n,t]`` of the teacher feature when ``weight_masks``; the mask sum is the plain
      normaliser; ``f_align`` is always a 1x1 conv (the authors' align modules);
    - segmentation logits (``form="segmentation"``): ``m = masks(T)``, normaliser
      ``sum_hw m + 1e-5``, mean over images, tokens and channels; no alignment where teacher
      and student have the same classes.

    The tokens get no gradient (``requires_grad`` False, so no optimizer ever sees them) and
    stay in eval mode; the student gets its gradient through ``f_align(S)``. The number of
    training calls is a buffer, so it is saved in the checkpoints and a resumed run goes on
    counting (the authors' counter restarts at 0).

    Out of scope: the authors' extra head losses of their detection results (L1 / SmoothL1 on
    the teacher's box regressions, on the student's RoIs for two-stage detectors), and the
    auxiliary-head logits (weight 0.4) of their ResNet segmentation students.
    """

    @configurable
    def __init__(
        self,
        *,
        teacher_channels: int,
        student_channels: int,
        num_tokens: int = 6,
        loss_weight: float = 1.0,
        warmup_iters: int = -1,
        weight_masks: bool = True,
        form: str = "detection",
        tokens: str = "",
        allow_random_tokens: bool = False,
    ) -> None:
        """
        Args:
            teacher_channels (int): Ct, also the tokens' width.
            student_channels (int): Cs.
            num_tokens (int): T, as in stage 1.
            loss_weight (float): w.
            warmup_iters (int): training calls before the student's masks multiply the
                teacher's; negative: never.
            weight_masks (bool): weigh the tokens by ``p[n,t]`` (as in stage 1).
            form (str): "detection" (FPN features) or "segmentation" (logits).
            tokens (str): stage 1's checkpoint, loaded by the checkpointer when a run starts.
            allow_random_tokens (bool): accept an empty ``tokens`` (random tokens; tests and
                smoke runs only).
        """
        if form not in _FORMS:
            raise ValueError(f"MasKD: form must be one of {_FORMS}, got {form!r}")
        if not tokens and not allow_random_tokens:
            raise ValueError(
                f"{_TOKENS_KEY} is empty: MasKD distils through receptive tokens learned on the "
                "teacher beforehand (its stage 1). Run stage 1 first, e.g. python train_net.py "
                f"--config-file {_STAGE1_EXAMPLE[form]} MODEL.ACAMKD.TEACHER.WEIGHTS "
                "<teacher checkpoint> (the maskd_tokens_*.yaml config of your teacher, "
                "META_ARCHITECTURE MasKDTokenLearner), then set "
                f"{_TOKENS_KEY} to the model_final.pth in its OUTPUT_DIR. ({_ALLOW_KEY} accepts "
                "random tokens, for tests and smoke runs only.)"
            )
        # The authors' align modules: a 1x1 conv for detection, none for same-width logits.
        super().__init__(teacher_channels, student_channels, align_always=form == "detection")
        self.loss_weight = loss_weight
        self.warmup_iters = warmup_iters
        self.form = form
        self.eps = _SEGMENTATION_EPS if form == "segmentation" else 0.0
        self.tokens = ReceptiveTokens(teacher_channels, num_tokens, weight_masks)
        self.tokens.requires_grad_(False)
        self.tokens.eval()
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        # Read by the checkpointer: the tokens come from stage 1's checkpoint, under the
        # learner's "tokens.<level>." keys.
        self.frozen_weights = FrozenWeights(
            path=tokens,
            key=_TOKENS_KEY,
            submodule="tokens",
            file_prefix="tokens.{level}.",
            what="MasKD's receptive tokens",
            allow_empty=allow_random_tokens,
            allow_key=_ALLOW_KEY,
            hint=(
                f"Give the model_final.pth of a MasKD stage-1 run (META_ARCHITECTURE "
                f"MasKDTokenLearner, e.g. {_STAGE1_EXAMPLE[form]}) on this teacher, with the "
                "distilled levels (MODEL.ACAMKD.IN_FEATURES) and MODEL.ACAMKD.MASKD.NUM_TOKENS "
                "and WEIGHT_MASKS of this run, or run stage 1 again with them."
            ),
        )

    @classmethod
    def from_config(cls, cfg: CfgNode, teacher_channels: int, student_channels: int) -> Dict:
        target = cfg.MODEL.ACAMKD.DISTILL_TARGET
        return {
            "teacher_channels": teacher_channels,
            "student_channels": student_channels,
            "num_tokens": family_setting(cfg, "MASKD", "NUM_TOKENS", _AUTHORS),
            "loss_weight": family_setting(cfg, "MASKD", "LOSS_WEIGHT", _AUTHORS),
            "warmup_iters": family_setting(cfg, "MASKD", "WARMUP_ITERS", _AUTHORS),
            "weight_masks": family_setting(cfg, "MASKD", "WEIGHT_MASKS", _AUTHORS),
            "form": "segmentation" if target == "sem_seg_logits" else "detection",
            "tokens": cfg.MODEL.ACAMKD.MASKD.TOKENS,
            "allow_random_tokens": cfg.MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT,
        }

    def train(self, mode: bool = True) -> "MasKD":
        """Like ``nn.Module.train``; the frozen tokens stay in eval mode."""
        super().train(mode)
        self.tokens.eval()
        return self

    @property
    def student_masks_on(self) -> bool:
        """Whether the student's masks multiply the teacher's (after the warm-up)."""
        return self.warmup_iters >= 0 and int(self.num_steps) >= self.warmup_iters

    @torch.no_grad()
    def token_masks(self, teacher: Tensor, aligned: Tensor) -> Tensor:
        """
        Args:
            teacher, aligned (Tensor): (B, C, H, W).

        Returns:
            Tensor: (B, T, H, W) the masks the loss uses: the teacher's, times the student's
            after the warm-up.
        """
        masks = self.tokens.masks(teacher)
        if self.student_masks_on:
            masks = masks * self.tokens.masks(aligned.detach())
        return masks

    def level_maps(self, teacher: Tensor, aligned: Tensor) -> Dict[str, Tensor]:
        """The frame's maps and "tokens" (B, T, H, W), the masks the loss uses."""
        maps = super().level_maps(teacher, aligned)
        maps["tokens"] = self.token_masks(teacher, aligned)
        return maps

    def level_losses(self, teacher: Tensor, aligned: Tensor) -> Tuple[Dict[str, Tensor], Dict]:
        """
        Returns:
            tuple: ``loss_maskd``; statistics ``token_mask_mean``, ``student_masks_on``
            (0 or 1) and, with the weights, ``token_weight_max`` (the mean largest ``p``).
        """
        student_masks = self.student_masks_on
        masks = self.token_masks(teacher, aligned)
        with torch.no_grad():
            weights = self.tokens.mask_weights(teacher) if self.tokens.weight_masks else None
        loss = masked_feature_loss(teacher, aligned, masks, weights, self.eps)
        if self.training and torch.is_grad_enabled():  # not the figures' no-grad passes
            with torch.no_grad():
                self.num_steps.add_(1)
        stats = {
            "token_mask_mean": masks.mean().detach(),
            "student_masks_on": torch.tensor(float(student_masks), device=teacher.device),
        }
        if weights is not None:
            stats["token_weight_max"] = weights.amax(dim=1).mean().detach()
        return {"loss_maskd": self.loss_weight * loss}, stats


@META_ARCH_REGISTRY.register()
class MasKDTokenLearner(nn.Module):
    """
    MasKD's stage 1: receptive tokens learned on a frozen teacher.

    A forward hook on the teacher's distilled output (its backbone's FPN levels for
    ``DISTILL_TARGET`` "fpn", its segmentation head's logits for "sem_seg_logits") replaces
    every distilled level ``F`` by ``sum_t p[n,t] m[n,t] F`` (``sum_t m[n,t] F`` without the
    weights), and the teacher's own forward computes its task losses on that: the tokens learn
    masks that keep what the teacher needs. Training returns those losses plus
    ``loss_maskd_dice``, ``DICE_WEIGHT`` times the Dice diversity of the masks summed over the
    levels; eval returns the teacher's predictions on the masked features, so the evaluator
    measures the masked teacher.

    The teacher gets no gradient, and its normalisation and dropout layers stay in eval mode
    (statistics frozen) while its heads run their training path. Only the tokens are trained.
    Building reads no weights: :class:`~acamkd.training.checkpointer.DistillationCheckpointer`
    loads the teacher from ``MODEL.ACAMKD.TEACHER.WEIGHTS`` (strictly: all of it is used) when
    a run starts, and its checkpoints hold the tokens, the teacher only as where it came from.
    Stage 2 reads the tokens from the ``tokens.<level>.`` keys of such a checkpoint.
    """

    @configurable
    def __init__(
        self,
        *,
        teacher: nn.Module,
        tokens: nn.ModuleDict,
        distill_target: str = "fpn",
        dice_weight: float = 1.0,
    ) -> None:
        """
        Args:
            teacher (nn.Module): a detectron2 meta-architecture, frozen here.
            tokens (nn.ModuleDict): level name ("p3", ..., or "logits") -> its
                :class:`ReceptiveTokens`.
            distill_target (str): "fpn" or "sem_seg_logits".
            dice_weight (float): weight of the Dice diversity loss.
        """
        super().__init__()
        if distill_target not in _FEATURE_MODULE:
            raise ValueError(
                f"MODEL.ACAMKD.DISTILL_TARGET={distill_target!r}; expected one of "
                f"{tuple(_FEATURE_MODULE)}"
            )
        if len(tokens) == 0:
            raise ValueError("MasKDTokenLearner: no level to learn tokens for")
        self.teacher = teacher
        self.tokens = tokens
        self.distill_target = distill_target
        self.dice_weight = dice_weight
        _check_learner_levels(teacher, list(tokens), distill_target)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.train(self.training)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict:
        tcfg = build_teacher_cfg(cfg)
        if tcfg.INPUT.FORMAT != cfg.INPUT.FORMAT:
            raise ValueError(
                f"The teacher takes {tcfg.INPUT.FORMAT} images but this config's data loader "
                f"gives {cfg.INPUT.FORMAT} (INPUT.FORMAT): stage 1 feeds the data straight to "
                "the teacher. Use the teacher's config as _BASE_ of the stage-1 config."
            )
        teacher = build_frozen_teacher(tcfg, teacher_weights_from_cfg(cfg))
        target = cfg.MODEL.ACAMKD.DISTILL_TARGET
        if target == "fpn":
            shapes = _fpn_shapes(teacher, cfg.MODEL.ACAMKD.TEACHER.CONFIG_FILE)
            levels = list(cfg.MODEL.ACAMKD.IN_FEATURES) or list(shapes)
            _check_learner_levels(teacher, levels, target)
            channels = {level: shapes[level].channels for level in levels}
        elif target == "sem_seg_logits":
            _check_learner_levels(teacher, [_LOGITS], target)
            channels = {_LOGITS: tcfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}
        else:
            raise ValueError(
                f"MODEL.ACAMKD.DISTILL_TARGET={target!r}; expected one of "
                f"{tuple(_FEATURE_MODULE)}"
            )
        num_tokens = family_setting(cfg, "MASKD", "NUM_TOKENS", _AUTHORS)
        weight_masks = family_setting(cfg, "MASKD", "WEIGHT_MASKS", _AUTHORS)
        tokens = nn.ModuleDict(
            {k: ReceptiveTokens(c, num_tokens, weight_masks) for k, c in channels.items()}
        )
        return {
            "teacher": teacher,
            "tokens": tokens,
            "distill_target": target,
            "dice_weight": cfg.MODEL.ACAMKD.MASKD.DICE_WEIGHT,
        }

    @property
    def device(self) -> torch.device:
        return self.teacher.device

    @property
    def teacher_weights(self) -> Optional[TeacherWeights]:
        """Where the checkpointer loads the teacher from (see ``ACAMDistiller``)."""
        return getattr(self.teacher, "acamkd_weights", None)

    @property
    def teacher_parts_used(self) -> Tuple[str, ...]:
        """The whole teacher (""): its heads compute the loss the tokens learn from."""
        return ("",)

    def train(self, mode: bool = True) -> "MasKDTokenLearner":
        """
        Like ``nn.Module.train``; in training the teacher's normalisation and dropout layers
        stay in eval mode, the rest of it in training mode so that it returns its losses.
        """
        super().train(mode)
        for m in self.teacher.modules():
            if isinstance(m, _EVAL_MODE_LAYERS):
                m.eval()
        return self

    def forward(self, batched_inputs: List[Dict[str, object]]):
        """
        Args:
            batched_inputs (list[dict]): detectron2's per-image dicts, as for the teacher.

        Returns:
            In training, dict[str, Tensor]: the teacher's task losses on the masked features
            and ``loss_maskd_dice``. In eval, the teacher's predictions on them.
        """
        dice: Dict[str, Tensor] = {}
        coverage: Dict[str, Tensor] = {}

        def mask_levels(_module, _inputs, output):
            features = output if isinstance(output, dict) else {_LOGITS: output}
            masked = dict(features)
            for level, tokens in self.tokens.items():
                masked[level], masks = tokens.masked_feature(features[level])
                if self.training:
                    dice[level] = dice_diversity(masks.float())
                    coverage[level] = masks.detach().float().mean()
            return masked if isinstance(output, dict) else masked[_LOGITS]

        module = self.teacher.get_submodule(_FEATURE_MODULE[self.distill_target])
        handle = module.register_forward_hook(mask_levels)
        try:
            outputs = self.teacher(batched_inputs)
        finally:
            handle.remove()
        if not self.training:
            return outputs
        losses = dict(outputs)
        losses["loss_maskd_dice"] = self.dice_weight * sum(dice.values())
        storage = current_storage()
        if storage is not None:
            scalars = {f"maskd/{k}/dice": float(v.detach()) for k, v in dice.items()}
            scalars.update({f"maskd/{k}/token_mask_mean": float(v) for k, v in coverage.items()})
            storage.put_scalars(**scalars)
        return losses


def _fpn_shapes(teacher: nn.Module, config: str) -> Dict:
    backbone = getattr(teacher, "backbone", None)
    if backbone is None or not hasattr(backbone, "output_shape"):
        raise ValueError(
            f"The teacher ({type(teacher).__name__}, {config!r}) has no backbone with FPN "
            "levels: MODEL.ACAMKD.DISTILL_TARGET 'fpn' needs a detector teacher."
        )
    return backbone.output_shape()


def _check_learner_levels(teacher: nn.Module, levels: List[str], target: str) -> None:
    """Every level exists in the teacher's distilled output."""
    if target == "sem_seg_logits":
        predictor = getattr(getattr(teacher, "sem_seg_head", None), "predictor", None)
        if predictor is None or levels != [_LOGITS]:
            raise ValueError(
                f"MODEL.ACAMKD.DISTILL_TARGET 'sem_seg_logits' learns tokens on the logits of "
                f"a semantic segmentor's head (sem_seg_head.predictor); the teacher is a "
                f"{type(teacher).__name__} and the levels are {levels}. Use 'fpn' for a detector."
            )
        return
    shapes = _fpn_shapes(teacher, "")
    missing = [level for level in levels if level not in shapes]
    if missing:
        raise ValueError(
            f"FPN levels {missing} (MODEL.ACAMKD.IN_FEATURES) are not outputs of the teacher's "
            f"backbone, whose levels are {sorted(shapes)}."
        )
