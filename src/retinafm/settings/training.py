"""Settings of the training verbs: finetune, pretrain, refine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from retinafm.settings.base import (
    ACCUMULATION,
    BATCH,
    BOOTSTRAP,
    EPOCHS,
    HEADS,
    INPUT_SIZE,
    NON_NEGATIVE,
    OCT_FRAMES_HELP,
    PRECISION_HELP,
    REPORT_HEATMAPS,
    REPORT_HEATMAPS_HELP,
    SEED,
    WARMUP,
    WORKERS,
    ConfigError,
    Head,
    Modality,
    Precision,
    Settings,
    _at_least_one,
    _check_crop_scale,
    _check_warmup,
    check_device,
    check_precision,
    check_preprocessing,
    check_ratios,
    comma_list,
    parse_oct_frames,
    setting,
)

Adaptation = Literal["finetune", "lp"]
LpMode = Literal["features", "sgd"]
RegressionLoss = Literal["huber", "mse"]
GlobalPool = Literal["avg", "token"]
PretrainMethod = Literal["mae", "dino"]
VISION_LANGUAGE_LOSSES = ("itc", "itm", "mlm", "gm")


@dataclass
class FinetuneSettings(Settings):
    """Fine-tuning settings; defaults follow RETFound's fine-tuning recipe."""

    out: str = setting("", "Run directory to create.", path={})
    data_path: str | None = setting(None, "Folder DATA/{train,val,test}/<class>/<image>.", path={})
    manifest: str | None = setting(
        None, "CSV: path, split [, patient_id] and label | 0/1 label columns | numeric targets.", path={})
    split: str | None = setting(None, "Automatic stratified split ratios train,val,test, e.g. 0.7,0.15,0.15.")
    model: str = setting("RETFound_mae_natureCFP", "Zoo name (see `retinafm models`) or timm ViT.")
    weights: str | None = setting(None, "Zoo weights (default), HF repo id, local file, or 'none'.")
    adaptation: Adaptation = setting("finetune", "finetune: train the whole model; lp: a linear probe on the "
                                                 "frozen backbone.")
    # "features" embeds every image once and fits a scikit-learn probe (seconds); "sgd" is RETFound's
    # way, the frozen backbone run in every epoch with the head trained by AdamW.
    lp_mode: LpMode = setting("features", "lp: embed once + scikit-learn probe (features), or RETFound's epoch "
                                          "loop (sgd).")
    task: str = setting("multiclass", "A task type of retinafm.tasks: multiclass (binary is two classes), multilabel "
                                      "or regression (one or more targets).", choices="tasks")
    oct_frames: str = setting("middle", OCT_FRAMES_HELP)
    fundus_crop: bool = setting(False, "Crop fundus photographs to their circular field of view, padded square "
                                       "(kept for predict).")
    oct_crop: float | None = setting(None, "Keep this central fraction of each OCT B-scan, e.g. 0.8 (kept for "
                                              "predict).")
    modality: Modality | None = setting(None, "What the images are, when the colour/grayscale check guesses "
                                                 "wrong.")
    labels: list[str] | None = setting(None, "multilabel: comma-separated 0/1 manifest columns (default: every "
                                                "non-reserved column).")
    targets: list[str] | None = setting(None, "regression: comma-separated numeric manifest columns (default: "
                                                 "every non-reserved column).")
    head: Head = setting("linear", "Task head on the pooled feature: linear, mlp, or transformer (one token per "
                                   "output).")
    head_depth: int = setting(2, "mlp: hidden layers; transformer: encoder layers.", bounds=(1, 64))
    head_num_heads: int = setting(4, "Attention heads of the transformer head.", bounds=(1, 256))
    head_mlp_ratio: float = setting(2.0, "Hidden width of the mlp/transformer head as a multiple of the backbone "
                                         "width.", bounds=(None, 64))
    head_dropout: float = setting(0.1, "Dropout inside the mlp/transformer head.")
    loss: RegressionLoss | None = setting(None, "regression loss on standardised targets (default huber).")
    huber_beta: float = setting(1.0, "regression: where the Huber (SmoothL1) loss turns from quadratic to linear.")
    pos_weight: bool = setting(False, "multilabel: weight each label's positives by its negative/positive ratio "
                                      "in train.")
    threshold: str = setting("0.5", "multilabel decision threshold, or 'youden' for per-label thresholds chosen "
                                    "on val.")
    ordinal: bool = setting(False, "multiclass: the classes are ordered grades (adds quadratic-weighted kappa); "
                                   "classes named with grade numbers (0..4, DR0.., 0_none..) are detected without it.")
    bootstrap: int = setting(1000, "Bootstrap replicates for the test metrics' 95% CIs (patient-level with "
                                   "patient_id); 0: none.", **BOOTSTRAP)
    report_heatmaps: int = setting(8, REPORT_HEATMAPS_HELP, **REPORT_HEATMAPS)
    epochs: int = setting(50, "Training epochs.", **EPOCHS)
    batch_size: int = setting(16, "Per process.", **BATCH)
    accum_iter: int = setting(1, "Accumulate gradients over this many batches per optimizer step.", **ACCUMULATION)
    lr: float | None = setting(None, "Absolute lr (default: blr × effective batch / 256).", **NON_NEGATIVE)
    blr: float = setting(5e-3, "Base learning rate, scaled by the effective batch / 256.", **NON_NEGATIVE)
    min_lr: float = setting(1e-6, "Floor of the cosine learning-rate schedule.", **NON_NEGATIVE)
    layer_decay: float = setting(0.65, "Layer-wise learning-rate decay towards the input (1: none).")
    weight_decay: float = setting(0.05, "AdamW weight decay.", **NON_NEGATIVE)
    drop_path: float = setting(0.2, "Stochastic depth rate of the backbone.")
    warmup_epochs: int = setting(10, "Epochs of linear learning-rate warmup (a default longer than --epochs "
                                     "shrinks to it).", **WARMUP)
    smoothing: float = setting(0.1, "Label smoothing (multiclass; multilabel smooths towards 0.5).")
    mixup: float = setting(0.0, "Mixup alpha (multiclass; 0: off).", **NON_NEGATIVE)
    cutmix: float = setting(0.0, "CutMix alpha (multiclass; 0: off).", **NON_NEGATIVE)
    clip_grad: float | None = setting(None, "Clip gradient norm to this value.", **NON_NEGATIVE)
    grad_checkpointing: bool = setting(False, "Recompute block activations in backward: far less GPU memory, about "
                                              "a third more compute.")
    compile: bool = setting(False, "torch.compile the model for training (GPU; pays a compile time up front).")
    input_size: int | None = setting(None, "Default: the model's input size.", **INPUT_SIZE)
    global_pool: GlobalPool | None = setting(None, "avg (RETFound: mean of patch tokens + fc_norm) or token "
                                                      "(CLS); default per model.")
    crop_min_scale: float = setting(0.08, "Smallest area fraction of the random resized crop.")
    randaug_magnitude: int = setting(9, "RandAugment magnitude; 0 turns RandAugment off.", bounds=(0, 100))
    reprob: float = setting(0.25, "Random erasing probability.")
    seed: int = setting(0, "Random seed (data order, augmentation, initialisation).", **SEED)
    device: str = setting("auto", "auto, cpu or cuda.")
    precision: Precision = setting("auto", PRECISION_HELP)
    num_workers: int = setting(2, "Data-loading worker processes.", **WORKERS)
    resume: bool = setting(False, "Continue the run in --out from its checkpoint-last.pth (the CLI takes "
                                  "--resume RUN_DIR).", cli=False)
    overwrite: bool = setting(False, "Allow writing into an existing non-empty --out.")

    def validate(self) -> None:
        self.check_values()
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
        if not 0.0 < self.layer_decay <= 1.0:  # lr x decay**depth: 0 freezes, a negative one flips signs
            raise ConfigError(f"--layer-decay must be in (0, 1] (1: one lr for every layer), got {self.layer_decay}")
        _check_crop_scale(self.crop_min_scale)

    def check_values(self) -> None:
        super().check_values()
        check_ratios(self.split, "--split")

    def threshold_value(self) -> float | None:
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

    def names_list(self) -> list[str] | None:
        """--labels / --targets as a list of manifest columns (None: every non-reserved column). The
        task type's settings check has made sure only the one its task takes is given."""
        flag, names = ("labels", self.labels) if self.labels else ("targets", self.targets)
        names = comma_list(names)
        if not names:
            return None
        if len(set(names)) != len(names):
            raise ConfigError(f"--{flag} lists a column twice: {','.join(names)}")
        return names


