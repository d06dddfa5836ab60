"""Checkpoints without the frozen teacher: a distiller checkpoint holds the student, the ACAM
modules, optimizer and scheduler, and for the teacher only where its weights came from and
their SHA-256; loading it reloads the teacher from its setting and refuses a file of other
content. Checkpoints written before (with the teacher's tensors) still load."""

import hashlib
import importlib.util
import logging
import os
import shutil

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer

from acamkd import DistillationCheckpointer
from acamkd.modeling.teacher import build_teacher_cfg
from acamkd.pictures.visualization import load_distiller_checkpoint
from acamkd.training import teacher_weights
from acamkd.training.checkpointer import TEACHER_SOURCE_KEY
from acamkd.training.export import export_student
from acamkd.training.teacher_weights import TeacherWeightsError

from tiny_models import REPO, distill_cfg
from troubleshooting import assert_documented

SETTING = "MODEL.ACAMKD.TEACHER.WEIGHTS"
CHECKPOINT_SIZE_TOOL = os.path.join(REPO, "tools", "checkpoint_size.py")


# Tiny models: one thread is as fast, and far faster when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def info(log_records):
    """The log lines (INFO and above) of the checkpointer and of the weights it loads."""
    return log_records("acamkd.training", logging.INFO)


def _cfg(weights: str, **kwargs):
    """A tiny RetinaNet distiller (R-18 teacher, FPN 16) whose teacher loads ``weights``
    ("" with ALLOW_RANDOM_INIT)."""
    extra = [SETTING, weights, "MODEL.ACAMKD.TEACHER.ALLOW_RANDOM_INIT", str(not weights)]
    extra += ["SOLVER.MAX_ITER", "10"]
    return distill_cfg("RetinaNet", teacher_depth=18, teacher_fpn=16, extra=extra, **kwargs)


def _teacher_file(tmp_path, name: str = "teacher.pth", seed: int = 1) -> str:
    """A tiny RetinaNet teacher's checkpoint, as train_net.py saves it."""
    torch.manual_seed(seed)
    state = build_model(build_teacher_cfg(_cfg(""))).state_dict()
    path = str(tmp_path / name)
    torch.save({"model": state}, path)
    return path


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _built(cfg, out_dir: str, seed: int = 0):
    """A new process's distiller (random init everywhere), optimizer and scheduler, and their
    checkpointer on ``out_dir``, as the trainer builds them before it loads anything."""
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    checkpointer = DistillationCheckpointer(
        model, out_dir, optimizer=optimizer, scheduler=scheduler
    )
    return model, optimizer, checkpointer


def _trained(cfg, out_dir: str, seed: int = 0):
    """:func:`_built`, started as train_net.py starts a run without a checkpoint to resume,
    after one optimizer step."""
    model, optimizer, checkpointer = _built(cfg, out_dir, seed)
    scheduler = checkpointer.checkpointables["scheduler"]
    checkpointer.resume_or_load("", resume=False)  # the teacher's weights
    with torch.no_grad():
        for p in model.student.parameters():
            p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    return model, optimizer, checkpointer


def _teacher_equals(model, path: str) -> None:
    state = torch.load(path, map_location="cpu")["model"]
    loaded = model.teacher.state_dict()
    assert set(loaded) <= set(state)
    for k, v in loaded.items():
        assert torch.equal(v, state[k]), k


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_checkpoint_holds_no_teacher_but_its_source_and_hash(tmp_path, monkeypatch):
    teacher = _teacher_file(tmp_path)
    hashes = []
    real = teacher_weights.hashlib.sha256
    monkeypatch.setattr(teacher_weights.hashlib, "sha256", lambda *a: hashes.append(1) or real(*a))
    model, _, checkpointer = _trained(_cfg(teacher), str(tmp_path / "out"))
    for i in range(3):  # periodic saves: the teacher's file is hashed once
        checkpointer.save(f"model_{i:07d}", iteration=i)
    assert len(hashes) == 1

    saved = torch.load(str(tmp_path / "out" / "model_0000002.pth"), map_location="cpu")
    assert not any(k.startswith("teacher.") for k in saved["model"])
    assert any(k.startswith("student.") for k in saved["model"])
    assert any(k.startswith("acam.") for k in saved["model"])
    assert {"optimizer", "scheduler", "iteration"} <= set(saved)
    assert saved[TEACHER_SOURCE_KEY] == {
        "path": teacher,
        "setting": SETTING,
        "sha256": _sha256(teacher),
    }
    whole = {"model": model.state_dict()}
    torch.save(whole, str(tmp_path / "with_teacher.pth"))
    assert (tmp_path / "out" / "model_0000002.pth").stat().st_size < (
        tmp_path / "with_teacher.pth"
    ).stat().st_size


