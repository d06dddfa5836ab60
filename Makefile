# One entry point for set-up, the demo and the tests. Every target that runs Python first
# makes sure the virtual environment exists (tools/setup_env.sh is idempotent and returns at
# once when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
OUTPUT ?= output/demo
PYTEST_ARGS ?=

.PHONY: setup demo test lint env gpu-check

setup:
	@VENV=$(VENV) bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py --output-dir $(OUTPUT)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m flake8 projects tools tests configs train_net.py
	$(PY) -m isort --check-only --diff projects tools tests configs train_net.py
	$(PY) -m black --check -l 100 projects tools tests configs train_net.py

env: setup
	$(PY) -m acamkd.training.env

# One GPU, under 8 minutes: the CUDA-only tests (AMP steps, fused SDPA at COCO level shapes;
# skipped on the CPU, failing here without a GPU), then the step benchmark at 1333x800, batch 2,
# random weights, for RetinaNet and Faster R-CNN R101 -> R50 (ratio to the floor, peak memory).
GPU_CHECK_OUT ?= output/gpu_check
gpu-check: setup
	ACAMKD_GPU_CHECK=1 CUDA_VISIBLE_DEVICES=$${CUDA_VISIBLE_DEVICES:-0} $(PY) -m pytest -q -rs tests/test_gpu.py
	for arch in retinanet faster_rcnn; do \
	  CUDA_VISIBLE_DEVICES=$${CUDA_VISIBLE_DEVICES:-0} timeout 180 $(PY) tools/benchmark_step.py \
	    --config-file configs/COCO-Detection/acamkd_$${arch}_R_50_from_R_101_FPN_2x.yaml \
	    --device cuda --batch 2 --height 800 --width 1333 --rounds 2 --repeats 3 \
	    --output $(GPU_CHECK_OUT)/step_$${arch}_1333x800_b2.json || exit 1; \
	done