# MAE (He et al. 2022; RETFound's pretraining) and DINO (Caron et al. 2021) recipes.
PRETRAIN_DEFAULTS = {"mae": {"blr": 1.5e-4, "warmup_epochs": 40, "weight_decay": 0.05},
                     "dino": {"blr": 5e-4, "warmup_epochs": 10, "weight_decay": 0.04}}


@dataclass
class PretrainSettings(Settings):
    """Self-supervised pretraining settings; defaults follow MAE / RETFound (mae) and DINO (dino)."""

    out: str = setting("", "Run directory to create.", path={"file_okay": False})
    images: str = setting("", "Unlabelled images: any folder (searched recursively; labels ignored) or a manifest "
                              "CSV.", path={})
    splits: list[str] | None = setting(None, "Keep only these splits (e.g. train,val) when the images carry one.")
    method: PretrainMethod = setting("mae", "mae (RETFound's first stage) or dino.")
    model: str = setting("vit_large_patch16", "Zoo name or timm ViT architecture.")
    init: str | None = setting(None, "Continue from these weights (zoo name, org/repo[:file], local file; an MAE "
                                        "file's decoder too). Default: random.")
    input_size: int | None = setting(None, "Default: the model's own.", **INPUT_SIZE)
    oct_frames: str = setting("middle", OCT_FRAMES_HELP)
    fundus_crop: bool = setting(False, "Crop fundus photographs to their field of view first.")
    oct_crop: float | None = setting(None, "Keep this central fraction of each OCT B-scan.")
    epochs: int = setting(800, "Pretraining epochs.", **EPOCHS)
    warmup_epochs: int | None = setting(None, "Default: mae 40, dino 10 (at most --epochs).", **WARMUP)
    batch_size: int = setting(64, "Per process.", **BATCH)
    accum_iter: int = setting(1, "Accumulate gradients over this many batches per optimizer step.", **ACCUMULATION)
    lr: float | None = setting(None, "Absolute learning rate (default: blr x batch / 256).", **NON_NEGATIVE)
    blr: float | None = setting(None, "Base learning rate. Default: mae 1.5e-4, dino 5e-4.", **NON_NEGATIVE)
    min_lr: float = setting(0.0, "Floor of the cosine learning-rate schedule.", **NON_NEGATIVE)
    weight_decay: float | None = setting(None, "Default: mae 0.05, dino 0.04.", **NON_NEGATIVE)
    clip_grad: float | None = setting(None, "Clip gradient norm to this value.", **NON_NEGATIVE)
    # MAE
    mask_ratio: float = setting(0.75, "MAE.")
    norm_pix_loss: bool = setting(True, "MAE.")
    decoder_dim: int = setting(512, "MAE.", bounds=(1, 16_384))
    decoder_depth: int = setting(8, "MAE.", bounds=(1, 64))
    decoder_heads: int = setting(16, "MAE.", bounds=(1, 256))
    crop_min_scale: float = setting(0.2, "MAE.")
    # DINO
    out_dim: int = setting(65536, "DINO: prototypes.", bounds=(1, 1_048_576))
    local_crops: int = setting(6, "DINO.", bounds=(0, 64))
    local_size: int | None = setting(None, "DINO (default: 96/224 of the input size).", bounds=(1, 4096))
    teacher_temp: float = setting(0.04, "DINO.", **NON_NEGATIVE)
    warmup_teacher_temp: float = setting(0.04, "DINO.", **NON_NEGATIVE)
    warmup_teacher_epochs: int = setting(0, "DINO.", **WARMUP)
    momentum_teacher: float = setting(0.996, "DINO.")
    # both
    reconstructions: int = setting(4, "MAE: images drawn after every epoch (plots/reconstructions_*.png); 0: none.",
                                   bounds=(0, 256))
    grad_checkpointing: bool = setting(False, "Recompute block activations in backward: far less GPU memory, about "
                                              "a third more compute.")
    seed: int = setting(0, "Random seed.", **SEED)
    device: str = setting("auto", "auto, cpu or cuda.")
    precision: Precision = setting("auto", PRECISION_HELP)
    num_workers: int = setting(2, "Data-loading worker processes.", **WORKERS)
    resume: bool = setting(False, "Continue the run in --out (the CLI takes --resume RUN_DIR).", cli=False)
    overwrite: bool = setting(False, "Allow writing into an existing non-empty --out.")

    def validate(self) -> None:
        self.check_values()
        if not self.out:
            raise ConfigError("--out is required: the run directory to write.")
        if not self.images:
            raise ConfigError("--images is required: a folder of images or a CSV manifest with a path column.")
        if self.method not in ("mae", "dino"):
            raise ConfigError(f"--method must be 'mae' or 'dino', not {self.method!r}")
        parse_oct_frames(self.oct_frames)
        check_preprocessing(self.oct_crop, None)
        _at_least_one(self, "epochs", "batch_size", "accum_iter", "decoder_dim", "decoder_depth", "decoder_heads",
                      "out_dim")
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

    def split_list(self) -> list[str] | None:
        return comma_list(self.splits) or None


