"""The Jobs page's forms, generated from the settings dataclasses, and the check of a submitted form.

Why generated: a default or a help text lives in one place (the dataclass field, `settings.setting`),
and the CLI builds its options from the same fields (cli.py `settings_options`), so the form cannot
drift from the command line. The field -> flag / type / default rules below are the CLI's
(`option_flag`, `field_types`, `unwrap_optional`, `list_item_type`, the field metadata `help`,
`bounds`, `required`, `choices`, `path`); serve may not import the CLI, so they are applied here
to the same metadata.

What a web form may not set: where a job writes (`out`, predict's `heatmaps` folder: the server
chooses `<runs>/<name>`), `overwrite` (a job never replaces a folder) and `resume`. Paths are names
relative to a served folder: data (`data_path`, `manifest`, `images`) under --data-root, models
(`checkpoint`, a model id) under --runs; each goes through `security.confined`, so `..`, absolute
paths and symlinks out are refused (403) before anything runs. `weights` takes a zoo name, `none`,
a Hugging Face repo id (read from the local hub cache) or a weights file under --runs.

A submitted form becomes a `JobPlan`: the settings object of each step, checked by the class's own
`validate()` (so a bad value is refused, naming its flag, before it is queued), and the exact
command lines the job runs: only the settings that differ from their defaults are passed, so the
CLI adapts its defaults (a warmup longer than a short run) exactly as it does for a typed command.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from retinafm.serve.security import confined
from retinafm.settings import (
    ConfigError,
    EmbedSettings,
    EvaluateSettings,
    FinetuneSettings,
    PredictSettings,
    ProbeSettings,
    check_bounds,
    check_value,
    field_types,
    flag_text,
    list_item_type,
    option_flag,
    unwrap_optional,
)
from retinafm.tasks import TASKS

# Inputs a form names, and the folder each is confined to; "folder" / "file": what it must be.
DATA_FIELDS: dict[str, str] = {"data_path": "folder", "manifest": "file", "images": "any"}  # under --data-root
MODEL_FIELDS: dict[str, str] = {"checkpoint": "file"}  # a model id: a checkpoint under --runs
SERVER_CHOSEN = frozenset({"out", "overwrite", "resume"})  # the job's folder is <runs>/<name>, never replaced
EMBEDDINGS = "embeddings.parquet"  # embed-probe's intermediate file, kept in the job's record folder
PREDICTIONS = "predictions.csv"  # predict's output inside the job's folder
HEATMAPS = "heatmaps"  # predict --heatmaps: the folder inside the job's folder

PROBE_EXCLUDED = frozenset({"max_iter"})  # not an option of `retinafm probe`: a job runs only what the CLI takes


@dataclass(frozen=True)
class FormField:
    """One setting of a form. `step`: the command it is passed to (embed-probe has two); `root`: the
    served folder a path is relative to ("data" or "runs"); `annotation`: the field's type, for checks."""

    name: str
    flag: str
    type: str  # "int" | "float" | "bool" | "str" | "choice" | "path"
    default: Any
    help: str
    choices: list[str] | None
    required: bool
    step: str
    bounds: tuple[float | None, float | None] | None = None
    root: str | None = None
    is_list: bool = False
    annotation: Any = str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "flag": self.flag, "type": self.type, "default": self.default, "help": self.help,
                "choices": self.choices, "required": self.required,
                "bounds": list(self.bounds) if self.bounds else None, "root": self.root, "list": self.is_list,
                "step": self.step}


def _task_names() -> list[str]:
    return list(TASKS)


