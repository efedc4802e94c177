"""Settings plumbing shared by every verb: the error type, value parsers, YAML in and out, and
`setting()`, which keeps a field's help text beside its default so the CLI (and later the web
forms) are generated from the dataclasses and a default lives in one place.

Library errors name the setting by its CLI spelling (`--warmup-epochs`); see `flag_name`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
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
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
            bounds: tuple[float | None, float | None] | None = None, **metadata: Any) -> Any:
    """A dataclass field with its help text (and any CLI hints, e.g. `flag`, `metavar`) as metadata.

    `bounds=(lo, hi)` (inclusive; None: open) are checked by `check_bounds` before any work, so a
    value that would mean an unbounded allocation or an overflow deep inside a library is refused
    up front, in words naming the flag; `why=` adds the reason to that message."""
    if bounds is not None:
        metadata["bounds"] = bounds
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


# --------------------------------------------------------------------------- strict value types
# Every setting value that does not come from typed command-line text (a --config YAML file, the
# config.yaml of the run --resume continues, a Python caller) passes `check_value`, driven by the
# field's annotation: Python's own conversions would read `epochs: 2.9` as 2 and `true` as 1 (bool
# is an int), and turn a YAML list into its repr.


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a yes/no value)"
    if isinstance(value, str):
        return f"{value!r} (text)"
    if isinstance(value, (list, tuple)):
        return f"a list {list(value)!r}"[:80]
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)[:80]


def _whole_number(value: Any) -> int | None:
    """`value` as an int when it is one (3, 3.0, "3" from typed text), else None (2.9, True, [1], "x")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):  # numpy integers too
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return int(value) if math.isfinite(value) and value.is_integer() else None
    return None


def check_value(flag: str, annotation: Any, value: Any, origin: str | None = None, *, text: bool = False) -> Any:
    """`value` of the setting `flag` checked (and converted where nothing is lost) against its type.

    int: whole numbers only (3.0 becomes 3; 2.9, true, a list or text are refused); float: finite
    numbers (an int becomes a float); str: text (a YAML number is taken as its text, e.g.
    `threshold: 0.5`, but a yes/no, list or mapping is refused); bool: true/false only; list[...]:
    a list of plain values or comma-separated text. `text=True`: the value was typed after the flag,
    so numbers arrive as text to parse. `origin` ("--config x.yaml") is named in the message."""
    inner, optional = unwrap_optional(annotation)
    where = f" (from {origin})" if origin else ""
    if value is None:
        if optional or inner is Any:
            return None
        raise ConfigError(f"{flag} needs a value{where}")
    if inner is int:
        if text and isinstance(value, str):
            try:
                number: Any = float(value.strip()) if "." in value or "e" in value.lower() else int(value.strip())
            except ValueError:
                raise ConfigError(f"{flag} must be a whole number, got {value!r}{where}") from None
            value = number
        whole = _whole_number(value)
        if whole is None:
            raise ConfigError(f"{flag} must be a whole number, got {_shown(value)}{where}")
        return whole
    if inner is float:
        if text and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{flag} must be a number, got {value!r}{where}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{flag} must be a number, got {_shown(value)}{where}")
        if not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}{where}")
        return float(value)
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} is a yes/no setting (true or false), got {_shown(value)}{where}")
        return value
    if inner is str or typing.get_origin(inner) is Literal:
        if isinstance(value, bool) or isinstance(value, (list, tuple, dict, set)):
            hint = "; quote it if you mean the text" if isinstance(value, bool) else ""
            raise ConfigError(f"{flag} takes one value, got {_shown(value)}{where}{hint}")
        return value  # numbers stay as given (--oct-frames 3, --threshold 0.5); choices are checked by validate()
    if typing.get_origin(inner) is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, dict) or any(isinstance(v, (list, tuple, dict, set, bool)) for v in items):
            raise ConfigError(f"{flag} takes a list of plain values or comma-separated text, got "
                              f"{_shown(value)}{where}")
        return value
    if inner is OctFrames or typing.get_origin(inner) in (Union, types.UnionType):
        if isinstance(value, (bool, list, tuple, dict, set)):
            raise ConfigError(f"{flag} takes one value, got {_shown(value)}{where}")
    return value


