"""The teacher's weights: loaded by the checkpointer, never while the model is built, and
strictly: a checkpoint in which a tensor distillation uses is missing or has another shape is
refused with its keys named (MODEL.ACAMKD.TEACHER.STRICT / model.teacher.strict relax it)."""

import os
import pickle

import pytest
import torch

from detectron2.modeling import build_model

from acamkd import DistillationCheckpointer, get_acamkd_cfg
from acamkd.lazy import build_lazy_teacher
from acamkd.modeling.teacher import build_teacher_cfg
from acamkd.training.teacher_weights import TeacherWeightsError, load_teacher_weights

from tiny_models import REPO, distill_cfg
from troubleshooting import assert_documented

STREETS_SEG = os.path.join(REPO, "configs", "Streets-SemanticSegmentation")


# Tiny models: one thread is as fast, and far faster when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def _text(messages: list) -> str:
    return "\n".join(messages)


def _detection_cfg(weights: str, *, depth: int = 18, extra=()):
    """A tiny RetinaNet distiller whose teacher (R-``depth``, FPN 16) loads ``weights``."""
    return distill_cfg(
        "RetinaNet",
        teacher_depth=depth,
        teacher_fpn=16,
        extra=["MODEL.ACAMKD.TEACHER.WEIGHTS", weights]
        + ["MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT", "False"]
        + list(extra),
    )


def _teacher_state(depth: int = 18, num_classes: int = 2, seed: int = 1) -> dict:
    """The state dict of a tiny RetinaNet teacher as train_net.py would save it."""
    cfg = distill_cfg("RetinaNet", teacher_depth=depth, teacher_fpn=16, num_classes=num_classes)
    torch.manual_seed(seed)
    return build_model(build_teacher_cfg(cfg)).state_dict()


def _save(state: dict, tmp_path, name: str) -> str:
    path = str(tmp_path / name)
    torch.save({"model": state}, path)
    return path


def _start(model):
    """What train_net.py does when a run starts without a checkpoint to resume."""
    return DistillationCheckpointer(model).resume_or_load("", resume=False)


def _assert_teacher_is(model, state: dict) -> None:
    loaded = model.teacher.state_dict()
    for k, v in state.items():
        if k in loaded:
            assert torch.equal(loaded[k], v), k


def test_building_reads_no_file_and_the_checkpointer_loads_the_teacher(tmp_path, log_records):
    state = _teacher_state()
    path = _save(state, tmp_path, "teacher.pth")
    missing = str(tmp_path / "not_yet.pth")
    model = build_model(_detection_cfg(missing))  # nothing is read while building
    assert model.teacher_weights.path == missing and model.teacher_parts_used == ("backbone",)

    model = build_model(_detection_cfg(path))
    records = log_records("acamkd.training.teacher_weights")
    _start(model)
    _assert_teacher_is(model, state)
    assert f"Loaded the teacher from '{path}' (MODEL.ACAMKD.TEACHER.WEIGHTS)" in _text(records)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_an_old_distiller_checkpoint_restores_the_teacher_without_its_weights(tmp_path):
    model = build_model(_detection_cfg(_save(_teacher_state(), tmp_path, "teacher.pth")))
    _start(model)
    # As checkpoints were written before they left the teacher out (with its tensors); the
    # teacher-less ones: tests/test_teacherless_checkpoint.py.
    torch.save({"model": model.state_dict()}, str(tmp_path / "distilled.pth"))
    # Resuming or evaluating: TEACHER.WEIGHTS (now unreadable) is not read.
    again = build_model(_detection_cfg(str(tmp_path / "gone.pth")))
    DistillationCheckpointer(again).resume_or_load(str(tmp_path / "distilled.pth"), resume=False)
    _assert_teacher_is(again, model.teacher.state_dict())