def settings_fields(cls: type, step: str, *, exclude: frozenset[str] = frozenset(),
                    help_texts: Mapping[str, str] | None = None,
                    choices: Mapping[str, str] | None = None) -> list[FormField]:
    """The form fields of the settings dataclass `cls`, in field order (the order of `--help`), as the CLI's
    `field_option` reads them: flag, type, default (None for a required option, a list as comma text) and
    help from the field; Literal -> choice; `choices="tasks"` -> the task registry's names."""
    hints = field_types(cls)
    help_texts, choices = help_texts or {}, choices or {}
    fields = []
    for field in dataclasses.fields(cls):
        name, meta = field.name, field.metadata
        if name in SERVER_CHOSEN or name in exclude or not meta.get("cli", True):
            continue
        if "path" in meta and name not in DATA_FIELDS and name not in MODEL_FIELDS:
            continue  # an output path: chosen by the server
        annotation = hints[name]
        inner, _ = unwrap_optional(annotation)
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]
        item = list_item_type(annotation)
        options: list[str] | None = None
        root = None
        if meta.get("choices", choices.get(name)) == "tasks":
            kind, options = "choice", _task_names()
        elif typing.get_origin(inner) is Literal:
            kind, options = "choice", [str(v) for v in typing.get_args(inner)]
        elif name in DATA_FIELDS or name in MODEL_FIELDS:
            kind, root = "path", "data" if name in DATA_FIELDS else "runs"
        elif item is not None:
            kind = "str"
            default = None if default is None else ",".join(map(str, default))
        elif inner is bool:
            kind = "bool"
        elif inner in (int, float):
            kind = inner.__name__
        else:
            kind = "str"
        required = bool(meta.get("required"))
        if required or (kind == "path" and default == ""):
            default = None  # nothing to show: the form must give it (the CLI's required option has no default)
        fields.append(FormField(
            name=name, flag=option_flag(field), type=kind, default=default,
            help=meta.get("help") or help_texts.get(name, ""), choices=options, required=required, step=step,
            bounds=meta.get("bounds"), root=root, is_list=item is not None, annotation=annotation))
    return fields


def _probe_fields() -> list[FormField]:
    fields = []
    for field in settings_fields(ProbeSettings, "probe", exclude=PROBE_EXCLUDED, choices={"task": "tasks"}):
        if field.name == "columns":  # `retinafm probe --labels A,B` (multilabel) or `--targets A,B` (regression)
            field = dataclasses.replace(field, flag="--labels", is_list=True)
        elif field.name == "threshold":  # a number, or 'youden' (ProbeSettings holds None for it)
            field = dataclasses.replace(field, type="str", default=flag_text(field.default), annotation=str)
        fields.append(field)
    return fields


def form(verb: str) -> tuple[FormField, ...]:
    """The fields of one verb's form, read from the dataclasses at each call (so the form is what the classes
    say now); KeyError for a verb the Jobs page does not run."""
    if verb == "finetune":
        return tuple(settings_fields(FinetuneSettings, "finetune"))
    if verb == "evaluate":
        return tuple(settings_fields(EvaluateSettings, "evaluate"))
    if verb == "predict":
        fields = settings_fields(PredictSettings, "predict")
        at = next(i for i, f in enumerate(fields) if f.name == "heatmap_method")
        heatmaps = FormField(  # the CLI's --heatmaps DIR as a yes/no: the folder is <job folder>/heatmaps
            name="heatmaps", flag="--heatmaps", type="bool", default=False, step="predict", choices=None,
            required=False, annotation=bool,
            help="Also write heatmaps and overlays of each prediction into the job's folder (heatmaps/), as "
                 "`retinafm explain` does.")
        return tuple([*fields[:at], heatmaps, *fields[at:]])
    if verb == "embed-probe":
        images = FormField(  # embed's --images is an option of the command, not a field of EmbedSettings
            name="images", flag="--images", type="path", default=None, step="embed", choices=None, required=True,
            root="data", help="A folder (train|val|test/<class>/ keeps split and label) or a manifest CSV (its "
                              "columns are kept, a split column among them).")
        return tuple([images, *settings_fields(EmbedSettings, "embed"), *_probe_fields()])
    raise KeyError(verb)


VERBS = ("finetune", "evaluate", "predict", "embed-probe")


def forms() -> dict[str, list[dict[str, Any]]]:
    """GET /api/forms: {verb: [field, ...]}."""
    return {verb: [f.as_json() for f in form(verb)] for verb in VERBS}


# --------------------------------------------------------------------------- a submitted form
@dataclass
class JobPlan:
    """What a job runs: `commands` (each the arguments after `python -m retinafm`, in order), the values
    the form chose (recorded with the job), the epochs it trains for (None: no epoch loop)."""

    verb: str
    commands: list[list[str]]
    settings: dict[str, Any]
    epochs: int | None = None