def test_resume_reloads_the_teacher_from_its_setting(tmp_path, info, log_records):
    teacher = _teacher_file(tmp_path)
    out = str(tmp_path / "out")
    model, optimizer, checkpointer = _trained(_cfg(teacher), out)
    checkpointer.save("model_0000004", iteration=4)

    # A new process: another random init everywhere; --resume restores it all.
    again, optimizer2, checkpointer2 = _built(_cfg(teacher), out, seed=5)
    info.clear()
    fvcore_warnings = log_records("fvcore.common.checkpoint", logging.WARNING)
    extra = checkpointer2.resume_or_load("", resume=True)
    assert extra["iteration"] == 4
    _teacher_equals(again, teacher)
    _assert_same(again.student.state_dict(), model.student.state_dict())
    _assert_same(again.acam.state_dict(), model.acam.state_dict())
    assert optimizer2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert f"Loaded the teacher from '{teacher}' ({SETTING})" in "\n".join(info)
    assert not fvcore_warnings  # the teacher's keys are not reported missing
    assert not any(p.requires_grad for p in again.teacher.parameters())

    # The same content elsewhere is the same teacher (said at INFO).
    moved = str(tmp_path / "moved.pth")
    shutil.copyfile(teacher, moved)
    third, _, checkpointer3 = _built(_cfg(moved), out, seed=6)
    info.clear()
    checkpointer3.resume_or_load("", resume=True)
    _teacher_equals(third, moved)
    assert f"now gives '{moved}', with the same content" in "\n".join(info)


def test_resume_refuses_a_teacher_file_whose_content_changed(tmp_path):
    teacher = _teacher_file(tmp_path)
    out = str(tmp_path / "out")
    _, _, checkpointer = _trained(_cfg(teacher), out)
    checkpointer.save("model_0000004", iteration=4)
    recorded = _sha256(teacher)

    _teacher_file(tmp_path, seed=2)  # the file is overwritten with another teacher
    current = _sha256(teacher)
    assert current != recorded
    _, _, checkpointer2 = _built(_cfg(teacher), out, seed=5)
    with pytest.raises(TeacherWeightsError) as e:
        checkpointer2.resume_or_load("", resume=True)
    message = str(e.value)
    assert f"'{teacher}' ({SETTING}, sha256 {recorded})" in message
    assert f"now gives '{teacher}' ({SETTING}, sha256 {current})" in message
    assert_documented("teacher-changed", message)

    # Another file altogether: both named.
    other = _teacher_file(tmp_path, "other.pth", seed=3)
    _, _, checkpointer3 = _built(_cfg(other), out, seed=5)
    with pytest.raises(TeacherWeightsError, match=f"now gives '{other}'"):
        checkpointer3.resume_or_load("", resume=True)

    # A random teacher where the checkpoint had a file.
    _, _, checkpointer4 = _built(_cfg(""), out, seed=5)
    with pytest.raises(TeacherWeightsError, match="now gives a randomly initialised teacher"):
        checkpointer4.resume_or_load("", resume=True)