def test_a_checkpoint_of_another_depth_is_refused(tmp_path, log_records):
    r18, r34 = _teacher_state(18), _teacher_state(34)
    deeper_blocks = [k for k in r34 if k not in r18]  # res2.2, res3.2-3, res4.2-5, res5.2
    assert deeper_blocks[0] == "backbone.bottom_up.res2.2.conv1.weight"
    n = len(deeper_blocks)
    # Shallower than the teacher: its deeper blocks are missing from the file.
    model = build_model(_detection_cfg(_save(r18, tmp_path, "r18.pth"), depth=34))
    with pytest.raises(TeacherWeightsError) as e:
        _start(model)
    message = str(e.value)
    assert "r18.pth' (MODEL.ACAMKD.TEACHER.WEIGHTS) does not fit" in message
    assert (
        f"Distillation uses the teacher's backbone: {n} of its tensors are missing from the "
        "file, 0 have another shape there, and the file has 0 tensors" in message
    )
    assert f"Missing ({n}): {', '.join(deeper_blocks[:10])}, ... ({n - 10} more)." in message
    assert "or set MODEL.ACAMKD.TEACHER.STRICT False to distil from it anyway" in message
    assert_documented("teacher-checkpoint-misfit", message)

    # Deeper than the teacher: the file's backbone has blocks the teacher lacks.
    model = build_model(_detection_cfg(_save(r34, tmp_path, "r34.pth")))
    with pytest.raises(TeacherWeightsError) as e:
        _start(model)
    message = str(e.value)
    assert f"the file has {n} tensors of the teacher's backbone that the teacher lacks" in message
    assert f"Only in the file ({n}): {deeper_blocks[0]}, " in message

    # STRICT False: what fits loads, the rest is logged.
    model = build_model(
        _detection_cfg(
            str(tmp_path / "r18.pth"), depth=34, extra=["MODEL.ACAMKD.TEACHER.STRICT", "False"]
        )
    )
    records = log_records("acamkd.training.teacher_weights")
    _start(model)
    _assert_teacher_is(model, r18)
    assert "MODEL.ACAMKD.TEACHER.STRICT False is set: distilling anyway" in _text(records)


def test_a_checkpoint_with_a_renamed_prefix_is_refused(tmp_path):
    state = {"detector." + k: v for k, v in _teacher_state().items()}
    model = build_model(_detection_cfg(_save(state, tmp_path, "renamed.pth")))
    with pytest.raises(TeacherWeightsError) as e:
        _start(model)
    message = str(e.value)
    used = [k for k in model.teacher.state_dict() if k.startswith("backbone.")]
    assert f"{len(used)} of its tensors are missing from the file" in message
    assert f"Missing ({len(used)}): {used[0]}, {used[1]}," in message
    assert f"The file has {len(state)} other tensors the teacher lacks (a renamed prefix?)" in (
        message
    )
    assert f"(a renamed prefix?): detector.{used[0]}, detector.{used[1]}," in message


def test_a_checkpoint_of_another_class_count(tmp_path, log_records):
    state = _teacher_state(num_classes=5)
    path = _save(state, tmp_path, "five_classes.pth")
    # FPN distillation reads the backbone only: the head is logged, the backbone loads.
    model = build_model(_detection_cfg(path))
    records = log_records("acamkd.training.teacher_weights")
    _start(model)
    _assert_teacher_is(model, {k: v for k, v in state.items() if k.startswith("backbone.")})
    assert "head.cls_score.weight" in _text(records)
    # With the inheritance strategy the student starts from the teacher's head: refused.
    model = build_model(_detection_cfg(path, extra=["MODEL.ACAMKD.INHERIT_TEACHER", "True"]))
    assert model.teacher_parts_used == ("backbone", "")
    with pytest.raises(TeacherWeightsError) as e:
        _start(model)
    message = str(e.value)
    assert "Distillation uses the whole teacher: 0 of its tensors are missing" in message
    assert "Another shape (2): head.cls_score.weight (45, 16, 3, 3) in the file, " in message
    assert "(18, 16, 3, 3) in the teacher" in message and "head.cls_score.bias" in message