def setting_named(verb: str, message: str) -> str | None:
    """The form field a refusal's message names (its first --flag), for the page to mark."""
    flags = {f.flag: f.name for f in form(verb)}
    for flag in re.findall(r"--[a-z0-9][a-z0-9-]*", message):
        if flag in flags:
            return flags[flag]
        if flag == "--targets" and verb == "embed-probe":
            return "columns"
    return None


def _value(field: FormField, value: Any) -> Any:
    """A submitted value checked against its field's type (a page's text like "3" is read as the CLI reads it)."""
    if field.type == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "on", "off"):
            return value.strip().lower() in ("true", "on")
        return check_value(field.flag, bool, value)
    if field.type == "choice":
        text = str(value).strip() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
        if text not in (field.choices or []):
            raise ConfigError(f"{field.flag} must be one of {', '.join(field.choices or [])}, not {value!r}")
        return text
    return check_value(field.flag, field.annotation, value, text=isinstance(value, str))


def _path(field: FormField, value: Any, data_root: Path, runs: Path) -> str:
    """A data or model path from the form: confined to its folder (403/404), of the kind the setting takes."""
    if not isinstance(value, str):
        raise ConfigError(f"{field.flag} takes a path relative to the served folder, got {value!r}")
    root = data_root if field.root == "data" else runs
    where = "--data-root" if field.root == "data" else "--runs"
    path = confined(root, value.strip(), what=field.flag)
    kind = (DATA_FIELDS | MODEL_FIELDS)[field.name]
    if kind == "folder" and not path.is_dir():
        raise ConfigError(f"{field.flag} {value!r} is a file; give a folder under {where}")
    if kind == "file" and not path.is_file():
        raise ConfigError(f"{field.flag} {value!r} is not a file; give a file under {where}")
    return str(path)


def _weights(value: str, runs: Path) -> str:
    """--weights from a form: 'none', a zoo name, a Hugging Face repo id (offline: the local hub cache), or
    a weights file under --runs (confined like a checkpoint). Never a file elsewhere on the machine."""
    from retinafm.models.registry import ZOO
    from retinafm.models.weights import WEIGHT_SUFFIXES

    text = value.strip()
    if text.lower() == "none" or text in ZOO:
        return text
    looks_like_path = (Path(text).suffix in WEIGHT_SUFFIXES or text.startswith((".", "/", "~")) or "\\" in text
                       or ".." in text or "\x00" in text)
    if looks_like_path or (runs / text).exists():
        return str(confined(runs, text, what="--weights"))
    repo, _, _ = text.removeprefix("hf-hub:").partition(":")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        return text
    raise ConfigError(f"--weights {value!r} is neither a zoo name, 'none', a Hugging Face repo id nor a weights "
                      "file under --runs")


def _flags(fields: list[FormField], values: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """The command-line flags of the values that differ from their defaults (in the form's order)."""
    args: list[str] = []
    for field in fields:
        if field.name not in values or values[field.name] == defaults.get(field.name):
            continue
        value = values[field.name]
        if field.type == "bool":
            args.append(field.flag if value else f"--no-{field.flag[2:]}")
        else:
            args += [field.flag, flag_text(value)]
    return args


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            for f in dataclasses.fields(cls)}


