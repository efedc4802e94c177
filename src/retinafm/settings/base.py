"""Settings plumbing shared by every verb: the error type, value parsers, YAML in and out, and
`setting()`, which keeps a field's help text beside its default so the CLI (and later the web
forms) are generated from the dataclasses and a default lives in one place.

Library errors name the setting by its CLI spelling (`--warmup-epochs`); see `flag_name`.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal, Union

import yaml

# Choices are Literal types (the CLI turns them into click.Choice); the tuples are their values.
Head = Literal["linear", "mlp", "transformer"]
Modality = Literal["CFP", "OCT"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # runtime.device.amp_dtype turns these into an autocast dtype
HEADS: tuple[str, ...] = typing.get_args(Head)
MODALITIES: tuple[str, ...] = typing.get_args(Modality)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
OctFrames = str | int

OCT_FRAMES_HELP = ("B-scans of each OCT volume (multi-frame DICOM, .vol, .e2e, multi-page TIFF): middle, all, "
                   "or N evenly spread.")
PRECISION_HELP = ("Autocast. auto: bf16 on a GPU (fp16 where it lacks bf16) and on CPUs with AMX or AVX-512-BF16; "
                  "fp32 on other CPUs, where bf16 is several times slower.")


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


def check_preprocessing(oct_crop: float | None, modality: str | None) -> None:
    """--oct-crop and --modality, wherever they are given (finetune, embed)."""
    if oct_crop is not None and not 0 < oct_crop <= 1:
        raise ConfigError(f"--oct-crop is the central fraction to keep, in (0, 1]; got {oct_crop}")
    if modality is not None and modality not in MODALITIES:
        raise ConfigError(f"--modality must be one of {', '.join(MODALITIES)}, not {modality!r}")


def _at_least_one(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def _check_warmup(warmup_epochs: int | None, epochs: int) -> None:
    if warmup_epochs is not None and not 0 <= warmup_epochs <= epochs:
        raise ConfigError(f"--warmup-epochs must be between 0 and --epochs ({epochs})")


def _check_crop_scale(value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"--crop-min-scale must be in (0, 1], got {value}")


def check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda, not {device!r}")


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


def comma_list(value: Any) -> list[str] | None:
    """A comma list as given on the command line or in an older config.yaml ("a, b,") or already a list."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Each field's resolved annotation (the modules use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether None is allowed)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):  # Optional[X] and X | None
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def list_item_type(annotation: Any) -> type | None:
    """str for list[str], float for list[float], None when the field is not a list."""
    inner, _ = unwrap_optional(annotation)
    if typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner) or (str,)
        return item
    return None


class Settings:
    """Base of every verb's settings dataclass: list fields also accept comma-separated text (the form
    flags and older config.yaml files give them), and defaults that do not fit a short run adapt."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            item = list_item_type(field_types(type(self))[field.name])
            value = getattr(self, field.name)
            if item is None or value is None:
                continue
            items = comma_list(value)
            if not items and unwrap_optional(field_types(type(self))[field.name])[1]:
                setattr(self, field.name, None)
                continue
            if item is not str:
                try:
                    items = [item(v) for v in items]
                except ValueError:
                    pass  # kept as text: validate() names the setting and what it takes
            setattr(self, field.name, items)

    def fit_defaults(self, given: Collection[str] = ()) -> list[str]:
        """Adapt defaults that do not fit this run; one note per change. Settings named in `given` were
        chosen by the user (a flag or --config) and are left as they are, for validate() to refuse."""
        return fit_warmup(self, given)


def fit_warmup(cfg: Any, given: Collection[str]) -> list[str]:
    """A default warmup longer than a short run becomes the whole run (min(default, epochs))."""
    warmup, epochs = getattr(cfg, "warmup_epochs", None), getattr(cfg, "epochs", None)
    if "warmup_epochs" in given or warmup is None or not isinstance(epochs, int) or not 1 <= epochs < warmup:
        return []
    cfg.warmup_epochs = epochs
    return [f"note: {flag_name('warmup_epochs')} defaults to {warmup}, longer than {flag_name('epochs')} {epochs}; "
            f"warming up for {epochs} epoch{'s' if epochs != 1 else ''}"]


def flag_text(value: Any) -> str:
    """A setting's value as typed after its flag: a list comma-separated, a float exactly (repr)."""
    if isinstance(value, (list, tuple)):
        return ",".join(flag_text(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def config_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def read_yaml_settings(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML settings file; keys may use dashes or underscores. Unknown keys are an error."""
    from retinafm.files.inputs import InputFileError, load_yaml  # here: this function is all of base that reads files

    path = Path(path)
    try:
        # Regular files of at most 1 MiB, and no alias bombs (see files.inputs.load_yaml).
        data = load_yaml(path, what="--config") or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist") from None
    except InputFileError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"--config {path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not a text file (not UTF-8); give a YAML file of settings") from None
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


