"""Settings plumbing shared by every verb: the error type, value parsers, YAML in and out, and
`setting()`, which keeps a field's help text beside its default so the CLI (and later the web
forms) are generated from the dataclasses and a default lives in one place.

Library errors name the setting by its CLI spelling (`--warmup-epochs`); see `flag_name`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Union

import yaml

HEADS = ("linear", "mlp", "transformer")
MODALITIES = ("CFP", "OCT")
OctFrames = Union[str, int]


class ConfigError(ValueError):
    """A setting has a value the toolkit cannot use; the message names the setting."""


def parse_oct_frames(value: OctFrames) -> OctFrames:
    """'middle' | 'all' | a positive integer (also given as text)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif str(value).strip().lower() in ("middle", "all"):
        return str(value).strip().lower()
    else:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ConfigError(f"--oct-frames must be middle, all or a number of B-scans, got {value!r}") from None
    if number < 1:
        raise ConfigError(f"--oct-frames must be at least 1, got {number}")
    return number


def check_preprocessing(oct_crop: Optional[float], modality: Optional[str]) -> None:
    """--oct-crop and --modality, wherever they are given (finetune, embed)."""
    if oct_crop is not None and not 0 < oct_crop <= 1:
        raise ConfigError(f"--oct-crop is the central fraction to keep, in (0, 1]; got {oct_crop}")
    if modality is not None and modality not in MODALITIES:
        raise ConfigError(f"--modality must be one of {', '.join(MODALITIES)}, not {modality!r}")


def _at_least_one(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def _check_warmup(warmup_epochs: Optional[int], epochs: int) -> None:
    if warmup_epochs is not None and not 0 <= warmup_epochs <= epochs:
        raise ConfigError(f"--warmup-epochs must be between 0 and --epochs ({epochs})")


def _check_crop_scale(value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"--crop-min-scale must be in (0, 1], got {value}")


def check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda, not {device!r}")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # train.runtime.amp_dtype turns these into an autocast dtype


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
            **metadata: Any) -> Any:
    """A dataclass field with its help text (and any CLI hints, e.g. `flag`, `metavar`) as metadata."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def flag_name(name: str) -> str:
    """The CLI spelling of a setting: warmup_epochs -> --warmup-epochs."""
    return "--" + name.replace("_", "-")


def config_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def read_yaml_settings(path: str | Path, cls: type) -> dict[str, Any]:
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


