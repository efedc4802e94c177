"""Self-supervised pretraining: MAE (RETFound's first stage) and DINO, producing backbones that
`finetune`, `embed` and `pretrain --init` take as weights."""
from .run import PretrainResult, pretrain

__all__ = ["PretrainResult", "pretrain"]
