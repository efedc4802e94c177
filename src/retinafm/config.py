"""Typed settings for every workflow, with YAML in and out.

The CLI fills these once (flags override a --config YAML file); library functions take them as
plain dataclasses, and every run saves its resolved settings as config.yaml.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A setting has a value the toolkit cannot use; the message names the setting."""


@dataclass
class FinetuneConfig:
    """Fine-tuning settings; defaults follow RETFound's fine-tuning recipe."""

    out: str = ""
    data_path: Optional[str] = None
    manifest: Optional[str] = None
    split: Optional[str] = None  # "0.7,0.15,0.15" asks for an automatic stratified split
    model: str = "RETFound_mae_natureCFP"
    weights: Optional[str] = None  # None: the zoo entry's own weights; "none": random init
    adaptation: str = "finetune"  # finetune | lp
    task: str = "multiclass"
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
    input_size: Optional[int] = None  # None: the model's own input size
    global_pool: Optional[str] = None  # avg | token; None: the model's default
    crop_min_scale: float = 0.08
    randaug_magnitude: int = 9  # 0 turns RandAugment off
    reprob: float = 0.25
    seed: int = 0
    device: str = "auto"
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
        if self.task != "multiclass":
            raise ConfigError(f"--task {self.task!r} is not available yet; use 'multiclass'")
        if self.global_pool not in (None, "avg", "token"):
            raise ConfigError(f"--global-pool must be 'avg' or 'token', not {self.global_pool!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "accum_iter": self.accum_iter}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ConfigError(f"--warmup-epochs must be between 0 and --epochs ({self.epochs})")
        for name in ("smoothing", "drop_path", "reprob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ConfigError(f"--crop-min-scale must be in (0, 1], got {self.crop_min_scale}")


def config_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def read_yaml_settings(path: str | Path, cls: type = FinetuneConfig) -> dict[str, Any]:
    """Read a YAML settings file; keys may use dashes or underscores. Unknown keys are an error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of setting: value")
    settings = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(settings) - config_fields(cls))
    if unknown:
        raise ConfigError(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    return settings


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)

