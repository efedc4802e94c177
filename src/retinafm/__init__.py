"""retinafm: fine-tune, evaluate and run retinal foundation models."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "finetune", "evaluate_checkpoint", "predict", "FinetuneConfig"]


def __getattr__(name: str):
    # Lazy imports keep `retinafm --help` fast (torch and timm load only when work starts).
    if name == "finetune":
        from .finetune import finetune

        return finetune
    if name == "FinetuneConfig":
        from .config import FinetuneConfig

        return FinetuneConfig
    if name == "evaluate_checkpoint":
        from .evaluate.evaluation import evaluate_checkpoint

        return evaluate_checkpoint
    if name == "predict":
        from .predict import predict

        return predict
    raise AttributeError(name)
