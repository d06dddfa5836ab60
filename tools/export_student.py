#!/usr/bin/env python
"""
Export the student of a distillation run as a plain detectron2 model:

    python tools/export_student.py --config-file <distill config>.yaml \
        --checkpoint output/model_final.pth --output output/student [KEY VALUE ...]

Then, with stock detectron2 only:

    cfg = get_cfg(); cfg.merge_from_file("output/student/student_config.yaml")
    predictor = DefaultPredictor(cfg)
"""
import argparse

import acamkd  # noqa: F401  (registers the distiller)
from acamkd import get_acamkd_cfg
from acamkd.training.export import export_student


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="the distillation config")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of that run")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    cfg = get_acamkd_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    weights, config = export_student(cfg, args.checkpoint, args.output)
    print(f"student weights: {weights}\nstudent config:  {config}")


if __name__ == "__main__":
    main()
