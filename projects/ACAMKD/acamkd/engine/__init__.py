from .trainer import DistillationTrainer, create_ddp_model

__all__ = ["DistillationTrainer", "create_ddp_model"]
