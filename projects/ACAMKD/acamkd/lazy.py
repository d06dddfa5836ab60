"""
What a LazyConfig ``.py`` file needs from this project, beside ``ACAMDistiller`` itself:

    model = L(ACAMDistiller)(
        student=<a detectron2 model node, e.g. model_zoo.get_config(...).model>,
        teacher=L(build_lazy_teacher)(config="COCO-Detection/retinanet_R_101_FPN_3x.yaml",
                                      weights="detectron2://..."),
        acam=L(build_acam_levels)(levels=["p3", ..., "p7"], teacher_channels=256,
                                  student_channels=256, num_masks=6),
        # or another method: L(build_acam_levels)(..., method="FGD", temp=0.5, alpha=1e-3, ...)
    )

Every builder here takes plain typed values (no lambdas, no built modules), so a config saved
with ``LazyConfig.save`` loads back equal, and every value can be overridden from the command
line (``model.acam.num_masks=4``, ``model.teacher.weights=/path/model.pkl``).
"""

from typing import Mapping, Sequence, Union

from omegaconf import DictConfig
from torch import nn

from detectron2.evaluation import DatasetEvaluator
from detectron2.modeling import build_model

from .config import get_acamkd_cfg
from .modeling.methods import DISTILL_METHOD_REGISTRY, method_names
from .modeling.teacher import build_lazy_teacher, resolve_config_file
from .training.evaluation import build_evaluator

__all__ = [
    "build_acam_levels",
    "build_dataset_evaluator",
    "build_lazy_teacher",
    "build_yaml_model",
]


def build_acam_levels(
    levels: Sequence[str],
    teacher_channels: Union[int, Mapping[str, int]],
    student_channels: Union[int, Mapping[str, int]],
    method: str = "ACAMKD",
    **method_kwargs,
) -> nn.ModuleDict:
    """
    One module of the distillation ``method`` per distilled level (an :class:`ACAMLevel` by
    default), the ``acam`` argument of ``ACAMDistiller``.

    Args:
        levels (list[str]): the level names: FPN levels ("p3", ..., "p7"; in a config e.g.
            "${..student.head_in_features}") or ["logits"] for "sem_seg_logits".
        teacher_channels (int or dict[str, int]): the teacher's channels, for every level or
            per level (FPN width, or the number of classes for logits).
        student_channels (int or dict[str, int]): the same for the raw student feature.
        method (str): a name of ``DISTILL_METHOD_REGISTRY`` ("ACAMKD", "MSE", "FGD", "MGD",
            "CWD", "PKD", "MasKD", or one registered by the user).
        method_kwargs: every other keyword of the method's class (for ACAM-KD num_masks,
            query_source, mask_objective, loss_weight, ...), the same for every level.

    Returns:
        nn.ModuleDict: level name -> the method's module, in the order of ``levels``.
    """
    levels = [str(level) for level in levels]
    if not levels:
        raise ValueError("build_acam_levels: `levels` is empty, nothing would be distilled.")

    def per_level(channels, who: str) -> dict:
        if isinstance(channels, (Mapping, DictConfig)):
            missing = [level for level in levels if level not in channels]
            if missing:
                raise ValueError(f"build_acam_levels: no {who}_channels for levels {missing}")
            return {level: int(channels[level]) for level in levels}
        return {level: int(channels) for level in levels}

    if method not in DISTILL_METHOD_REGISTRY:
        raise ValueError(
            f"build_acam_levels: method={method!r} is not a registered distillation method; "
            f"the registered ones are {method_names()}."
        )
    cls = DISTILL_METHOD_REGISTRY.get(method)
    ct, cs = per_level(teacher_channels, "teacher"), per_level(student_channels, "student")
    return nn.ModuleDict(
        {
            level: cls(teacher_channels=ct[level], student_channels=cs[level], **method_kwargs)
            for level in levels
        }
    )


def build_yaml_model(config: str, overrides: Sequence[str] = ()) -> nn.Module:
    """
    A model built from a YAML config, for a LazyConfig whose parts exist only as YAML builders
    (e.g. the DeepLab backbones): ``student=L(build_yaml_model)(config="...yaml")``. It is
    built on the CPU and its MODEL.WEIGHTS are not loaded: ``train.init_checkpoint`` is.

    Args:
        config (str): a path (absolute, or relative to the working directory or this
            repository) or a detectron2 model-zoo name.
        overrides (list[str]): a flat KEY VALUE list merged after the file.

    Returns:
        nn.Module: the model, randomly initialised (plus what its builders load themselves).
    """
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(resolve_config_file(config, key="build_yaml_model(config=...)"))
    cfg.merge_from_list(list(overrides))
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return build_model(cfg)


def build_dataset_evaluator(dataset_name: str, output_dir: str = "./output") -> DatasetEvaluator:
    """
    The evaluator of ``dataset_name`` by its ``evaluator_type`` (COCO, Cityscapes, semantic
    segmentation), as the YAML path chooses it; COCO's uses the C++ COCOeval only where
    detectron2's compiled ops load.

    Args:
        dataset_name (str): a registered dataset (or a list holding exactly one).
        output_dir (str): results go to ``{output_dir}/inference/{dataset_name}``.

    Returns:
        DatasetEvaluator: the evaluator.
    """
    if not isinstance(dataset_name, str):
        names = list(dataset_name)
        if len(names) != 1:
            raise ValueError(
                f"build_dataset_evaluator evaluates one dataset, got {names}: give one name."
            )
        dataset_name = names[0]
    return build_evaluator(dataset_name, output_dir)
