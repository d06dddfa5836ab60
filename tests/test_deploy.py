"""
The exported student goes through detectron2's deployment path: a student written by
``tools/export_student.py`` is loaded with stock detectron2 (``get_cfg``, ``DefaultPredictor``),
traced with ``detectron2.export.TracingAdapter`` and scripted with
``detectron2.export.scripting_with_instances``, as detectron2's ``tools/deploy/export_model.py``
does; the TorchScript models, saved and loaded back, give ``DefaultPredictor``'s boxes, scores
and classes on an image that was not the tracing example.
"""

import runpy
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from acamkd import DistillationCheckpointer, DistillationTrainer

from tiny_models import REPO, distill_cfg

EXPORT_TOOL = str(Path(REPO) / "tools" / "export_student.py")

# The fields detectron2's export_model.py declares for scripting detectors.
_SCRIPT_FIELDS = {
    "proposal_boxes": Boxes,
    "objectness_logits": Tensor,
    "pred_boxes": Boxes,
    "scores": Tensor,
    "pred_classes": Tensor,
}


class ScriptableRCNN(nn.Module):
    """export_model.py's adapter: fields as dicts, in the network's input resolution."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, inputs: Tuple[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
        instances = self.model.inference(inputs, do_postprocess=False)
        return [i.get_fields() for i in instances]


class ScriptableOneStage(nn.Module):
    """export_model.py's adapter for models whose forward returns Instances (RetinaNet)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, inputs: Tuple[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
        instances = self.model(inputs)
        return [i.get_fields() for i in instances]


def _rcnn_inference(model, inputs):
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def _export_with_the_tool(tmp_path: Path, arch: str, thresh_key: str) -> Path:
    """Train nothing: save a (random) distiller checkpoint and export it with the tool."""
    cfg = distill_cfg(arch, extra=[thresh_key, "0.0"])  # keep every (random) detection
    config = tmp_path / "distill.yaml"
    config.write_text(cfg.dump())
    model = DistillationTrainer.build_model(cfg)
    DistillationCheckpointer(model, save_dir=str(tmp_path)).save("distilled")
    argv = sys.argv
    sys.argv = [EXPORT_TOOL, "--config-file", str(config)]
    sys.argv += ["--checkpoint", str(tmp_path / "distilled.pth"), "--output", str(tmp_path / "s")]
    try:
        runpy.run_path(EXPORT_TOOL, run_name="__main__")
    finally:
        sys.argv = argv
    return tmp_path / "s" / "student_config.yaml"


def _network_input(predictor: DefaultPredictor, image: np.ndarray) -> Tensor:
    """DefaultPredictor's preprocessing: resize to the test size, (3, H', W') float."""
    resized = predictor.aug.get_transform(image).apply_image(image)
    return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))


def _assert_same(ours: Instances, expected: Instances) -> None:
    assert len(expected) > 0
    assert ours.image_size == expected.image_size
    assert torch.equal(ours.pred_classes, expected.pred_classes)
    torch.testing.assert_close(ours.scores, expected.scores, rtol=1e-5, atol=1e-6)
    # boxes in pixels of the original image
    torch.testing.assert_close(
        ours.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=1e-3
    )


@pytest.mark.parametrize(
    "arch,thresh_key",
    [
        ("RetinaNet", "MODEL.RETINANET.SCORE_THRESH_TEST"),
        ("GeneralizedRCNN", "MODEL.ROI_HEADS.SCORE_THRESH_TEST"),
    ],
)
def test_exported_student_traced_and_scripted_match_default_predictor(
    tmp_path: Path, arch: str, thresh_key: str
) -> None:
    student_config = _export_with_the_tool(tmp_path, arch, thresh_key)
    cfg = get_cfg()  # stock detectron2: no acamkd keys
    cfg.merge_from_file(str(student_config))
    predictor = DefaultPredictor(cfg)
    model = predictor.model
    assert type(model).__name__ == arch

    rng = np.random.default_rng(0)
    example, image = (rng.integers(0, 256, (80, 120, 3), dtype=np.uint8) for _ in range(2))
    image[20:60, 30:90] = (30, 200, 90)  # something unlike the tracing example
    expected = predictor(image)["instances"]
    height, width = image.shape[:2]
    x = _network_input(predictor, image)
    assert tuple(x.shape[1:]) != (height, width)  # the postprocessing has to rescale

    # Tracing, as export_model.py --export-method tracing: only the image tensor goes in.
    inference = _rcnn_inference if isinstance(model, GeneralizedRCNN) else None
    with torch.no_grad():
        adapter = TracingAdapter(model, [{"image": _network_input(predictor, example)}], inference)
        traced = torch.jit.trace(adapter, adapter.flattened_inputs)
    torch.jit.save(traced, str(tmp_path / "traced.ts"))
    loaded = torch.jit.load(str(tmp_path / "traced.ts"))
    with torch.no_grad():
        flat = loaded(x)
    instances = adapter.outputs_schema(flat)[0]["instances"]
    _assert_same(detector_postprocess(instances, height, width), expected)

    # Scripting, as export_model.py --export-method scripting.
    wrapper = ScriptableRCNN if isinstance(model, GeneralizedRCNN) else ScriptableOneStage
    scripted = scripting_with_instances(wrapper(model), _SCRIPT_FIELDS)
    torch.jit.save(scripted, str(tmp_path / "scripted.ts"))
    loaded = torch.jit.load(str(tmp_path / "scripted.ts"))
    with torch.no_grad():
        fields = loaded(({"image": x},))[0]
    instances = Instances(tuple(x.shape[1:]))
    boxes = fields["pred_boxes"]  # a Boxes in the model; the loaded module returns its tensor
    instances.pred_boxes = Boxes(boxes.tensor if isinstance(boxes, Boxes) else boxes)
    instances.scores = fields["scores"]
    instances.pred_classes = fields["pred_classes"]
    _assert_same(detector_postprocess(instances, height, width), expected)
