"""
ACAM-KD on Cityscapes: DeepLabV3-R101 (output stride 8) -> DeepLabV3-R18 (output stride 8),
40k iterations. Paper: 72.96 -> 77.53 mIoU (teacher 78.07).

detectron2's LazyConfig pieces have no DeepLab backbones (they exist only as YAML builders), so
teacher and student are built from this folder's YAML model files; data, optimizer and
schedule are written out here, as in Base-Cityscapes-Semantic-40k.yaml: 512x1024 crops of
images rescaled by 0.5-2.0, batch 16, SGD lr 0.02, momentum 0.9, weight decay 5e-4, poly LR
(power 0.9), no warm-up. ACAM distils the logits (19 classes, 19 masks) on the student's grid.
No public teacher checkpoint: train deeplabv3_R_101_OS8.yaml first and pass it with
model.teacher.weights=/path/to/model_final.pth.
"""

from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from acamkd.lazy import (
    build_acam_levels,
    build_dataset_evaluator,
    build_lazy_teacher,
    build_yaml_model,
)
from acamkd.modeling import ACAMDistiller

model = L(ACAMDistiller)(
    student=L(build_yaml_model)(
        config="configs/Cityscapes-SemanticSegmentation/deeplabv3_R_18_OS8.yaml"
    ),
    teacher=L(build_lazy_teacher)(
        config="configs/Cityscapes-SemanticSegmentation/deeplabv3_R_101_OS8.yaml", weights=""
    ),
    acam=L(build_acam_levels)(
        levels=["logits"], teacher_channels=19, student_channels=19, num_masks=19
    ),
    distill_target="sem_seg_logits",
    student_input_format="${..dataloader.train.mapper.image_format}",
    teacher_input_format="RGB",  # INPUT.FORMAT of the teacher's YAML
    logits_grid="student",
)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="cityscapes_fine_sem_seg_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length=(512, 2048), max_size=4096, sample_style="range"
            ),
            L(T.RandomCrop_CategoryAreaConstraint)(
                crop_type="absolute",
                crop_size=(512, 1024),
                single_category_max_area=1.0,
                ignored_category=255,
            ),
            L(T.RandomFlip)(),
        ],
        image_format="RGB",
    ),
    total_batch_size=16,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="cityscapes_fine_sem_seg_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=1024, max_size=2048)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)
dataloader.evaluator = L(build_dataset_evaluator)(
    dataset_name="${..test.dataset.names}", output_dir="${...train.output_dir}"
)

optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.lr = 0.02
optimizer.weight_decay = 5e-4

lr_multiplier = L(PolynomialDecayParamScheduler)(base_value=1.0, power=0.9)

train = model_zoo.get_config("common/train.py").train
# This project's key beside detectron2's train.*: iterations between TensorBoard figures of a
# distiller's masks (VIS_PERIOD in a YAML config); 0: none.
train.vis_period = 0
train.max_iter = 40000
train.checkpointer.period = 4000
train.eval_period = 4000