def _seg_cfg(weights: str, extra=()):
    cfg = get_acamkd_cfg()
    name = "acamkd_deeplabv3_R_18_OS8_from_deeplabv3_R_18_wide_OS8_streets.yaml"
    cfg.merge_from_file(os.path.join(STREETS_SEG, name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ACAMKD.TEACHER.WEIGHTS", weights])
    cfg.merge_from_list(list(extra))
    return cfg


def test_logits_distillation_refuses_a_teacher_of_another_class_count(tmp_path, log_records):
    tcfg = build_teacher_cfg(_seg_cfg("")).clone()
    tcfg.defrost()
    tcfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    path = _save(build_model(tcfg).state_dict(), tmp_path, "seg5.pth")
    model = build_model(_seg_cfg(path))
    assert model.teacher_parts_used == ("backbone", "sem_seg_head")
    with pytest.raises(TeacherWeightsError) as e:
        _start(model)
    message = str(e.value)
    assert "Distillation uses the teacher's backbone, sem_seg_head: 0 of its" in message
    width = model.teacher.sem_seg_head.predictor.weight.shape[1]
    assert (
        f"Another shape (2): sem_seg_head.predictor.weight (5, {width}, 1, 1) in the file, "
        f"(19, {width}, 1, 1) in the teacher, sem_seg_head.predictor.bias (5,)" in message
    )
    # STRICT False: loaded where it fits, the rest logged.
    model = build_model(_seg_cfg(path, ["MODEL.ACAMKD.TEACHER.STRICT", "False"]))
    records = log_records("acamkd.training.teacher_weights")
    _start(model)
    assert "MODEL.ACAMKD.TEACHER.STRICT False is set: distilling anyway" in _text(records)


def test_extra_keys_are_logged_and_the_teacher_loads(tmp_path, log_records):
    state = _teacher_state()
    extra = dict(state, **{"roi_heads.mask_head.predictor.weight": torch.ones(2, 8, 1, 1)})
    model = build_model(_detection_cfg(_save(extra, tmp_path, "extra.pth")))
    records = log_records("acamkd.training.teacher_weights")
    _start(model)
    _assert_teacher_is(model, state)
    assert "has 1 tensors the teacher does not have; they are ignored: " in _text(records)
    assert "roi_heads.mask_head.predictor.weight" in _text(records)


def test_model_zoo_pkl_teachers_load(tmp_path):
    """detectron2's model-zoo format: numpy arrays, and name matching where it asks for it."""
    state = _teacher_state()
    for heuristics in (False, True):
        data = {"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}
        data["matching_heuristics"] = heuristics
        path = str(tmp_path / f"model_final_{heuristics}.pkl")
        with open(path, "wb") as f:
            pickle.dump(data, f)
        model = build_model(_detection_cfg(path))
        _start(model)
        _assert_teacher_is(model, state)


def test_lazy_teacher_errors_name_the_lazy_settings(tmp_path):
    cfg = distill_cfg("RetinaNet", teacher_depth=34, teacher_fpn=16)
    config = str(tmp_path / "teacher.yaml")
    with open(config, "w") as f:
        f.write(build_teacher_cfg(cfg).dump())
    teacher = build_lazy_teacher(config, weights=_save(_teacher_state(18), tmp_path, "r18.pth"))
    with pytest.raises(TeacherWeightsError, match=r"r18.pth' \(model.teacher.weights\)") as e:
        load_teacher_weights(teacher, teacher.acamkd_weights, ["backbone"])
    assert "model.teacher.strict=False" in str(e.value)
    relaxed = build_lazy_teacher(config, weights=teacher.acamkd_weights.path, strict=False)
    load_teacher_weights(relaxed, relaxed.acamkd_weights, ["backbone"])
    state = _teacher_state(18)
    assert torch.equal(
        relaxed.state_dict()["backbone.bottom_up.res3.1.conv1.weight"],
        state["backbone.bottom_up.res3.1.conv1.weight"],
    )