def plan(verb: str, settings: Mapping[str, Any], *, data_root: Path, runs: Path, out: Path, work: Path) -> JobPlan:
    """Check a submitted form and turn it into the job's command lines. `out`: the job's folder
    (<runs>/<name>); `work`: its record folder (embed-probe keeps its embeddings there).

    Raises ConfigError (or another ValueError) naming the setting for a bad value, HTTPException
    (403/404, from `confined`) for a path outside its folder or missing."""
    fields = form(verb)
    by_name = {f.name: f for f in fields}
    unknown = sorted(set(settings) - set(by_name))
    if unknown:
        raise ConfigError(f"unknown setting(s) for {verb}: {', '.join(map(str, unknown))}")
    values: dict[str, Any] = {}
    shown: dict[str, Any] = {}  # what the job's record shows: paths as the form named them
    for name, value in settings.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue  # left blank: the default
        field = by_name[name]
        if isinstance(value, str) and "\x00" in value:  # no command line can carry it
            raise ConfigError(f"{field.flag}: a NUL character is not allowed")
        if field.type == "path":
            values[name] = _path(field, value, data_root, runs)
            shown[name] = value.strip()
        elif name == "weights":
            values[name] = _weights(str(check_value(field.flag, field.annotation, value)), runs)
            shown[name] = str(value).strip()
        else:
            values[name] = _value(field, value)
    for field in fields:
        if field.required and field.name not in values:
            raise ConfigError(f"{field.flag} is required")
    recorded = {name: shown.get(name, values[name]) for name in by_name if name in values}
    if verb == "embed-probe":
        return _plan_embed_probe(fields, values, recorded, out, work)
    cls = {"finetune": FinetuneSettings, "evaluate": EvaluateSettings, "predict": PredictSettings}[verb]
    defaults = _defaults(cls)
    given = {name for name, value in values.items() if name != "heatmaps" and value != defaults.get(name)}
    outputs: dict[str, Any] = {"out": str(out)}
    if verb == "predict":
        outputs["out"] = str(out / PREDICTIONS)
        outputs["heatmaps"] = str(out / HEATMAPS) if values.pop("heatmaps", False) else None
    cfg = cls(**values, **outputs)
    if verb == "finetune":
        cfg.fit_defaults(given)  # as make_settings does for the same flags
    cfg.validate()
    if verb == "finetune":
        from retinafm.tasks import check_settings

        check_settings(cfg)  # the task type's own rules (a multilabel task needs a manifest), before queueing
    args = [verb, "--out", outputs["out"]]
    if outputs.get("heatmaps"):
        args += ["--heatmaps", outputs["heatmaps"]]
    args += _flags([f for f in fields if f.name != "heatmaps"], values, defaults)
    # A features probe (finetune --adaptation lp) embeds once and fits: no epochs to count.
    epochs = cfg.epochs if verb == "finetune" and not (cfg.adaptation == "lp" and cfg.lp_mode == "features") else None
    return JobPlan(verb, [args], recorded, epochs=epochs)


def _plan_embed_probe(fields: tuple[FormField, ...], values: dict[str, Any], recorded: dict[str, Any], out: Path,
                      work: Path) -> JobPlan:
    """embed the images into the record folder, then probe them into the job's folder: two commands."""
    embed_fields = [f for f in fields if f.step == "embed" and f.name != "images"]
    probe_fields = [f for f in fields if f.step == "probe"]
    embed_values = {f.name: values[f.name] for f in embed_fields if f.name in values}
    probe_values = {f.name: values[f.name] for f in probe_fields if f.name in values}
    EmbedSettings(**embed_values).validate()
    threshold_text = str(probe_values.get("threshold", _probe_default_threshold()))
    probe_settings = {**probe_values, "threshold": _probe_threshold(threshold_text)}
    settings = ProbeSettings(**probe_settings)
    check_bounds(settings)
    settings.check()
    if TASKS[settings.task].named_columns and not settings.columns:  # as `retinafm probe` refuses it
        raise ConfigError(f"a {settings.task} probe needs {TASKS[settings.task].probe_columns_help}")
    embeddings = str(work / EMBEDDINGS)
    embed = ["embed", "--images", values["images"], "--out", embeddings,
             *_flags(embed_fields, embed_values, _defaults(EmbedSettings))]
    probe_defaults = {**_defaults(ProbeSettings), "threshold": _probe_default_threshold()}
    probe_args = _flags(probe_fields, probe_values, probe_defaults)
    if settings.task == "regression" and "--labels" in probe_args:  # the same setting; the task's own spelling
        probe_args[probe_args.index("--labels")] = "--targets"
    probe = ["probe", "--embeddings", embeddings, "--out", str(out), *probe_args]
    return JobPlan("embed-probe", [embed, probe], recorded)


def _probe_default_threshold() -> str:
    """ProbeSettings' threshold as `retinafm probe --threshold` spells it."""
    return flag_text(ProbeSettings.threshold)


def _probe_threshold(text: str) -> float | None:
    """`retinafm probe --threshold`: a probability, or 'youden' (None: chosen on validation)."""
    if text.strip().lower() == "youden":
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--threshold must be a probability or 'youden', got {text!r}") from None
