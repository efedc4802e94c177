"""Settings of the training verbs: finetune, pretrain, refine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from retinafm.settings.base import (
    HEADS,
    ConfigError,
    _at_least_one,
    _check_crop_scale,
    _check_warmup,
    check_device,
    check_precision,
    check_preprocessing,
    parse_oct_frames,
)


@dataclass
class FinetuneSettings:
    """Fine-tuning settings; defaults follow RETFound's fine-tuning recipe."""

    out: str = ""
    data_path: Optional[str] = None
    manifest: Optional[str] = None
    split: Optional[str] = None  # "0.7,0.15,0.15" asks for an automatic stratified split
    model: str = "RETFound_mae_natureCFP"
    weights: Optional[str] = None  # None: the zoo entry's own weights; "none": random init
    adaptation: str = "finetune"  # finetune | lp
    # lp only: "features" embeds every image once and fits a scikit-learn probe (seconds);
    # "sgd" is RETFound's way, the frozen backbone run in every epoch with the head trained by AdamW.
    lp_mode: str = "features"
    task: str = "multiclass"  # a task type of retinafm.tasks.TASKS
    oct_frames: str = "middle"  # B-scans of each volume used: middle | all | N (evenly spread)
    fundus_crop: bool = False  # crop colour fundus photographs to their field of view, padded square
    oct_crop: Optional[float] = None  # keep this central fraction of each OCT B-scan (e.g. 0.8)
    modality: Optional[str] = None  # CFP | OCT: what the images are, overriding the modality check
    labels: Optional[str] = None  # multilabel: comma-separated manifest columns (default: all non-reserved)
    targets: Optional[str] = None  # regression: comma-separated numeric manifest columns
    head: str = "linear"  # linear | mlp | transformer
    head_depth: int = 2  # mlp: hidden layers; transformer: encoder layers
    head_num_heads: int = 4  # transformer head only
    head_mlp_ratio: float = 2.0  # hidden width = backbone width x ratio (mlp, transformer)
    head_dropout: float = 0.1  # mlp and transformer heads
    loss: Optional[str] = None  # regression: huber (default) | mse
    huber_beta: float = 1.0
    pos_weight: bool = False  # multilabel: weight each label's positives by negatives/positives in train
    threshold: str = "0.5"  # multilabel decision threshold: a number in (0, 1) or "youden" (chosen on val)
    ordinal: bool = False  # multiclass: the classes are ordered grades (adds quadratic-weighted kappa)
    bootstrap: int = 1000  # bootstrap replicates for the test metrics' 95% CIs; 0: none
    epochs: int = 50
    batch_size: int = 16
    accum_iter: int = 1
    lr: Optional[float] = None  # absolute lr; default blr * effective batch / 256
    blr: float = 5e-3
    min_lr: float = 1e-6
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    drop_path: float = 0.2
    warmup_epochs: int = 10
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    clip_grad: Optional[float] = None
    grad_checkpointing: bool = False  # recompute block activations in backward: memory for compute
    compile: bool = False  # torch.compile the training model (GPU; the first steps pay the compile time)
    input_size: Optional[int] = None  # None: the model's own input size
    global_pool: Optional[str] = None  # avg | token; None: the model's default
    crop_min_scale: float = 0.08
    randaug_magnitude: int = 9  # 0 turns RandAugment off
    reprob: float = 0.25
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # autocast: auto (per machine), fp32, bf16 or fp16
    num_workers: int = 2
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("--out is required: the run directory to write.")
        if bool(self.data_path) == bool(self.manifest):
            raise ConfigError("give exactly one of --data-path DIR or --manifest FILE.csv")
        if self.adaptation not in ("finetune", "lp"):
            raise ConfigError(f"--adaptation must be 'finetune' or 'lp', not {self.adaptation!r}")
        if self.lp_mode not in ("features", "sgd"):
            raise ConfigError(f"--lp-mode must be 'features' or 'sgd', not {self.lp_mode!r}")
        if self.adaptation == "lp" and self.lp_mode == "features" and self.head != "linear":
            raise ConfigError(f"--head {self.head} needs gradient training: add --lp-mode sgd (the features probe "
                              "fits a linear head)")
        parse_oct_frames(self.oct_frames)
        check_preprocessing(self.oct_crop, self.modality)
        if self.head not in HEADS:
            raise ConfigError(f"--head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if self.head_depth < 1 or self.head_num_heads < 1:
            raise ConfigError("--head-depth and --head-num-heads must be at least 1")
        if self.head_mlp_ratio <= 0:
            raise ConfigError(f"--head-mlp-ratio must be positive, got {self.head_mlp_ratio}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError(f"--head-dropout must be in [0, 1), got {self.head_dropout}")
        if self.huber_beta <= 0:
            raise ConfigError(f"--huber-beta must be positive, got {self.huber_beta}")
        self.threshold_value()
        if self.bootstrap < 0 or 0 < self.bootstrap < 100:
            raise ConfigError(f"--bootstrap must be 0 (no confidence intervals) or at least 100 replicates, "
                              f"got {self.bootstrap}")
        if self.global_pool not in (None, "avg", "token"):
            raise ConfigError(f"--global-pool must be 'avg' or 'token', not {self.global_pool!r}")
        check_device(self.device)
        check_precision(self.precision)
        _at_least_one(self, "epochs", "batch_size", "accum_iter")
        _check_warmup(self.warmup_epochs, self.epochs)
        for name in ("smoothing", "drop_path", "reprob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        _check_crop_scale(self.crop_min_scale)


    def threshold_value(self) -> Optional[float]:
        """The fixed multilabel threshold, or None for thresholds chosen on validation (youden)."""
        if str(self.threshold).lower() == "youden":
            return None
        try:
            value = float(self.threshold)
        except ValueError:
            raise ConfigError(f"--threshold must be a number in (0, 1) or 'youden', not {self.threshold!r}") from None
        if not 0.0 < value < 1.0:
            raise ConfigError(f"--threshold must be in (0, 1), got {value}")
        return value

    def names_list(self) -> Optional[list[str]]:
        """--labels / --targets as a list of manifest columns (None: every non-reserved column). The
        task type's settings check has made sure only the one its task takes is given."""
        flag, text = ("labels", self.labels) if self.labels else ("targets", self.targets)
        if not text:
            return None
        names = [n.strip() for n in str(text).split(",") if n.strip()]
        if len(set(names)) != len(names):
            raise ConfigError(f"--{flag} lists a column twice: {text}")
        return names


# MAE (He et al. 2022; RETFound's pretraining) and DINO (Caron et al. 2021) recipes.
PRETRAIN_DEFAULTS = {"mae": {"blr": 1.5e-4, "warmup_epochs": 40, "weight_decay": 0.05},
                     "dino": {"blr": 5e-4, "warmup_epochs": 10, "weight_decay": 0.04}}


@dataclass
class PretrainSettings:
    """Self-supervised pretraining settings; defaults follow MAE / RETFound (mae) and DINO (dino)."""

    out: str = ""
    images: str = ""  # a folder (any layout; labels ignored) or a CSV manifest with a path column
    splits: Optional[str] = None  # keep only these splits (comma-separated) when the images carry a split
    method: str = "mae"  # mae | dino
    model: str = "vit_large_patch16"
    init: Optional[str] = None  # weights to continue from (zoo name, hub repo, file); None: random
    input_size: Optional[int] = None
    oct_frames: str = "middle"
    fundus_crop: bool = False
    oct_crop: Optional[float] = None
    epochs: int = 800
    warmup_epochs: Optional[int] = None  # None: the method's (mae 40, dino 10), at most --epochs
    batch_size: int = 64
    accum_iter: int = 1
    lr: Optional[float] = None  # absolute lr; default blr * effective batch / 256
    blr: Optional[float] = None  # None: the method's (mae 1.5e-4, dino 5e-4)
    min_lr: float = 0.0
    weight_decay: Optional[float] = None  # None: the method's (mae 0.05, dino 0.04)
    clip_grad: Optional[float] = None
    # MAE
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    crop_min_scale: float = 0.2
    # DINO
    out_dim: int = 65536
    local_crops: int = 6
    local_size: Optional[int] = None  # None: 96/224 of the input size, a multiple of the patch size
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_epochs: int = 0
    momentum_teacher: float = 0.996
    # both
    reconstructions: int = 4  # MAE: images drawn each epoch in plots/reconstructions_*.png; 0: none
    grad_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # autocast: auto (per machine), fp32, bf16 or fp16
    num_workers: int = 2
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("--out is required: the run directory to write.")
        if not self.images:
            raise ConfigError("--images is required: a folder of images or a CSV manifest with a path column.")
        if self.method not in ("mae", "dino"):
            raise ConfigError(f"--method must be 'mae' or 'dino', not {self.method!r}")
        parse_oct_frames(self.oct_frames)
        check_preprocessing(self.oct_crop, None)
        _at_least_one(self, "epochs", "batch_size", "accum_iter", "decoder_dim", "decoder_depth", "decoder_heads", "out_dim")
        _check_warmup(self.warmup_epochs, self.epochs)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        _check_crop_scale(self.crop_min_scale)
        if self.local_crops < 0 or self.reconstructions < 0:
            raise ConfigError("--local-crops and --reconstructions must be 0 or more")
        if not 0.0 <= self.momentum_teacher < 1.0:
            raise ConfigError(f"--momentum-teacher must be in [0, 1), got {self.momentum_teacher}")
        check_device(self.device)
        check_precision(self.precision)

    def method_default(self, name: str) -> float:
        """blr, warmup_epochs, weight_decay: the given value, else the method's published one."""
        value = getattr(self, name)
        if value is not None:
            return value
        value = PRETRAIN_DEFAULTS[self.method][name]
        return min(value, self.epochs) if name == "warmup_epochs" else value

    def split_list(self) -> Optional[list[str]]:
        return [s.strip() for s in self.splits.split(",") if s.strip()] if self.splits else None


@dataclass
class RefineSettings:
    """Vision-language refinement from image-report pairs (RetFiner-style)."""

    out: str = ""
    pairs: str = ""  # CSV: path, report [, split]
    model: str = "RETFound_mae_natureOCT"
    weights: Optional[str] = None  # None: the zoo entry's own; "none": random
    text_model: str = ""  # a BERT-family hub id or local folder
    input_size: Optional[int] = None
    oct_frames: str = "middle"
    fundus_crop: bool = False
    oct_crop: Optional[float] = None
    losses: str = "itc,itm,mlm,gm"
    loss_weights: Optional[str] = None  # one per loss, comma-separated; default all 1
    fusion_layers: Optional[int] = None  # upper text layers with cross-attention; None: half of them
    embed_dim: int = 256
    max_length: int = 128  # report tokens kept
    mlm_probability: float = 0.15
    epochs: int = 10
    warmup_epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    crop_min_scale: float = 0.5
    clip_grad: Optional[float] = None
    probe_on: Optional[str] = None  # a labelled folder / manifest: linear probes before and after, side by side
    probe_bootstrap: int = 1000
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # autocast: auto (per machine), fp32, bf16 or fp16
    num_workers: int = 2
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("--out is required: the run directory to write.")
        if not self.pairs:
            raise ConfigError("--pairs is required: a CSV with path and report columns (optional split).")
        if not self.text_model:
            raise ConfigError("--text-model is required: a BERT-family hub id or local folder.")
        self.loss_weight_map()
        parse_oct_frames(self.oct_frames)
        check_preprocessing(self.oct_crop, None)
        check_device(self.device)
        check_precision(self.precision)
        _at_least_one(self, "epochs", "batch_size", "embed_dim", "max_length")
        _check_warmup(self.warmup_epochs, self.epochs)
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"--mlm-probability must be in (0, 1), got {self.mlm_probability}")
        if self.fusion_layers is not None and self.fusion_layers < 1:
            raise ConfigError(f"--fusion-layers must be at least 1, got {self.fusion_layers}")
        _check_crop_scale(self.crop_min_scale)
        if self.probe_bootstrap < 0 or 0 < self.probe_bootstrap < 100:
            raise ConfigError(f"--probe-bootstrap must be 0 or at least 100, got {self.probe_bootstrap}")

    def loss_weight_map(self) -> dict[str, float]:
        names = [n.strip().lower() for n in self.losses.split(",") if n.strip()]
        unknown = sorted(set(names) - {"itc", "itm", "mlm", "gm"})
        if not names or unknown or len(set(names)) != len(names):
            raise ConfigError(f"--losses takes a comma-separated subset of itc, itm, mlm, gm; got {self.losses!r}")
        if self.loss_weights is None:
            return {n: 1.0 for n in names}
        try:
            weights = [float(w) for w in str(self.loss_weights).split(",")]
        except ValueError:
            raise ConfigError(f"--loss-weights must be numbers, got {self.loss_weights!r}") from None
        if len(weights) != len(names) or any(w < 0 for w in weights) or not any(weights):
            raise ConfigError(f"--loss-weights needs one non-negative weight per loss ({', '.join(names)}), "
                              f"not all zero; got {self.loss_weights!r}")
        return dict(zip(names, weights))