@dataclass
class RefineSettings(Settings):
    """Vision-language refinement from image-report pairs (RetFiner-style)."""

    out: str = setting("", "Run directory to create.", path={"file_okay": False})
    pairs: str = setting("", "CSV of image-report pairs: path, report [, split].", path={})
    model: str = setting("RETFound_mae_natureOCT", "Zoo name or timm ViT architecture.")
    weights: str | None = setting(None, "File, hf repo id, zoo name, or 'none' (default: the zoo entry's).")
    text_model: str = setting("", "BERT-family text encoder: Hugging Face repo id or local folder (e.g. "
                                  "emilyalsentzer/Bio_ClinicalBERT).")
    input_size: int | None = setting(None, "Default: the model's own.", **INPUT_SIZE)
    oct_frames: str = setting("middle", OCT_FRAMES_HELP)
    fundus_crop: bool = setting(False, "Crop fundus photographs to their field of view first.")
    oct_crop: float | None = setting(None, "Keep this central fraction of each OCT B-scan.")
    losses: list[str] = setting(help="Objectives: any of itc, itm, mlm, gm.",
                                default_factory=lambda: ["itc", "itm", "mlm", "gm"])
    loss_weights: list[float] | None = setting(None, "One weight per --losses entry, e.g. 1,1,0.5,0.5 (default "
                                                        "all 1).")
    fusion_layers: int | None = setting(None, "Upper text layers that cross-attend to the image (default: half "
                                                 "of them).", bounds=(1, 256))
    embed_dim: int = setting(256, "Contrastive space width.", bounds=(1, 16_384))
    max_length: int = setting(128, "Report tokens kept.", bounds=(1, 8192))
    mlm_probability: float = setting(0.15, "Share of report tokens masked for mlm.")
    epochs: int = setting(10, "Refinement epochs.", **EPOCHS)
    warmup_epochs: int = setting(1, "Epochs of linear learning-rate warmup (a default longer than --epochs "
                                    "shrinks to it).", **WARMUP)
    batch_size: int = setting(32, "Per process.", **BATCH)
    lr: float = setting(2e-5, "Learning rate.", **NON_NEGATIVE)
    min_lr: float = setting(1e-6, "Floor of the cosine learning-rate schedule.", **NON_NEGATIVE)
    weight_decay: float = setting(0.05, "AdamW weight decay.", **NON_NEGATIVE)
    crop_min_scale: float = setting(0.5, "Smallest area fraction of the random resized crop.")
    clip_grad: float | None = setting(None, "Clip gradient norm to this value.", **NON_NEGATIVE)
    probe_on: str | None = setting(None, "A labelled folder or manifest: linear probes before and after "
                                            "refinement, side by side.", path={})
    probe_bootstrap: int = setting(1000, "Bootstrap replicates of the probes' test CIs (0: none).", **BOOTSTRAP)
    seed: int = setting(0, "Random seed.", **SEED)
    device: str = setting("auto", "auto, cpu or cuda.")
    precision: Precision = setting("auto", PRECISION_HELP)
    num_workers: int = setting(2, "Data-loading worker processes.", **WORKERS)
    resume: bool = setting(False, "Continue the run in --out (the CLI takes --resume RUN_DIR).", cli=False)
    overwrite: bool = setting(False, "Allow writing into an existing non-empty --out.")

    def validate(self) -> None:
        self.check_values()
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
        names = [n.lower() for n in comma_list(self.losses) or []]
        unknown = sorted(set(names) - set(VISION_LANGUAGE_LOSSES))
        if not names or unknown or len(set(names)) != len(names):
            raise ConfigError(f"--losses takes a comma-separated subset of {', '.join(VISION_LANGUAGE_LOSSES)}; "
                              f"got {_text(self.losses)!r}")
        if self.loss_weights is None:
            return {n: 1.0 for n in names}
        try:
            weights = [float(w) for w in comma_list(self.loss_weights) or []]
        except ValueError:
            raise ConfigError(f"--loss-weights must be numbers, got {_text(self.loss_weights)!r}") from None
        if len(weights) != len(names) or any(w < 0 for w in weights) or not any(weights):
            raise ConfigError(f"--loss-weights needs one non-negative weight per loss ({', '.join(names)}), "
                              f"not all zero; got {_text(self.loss_weights)!r}")
        return dict(zip(names, weights, strict=True))


def _text(value: object) -> str:
    """A list setting as it is typed on the command line."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
