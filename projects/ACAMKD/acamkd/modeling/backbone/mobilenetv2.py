"""MobileNetV2 backbone (timm) with detectron2's ``Backbone`` interface, dilated to a chosen
output stride, for the DeepLabV3-MobileNetV2 student of the Cityscapes experiments."""

import os
from typing import Dict, List, Sequence

import timm
import torch
from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d

from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["MobileNetV2Backbone", "build_mobilenetv2_backbone"]

# detectron2's feature names by nominal stride: "res{k}" is the output of the last block of
# stride 2**k (before dilation), the names the heads' IN_FEATURES already use for a ResNet.
_FEATURE_NAMES = ("res1", "res2", "res3", "res4", "res5")
_NORMS = ("BN", "SyncBN", "FrozenBN")
# Parameters of timm's classification model that the feature extractor does not have.
_CLASSIFIER_PREFIXES = ("conv_head.", "bn2.", "classifier.")


class MobileNetV2Backbone(Backbone):
    """A timm MobileNetV2 feature extractor returning detectron2-named features.

    The stages past ``output_stride`` keep their resolution and are dilated instead (timm's
    ``output_stride``), so "res5" of MobileNetV2 at output stride 8 lies on the stride-8 grid
    with 320 channels, as the DeepLabV3 head of a dilated ResNet expects.
    """

    @configurable
    def __init__(
        self,
        *,
        model_name: str = "mobilenetv2_100",
        out_features: Sequence[str] = ("res5",),
        output_stride: int = 8,
        in_chans: int = 3,
        norm: str = "BN",
        weights: str = "",
        freeze_at: int = 0,
    ):
        """
        Args:
            model_name (str): a timm MobileNetV2 variant, e.g. "mobilenetv2_100".
            out_features (list[str]): features to return, among "res2".."res5".
            output_stride (int): 8, 16 or 32; the stride of the deepest feature.
            in_chans (int): input channels.
            norm (str): "BN", "SyncBN" or "FrozenBN" for every normalisation layer.
            weights (str): local path of a state dict of the timm model (a full classification
                checkpoint is accepted: its head is ignored); "" keeps the random init.
            freeze_at (int): as detectron2's ``ResNet.freeze``: 0 trains everything, 1 freezes
                the stem (every layer before the stride-4 stage), k >= 2 also "res2".."res{k}".
        """
        super().__init__()
        unknown = [f for f in out_features if f not in _FEATURE_NAMES[1:]]
        if not out_features or unknown:
            raise ValueError(
                f"MobileNetV2 out_features must be a non-empty subset of {_FEATURE_NAMES[1:]}, "
                f"got {list(out_features)}"
            )
        if output_stride not in (8, 16, 32):
            raise ValueError(f"MobileNetV2 output_stride must be 8, 16 or 32, got {output_stride}")
        if norm not in _NORMS:
            raise ValueError(f"MobileNetV2 norm must be one of {_NORMS}, got {norm!r}")

        # pretrained=False: weights never come from the network, only from `weights` below.
        body = timm.create_model(
            model_name,
            pretrained=False,
            features_only=True,
            output_stride=output_stride,
            in_chans=in_chans,
        )
        infos = body.feature_info.get_dicts()
        self._feature_index = {name: i for i, name in enumerate(_FEATURE_NAMES)}
        # timm's "stage" of a feature is the number of blocks up to and including it.
        self._num_blocks = {name: info["stage"] for name, info in zip(_FEATURE_NAMES, infos)}
        # Drop the blocks after the last requested feature: they would cost compute and hold
        # parameters without gradient (which DistributedDataParallel rejects).
        last = max(self._num_blocks[f] for f in out_features)
        body.blocks = body.blocks[:last]
        self.body = body
        if weights:
            self._load_weights(weights)

        self._out_features = list(out_features)
        self._out_feature_channels = {
            name: infos[self._feature_index[name]]["num_chs"] for name in out_features
        }
        # timm reports the stride after dilation, e.g. 8 for "res5" at output stride 8.
        self._out_feature_strides = {
            name: infos[self._feature_index[name]]["reduction"] for name in out_features
        }

        if norm == "SyncBN":
            self.body = convert_sync_batchnorm(self.body)
        elif norm == "FrozenBN":
            self.body = freeze_batch_norm_2d(self.body)
        self.freeze(freeze_at)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> Dict:
        c = cfg.MODEL.ACAMKD.MOBILENETV2
        return {
            "model_name": c.NAME,
            "out_features": c.OUT_FEATURES,
            "output_stride": c.OUTPUT_STRIDE,
            "in_chans": input_shape.channels,
            "norm": c.NORM,
            "weights": c.WEIGHTS,
            "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x (Tensor): (N, C, H, W) images.

        Returns:
            dict[str->Tensor]: for each name in ``out_features``, the feature
            (N, C_name, ceil(H / s), ceil(W / s)) at stride s = ``output_shape()[name].stride``.
        """
        feats: List[torch.Tensor] = self.body(x)
        return {name: feats[self._feature_index[name]] for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        # Padding to the coarsest stride makes every feature map tile the input exactly, so a
        # head that upsamples by its stride returns logits of the (padded) input size.
        return max(self._out_feature_strides.values())

    def freeze(self, freeze_at: int = 0) -> "MobileNetV2Backbone":
        """Freeze the stem and the first stages, as detectron2's ``ResNet.freeze``.

        Args:
            freeze_at (int): 0 freezes nothing, 1 the stem (``conv_stem``, ``bn1`` and the
                stride-2 block), k >= 2 also the stages "res2".."res{k}". Frozen layers get
                ``requires_grad=False`` and frozen batch norms.

        Returns:
            MobileNetV2Backbone: self.
        """
        if freeze_at <= 0:
            return self
        num_blocks = self._num_blocks[_FEATURE_NAMES[min(freeze_at, len(_FEATURE_NAMES)) - 1]]
        body = self.body
        body.bn1 = freeze_batch_norm_2d(body.bn1)
        for i in range(min(num_blocks, len(body.blocks))):
            body.blocks[i] = freeze_batch_norm_2d(body.blocks[i])
        frozen = [body.conv_stem, body.bn1] + list(body.blocks[:num_blocks])
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        return self

    def _load_weights(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"MODEL.ACAMKD.MOBILENETV2.WEIGHTS: no file at {path!r} (expected a state dict "
                f"of timm's MobileNetV2 saved with torch.save)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(
                f"MODEL.ACAMKD.MOBILENETV2.WEIGHTS: {path!r} is not a flat state dict of tensors"
            )
        own = self.body.state_dict()
        num_kept = len(self.body.blocks)

        def unused_by_design(key: str) -> bool:
            # The classifier and the blocks dropped after the last requested feature.
            if key.startswith(_CLASSIFIER_PREFIXES):
                return True
            parts = key.split(".")
            return parts[0] == "blocks" and int(parts[1]) >= num_kept

        state = {k: v for k, v in state.items() if not unused_by_design(k)}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mismatched = sorted(
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in set(own) & set(state)
            if state[k].shape != own[k].shape
        )
        if missing or unexpected or mismatched:
            raise ValueError(
                f"MODEL.ACAMKD.MOBILENETV2.WEIGHTS: {path!r} does not fit the backbone: "
                f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
                f"{unexpected[:5]}, {len(mismatched)} shape mismatches {mismatched[:5]}"
            )
        self.body.load_state_dict(state)


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> MobileNetV2Backbone:
    """Build a :class:`MobileNetV2Backbone` from ``cfg.MODEL.ACAMKD.MOBILENETV2``.

    Args:
        cfg (CfgNode): a config with ``add_acamkd_config`` applied.
        input_shape (ShapeSpec): the input image shape (its channels are used).

    Returns:
        MobileNetV2Backbone: the backbone.
    """
    return MobileNetV2Backbone(cfg, input_shape)
