"""Settings of the verbs that run a trained model: predict, evaluate, export, embed (their options are
generated from these)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from retinafm.settings.base import (
    BATCH,
    BOOTSTRAP,
    INPUT_SIZE,
    OCT_FRAMES_HELP,
    PRECISION_HELP,
    REPORT_HEATMAPS,
    REPORT_HEATMAPS_HELP,
    SEED,
    WORKERS,
    ConfigError,
    Modality,
    Precision,
    Settings,
    check_device,
    check_precision,
    check_preprocessing,
    parse_oct_frames,
    setting,
)

Pool = Literal["cls", "avg"]
# engine.heatmaps.METHODS, spelled out here because settings sit below the engine (a test keeps them equal)
HeatmapMethod = Literal["grad-rollout", "rollout", "gradcam", "integrated-gradients"]
_METHOD_HELP = ("How relevance is computed: grad-rollout (gradient-weighted attention rollout, the most faithful on "
                "RETFound), rollout (attention only, no gradients, about predict's cost), gradcam (Grad-CAM on the "
                "last block's tokens), integrated-gradients (captum, pixel-level, the slowest).")
_TARGET_HELP = ("Which output to explain: predicted (the predicted class; a multi-label model's positive labels; "
                "every target of a regression model), all, or one output's name.")
STEPS = {"bounds": (2, 1024), "why": "each step is a forward and backward pass"}
EmbeddingDtype = Literal["float16", "float32"]
ExportFormat = Literal["onnx"]

_CPU_INT8_HELP = "Dynamic int8 Linear layers on CPU: ~1.5x faster on ViT-B, outputs change slightly."
_MODALITY_HELP = "What the images are, when the colour/grayscale check guesses wrong."
_AS_TRAINED = OCT_FRAMES_HELP[:-1] + "; default: as in training."  # predict/evaluate: None reads the checkpoint's


def is_onnx(path: str | Path) -> bool:
    """predict, evaluate and embed treat a --checkpoint ending in .onnx as an exported model."""
    return Path(path).suffix.lower() == ".onnx"


def check_onnx_options(path: str | Path, device: str, cpu_int8: bool, precision: str = "auto") -> None:
    """Refuse the options that do not apply to an exported model, before any work."""
    if precision not in ("auto", "fp32"):
        raise ConfigError(f"--precision {precision}: {path} is an ONNX model, which runs in the precision it was "
                          "exported in (fp32, or int8 with `retinafm export --int8`); drop --precision")
    if cpu_int8:
        raise ConfigError(f"--cpu-int8 quantises a PyTorch checkpoint, and {path} is an ONNX model; export the "
                          "checkpoint with `retinafm export --int8` for an int8 ONNX model instead")
    if device != "auto" and not device.startswith("cpu"):
        raise ConfigError(f"--device {device}: {path} is an ONNX model, which runs on the CPU with ONNX Runtime; "
                          "pass --device cpu, or give the .pth checkpoint to run on a GPU")


def _required(cfg: Any, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required")


def _check_run(cfg: Any) -> None:
    """How a trained model runs (predict, evaluate): batch, workers, device, precision, volumes, modality."""
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.num_workers < 0:
        raise ConfigError(f"--num-workers must be 0 or more, got {cfg.num_workers}")
    check_device(cfg.device)
    check_precision(cfg.precision)
    if cfg.oct_frames is not None:
        parse_oct_frames(cfg.oct_frames)
    check_preprocessing(None, cfg.modality)
    if is_onnx(cfg.checkpoint):
        check_onnx_options(cfg.checkpoint, cfg.device, getattr(cfg, "cpu_int8", False), cfg.precision)


# Field order is the order of the options in `--help`; fields without help text had none on the CLI.
@dataclass
class PredictSettings(Settings):
    """`retinafm predict`: a checkpoint (or its .onnx export) on new images -> a predictions CSV."""

    checkpoint: str = setting("", "A run's checkpoint-best.pth, or its .onnx export (ONNX Runtime on the CPU).",
                              required=True, path={})
    images: str = setting("", "An image file or a folder (recursive).", required=True, path={})
    out: str = setting("", "Predictions CSV to write.", required=True, path={"dir_okay": False})
    batch_size: int = setting(32, **BATCH)
    device: str = setting("auto")
    precision: Precision = setting("auto", PRECISION_HELP)
    num_workers: int = setting(2, **WORKERS)
    overwrite: bool = setting(False)
    oct_frames: str | None = setting(None, _AS_TRAINED)  # None: as the model was trained
    modality: Modality | None = setting(None, _MODALITY_HELP)
    cpu_int8: bool = setting(False, _CPU_INT8_HELP)
    heatmaps: str | None = setting(None, "Also write heatmaps and overlays of each prediction into this folder "
                                         "(as `retinafm explain` does).", path={"file_okay": False})
    heatmap_method: HeatmapMethod = setting("grad-rollout", "--heatmaps: " + _METHOD_HELP)
    heatmap_target: str = setting("predicted", "--heatmaps: " + _TARGET_HELP)

    def validate(self) -> None:
        self.check_values()
        _required(self, "checkpoint", "images", "out")
        if self.heatmaps:
            check_explainable(self.checkpoint, self.cpu_int8, "--heatmaps")
        _check_run(self)


@dataclass
class ExplainSettings(Settings):
    """`retinafm explain`: where the model looked, per image and output, laid back on each file."""

    checkpoint: str = setting("", "A run's checkpoint-best.pth (or a probe's); not an .onnx export, which has no "
                                  "gradients or attention to read.", required=True, path={})
    images: str = setting("", "An image file, a folder (recursive) or a manifest CSV with a path column.",
                          required=True, path={})
    out: str = setting("", "Folder for explanations.csv, heatmaps/ (.npy at each file's resolution) and overlays/.",
                       required=True, path={"file_okay": False})
    method: HeatmapMethod = setting("grad-rollout", _METHOD_HELP)
    target: str = setting("predicted", _TARGET_HELP)
    evaluate: bool = setting(False, "Also measure every method's faithfulness (deletion / insertion AUC against "
                                    "random heatmaps) into faithfulness.csv, and with --masks their localisation.")
    masks: str | None = setting(None, "With --evaluate: a folder of lesion masks, <image stem>.png (non-zero = "
                                      "lesion), for the pointing game and the energy inside the masks "
                                      "(localisation.csv).", path={"file_okay": False})
    steps: int = setting(32, "integrated-gradients: interpolation steps.", **STEPS)
    faithfulness_steps: int = setting(16, "--evaluate: deletion / insertion steps.", **STEPS)
    bootstrap: int = setting(1000, "--evaluate: bootstrap replicates for 95% CIs.", **BOOTSTRAP)
    seed: int = setting(0, "Seed of the random heatmaps and the bootstrap.", **SEED)
    batch_size: int = setting(8, **BATCH)
    device: str = setting("auto")
    precision: Precision = setting("auto", PRECISION_HELP)
    num_workers: int = setting(2, **WORKERS)
    overwrite: bool = setting(False)
    oct_frames: str | None = setting(None, _AS_TRAINED)
    modality: Modality | None = setting(None, _MODALITY_HELP)

    def validate(self) -> None:
        self.check_values()
        _required(self, "checkpoint", "images", "out")
        if self.masks and not self.evaluate:
            raise ConfigError("--masks is used by --evaluate (localisation); add --evaluate or drop --masks")
        if 0 < self.bootstrap < 100:
            raise ConfigError(f"--bootstrap must be 0 (no confidence intervals) or at least 100 replicates, "
                              f"got {self.bootstrap}")
        check_explainable(self.checkpoint, False, "explain")
        _check_run(self)


def check_explainable(checkpoint: str, cpu_int8: bool, what: str) -> None:
    """Heatmaps need the PyTorch model: its attention and its gradients."""
    if is_onnx(checkpoint):
        raise ConfigError(f"{what}: {checkpoint} is an ONNX model, which gives neither gradients nor attention to "
                          "explain with; give the .pth checkpoint it was exported from")
    if cpu_int8:
        raise ConfigError(f"{what}: --cpu-int8 layers have no gradients; drop --cpu-int8 to compute heatmaps")


@dataclass
class EvaluateSettings(Settings):
    """`retinafm evaluate`: a checkpoint on a labelled folder or manifest split: metrics with CIs, report."""

    checkpoint: str = setting("", "A run's checkpoint-best.pth (or an imported one).", required=True, path={})
    data_path: str | None = setting(None, "Labelled folder (its own test split, or an external set).", path={})
    manifest: str | None = setting(None, "Labelled CSV manifest.", path={})
    split: str = setting("test", "Which split to evaluate.")
    out: str = setting("", "Folder for metrics, predictions, plots and report.html.", required=True, path={})
    label_map: str | None = setting(None, "External sets: rename their classes (or columns) to the model's, "
                                          "data=model,... e.g. 'no_dr=normal,mild=dr,moderate=dr' (several may "
                                          "merge into one).")
    ordinal: bool = setting(False, "Treat the classes as ordered grades (quadratic-weighted kappa).")
    bootstrap: int = setting(1000, "Bootstrap replicates for 95% CIs (patient-level when the manifest has "
                                   "patient_id); 0: none.", **BOOTSTRAP)
    seed: int = setting(0, "Seed of the bootstrap.", **SEED)
    report_heatmaps: int = setting(8, REPORT_HEATMAPS_HELP, **REPORT_HEATMAPS)
    batch_size: int = setting(32, **BATCH)
    device: str = setting("auto")
    precision: Precision = setting("auto", PRECISION_HELP)
    num_workers: int = setting(2, **WORKERS)
    overwrite: bool = setting(False)
    oct_frames: str | None = setting(None, _AS_TRAINED)  # None: as the model was trained
    modality: Modality | None = setting(None, _MODALITY_HELP)
    cpu_int8: bool = setting(False, _CPU_INT8_HELP)

    def validate(self) -> None:
        self.check_values()
        _required(self, "checkpoint", "out")
        if bool(self.data_path) == bool(self.manifest):
            raise ConfigError("give exactly one of --data-path or --manifest")
        if self.bootstrap < 0 or 0 < self.bootstrap < 100:
            raise ConfigError(f"--bootstrap must be 0 (no confidence intervals) or at least 100 replicates, "
                              f"got {self.bootstrap}")
        _check_run(self)


@dataclass
class ExportSettings(Settings):
    """`retinafm export`: a checkpoint as one ONNX file with its metadata inside."""

    checkpoint: str = setting("", "A retinafm checkpoint (.pth).", required=True, path={"dir_okay": False})
    out: str = setting("", "The .onnx file to write.", required=True, path={"dir_okay": False})
    format: ExportFormat = setting("onnx")
    int8: bool = setting(False, "ONNX Runtime's transformer fusions and int8 weights: smaller and faster on CPU, "
                                "outputs change slightly.")
    opset: int | None = setting(None, "ONNX opset (default 17).", bounds=(7, 30))
    overwrite: bool = setting(False)

    def validate(self) -> None:
        self.check_values()
        _required(self, "checkpoint", "out")
        if self.format != "onnx":
            raise ConfigError(f"--format must be onnx, got {self.format!r}")


@dataclass
class EmbedSettings(Settings):
    """How `retinafm embed` turns images into pooled feature vectors (and what a probe run embeds with)."""

    model: str | None = setting(None, "Zoo name or timm architecture (see `retinafm models`).")
    weights: str | None = setting(None, "For --model: file, hf repo id, zoo name, or 'none' (default: the zoo "
                                        "entry's).")
    checkpoint: str | None = setting(None, "Instead of --model: a retinafm checkpoint.", path={})
    pool: Pool | None = setting(None, "Class token or average of patch tokens (default: the model's own; "
                                      "RETFound: avg).")
    tta_flip: bool = setting(False, "Average with the horizontally flipped image's embedding.")
    dtype: EmbeddingDtype = setting("float16")
    input_size: int | None = setting(None, **INPUT_SIZE)
    batch_size: int = setting(64, **BATCH)
    shard_size: int = setting(2048, "Images per resumable shard.", bounds=(1, 65_536))
    oct_frames: str = setting("middle", OCT_FRAMES_HELP)
    fundus_crop: bool = setting(False, "With --model: crop fundus photographs to their field of view.")
    oct_crop: float | None = setting(None, "With --model: keep this central fraction of each B-scan.")
    modality: Modality | None = setting(None, _MODALITY_HELP)
    cpu_int8: bool = setting(False, _CPU_INT8_HELP)
    device: str = setting("auto")
    precision: Precision = setting("auto", PRECISION_HELP)
    num_workers: int = setting(2, **WORKERS)

    @classmethod
    def for_run(cls, cfg: Any) -> EmbedSettings:
        """The settings a linear-probe run (finetune --adaptation lp, label-efficiency) embeds with:
        the run's model, image recipe and volumes, float32 for the probe."""
        return cls(model=cfg.model, weights=cfg.weights, input_size=cfg.input_size,
                   pool={"token": "cls", "avg": "avg"}.get(cfg.global_pool or ""), dtype="float32",
                   batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device, precision=cfg.precision,
                   oct_frames=cfg.oct_frames, fundus_crop=cfg.fundus_crop, oct_crop=cfg.oct_crop,
                   modality=cfg.modality)

    def validate(self) -> None:
        self.check_values()
        if (self.model is None) == (self.checkpoint is None):
            raise ConfigError("give exactly one of --model NAME (with --weights) or --checkpoint FILE")
        if self.checkpoint is not None and self.weights is not None:
            raise ConfigError("--weights goes with --model; a --checkpoint already holds its weights")
        if self.checkpoint is not None and (self.fundus_crop or self.oct_crop):
            raise ConfigError("--fundus-crop / --oct-crop go with --model; a --checkpoint applies the "
                              "preprocessing it was trained with")
        if self.checkpoint is not None and is_onnx(self.checkpoint):
            check_onnx_options(self.checkpoint, self.device, self.cpu_int8, self.precision)
        check_preprocessing(self.oct_crop, self.modality)
        if self.pool is not None and self.pool not in ("cls", "avg"):
            raise ConfigError(f"--pool must be one of cls, avg, got {self.pool!r}")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"--dtype must be one of float16, float32, got {self.dtype!r}")
        parse_oct_frames(self.oct_frames)
        check_device(self.device)
        check_precision(self.precision)
        if self.shard_size < 1 or self.batch_size < 1:
            raise ConfigError("--shard-size and --batch-size must be at least 1")

    check = validate  # the name the probe, refine and retinafm.load callers use