def test_a_randomly_initialised_teacher_is_saved_and_recorded_as_such(tmp_path, info):
    # Smoke runs: no file could reload a random teacher, so the checkpoint keeps it.
    out = str(tmp_path / "out")
    model, _, checkpointer = _trained(_cfg(""), out)
    checkpointer.save("model_0000004", iteration=4)
    saved = torch.load(str(tmp_path / "out" / "model_0000004.pth"), map_location="cpu")
    assert any(k.startswith("teacher.") for k in saved["model"])
    assert saved[TEACHER_SOURCE_KEY] == {"path": "", "setting": SETTING, "random_init": True}

    again, _, checkpointer2 = _built(_cfg(""), out, seed=5)
    info.clear()
    assert checkpointer2.resume_or_load("", resume=True)["iteration"] == 4
    _assert_same(again.state_dict(), model.state_dict())  # the same random teacher
    assert "holds its randomly initialised teacher, which is loaded from it" in "\n".join(info)
    checkpointer2.save("model_0000005")  # and it stays in the checkpoints
    saved = torch.load(str(tmp_path / "out" / "model_0000005.pth"), map_location="cpu")
    assert any(k.startswith("teacher.") for k in saved["model"])
    assert saved[TEACHER_SOURCE_KEY]["random_init"]

    # A teacher file where the checkpoint had a random teacher: refused, both named.
    teacher = _teacher_file(tmp_path)
    _, _, checkpointer3 = _built(_cfg(teacher), out, seed=5)
    with pytest.raises(TeacherWeightsError) as e:
        checkpointer3.resume_or_load("", resume=True)
    assert f"distilled from a randomly initialised teacher ({SETTING} empty)" in str(e.value)
    assert f"now gives '{teacher}'" in str(e.value)


def test_export_and_evaluation_need_no_teacher_file(tmp_path, info):
    teacher = _teacher_file(tmp_path)
    cfg = _cfg(teacher)
    model, _, checkpointer = _trained(cfg, str(tmp_path / "out"))
    checkpointer.save("model_final")
    final = str(tmp_path / "out" / "model_final.pth")
    (tmp_path / "teacher.pth").unlink()  # neither export nor --eval-only reads it

    weights, _ = export_student(cfg, final, str(tmp_path / "export"))
    exported = torch.load(weights, map_location="cpu")["model"]
    _assert_same(exported, model.student.state_dict())

    evaluated = build_model(cfg)
    info.clear()
    DistillationCheckpointer(evaluated, restore_teacher=False).load(final)
    _assert_same(evaluated.student.state_dict(), model.student.state_dict())
    assert "the teacher's weights are not loaded" in "\n".join(info)
    # Anything that runs the teacher reloads it and says what is missing.
    with pytest.raises(RuntimeError, match="teacher.pth"):
        DistillationCheckpointer(build_model(cfg)).load(final)


def test_the_mask_figures_reload_the_teacher_from_its_source(tmp_path):
    teacher = _teacher_file(tmp_path)
    model, _, checkpointer = _trained(_cfg(teacher), str(tmp_path / "out"))
    checkpointer.save("model_final", iteration=9)
    figures = build_model(_cfg(teacher))
    extra = load_distiller_checkpoint(figures, str(tmp_path / "out" / "model_final.pth"))
    assert extra["iteration"] == 9
    _teacher_equals(figures, teacher)
    _assert_same(figures.acam.state_dict(), model.acam.state_dict())


def test_an_old_checkpoint_with_the_teacher_loads_it(tmp_path, info):
    teacher = _teacher_file(tmp_path)
    model, _, _ = _trained(_cfg(teacher), str(tmp_path / "out"))
    old = str(tmp_path / "old.pth")
    torch.save({"model": model.state_dict(), "iteration": 7}, old)

    # Its teacher file is gone: the checkpoint's own teacher tensors are used.
    again = build_model(_cfg(str(tmp_path / "gone.pth")))
    info.clear()
    os.makedirs(tmp_path / "resumed")
    checkpointer = DistillationCheckpointer(again, str(tmp_path / "resumed"))
    assert checkpointer.load(old)["iteration"] == 7
    _assert_same(again.state_dict(), model.state_dict())
    assert f"The checkpoint {old} holds the teacher's weights" in "\n".join(info)
    # Checkpoints saved from it keep the teacher (its file is not known to be the same).
    checkpointer.save("model_0000008")
    saved = torch.load(str(tmp_path / "resumed" / "model_0000008.pth"), map_location="cpu")
    assert any(k.startswith("teacher.") for k in saved["model"])
    assert TEACHER_SOURCE_KEY not in saved


def test_checkpoint_size_tool(tmp_path, capsys):
    config = tmp_path / "distill.yaml"
    config.write_text(_cfg("").dump())
    spec = importlib.util.spec_from_file_location("checkpoint_size", CHECKPOINT_SIZE_TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    sizes = tool.main(["--config-file", str(config)])
    assert 0 < sizes["without_teacher"] < sizes["with_teacher"]
    assert "checkpoint without the teacher:" in capsys.readouterr().out