def check_types(cls: type, values: dict[str, Any], origin: str | None = None) -> dict[str, Any]:
    """Settings read from a file (--config, a resumed run's config.yaml) checked against `cls`'s
    field types, before they reach click (whose INT type would truncate 2.9 and take true as 1)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = field_types(cls)
    return {name: check_value(option_flag(fields[name]), hints[name], value, origin) if name in fields else value
            for name, value in values.items()}


def option_flag(field: dataclasses.Field) -> str:
    """The flag a field is given with on the command line (its `flag` metadata, else --its-name)."""
    return field.metadata.get("flag", flag_name(field.name))


# --------------------------------------------------------------------------- bounds, before any work
# Declared with `setting(..., **BOUNDS)`. Upper bounds sit where a larger value would be an
# allocation no machine holds (or an overflow inside NumPy / torch), far above any real use.
# The seed range is NumPy's (np.random.seed takes 0..2**32-1); torch and Python take it too.
SEED = {"bounds": (0, 2**32 - 1), "why": "NumPy's seed range"}
# DataLoader workers: each is a process holding its own copy of the dataset; values above the
# machine's CPUs are lowered to them (see fit_workers), absurd ones refused.
MAX_WORKERS = 256
WORKERS = {"bounds": (0, MAX_WORKERS)}
BATCH = {"bounds": (1, 4096), "why": "a batch is held in memory at once"}
ACCUMULATION = {"bounds": (1, 4096)}
EPOCHS = {"bounds": (1, 100_000)}
WARMUP = {"bounds": (0, 100_000)}
# Each replicate's metrics are kept (and computed: time grows with them too).
BOOTSTRAP = {"bounds": (0, 100_000), "why": "1,000 to 10,000 replicates are usual"}
REPORT_HEATMAPS_HELP = ("report.html: heatmaps (grad-rollout) of up to this many of the most confident errors and "
                        "as many correct cases; 0: none.")
REPORT_HEATMAPS = {"bounds": (0, 256), "why": "each is an overlay embedded in report.html"}
# The upper limit is the token count the size implies, checked by ModelSpec.input_size_for.
INPUT_SIZE = {"bounds": (1, None), "why": "omit it for the model's default"}
NON_NEGATIVE = {"bounds": (0, None)}


def check_bounds(cfg: Any) -> None:
    """Every field's declared `bounds` (see `setting`), for any settings dataclass; None values
    (\"the default\") pass. Also refuses non-finite floats given from Python."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{option_flag(field)} must be a finite number, got {value}")
        bounds = field.metadata.get("bounds")
        if bounds is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        lo, hi = bounds
        if (lo is None or value >= lo) and (hi is None or value <= hi):
            continue
        flag, why = option_flag(field), field.metadata.get("why")
        if lo is not None and hi is not None:
            rule = f"between {lo:,} and {hi:,}"
        else:
            rule = f"at least {lo}" if lo is not None else f"at most {hi:,}"
        raise ConfigError(f"{flag} must be {rule}, got {value:,}" + (f" ({why})" if why else ""))


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under a scheduler), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def fit_workers(cfg: Any) -> list[str]:
    """--num-workers above this machine's CPUs is lowered to them (more processes than CPUs only
    compete for them and each holds its own copy of the dataset); one note when it is."""
    workers = getattr(cfg, "num_workers", None)
    cpus = available_cpus()
    if not isinstance(workers, int) or workers <= cpus:
        return []
    cfg.num_workers = cpus
    return [f"note: --num-workers {workers} is more than the {cpus} CPU(s) this process may use; using {cpus}"]


def check_ratios(text: str | None, flag: str = "--split") -> tuple[float, float, float] | None:
    """train,val,test fractions: three finite numbers in (0, 1] summing to 1 (nan compares false with
    everything, so a range check alone would let it through)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected three numbers like 0.7,0.15,0.15") from None
    if len(values) != 3 or not all(math.isfinite(v) and 0 < v <= 1 for v in values) \
            or abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(f"{flag} {text!r}: expected three fractions (train,val,test), each above 0, summing to 1")
    return values[0], values[1], values[2]


class Settings:
    """Base of every verb's settings dataclass: values are checked against the field types (no
    silent truncation), list fields also accept comma-separated text (the form flags and older
    config.yaml files give them), and defaults that do not fit a short run adapt."""

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, field.name, check_value(option_flag(field), hints[field.name], getattr(self, field.name)))
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

    def check_values(self) -> None:
        """Each value on its own (declared bounds, ratio texts), before any check of how settings go
        together; validate() starts with this, and the CLI runs it as soon as the settings exist."""
        check_bounds(self)


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


