"""Command line: one verb per workflow step. Thin: parse, call the library, print.

The options of the verbs with a settings class (finetune, tune, label-efficiency, pretrain, refine)
are generated from its dataclass fields: type from the annotation, default and help from the field,
so a default lives in one place. Every such flag can also come from `--config file.yaml`; flags
given on the command line win. `--resume RUN_DIR` reads that run's config.yaml, so only changed
flags need repeating. Workflows are imported inside each command so `retinafm --help` stays fast.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click

from retinafm.settings import (
    CompareSettings,
    ConfigError,
    EmbedSettings,
    EvaluateSettings,
    ExplainSettings,
    ExportSettings,
    FinetuneSettings,
    ImportSettings,
    PredictSettings,
    PretrainSettings,
    RefineSettings,
    SplitSettings,
    check_bounds,
    check_types,
    check_value,
    comma_list,
    config_fields,
    field_types,
    fit_workers,
    flag_name,
    list_item_type,
    read_yaml_settings,
    unwrap_optional,
)


class SettingError(click.ClickException):
    """A setting's value refused while the command line is read (a flag, --config, the config.yaml of
    the run --resume continues): one `error:` line and exit 2, like the errors `_run` reports."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class StrictNumber(click.ParamType):
    """An int or float setting: click's INT would take 2.9 as 2 and `true` as 1 from a --config file;
    this one refuses what is not a whole number (or a finite number), in words naming the flag."""

    def __init__(self, kind: type, flag: str) -> None:
        self.kind, self.flag = kind, flag
        self.name = "integer" if kind is int else "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return check_value(self.flag, self.kind, value, text=isinstance(value, str))
        except ConfigError as exc:
            raise SettingError(str(exc)) from None


class _TaskChoice(click.Choice):
    """--task: the names in the task registry, read when click first needs them (importing the task
    types at start-up would pull torch into every command, `--help` included)."""

    def __init__(self) -> None:
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        from retinafm.tasks import TASKS

        return tuple(TASKS)


def _user_errors() -> tuple[type[BaseException], ...]:
    from retinafm.data.sources import DataSourceError
    from retinafm.engine.checkpoint import CheckpointError
    from retinafm.engine.loop import NonFiniteLossError
    from retinafm.files import OutputExistsError
    from retinafm.models.registry import UnknownModelError
    from retinafm.models.weights import WeightsError

    # OSError: unwritable or missing paths, read-only folders, a full disk; the message names the path.
    # NonFiniteLossError: a diverging run, reported with what to change (learning rate, precision).
    return (ConfigError, DataSourceError, OutputExistsError, UnknownModelError, WeightsError, CheckpointError,
            NonFiniteLossError, OSError, ValueError)


def _run(fn: Callable[[], Any],
         on_interrupt: str = ("A run that has saved a checkpoint continues with --resume RUN_DIR; one stopped "
                               "before its first checkpoint leaves nothing behind.")) -> Any:
    """Turn the errors a user can cause into one clear line and a non-zero exit, not a traceback."""
    try:
        return fn()
    except KeyboardInterrupt:
        click.echo(f"interrupted. {on_interrupt}", err=True)
        sys.exit(130)
    except _user_errors() as exc:
        if os.environ.get("RETINAFM_DEBUG"):
            raise
        message = str(exc)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # files.outputs words it with the free space
            message = exc.strerror if exc.strerror and exc.strerror.startswith("no space") else \
                f"no space left on device writing {exc.filename or 'an output'}; free space or choose another --out"
        elif isinstance(exc, OSError) and exc.filename:  # "[Errno 30] ..." into the path and the reason
            hint = "; choose a folder you can write to" if exc.errno in (errno.EACCES, errno.EROFS) else ""
            message = f"cannot use {exc.filename}: {exc.strerror or exc}{hint}"
        click.echo(f"error: {message}", err=True)
        click.echo("(set RETINAFM_DEBUG=1 to see the full traceback)", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="retinafm")
