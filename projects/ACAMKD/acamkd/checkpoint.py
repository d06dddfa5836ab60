"""Checkpoint loading that keeps teacher and student apart."""

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["DistillationCheckpointer", "is_distiller_state"]


def is_distiller_state(state_dict: dict) -> bool:
    """True for a state dict saved from :class:`ACAMDistiller` (keys under ``student.``)."""
    return any(k.startswith("student.") for k in state_dict)


class DistillationCheckpointer(DetectionCheckpointer):
    """
    A :class:`DetectionCheckpointer` that knows the distiller's layout:

    - this project's own checkpoints (student, teacher and ACAM modules) restore everything,
      by exact names;
    - any other checkpoint (``MODEL.WEIGHTS``: ImageNet backbones, plain detectron2 models,
      exported students) initialises the student alone. detectron2's suffix-matching loader
      would otherwise match one key against both ``teacher.*`` and ``student.*`` and fail.

    For a model that is not a distiller it behaves exactly as :class:`DetectionCheckpointer`.
    """

    def _load_model(self, checkpoint):
        student = getattr(self.model, "student", None)
        if student is not None and not is_distiller_state(checkpoint["model"]):
            return DetectionCheckpointer(student)._load_model(checkpoint)
        return super()._load_model(checkpoint)
