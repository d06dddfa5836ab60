#!/usr/bin/env python
"""
Size of a distiller's training checkpoint with and without the frozen teacher.

Builds the distiller of a YAML config with random weights: in a temporary folder that is
deleted afterwards, a randomly initialised teacher is saved as the teacher's file
(``MODEL.ACAMKD.TEACHER.WEIGHTS``, which is not read) and loaded as a run loads it. Takes one
optimizer step with zero gradients so that the optimizer holds its momentum buffers as in a
run, then writes the checkpoint as ``DistillationCheckpointer`` saves it (student, ACAM
modules, optimizer, scheduler, the teacher's file and SHA-256) and as it was saved before (the
same with the teacher's tensors), and prints both sizes in MB (10^6 bytes):

    python tools/checkpoint_size.py \\
        --config-file configs/COCO-Detection/acamkd_retinanet_R_50_from_R_101_FPN_2x.yaml
"""
import argparse
import os
import tempfile

import torch

from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer

from acamkd import DistillationCheckpointer, get_acamkd_cfg
from acamkd.modeling.teacher import build_teacher_cfg


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--config-file", required=True, help="a distillation YAML config")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def main(argv=None) -> dict:
    args = build_argument_parser().parse_args(argv)
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + list(args.opts))
    sizes = {}
    with tempfile.TemporaryDirectory() as folder:
        teacher_file = os.path.join(folder, "teacher.pth")
        torch.save({"model": build_model(build_teacher_cfg(cfg)).state_dict()}, teacher_file)
        cfg.merge_from_list(["MODEL.ACAMKD.TEACHER.WEIGHTS", teacher_file])
        model = build_model(cfg)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_lr_scheduler(cfg, optimizer)
        checkpointer = DistillationCheckpointer(
            model, folder, optimizer=optimizer, scheduler=scheduler
        )
        checkpointer.resume_or_load("", resume=False)  # the teacher from its file, as a run
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()  # creates the momentum buffers a run's checkpoint holds

        checkpointer.save("without_teacher", iteration=0)
        with_teacher = {"model": model.state_dict()}  # what checkpoints held before
        with_teacher.update({k: v.state_dict() for k, v in checkpointer.checkpointables.items()})
        torch.save(dict(with_teacher, iteration=0), os.path.join(folder, "with_teacher.pth"))
        for name in ("with_teacher", "without_teacher"):
            sizes[name] = os.path.getsize(os.path.join(folder, f"{name}.pth")) / 1e6
    teacher = sum(t.numel() * t.element_size() for t in model.teacher.state_dict().values()) / 1e6
    print(f"{args.config_file}:")
    print(f"  checkpoint with the teacher:    {sizes['with_teacher']:8.1f} MB")
    print(f"  checkpoint without the teacher: {sizes['without_teacher']:8.1f} MB")
    print(f"  (the teacher's tensors: {teacher:.1f} MB)")
    return sizes


if __name__ == "__main__":
    main()