def main() -> None:
    """retinafm: fine-tune, evaluate and run retinal foundation models (RETFound, DINOv2, DINOv3)."""
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001 (warnings' signature)
    """Warnings about the user's data (skipped files, modality) as one plain line, not source locations."""
    return f"warning: {message}\n"


@main.command("models")
def models_cmd() -> None:
    """List the model zoo: name, architecture, input size, modality, weights, licence."""
    from retinafm.models.registry import zoo_table

    rows = zoo_table()
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        click.echo("  ".join(r[c].ljust(widths[c]) for c in cols))
    click.echo("\nAny timm ViT name also works as --model. --weights takes a zoo weight (default), a Hugging Face "
               "repo id (org/name[:file]), a local .pth/.safetensors file, or 'none'.")


class CommaList(click.ParamType):
    """A list setting typed as comma-separated text ("a,b"); a YAML list (from --config) is taken as is."""

    name = "text"

    def __init__(self, item: type = str) -> None:
        self.item = item

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        items = comma_list(value)
        if self.item is str or items is None:
            return items
        try:
            return [self.item(v) for v in items]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.item.__name__} values", param, ctx)


def _with_bounds(help_text: str, bounds: tuple[Any, Any] | None) -> str | None:
    """A bounded setting's help says its range (the same bounds check_bounds enforces)."""
    if not bounds:
        return help_text or None
    low, high = bounds
    if low is not None and high is not None:
        text = f"{low:,} to {high:,}"
    else:
        text = f"at least {low:,}" if low is not None else f"at most {high:,}"
    return f"{help_text} Range: {text}.".strip()


def field_option(cls: type, field: dataclasses.Field, **overrides: Any) -> Callable:
    """The click option of one settings field: its flag, type, default and help come from the field.

    bool -> a flag (--x, or --x/--no-x when the default is on); Literal -> click.Choice; list ->
    comma-separated text parsed into a list; Optional[...] -> the same with no default. Metadata of
    the field: `choices="tasks"` -> the task registry's names; `path` -> click.Path(**path); `flag` ->
    another spelling (compare's --on); `required` -> the option must be given."""
    annotation = field_types(cls)[field.name]
    inner, _ = unwrap_optional(annotation)
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]
    flag = field.metadata.get("flag", flag_name(field.name))
    decls = [flag]
    kwargs: dict[str, Any] = {"help": _with_bounds(field.metadata.get("help") or "", field.metadata.get("bounds"))}
    if inner is bool:
        if default:
            decls = [f"{flag}/--no-{flag[2:]}"]
            kwargs.update(default=True, show_default=True)
        else:
            kwargs.update(is_flag=True, default=False)
    else:
        item = list_item_type(annotation)
        if field.metadata.get("choices") == "tasks":
            kind: Any = _TaskChoice()
        elif typing.get_origin(inner) is Literal:
            kind = click.Choice(typing.get_args(inner))
        elif item is not None:
            kind = CommaList(item)
            default = None if default is None else ",".join(map(str, default))
        elif "path" in field.metadata:
            kind = click.Path(**field.metadata["path"])
        elif inner in (int, float):
            kind = StrictNumber(inner, flag)
        else:
            kind = str
        kwargs.update(type=kind, default=default, show_default=default not in (None, ""))
        if field.metadata.get("required"):  # no default to show: the command line must give it
            kwargs.update(required=True, default=None, show_default=False)
    kwargs.update(overrides)
    return click.option(*decls, field.name, **kwargs)


def settings_options(cls: type, *, exclude: tuple[str, ...] = (),
                     overrides: dict[str, dict[str, Any]] | None = None) -> list[Callable]:
    """One option per field of the settings dataclass `cls` (in field order), except those in `exclude`
    and those whose metadata says cli=False; `overrides` changes click arguments of single options."""
    overrides = overrides or {}
    return [field_option(cls, f, **overrides.get(f.name, {})) for f in dataclasses.fields(cls)
            if f.name not in exclude and f.metadata.get("cli", True)]


