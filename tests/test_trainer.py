"""The trainer: frozen teacher over several steps, resume, DDP on CPU processes, export."""

import copy
import json
import os
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from detectron2.engine import DefaultPredictor, launch

from acamkd import DistillationCheckpointer, DistillationTrainer
from acamkd.training.export import export_student
from acamkd.training.nonfinite import FiniteSimpleTrainer

from tiny_models import distill_cfg, register_tiny_dataset


def _train_cfg(tmp_path, max_iter: int, arch: str = "RetinaNet", dataset: str = "tiny_train"):
    register_tiny_dataset(dataset, str(tmp_path / "images"))
    cfg = distill_cfg(arch)
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN",
            (dataset,),
            "DATASETS.TEST",
            (),
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.BASE_LR",
            "0.01",
            "SOLVER.MAX_ITER",
            str(max_iter),
            "SOLVER.STEPS",
            "()",
            "SOLVER.WARMUP_ITERS",
            "1",
            "SOLVER.CHECKPOINT_PERIOD",
            "100",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
            "SEED",
            "1",
        ]
    )
    return cfg


def _state(module: torch.nn.Module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_teacher_unchanged_and_student_trained_after_several_steps(tmp_path):
    trainer = DistillationTrainer(_train_cfg(tmp_path, max_iter=3))
    # detectron2's constructor steps with this project's checkpointer and trainer loop.
    assert isinstance(trainer.checkpointer, DistillationCheckpointer)
    assert type(trainer._trainer) is FiniteSimpleTrainer
    trainer.resume_or_load(resume=False)
    teacher0, student0 = _state(trainer.model.teacher), _state(trainer.model.student)
    trainer.train()
    teacher1, student1 = _state(trainer.model.teacher), _state(trainer.model.student)
    assert all(torch.equal(teacher0[k], teacher1[k]) for k in teacher0)  # bitwise, BN included
    changed = [k for k in student0 if not torch.equal(student0[k], student1[k])]
    assert (
        "head.cls_score.weight" in changed and "backbone.bottom_up.res5.0.conv1.weight" in changed
    )
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")]
    assert "acam/p3/spatial_mask_mean" in metrics[-1] and "loss_acam_spatial" in metrics[-1]


def test_resume_restores_everything(tmp_path):
    cfg = _train_cfg(tmp_path, max_iter=2)
    first = DistillationTrainer(cfg)
    first.resume_or_load(resume=False)
    first.train()
    saved_model = _state(first.model)
    saved_optim = copy.deepcopy(first.optimizer.state_dict())
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")

    cfg2 = cfg.clone()
    cfg2.SOLVER.MAX_ITER = 4
    second = DistillationTrainer(cfg2)
    second.resume_or_load(resume=True)
    assert second.start_iter == 2
    restored = _state(second.model)
    assert restored.keys() == saved_model.keys()
    assert all(torch.equal(restored[k], saved_model[k]) for k in saved_model)
    optim = second.optimizer.state_dict()
    for idx, state in saved_optim["state"].items():
        assert torch.equal(optim["state"][idx]["momentum_buffer"], state["momentum_buffer"])
    assert second.scheduler.last_epoch == first.scheduler.last_epoch
    second.train()  # and training goes on from there
    assert second.iter == 4  # detectron2 leaves iter at max_iter after the loop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(cfg, out_dir):
    from detectron2.utils import comm

    register_tiny_dataset(cfg.DATASETS.TRAIN[0], os.path.join(out_dir, "images"))
    trainer = DistillationTrainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model.module  # wrapped in DistributedDataParallel
    teacher0 = _state(model.teacher)
    trainer.train()
    teacher_same = all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher0.items())
    trained = {k: v for k, v in _state(model).items() if not k.startswith("teacher.")}
    torch.save(
        {"trained": trained, "teacher_unchanged": teacher_same},
        os.path.join(out_dir, f"rank{comm.get_rank()}.pt"),
    )


def test_ddp_on_two_cpu_processes(tmp_path):
    cfg = _train_cfg(tmp_path, max_iter=3, dataset="tiny_ddp")
    cfg.SOLVER.IMS_PER_BATCH = 4  # 2 images per process
    out_dir = str(tmp_path)
    launch(_ddp_worker, 2, dist_url=f"tcp://127.0.0.1:{_free_port()}", args=(cfg, out_dir))
    r0, r1 = (torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in (0, 1))
    assert r0["teacher_unchanged"] and r1["teacher_unchanged"]
    assert r0["trained"].keys() == r1["trained"].keys()
    assert any(k.startswith("acam.") for k in r0["trained"])
    for k in r0["trained"]:
        assert torch.equal(r0["trained"][k], r1["trained"][k]), k


_STOCK_SCRIPT = """
import json, sys
import cv2, torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

cfg = get_cfg()
cfg.merge_from_file(sys.argv[1])
expected = build_model(cfg).state_dict()
saved = torch.load(cfg.MODEL.WEIGHTS, map_location="cpu")["model"]
out = DefaultPredictor(cfg)(cv2.imread(sys.argv[2]))["instances"]
assert not any(m.startswith("acamkd") for m in sys.modules), "acamkd was imported"
torch.save({"boxes": out.pred_boxes.tensor, "scores": out.scores}, sys.argv[3])
print(json.dumps({
    "missing": sorted(set(expected) - set(saved)),
    "unexpected": sorted(set(saved) - set(expected)),
    "wrong_shape": sorted(k for k in saved if saved[k].shape != expected.get(k, saved[k]).shape),
}))
"""


@pytest.mark.parametrize(
    "arch,thresh_key",
    [
        ("RetinaNet", "MODEL.RETINANET.SCORE_THRESH_TEST"),
        ("GeneralizedRCNN", "MODEL.ROI_HEADS.SCORE_THRESH_TEST"),
    ],
)
def test_export_loads_in_stock_detectron2_with_identical_predictions(tmp_path, arch, thresh_key):
    cfg = distill_cfg(arch, extra=[thresh_key, "0.0"])  # keep every (random) detection
    model = DistillationTrainer.build_model(cfg)
    DistillationCheckpointer(model, save_dir=str(tmp_path)).save("distilled")
    weights, config = export_student(cfg, str(tmp_path / "distilled.pth"), str(tmp_path / "export"))

    image_path = str(tmp_path / "image.png")
    cv2.imwrite(image_path, np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    # Stock detectron2 (nothing of this repository), with this process's thread count: a
    # different count changes the order of float reductions, and the predictions' last bits.
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS=str(torch.get_num_threads()))
    stock_out = str(tmp_path / "stock.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _STOCK_SCRIPT, config, image_path, stock_out],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = json.loads(proc.stdout.strip().splitlines()[-1])
    assert keys == {"missing": [], "unexpected": [], "wrong_shape": []}

    ours_cfg = cfg.clone()
    ours_cfg.MODEL.WEIGHTS = str(tmp_path / "distilled.pth")
    ours = DefaultPredictor(ours_cfg)(cv2.imread(image_path))["instances"]
    theirs = torch.load(stock_out)
    assert len(ours) > 0
    assert torch.equal(ours.pred_boxes.tensor, theirs["boxes"])
    assert torch.equal(ours.scores, theirs["scores"])
