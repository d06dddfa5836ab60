"""
Training: the YAML engine (:class:`DistillationTrainer`, ``trainer.py``), the LazyConfig engine
(``lazy_train.py``) and what both use (``common.py``: step loop, checkpointer, hooks).
"""

from .trainer import DistillationTrainer, create_ddp_model

__all__ = ["DistillationTrainer", "create_ddp_model"]