# ctx.meta: settings chosen in a --config file or by the run --resume continues (like flags, never adapted)
CHOSEN_KEYS = "retinafm.chosen_settings"


def _config_loader(cls: type) -> Callable:
    """The --config callback for a settings class: `--resume RUN_DIR` first loads that run's
    config.yaml, then --config FILE, then flags on the command line win."""

    def load(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        settings: dict[str, Any] = {}
        resume_dir = ctx.params.get("resume")
        if resume_dir:
            config = Path(resume_dir) / "config.yaml"
            if not config.is_file():
                raise SettingError(f"--resume: {config} does not exist; is {resume_dir} a retinafm run directory?")
            saved = read_yaml_settings_lenient(config, cls)
            saved = {k: v for k, v in saved.items() if k not in ("resume", "overwrite", "out")}
            settings.update(_checked(cls, saved, f"{config}, the run --resume continues"))
            # The run's own settings are not defaults to adapt: a continued run keeps its schedule.
            ctx.meta.setdefault(CHOSEN_KEYS, set()).update(settings)
        if value:
            try:
                chosen = read_yaml_settings(value, cls)
            except ConfigError as exc:
                raise SettingError(str(exc)) from None
            chosen = _checked(cls, chosen, f"--config {value}")
            settings.update(chosen)
            ctx.meta.setdefault(CHOSEN_KEYS, set()).update(chosen)
        if settings:
            ctx.default_map = {**(ctx.default_map or {}), **settings}
        return value

    return load


def _checked(cls: type, values: dict[str, Any], origin: str) -> dict[str, Any]:
    """Values read from a settings file, type-checked before they become click defaults."""
    try:
        return check_types(cls, values, origin)
    except ConfigError as exc:
        raise SettingError(str(exc)) from None


def run_options(cls: type) -> list[Callable]:
    """--resume RUN_DIR and --config FILE for a command whose settings are `cls` (loaded in that order)."""
    return [
        click.option("--resume", "resume", type=click.Path(file_okay=False), default=None, is_eager=True,
                     help="Continue the run in this directory from its checkpoint-last.pth."),
        click.option("--config", type=click.Path(dir_okay=False), callback=_config_loader(cls), expose_value=False,
                     help="YAML file of settings (any flag below, dashes or underscores)."),
    ]


def _apply(options: list[Callable]) -> Callable:
    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def read_yaml_settings_lenient(path: Path, cls: type = FinetuneSettings) -> dict[str, Any]:
    """A run's saved config.yaml also records derived values (class names); keep only settings.
    Read like --config (a regular file, size-limited, no alias bombs); a bad one is a --resume error."""
    import yaml

    from retinafm.files.inputs import InputFileError, load_yaml

    try:
        data = load_yaml(path, what="--resume") or {}
    except InputFileError as exc:
        raise SettingError(str(exc)) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SettingError(f"--resume: {path} cannot be read as YAML ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(data, dict):
        raise SettingError(f"--resume: {path} must hold a mapping of setting: value")
    return {k: v for k, v in data.items() if k in config_fields(cls)}


def settings_command(cls: type) -> Callable:
    """--resume RUN_DIR, --config FILE and one option per field of `cls`."""
    return _apply([*run_options(cls), *settings_options(cls)])


def given_settings(options: dict[str, Any]) -> set[str]:
    """The settings the user chose (a flag, --config, the resumed run's config.yaml) rather than defaults."""
    ctx = click.get_current_context()
    chosen = set(ctx.meta.get(CHOSEN_KEYS, ()))
    for name in options:
        source = ctx.get_parameter_source(name)
        if source is not None and source not in (click.core.ParameterSource.DEFAULT,
                                                 click.core.ParameterSource.DEFAULT_MAP):
            chosen.add(name)
    return chosen


def build_settings(cls: type, options: dict[str, Any]) -> Any:
    """`cls(**options)` with every value checked on its own (types, declared bounds) before any work:
    a refusal is one `error:` line, exit 2. --num-workers above this machine's CPUs is lowered, with
    a note."""
    try:
        cfg = cls(**options)
        if hasattr(cfg, "check_values"):  # a Settings class: bounds and its own per-value checks
            cfg.check_values()
        else:  # a plain dataclass with declared bounds (ProbeSettings, TuneSettings)
            check_bounds(cfg)
    except ConfigError as exc:
        raise SettingError(str(exc)) from None
    for note in fit_workers(cfg):
        if _primary():
            click.echo(note, err=True)
    return cfg


def make_settings(cls: type, options: dict[str, Any], resume: str | None = None) -> Any:
    """The settings of this command line; defaults that do not fit the run (a warmup longer than a
    short run) adapt, with a one-line note, while values the user chose are left to validate()."""
    if resume:
        options = {**options, "out": resume, "resume": True}
    cfg = build_settings(cls, options)
    for note in cfg.fit_defaults(given_settings(options)):
        if _primary():
            click.echo(note, err=True)
    return cfg


def finetune_options(command: Callable) -> Callable:
    """The finetune flags, shared by `finetune`, `tune` (which searches some of them) and `label-efficiency`."""
    return settings_command(FinetuneSettings)(command)


def _primary() -> bool:
    from retinafm.runtime import distributed as dist_utils

    return dist_utils.is_primary()


@main.command("finetune")
@finetune_options
def finetune_cmd(resume: str | None, **options: Any) -> None:
    """Fine-tune (or linear-probe) a model on a labelled folder or manifest."""
    from retinafm.runtime import distributed as dist_utils
    from retinafm.workflows.finetune import finetune

    cfg = make_settings(FinetuneSettings, options, resume)
    result = _run(lambda: finetune(cfg))
    if _primary():
        click.echo(f"run directory: {result.run_dir}")
    dist_utils.cleanup()


@main.command("tune")
@finetune_options
@click.option("--trials", type=int, default=20, show_default=True, help="Trials to run (in all, with --storage).")
@click.option("--tune-epochs", type=int, default=10, show_default=True, help="Epochs per trial.")
@click.option("--direction", type=click.Choice(["maximize", "minimize"]), default="maximize", show_default=True,
              help="Of the task's validation selection metric (AUROC, or R² for regression).")
@click.option("--storage", default=None, help="Optuna storage URL (e.g. sqlite:///study.db) for a resumable study.")
@click.option("--study-name", default=None, help="Study name in --storage (default: the --out folder's name).")
@click.option("--timeout", type=float, default=None, help="Stop starting new trials after this many seconds.")
def tune_cmd(resume: str | None, trials: int, tune_epochs: int, direction: str, storage: str | None,
             study_name: str | None, timeout: float | None, **options: Any) -> None:
    """Optuna search (TPE, median pruning) over lr, weight decay, layer decay, drop path and head
    settings; --out is the study folder. Prints the finetune command of the best trial."""
    from retinafm.workflows.tune import TuneSettings, tune

    if resume:
        raise click.UsageError("tune has no --resume; give --storage to continue a study")
    cfg = make_settings(FinetuneSettings, options)
    settings = build_settings(TuneSettings, dict(trials=trials, tune_epochs=tune_epochs, direction=direction,
                                                 storage=storage, study_name=study_name, timeout=timeout))
    result = _run(lambda: tune(cfg, settings),
                  on_interrupt="A study run with --storage continues when the same command is run again.")
    click.echo(f"best trial {result.best_trial}: {result.best_value:.4f}  {result.best_params}")
    click.echo(f"study files in {result.out}; reproduce the best trial at full epochs with:\n{result.command}")


@main.command("label-efficiency")
@finetune_options
@click.option("--fractions", default="0.05,0.1,0.25,0.5,1", show_default=True,
              help="Fractions of the train split, each class alike.")
@click.option("--seeds", type=int, default=3, show_default=True, help="Subsets (and runs) per fraction.")
@click.option("--metric", default=None, help="Test metric to plot (default: the task's, AUROC macro or R² macro).")
def label_efficiency_cmd(resume: str | None, fractions: str, seeds: int, metric: str | None, **options: Any) -> None:
    """Test performance against the number of training images: class-stratified subsets of the
    train split, several seeds each; a table and a plot (mean ± sd). With --adaptation lp
    (recommended) every image is embedded once and each point takes seconds."""
    from retinafm.workflows.label_efficiency import label_efficiency, parse_fractions

    if resume:
        raise click.UsageError("label-efficiency has no --resume")
    cfg = make_settings(FinetuneSettings, options)
    result = _run(lambda: label_efficiency(cfg, parse_fractions(fractions), seeds, metric=metric))
    click.echo(f"study folder: {result.out}")


@main.command("evaluate")
@_apply(settings_options(EvaluateSettings))
def evaluate_cmd(**options: Any) -> None:
    """Metrics with 95% CIs (AUROC, AUPRC, accuracy, sensitivity, specificity, F1, kappa, MCC, ECE),
    predictions, plots and report.html — on the run's test split or an external data set."""
    from retinafm.workflows.evaluate import evaluate

    cfg = build_settings(EvaluateSettings, options)
    if bool(cfg.data_path) == bool(cfg.manifest):
        raise click.UsageError("give exactly one of --data-path or --manifest")
    ev = _run(lambda: evaluate(cfg))
    if not _primary():
        return
    click.echo(f"{cfg.split}: {len(ev.paths)} images  {ev.task.summary(ev.metrics, ev.ci)}")
    if ev.notes.get("absent_classes"):
        click.echo(f"not in this set (metrics undefined): {', '.join(ev.notes['absent_classes'])}")
    click.echo(f"written to {cfg.out} (open {Path(cfg.out) / 'report.html'})")


@main.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@_apply(settings_options(CompareSettings))
def compare_cmd(runs: tuple[str, ...], **options: Any) -> None:
    """Paired comparison of RUNS (the first is the reference) on the same images: metric difference
    with a paired bootstrap CI and p-value, DeLong's test per ROC curve; give folders of runs (one
    sub-folder per task) for a Wilcoxon signed-rank test across tasks."""
    from retinafm.workflows.compare import compare_runs

    cfg = build_settings(CompareSettings, options)
    result = _run(lambda: compare_runs(runs, cfg.out, split=cfg.split, metric=cfg.metric, bootstrap=cfg.bootstrap,
                                       seed=cfg.seed, overwrite=cfg.overwrite))
    table = result.table()
    shown = table[["task", "model", "metric", "reference_value", "model_value", "difference", "ci_low", "ci_high",
                   "p_value", "test"]]
    if not shown["task"].any():
        shown = shown.drop(columns="task")
    click.echo(f"reference: {table['reference'].iloc[0]}")
    click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for entry in result.wilcoxon:
        click.echo(f"Wilcoxon signed-rank over {entry['tasks']} tasks, {entry['model']} vs {entry['reference']} "
                   f"({entry['metric']}): better on {entry['model_better']}, p = {entry['p_value']:.4g}"
                   + (f"  ({entry['note']})" if entry.get("note") else ""))
    click.echo(f"written to {cfg.out}")


@main.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", "split_name", default="test", show_default=True)
def report_cmd(run_dir: str, split_name: str) -> None:
    """(Re)write RUN_DIR/report.html: one self-contained page with data, settings, curves, metrics
    with CIs, figures and the most confident errors."""
    from retinafm.workflows.report import write_report

    path = _run(lambda: write_report(run_dir, split_name))
    click.echo(f"report: {path}")


@main.command("import")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@_apply(settings_options(ImportSettings))
def import_cmd(checkpoint: str, **options: Any) -> None:
    """Turn a model fine-tuned elsewhere (RETFound's main_finetune.py) into a retinafm checkpoint
    with the identical forward, for `evaluate`, `predict` and `compare`."""
    from retinafm.workflows.import_ import import_retfound

    cfg = build_settings(ImportSettings, options)
    result = _run(lambda: import_retfound(checkpoint, cfg.classes, cfg.out, overwrite=cfg.overwrite))
    click.echo(f"wrote {result.out}: {result.variant} as timm {result.arch}, {len(result.class_names)} classes: "
               f"{', '.join(result.class_names)}; input {result.input_size}px")


@main.command("predict")
@_apply(settings_options(PredictSettings))
def predict_cmd(**options: Any) -> None:
    """Predictions for new images: path, then per-class probabilities (or one column per target).
    With --oct-frames all (or N), also one row per volume in <out>_volumes.csv."""
    from retinafm.workflows.predict import predict

    cfg = build_settings(PredictSettings, options)
    res = _run(lambda: predict(cfg))
    if _primary():  # under torchrun every rank returns; one reports
        click.echo(f"{len(res.predictions)} predictions written to {res.out}")
        if res.volumes_path:
            click.echo(f"{len(res.volumes)} volume-level rows (mean and max over B-scans) in {res.volumes_path}")
        if res.skipped_path:
            click.echo(f"{len(res.skipped)} unreadable file(s) listed in {res.skipped_path}")


@main.command("explain")
@_apply(settings_options(ExplainSettings))
def explain_cmd(**options: Any) -> None:
    """Where the model looked: a heatmap per image and output (.npy at each file's own resolution), an
    overlay PNG with the top 10 % contoured, and explanations.csv; --evaluate measures each method's
    faithfulness (and its localisation against --masks)."""
    from retinafm.workflows.explain import explain

    cfg = build_settings(ExplainSettings, options)
    res = _run(lambda: explain(cfg))
    if _primary():
        click.echo(f"{len(res.explanations)} heatmaps of {res.explanations['path'].nunique()} images "
                   f"({cfg.method}) in {res.out}: explanations.csv, heatmaps/, overlays/")
        for key in ("faithfulness", "localisation", "skipped"):
            if key in res.files:
                click.echo(f"{key}: {res.files[key]}")


@main.command("export")
@_apply(settings_options(ExportSettings))
def export_cmd(**options: Any) -> None:
    """A checkpoint as one ONNX file (metadata inside) that `predict` and `embed --checkpoint` run
    with ONNX Runtime; checked against PyTorch before it is written."""
    from retinafm.workflows.export import export

    cfg = build_settings(ExportSettings, options)
    res = _run(lambda: export(cfg))
    click.echo(f"{cfg.format}{' int8' if res.int8 else ''} (opset {res.opset}) written to {res.out} in "
               f"{res.seconds:.1f}s; "
               f"max |ONNX Runtime - PyTorch|: logits {res.max_abs_diff_logits:.2g}, "
               f"features {res.max_abs_diff_features:.2g}")


@main.command("embed")
@click.option("--images", required=True, type=click.Path(),
              help="A folder (train|val|test/<class>/ keeps split and label), a manifest CSV (its columns are kept), "
                   "or an image.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="emb.parquet, or emb.npy (+ emb.csv index).")
@_apply(settings_options(EmbedSettings))
@click.option("--overwrite", is_flag=True)
def embed_cmd(images: str, out: str, overwrite: bool, **options: Any) -> None:
    """One pooled feature vector per image, for probes and analysis. Interrupted? Run the same
    command again: finished shards are kept."""
    from retinafm.workflows.embed import embed

    cfg = build_settings(EmbedSettings, options)
    res = _run(lambda: embed(images, out, cfg, overwrite=overwrite),
               on_interrupt="Run the same command again to continue from the finished shards.")
    reused = f" ({res.shards_reused} shard(s) reused)" if res.shards_reused else ""
    if _primary():
        click.echo(f"{res.count} embeddings of dimension {res.dim} written to {res.out}{reused}")
        if res.skipped:
            click.echo(f"{len(res.skipped)} unreadable file(s) listed in "
                       f"{res.out.with_name(res.out.stem + '_skipped.csv')}")


@main.command("pretrain")
@settings_command(PretrainSettings)
def pretrain_cmd(resume: str | None, **options: Any) -> None:
    """Self-supervised pretraining on unlabelled images: MAE (RETFound's first stage) or DINO.
    The run's checkpoint-last.pth is then --weights for finetune and embed."""
    from retinafm.runtime import distributed as dist_utils
    from retinafm.workflows.pretrain import pretrain

    cfg = make_settings(PretrainSettings, options, resume)
    result = _run(lambda: pretrain(cfg), on_interrupt="Continue with `retinafm pretrain --resume RUN_DIR`.")
    if _primary():
        click.echo(f"run directory: {result.run_dir}")
    dist_utils.cleanup()


@main.command("refine")
@settings_command(RefineSettings)
def refine_cmd(resume: str | None, **options: Any) -> None:
    """Vision-language refinement (RetFiner-style) of a backbone from image-report pairs; writes
    backbone.safetensors for finetune / embed --weights."""
    from retinafm.objectives.vision_language import TextModelError
    from retinafm.runtime import distributed as dist_utils
    from retinafm.workflows.refine import refine

    cfg = make_settings(RefineSettings, options, resume)

    def work():
        try:
            return refine(cfg)
        except TextModelError as exc:
            raise ConfigError(str(exc)) from None

    result = _run(work, on_interrupt="Continue with `retinafm refine --resume RUN_DIR`.")
    if _primary():
        click.echo(f"run directory: {result.run_dir}")
    dist_utils.cleanup()


@main.command("probe")
@click.option("--embeddings", required=True, type=click.Path(), help="An `embed` output (.parquet or .npy).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--task", type=_TaskChoice(), default=FinetuneSettings.task, show_default=True)
@click.option("--label-column", default="label", show_default=True, help="Multi-class: the class column.")
@click.option("--labels", "label_columns", default=None, help="Multi-label: the 0/1 columns, comma-separated.")
@click.option("--targets", "target_columns", default=None, help="Regression: the value columns, comma-separated.")
@click.option("--knn-k", type=int, default=20, show_default=True)
@click.option("--folds", type=int, default=5, show_default=True, help="k-fold on train when there is no val split.")
@click.option("--threshold", default="0.5", show_default=True,
              help="Multi-label decision threshold, or 'youden' (chosen per label on validation).")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Replicates for the test CIs (0: none).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
def probe_cmd(embeddings: str, out: str, task: str, label_column: str, label_columns: str | None,
              target_columns: str | None, knn_k: int, folds: int, threshold: str, bootstrap: int, seed: int,
              overwrite: bool) -> None:
    """Linear probe (logistic / ridge regression, regularisation chosen on validation) and kNN on
    embeddings: metrics with CIs, predictions, report, and a checkpoint `predict` can use."""
    from retinafm.workflows.probe import ProbeSettings, probe

    def run_probe():
        if threshold.lower() != "youden":
            try:
                value: float | None = float(threshold)
            except ValueError:
                raise ConfigError(f"--threshold must be a probability or 'youden', got {threshold!r}") from None
        else:
            value = None
        settings = ProbeSettings(task=task, label_column=label_column, columns=label_columns or target_columns,
                                 knn_k=knn_k, folds=folds, threshold=value, bootstrap=bootstrap, seed=seed)
        check_bounds(settings)
        return probe(embeddings, out, settings, overwrite=overwrite)

    result = _run(run_probe)
    click.echo(f"run directory: {result.run_dir} (checkpoint-best.pth, metrics, predictions, report.html; kNN in knn/)")


@main.command("demo")
@click.option("--out", default="demo_output", show_default=True, type=click.Path(), help="Folder for everything.")
@click.option("--epochs", type=click.IntRange(1, 100_000), default=None, help="Override the demo's number of epochs.")
@click.option("--pretrain-epochs", type=click.IntRange(0, 100_000), default=None,
              help="MAE pretraining epochs before fine-tuning (default 60; 0 skips it).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo in --out.")
def demo_cmd(out: str, epochs: int | None, pretrain_epochs: int | None, overwrite: bool) -> None:
    """Generate a synthetic fundus data set, pretrain a small ViT with MAE and fine-tune it (and
    from scratch, for comparison) on CPU, evaluate and predict."""
    from retinafm.workflows.demo import PRETRAIN_EPOCHS, run_demo

    epochs_pre = PRETRAIN_EPOCHS if pretrain_epochs is None else pretrain_epochs
    summary = _run(lambda: run_demo(Path(out), epochs=epochs, overwrite=overwrite, pretrain_epochs=epochs_pre))
    if not summary.passed:
        sys.exit(1)


@main.command("serve")
@click.option("--runs", required=True, type=click.Path(), help="Folder of run directories and checkpoints to serve "
              "(e.g. demo_output); jobs write their runs here.")
@click.option("--data-root", type=click.Path(), default=None, help="The only folder jobs may read images and "
              "manifests from (without it, jobs cannot start).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; anything but "
              "loopback needs a token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--token", default=None, help="Token every request must carry (at least 16 characters); generated "
              "and printed once when another --host is given without one.")
def serve_cmd(runs: str, data_root: str | None, host: str, port: int, token: str | None) -> None:
    """The local web app and HTTP API: models, predict with heatmaps, runs and reports, jobs. Patient
    images stay on this machine; it listens on 127.0.0.1 unless --host says otherwise."""
    from retinafm.serve.server import make_config, serve

    config, generated = _run(lambda: make_config(runs, data_root, host, port, token))
    _run(lambda: serve(config, generated_token=generated), on_interrupt="server stopped.")


@main.command("split")
@_apply(settings_options(SplitSettings))
def split_cmd(**options: Any) -> None:
    """Patient-grouped, stratified, seeded train/val/test split of a manifest (paths unchanged), or
    with --check a patient-leakage report on the split it already has."""
    from retinafm.workflows.split import check_leakage, split

    cfg = build_settings(SplitSettings, options)
    try:
        cfg.validate()
    except ConfigError as exc:  # which flags go together: a usage error, shown with the usage line
        raise click.UsageError(str(exc)) from None
    group_by, out = cfg.group_by, cfg.out
    if cfg.check:
        leaks = _run(lambda: check_leakage(cfg))
        report = leaks.report
        click.echo(leaks.summary.to_string())
        if report.empty:
            click.echo(f"no leakage: every {group_by} is in one split")
            return
        click.echo(f"leakage: {len(report)} {group_by} value(s) have images in more than one split "
                   f"({int(report['images'].sum())} images)")
        click.echo(report.head(20).to_string(index=False))
        if len(report) > 20:
            click.echo(f"... and {len(report) - 20} more" + (f" (all in {out})" if out else "; pass --out to list all"))
        elif out:
            click.echo(f"written to {out}")
        sys.exit(1)

    result = _run(lambda: split(cfg))
    info = result.info
    grouping = f"{info['groups']} {group_by} groups" if group_by else "image by image"
    click.echo(f"wrote {out}: {len(result.manifest)} images, {grouping}, stratified by {info['stratified_by']} "
               f"(ratios {cfg.ratios}, seed {cfg.seed})")
    click.echo(result.summary.to_string())


if __name__ == "__main__":  # pragma: no cover
    main()
