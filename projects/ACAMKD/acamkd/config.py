"""Config keys of ACAM-KD, all under ``MODEL.ACAMKD``.

Every reading the paper leaves open is a key here (``docs/METHOD.md`` lists them with their
defaults and how each was chosen), so the other reading can be run from YAML or the command
line. Shared detectron2 defaults (INPUT, SOLVER, RESNETS, ...) are never changed here; that
belongs in the YAML files under ``configs/``.
"""

import os

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["REPO_ROOT", "add_acamkd_config", "get_acamkd_cfg"]

# The repository root when the package is installed in editable mode (projects/ACAMKD/acamkd):
# config paths such as "configs/COCO-Detection/..." resolve against it, and train_net.py is in it.
REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
)


def get_acamkd_cfg() -> CN:
    """detectron2's default config with the DeepLab, RepPoints and ``MODEL.ACAMKD`` keys."""
    # Imported here: the model parts import this module, and the DeepLab project is only
    # needed once a config is made.
    from detectron2.projects.deeplab import add_deeplab_config

    from .modeling.meta_arch.reppoints import add_reppoints_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_reppoints_config(cfg)
    add_acamkd_config(cfg)
    return cfg


def add_acamkd_config(cfg: CN) -> None:
    """Add the ``MODEL.ACAMKD`` node to ``cfg`` in place (idempotent)."""
    if "ACAMKD" in cfg.MODEL:
        return
    _C = cfg
    _C.MODEL.ACAMKD = CN()

    # Meta-architecture of the student (the rest of this config describes the student):
    # "RetinaNet", "GeneralizedRCNN", "FCOS" or "SemanticSegmentor".
    _C.MODEL.ACAMKD.STUDENT_META_ARCHITECTURE = "RetinaNet"
    # Where to distil: "fpn" (every FPN level shared by teacher and student, detection) or
    # "sem_seg_logits" (the segmentation head's logits, before upsampling).
    _C.MODEL.ACAMKD.DISTILL_TARGET = "fpn"
    # FPN levels to distil; empty means every level the two FPNs share (RetinaNet/FCOS p3-p7,
    # Faster R-CNN p2-p6). Ignored for "sem_seg_logits".
    _C.MODEL.ACAMKD.IN_FEATURES = []
    # For "sem_seg_logits": when teacher and student logits have different strides, both are
    # bilinearly resampled to the grid of "teacher" or "student".
    _C.MODEL.ACAMKD.LOGITS_GRID = "student"

    _C.MODEL.ACAMKD.TEACHER = CN()
    # The teacher's own config: a file path or a detectron2 model-zoo name such as
    # "COCO-Detection/retinanet_R_101_FPN_3x.yaml".
    _C.MODEL.ACAMKD.TEACHER.CONFIG_FILE = ""
    # Overrides applied to the teacher's config, as a flat KEY VALUE list.
    _C.MODEL.ACAMKD.TEACHER.OPTS = []
    # The teacher's weights: a local path, a detectron2:// or an https:// URL.
    # MODEL.WEIGHTS initialises the student only.
    _C.MODEL.ACAMKD.TEACHER.WEIGHTS = ""
    # Allow an empty TEACHER.WEIGHTS (a randomly initialised teacher). Only for tests and
    # smoke runs: distilling from a random teacher is almost never what a user wants.
    _C.MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT = False
    # The checkpointer loads TEACHER.WEIGHTS when a run starts, and again when a run resumes
    # (a distiller checkpoint records the file's SHA-256, not the teacher; a file of other
    # content is refused). True: every tensor distillation reads
    # (the teacher's backbone with its FPN; also its sem_seg_head for "sem_seg_logits"; the
    # whole teacher with INHERIT_TEACHER) must load with its shape, else the run stops with
    # the missing and mis-shaped keys. False: they are only logged, and those tensors keep
    # their random init. Keys of the file the teacher lacks (e.g. a mask head) are logged.
    _C.MODEL.ACAMKD.TEACHER.STRICT = True

    # Paper's "inheritance strategy": the student starts from the teacher's FPN and head
    # weights wherever the shapes match (the log lists what was copied and what was skipped).
    _C.MODEL.ACAMKD.INHERIT_TEACHER = False

    # The distillation method on every distilled level: "ACAMKD" (this project's method; its
    # keys follow below), "MSE" (plain feature MSE, LOSS_WEIGHT and ALIGN apply), or a rival:
    # "FGD", "MGD", "CWD", "PKD", "MasKD" (keys under their own nodes below), or any name
    # registered in acamkd.modeling.methods.DISTILL_METHOD_REGISTRY. A rival's keys left at None
    # take its authors' value for the student's family (STUDENT_META_ARCHITECTURE).
    _C.MODEL.ACAMKD.METHOD = "ACAMKD"

    # FGD (focal and global distillation). Authors' values, temp/alpha/beta/gamma/lambda:
    # RetinaNet 0.5/1e-3/5e-4/5e-4/5e-6; GeneralizedRCNN 0.5/5e-5/2.5e-5/5e-5/5e-7;
    # FCOS 0.8/1.6e-3/8e-4/8e-4/8e-6; RepPoints 0.5/1.6e-3/8e-4/8e-4/8e-6. Detection only.
    _C.MODEL.ACAMKD.FGD = CN()
    # Temperature of the spatial and channel attention.
    _C.MODEL.ACAMKD.FGD.TEMP = None
    # Weights of the foreground, background, attention and global losses.
    _C.MODEL.ACAMKD.FGD.ALPHA = None
    _C.MODEL.ACAMKD.FGD.BETA = None
    _C.MODEL.ACAMKD.FGD.GAMMA = None
    _C.MODEL.ACAMKD.FGD.LAMBDA = None
    # How boxes map onto a level's grid: "unpadded" (the authors' code: scaled by the grid's
    # size over the image's size before padding, so boxes stretch by the padding ratio) or
    # "stride" (divided by the level's stride, the geometric mapping).
    _C.MODEL.ACAMKD.FGD.BOX_MAPPING = "unpadded"

    # MGD (masked generative distillation). Authors' values: alpha 2e-5 and mask ratio 0.65
    # (RetinaNet, RepPoints; FCOS has no config of theirs and takes RetinaNet's),
    # 5e-7 and 0.45 (GeneralizedRCNN), 2e-5 and 0.75 (segmentation).
    _C.MODEL.ACAMKD.MGD = CN()
    # Weight of the generation loss.
    _C.MODEL.ACAMKD.MGD.ALPHA = None
    # Fraction of the student's positions zeroed before generation (redrawn every step).
    _C.MODEL.ACAMKD.MGD.MASK_RATIO = None

    # CWD (channel-wise distillation). Authors' values: tau 1, weight 5 (detection, FPN
    # features); tau 4, weight 3 (segmentation logits).
    _C.MODEL.ACAMKD.CWD = CN()
    # Temperature of the per-channel softmax over positions.
    _C.MODEL.ACAMKD.CWD.TAU = None
    # Loss weight (the loss is multiplied by tau^2 as well).
    _C.MODEL.ACAMKD.CWD.WEIGHT = None

    # PKD (Pearson correlation distillation). Authors' weight: 6 (GeneralizedRCNN), 10
    # (RetinaNet, FCOS, RepPoints; also used for segmentation, which has no config of theirs).
    # Their configs distil p2-p5 / p3-p6 only: set IN_FEATURES to match.
    _C.MODEL.ACAMKD.PKD = CN()
    _C.MODEL.ACAMKD.PKD.WEIGHT = None

    # MasKD (receptive tokens learned on the teacher, then frozen as distillation masks).
    # Stage 1 is its own run (META_ARCHITECTURE "MasKDTokenLearner", its teacher under TEACHER,
    # its family under STUDENT_META_ARCHITECTURE, e.g. configs/*/maskd_tokens_*.yaml); stage 2
    # distils with METHOD "MasKD" and TOKENS pointing at stage 1's checkpoint. NUM_TOKENS and
    # WEIGHT_MASKS must resolve alike in both stages.
    _C.MODEL.ACAMKD.MASKD = CN()
    # Number of receptive tokens per level (authors: 6 for detection, 8 for segmentation).
    _C.MODEL.ACAMKD.MASKD.NUM_TOKENS = None
    # Stage 2: weight of the masked loss (authors: RetinaNet 7, GeneralizedRCNN 1, FCOS and
    # RepPoints 10; segmentation 0.5).
    _C.MODEL.ACAMKD.MASKD.LOSS_WEIGHT = None
    # Stage 2: after this many training steps the masks become masks(T) * masks(S) (student
    # masks without gradient); authors: RetinaNet 7000, GeneralizedRCNN 7330, FCOS and
    # RepPoints 5000; segmentation never (a negative value). The count is saved in the
    # checkpoints: a resumed run goes on counting.
    _C.MODEL.ACAMKD.MASKD.WARMUP_ITERS = None
    # Weigh each token's loss by a softmax over tokens computed from the teacher feature
    # (authors: detection True, segmentation False).
    _C.MODEL.ACAMKD.MASKD.WEIGHT_MASKS = None
    # Stage 2: the stage-1 checkpoint holding the learned tokens (a local path or URL). Loaded
    # strictly by the checkpointer when a run starts; its SHA-256 is recorded and checked on
    # resume, as the teacher's (the tokens then come from the checkpoint). Empty is refused
    # unless TEACHER.ALLOW_RANDOM_INIT (random tokens, tests and smoke runs only).
    _C.MODEL.ACAMKD.MASKD.TOKENS = ""
    # Stage 1: weight of the Dice diversity loss of the tokens' masks.
    _C.MODEL.ACAMKD.MASKD.DICE_WEIGHT = 1.0

    # The paper's ablation rows. Which masks weight the feature loss: "spatial_channel"
    # (ACAM-KD), "spatial" or "channel" (only that loss and the Dice loss of those masks), or
    # "none" (the "no mask" row: plain MSE ||D||^2 / (C*H*W) per level, no STCA-FF or ASCM
    # parameters, no diversity loss).
    _C.MODEL.ACAMKD.MASKS = "spatial_channel"
    # What the masks are computed from: "fused" (ACAM-KD: the STCA-FF fusion of teacher and
    # student) or "teacher" (the "teacher adaptive" row: the teacher feature alone, no STCA-FF,
    # masks still learned online with the same losses).
    _C.MODEL.ACAMKD.MASK_SOURCE = "fused"
    # Number M of spatial and of channel masks (paper: 6 for detection, 19 for segmentation).
    _C.MODEL.ACAMKD.NUM_MASKS = 6
    # STCA-FF query source: "teacher" (paper default: Q from the teacher, K and V from the
    # student) or "student" (Q from the student, K and V from the teacher; paper Table 9).
    _C.MODEL.ACAMKD.QUERY_SOURCE = "teacher"
    # Width of the query/key projections as a fraction of C (C_q = C/2 in the paper).
    _C.MODEL.ACAMKD.QUERY_CHANNEL_RATIO = 0.5
    # Channel-mask form: "scalar" (literal: m_c in R^{M x 1}, one weight per mask) or
    # "per_channel" (m_c in R^{M x C}, elementwise).
    _C.MODEL.ACAMKD.CHANNEL_MASK_FORM = "scalar"
    # Detach the student's feature where it enters the mask branch (STCA-FF), so the student
    # gets gradient only through the difference term. Not stated in the paper.
    _C.MODEL.ACAMKD.DETACH_STUDENT_IN_MASKS = False
    # How the mask generator treats the masked feature losses: "descend" (literal: minimise
    # them) or "ascend" (gradient reversal on the masks: masks seek where the student lags).
    # The Dice diversity loss is minimised either way. See docs/METHOD.md, "Known risk".
    _C.MODEL.ACAMKD.MASK_OBJECTIVE = "descend"
    # Normaliser of the masked losses: "sum_sq" (the mask's sum of squares: the loss does not
    # shrink with the masks' scale) or "sum" (its plain sum, as in MasKD; the literal reading,
    # whose masks collapse). Chosen by the objective study, 3 seeds: see docs/METHOD.md. With
    # masks near 0.5 (at the start) sum_sq's losses are twice sum's: the same LOSS_WEIGHT
    # weighs twice as much (unclipped, halve it when moving a config tuned under sum).
    _C.MODEL.ACAMKD.NORMALIZER = "sum_sq"
    # This project's own reading, not the paper's: 0 keeps the paper's sigmoid masks; a value
    # in (0, 1) shifts each mask, per image, so that it averages this much over what it covers
    # (positions or channels). The masks can then neither vanish nor cover everything; with
    # MASK_OBJECTIVE ascend they spend that budget where the student lags most.
    # See docs/METHOD.md, "A reading of this project's own".
    _C.MODEL.ACAMKD.MASK_BUDGET = 0.0
    # Masks the Dice diversity loss acts on: "both" (spatial and channel) or "spatial".
    _C.MODEL.ACAMKD.DIVERSITY_TARGETS = "both"
    # Student alignment f_align (1x1 conv, student -> teacher channels): "always" (default) or
    # "when_needed" (only where the widths differ; identity otherwise).
    _C.MODEL.ACAMKD.ALIGN = "always"
    # alpha: weight of the masked feature losses (channel + spatial).
    _C.MODEL.ACAMKD.LOSS_WEIGHT = 1.0
    # lambda: weight of the Dice diversity loss.
    _C.MODEL.ACAMKD.DIVERSITY_WEIGHT = 1.0
    # Standard deviation of the normal init of the mask selection units m_s, m_c
    # (small, so every mask starts near 0.5).
    _C.MODEL.ACAMKD.MASK_INIT_STD = 0.01
    # Added to the Dice denominator for numerical safety.
    _C.MODEL.ACAMKD.DICE_EPS = 1e-6
    # How STCA-FF computes its attention; all three give the same result (docs/METHOD.md,
    # "Computing the attention"): "chunked" (one head over chunks of queries, reading the
    # fused feature only as ASCM does, without forming it; fastest on the CPU), "sdpa" (the
    # fused scaled_dot_product_attention kernels, the value split into C_q-wide heads; fastest on
    # CUDA) or "auto" ("chunked" on the CPU, "sdpa" elsewhere).
    _C.MODEL.ACAMKD.ATTENTION = "auto"

    # ---- Semantic-segmentation student parts (modeling/backbone, modeling/heads) ----
    # The timm MobileNetV2 backbone of the DeepLabV3-MobileNetV2 student
    # (MODEL.BACKBONE.NAME "build_mobilenetv2_backbone"); MODEL.BACKBONE.FREEZE_AT applies.
    _C.MODEL.ACAMKD.MOBILENETV2 = CN()
    # timm model name of the variant: "mobilenetv2_100" (width 1.0), "mobilenetv2_140", ...
    _C.MODEL.ACAMKD.MOBILENETV2.NAME = "mobilenetv2_100"
    # Features to return, among "res2".."res5" (the last block of nominal stride 4/8/16/32;
    # "res5" has 320 channels at width 1.0).
    _C.MODEL.ACAMKD.MOBILENETV2.OUT_FEATURES = ["res5"]
    # Output stride 8, 16 or 32: the stages past it are dilated instead of strided.
    _C.MODEL.ACAMKD.MOBILENETV2.OUTPUT_STRIDE = 8
    # Normalisation: "BN", "SyncBN" or "FrozenBN".
    _C.MODEL.ACAMKD.MOBILENETV2.NORM = "BN"
    # Local path of a state dict of the timm model, saved with torch.save (e.g. its ImageNet
    # weights); the classifier keys are ignored. "" keeps the random init. Nothing is
    # downloaded. MODEL.WEIGHTS, loaded after, still overrides it.
    _C.MODEL.ACAMKD.MOBILENETV2.WEIGHTS = ""

    # PSPNet's pyramid pooling head (MODEL.SEM_SEG_HEAD.NAME "PSPHead"); the rest of its
    # settings are MODEL.SEM_SEG_HEAD's (IN_FEATURES, NUM_CLASSES, CONVS_DIM, ...).
    _C.MODEL.ACAMKD.PSP = CN()
    # Output grid sizes of the pyramid's adaptive average pools (the paper's 1, 2, 3, 6).
    _C.MODEL.ACAMKD.PSP.POOL_SCALES = [1, 2, 3, 6]
    # Dropout probability before the classifier.
    _C.MODEL.ACAMKD.PSP.DROPOUT = 0.1
    # ---- end of the semantic-segmentation student parts ----
