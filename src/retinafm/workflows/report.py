"""report.html: one self-contained page per run directory (or `evaluate` output folder).

Everything is embedded — figures as base64 PNGs, error thumbnails and heatmap overlays as base64
JPEGs, inline CSS, no JavaScript — so the file can be mailed or opened from disk without a server.
Each section is built only from the files it needs and says so in one line when they are absent (an
`evaluate` folder has no config.yaml, log.csv or data_summary.csv). Class names, labels and paths
come from users, so the Jinja2 template escapes everything.
"""
from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import math
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from retinafm.files import write_text
from retinafm.files.inputs import IMAGE_MAX_BYTES, load_yaml, open_regular, read_table
from retinafm.tasks import DEFAULT_TASK, TASKS
from retinafm.tasks.report_cells import NA
from retinafm.tasks.report_cells import fmt as _fmt

TEMPLATE = "report.html.j2"
THUMBNAIL_PX = 160
OVERLAY_PX = 256  # heatmap overlays: bigger than the error thumbnails, the contour must be readable
MAX_SKIPPED_ROWS = 20
MAX_EXPLANATION_CARDS = 24  # per gallery: a hostile or huge explanations CSV does not make a huge page
EXPLANATION_COLUMNS = ("path", "target", "method", "overlay", "case")  # plus the task's value column
# explain's --method names as a reader knows the methods.
METHOD_NAMES = {
    "grad-rollout": "gradient-weighted attention rollout",
    "rollout": "attention rollout",
    "gradcam": "Grad-CAM on the ViT's tokens",
    "integrated-gradients": "integrated gradients",
}
GALLERIES = (("error", "Most confident errors"), ("correct", "Correct cases (a sample)"))
# Settings a reader looks for first, in this order; the rest follow as config.yaml has them.
IMPORTANT_SETTINGS = ("model", "weights", "adaptation", "task", "epochs", "batch_size", "lr", "blr",
                      "layer_decay", "drop_path", "input_size", "seed")
# Per-output metrics (<prefix>_<output name>), in column order; a column appears when it exists.
PER_OUTPUT = ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1", "kappa", "ece", "r2", "mae", "rmse",
              "pearson", "threshold", "prevalence", "n")
METRIC_NAMES = {
    "auroc": "AUROC", "auprc": "AUPRC", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
    "f1": "F1", "sensitivity": "sensitivity", "specificity": "specificity", "kappa": "Cohen's kappa",
    "quadratic_kappa": "quadratic weighted kappa", "mcc": "MCC", "ece": "expected calibration error", "r2": "R²",
    "mae": "MAE", "rmse": "RMSE", "pearson": "Pearson r", "threshold": "threshold", "prevalence": "prevalence",
    "n": "n",
}
CAPTIONS = {
    "confusion_matrix.png": "Confusion matrix (counts)",
    "confusion_matrix_normalized.png": "Confusion matrix (row-normalised)",
    "roc.png": "ROC curves with their macro average",
    "pr.png": "Precision–recall curves with their macro average",
    "calibration.png": "Calibration (reliability diagram)",
    "scatter.png": "Predicted against true values",
    "forest.png": "Model comparison (forest plot)",
    "optimization_history.png": "Hyperparameter search history",
}


def write_report(run_dir: str | Path, split: str = "test", *, title: str | None = None,
                 max_errors: int = 12) -> Path:
    """Write `<run_dir>/report.html` for `split` from the files in the folder; return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder; give a run directory or an evaluate output folder")
    config = _read_yaml(run_dir / "config.yaml")
    metrics = _read_json(run_dir / f"metrics_{split}.json")
    task = _task_name(metrics, config)
    outputs = _output_names(metrics, config, task)
    context = {
        "header": _header(run_dir, split, title, config, metrics, task, outputs),
        "data": _data_section(run_dir),
        "training": _training_section(run_dir, task),
        "metrics": _metrics_section(metrics, split, task, outputs),
        "figures": _figures(run_dir / "plots"),
        "errors": _errors_section(run_dir, split, task, outputs, metrics, max_errors),
        "explanations": _explanations_section(run_dir, split, task),
    }
    context["settings"], context["settings_note"] = _settings(config)
    return write_text(run_dir / "report.html", _render(context))


def _render(context: dict[str, Any]) -> str:
    import jinja2

    source = resources.files(__package__).joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(**context)


# --- reading --------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = load_yaml(path, what="the run's config")
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))  # NaN is valid here: json.dumps writes it
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _read_csv(path: Path, *, as_text: bool = False) -> pd.DataFrame | None:
    """The CSV, or None when absent or unreadable. `as_text` keeps every cell a string: class
    names such as "1" or "NA" must not become numbers or NaN."""
    if not path.is_file():
        return None
    try:
        return read_table(path, what="report input", text=True, na_values=()) if as_text else read_table(path, what="")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None


def _task_name(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    task = (metrics.get("task") or {}).get("name") or config.get("task")
    if task in TASKS:
        return task
    # Older metrics files carry no task block: tell the tasks apart by their metric names.
    for name, task_type in TASKS.items():
        if task_type.legacy_marker is not None and task_type.legacy_marker in metrics:
            return name
    return DEFAULT_TASK


def _output_names(metrics: dict[str, Any], config: dict[str, Any], task: str) -> list[str]:
    names = (metrics.get("task") or {}).get("outputs") or config.get("class_names")
    if names:
        return [str(n) for n in names]
    first = TASKS[task].report_headline[0].removesuffix("macro")
    return [k[len(first):] for k in metrics if k.startswith(first) and k != f"{first}macro"]


# --- sections -------------------------------------------------------------------------------------


def _header(run_dir: Path, split: str, title: str | None, config: dict[str, Any], metrics: dict[str, Any],
            task: str, outputs: list[str]) -> dict[str, Any]:
    from retinafm import __version__

    model, arch = _model_of(run_dir, config)
    written = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    items = [("model", model or NA), ("architecture", arch or NA), ("task", task),
             (_output_kind(task, plural=True), ", ".join(outputs) or NA), ("split", split)]
    if "n" in metrics:
        items.append(("images", _fmt("n", metrics["n"])))
    items += [("written", written), ("retinafm", __version__)]
    return {"title": title or run_dir.resolve().name, "fields": items, "version": __version__, "written": written}


def _model_of(run_dir: Path, config: dict[str, Any]) -> tuple[str | None, str | None]:
    """(model name, architecture) from the best checkpoint's metadata, else from config.yaml."""
    checkpoint = run_dir / "checkpoint-best.pth"
    if checkpoint.is_file():
        try:
            import torch

            # mmap: only the metadata is read, not a ViT-L's gigabyte of weights.
            state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
            meta = state.get("retinafm", {})
            if meta.get("model_name"):
                return str(meta["model_name"]), str(meta.get("arch") or "") or None
        except Exception:  # a report is no place to fail over a checkpoint; config.yaml may do
            pass
    model = config.get("model")
    if not model:
        return None, None
    try:
        from retinafm.models.registry import get_spec

        return str(model), get_spec(str(model)).arch
    except Exception:
        return str(model), None


def _data_section(run_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = {"summary": None, "skipped": None, "skipped_count": 0,
                            "summary_note": "No data_summary.csv in this folder (evaluate output folders have none).",
                            "skipped_note": "No unreadable files were skipped."}
    summary = _read_csv(run_dir / "data_summary.csv")
    if summary is not None and len(summary):
        data["summary"] = _table(summary)
    skipped = _read_csv(run_dir / "skipped.csv")
    if skipped is not None and len(skipped):
        data["skipped_count"] = len(skipped)
        data["skipped"] = _table(skipped.head(MAX_SKIPPED_ROWS), path_columns=("path",))
    return data


def _settings(config: dict[str, Any]) -> tuple[list[list[tuple[str, str]]], str]:
    """config.yaml as (key, value) rows, the important ones first, split in two columns."""
    if not config:
        return [], "No config.yaml in this folder (evaluate output folders have none)."
    keys = [k for k in IMPORTANT_SETTINGS if k in config] + [k for k in config if k not in IMPORTANT_SETTINGS]
    rows = [(str(k), _setting_text(config[k])) for k in keys]
    half = math.ceil(len(rows) / 2)
    return [rows[:half], rows[half:]], ""


def _setting_text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting_text(v) for v in value)
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return str(value)


def _training_section(run_dir: Path, task: str) -> dict[str, Any]:
    training: dict[str, Any] = {"curves": None, "best": None, "notes": []}
    curves = run_dir / "plots" / "curves.png"
    if curves.is_file():
        training["curves"] = _data_uri(curves, "image/png")
    log = _read_csv(run_dir / "log.csv")
    metric = f"val_{TASKS[task].selection_metric}"
    if log is None or not len(log):
        training["notes"].append("No log.csv in this folder (evaluate output folders have none): no training history.")
    else:
        training["best"] = _best_epoch(log, metric)
    if not curves.is_file():
        training["notes"].append("No plots/curves.png here.")
    return training


def _best_epoch(log: pd.DataFrame, metric: str) -> str:
    """The epoch checkpoint-best.pth holds, by finetune's rule: the highest selection metric, ties
    (or a metric undefined in every epoch) to the lower validation loss, then the earlier epoch."""
    has_loss = "val_loss" in log
    log = log.assign(_loss=log["val_loss"] if has_loss else 0.0,
                     _metric=log[metric] if metric in log else float("nan"))
    if log["_metric"].isna().all() and not has_loss:
        return ""
    best = log.sort_values(["_metric", "_loss"], ascending=[False, True], na_position="last").iloc[0]
    epoch = int(best["epoch"]) + 1 if "epoch" in log else int(best.name) + 1
    name = metric.removeprefix("val_")
    parts = [f"validation {name} {_fmt(name, best['_metric'])}"]
    if has_loss:
        parts.append(f"validation loss {best['_loss']:.4f}")
    return f"Best epoch {epoch} of {len(log)}: {', '.join(parts)} (the weights in checkpoint-best.pth)"


def _metrics_section(metrics: dict[str, Any], split: str, task: str, outputs: list[str]) -> dict[str, Any]:
    section: dict[str, Any] = {"split": split, "headline": [], "per_output": None, "notes": [],
                               "output_kind": _output_kind(task),
                               "missing_note": f"No metrics_{split}.json here."}
    if not metrics:
        return section
    ci = metrics.get("ci") or {}
    section["headline"] = [{"key": key, "name": _metric_name(key), "value": _with_ci(key, metrics[key], ci.get(key))}
                           for key in TASKS[task].report_headline if key in metrics]
    if not section["headline"]:
        section["missing_note"] = f"metrics_{split}.json has none of the {task} headline metrics."
    columns = [p for p in PER_OUTPUT if any(f"{p}_{name}" in metrics for name in outputs)]
    if columns and outputs:
        headers = [{"name": _output_kind(task)}] + [{"name": METRIC_NAMES.get(p, p), "num": True} for p in columns]
        rows = [[{"text": name}] + [{"text": _with_ci(p, metrics.get(f"{p}_{name}"), ci.get(f"{p}_{name}")),
                                     "cls": "num"} for p in columns] for name in outputs]
        section["per_output"] = {"headers": headers, "rows": rows}
    notes = section["notes"]
    extras = [f"n = {_fmt('n', metrics['n'])} images"] if "n" in metrics else []
    if isinstance(metrics.get("loss"), (int, float)):
        extras.append(f"loss {_fmt('loss', metrics['loss'])}")
    if extras:
        notes.append(", ".join(extras) + ".")
    boot = metrics.get("bootstrap") or {}
    if boot:
        level = boot.get("level", 0.95)
        unit = {"patient": "patients (all images of a patient together)", "image": "images"}.get(
            boot.get("unit"), str(boot.get("unit", "images")))
        notes.append(f"{float(level):.0%} confidence intervals: {boot.get('method', 'percentile')} bootstrap, "
                     f"{boot.get('replicates', '?')} replicates resampling {unit}"
                     f"{', stratified' if boot.get('stratified') else ''}, seed {boot.get('seed', '?')}.")
    else:
        notes.append("No confidence intervals (no bootstrap was run).")
    notes.append("Macro averages are over the classes where a metric is defined; n/a: undefined in this set.")
    if metrics.get("absent_classes"):
        notes.append(f"Absent from this set (their per-{_output_kind(task)} metrics are undefined and left out of "
                     f"macro averages): {', '.join(map(str, metrics['absent_classes']))}.")
    if metrics.get("label_map"):
        mapping = ", ".join(f"{k} → {v}" for k, v in metrics["label_map"].items())
        notes.append(f"Labels of this set were mapped to the model's: {mapping}.")
    return section


def _figures(folder: Path) -> list[dict[str, str]]:
    """Every PNG in plots/ but the training curves: known ones in CAPTIONS order, then by name."""
    if not folder.is_dir():
        return []
    found = {p.name: p for p in folder.glob("*.png") if p.is_file() and p.name != "curves.png"
             and not p.name.startswith(".")}  # a temporary file of an atomic write is hidden
    order = [n for n in CAPTIONS if n in found] + sorted(n for n in found if n not in CAPTIONS)
    return [{"caption": CAPTIONS.get(n, found[n].stem), "uri": _data_uri(found[n], "image/png")} for n in order]


def _errors_section(run_dir: Path, split: str, task: str, outputs: list[str], metrics: dict[str, Any],
                    max_errors: int) -> dict[str, Any]:
    section: dict[str, Any] = {"headers": [], "rows": [], "notes": []}
    frame = _read_csv(run_dir / f"predictions_{split}.csv", as_text=True)
    if frame is None:
        section["notes"].append(f"No predictions_{split}.csv here.")
        return section
    try:
        headers, errors, note = TASKS[task].error_rows(frame, outputs, metrics, max_errors)
    except KeyError as exc:  # a CSV without the columns this task writes
        section["notes"].append(f"predictions_{split}.csv lacks column {exc}; errors not shown.")
        return section
    thumbs: dict[str, str | None] = {}
    for path, cells in errors:
        if path not in thumbs:
            thumbs[path] = _thumbnail(path, run_dir)
        section["rows"].append({"image": thumbs[path], "file": path,
                                "cells": [{"text": path, "cls": "path"}] + cells})
    section["headers"] = [{"name": "file"}] + headers
    section["notes"].append(note)
    return section


def _explanations_section(run_dir: Path, split: str, task: str) -> dict[str, Any]:
    """'Where the model looked': the overlays listed in explanations_<split>.csv (written by evaluate
    and finetune), errors and correct cases in two galleries, each card the overlay, the file, the
    explained output and its probability (or predicted value). The CSV may be hostile: every cell is
    escaped by the template, and an overlay is read only from inside the run folder."""
    name = f"explanations_{split}.csv"
    section: dict[str, Any] = {"galleries": [], "caption": "", "notes": []}
    frame = _read_csv(run_dir / name, as_text=True)
    if frame is None:
        section["notes"].append(f"No {name} here: no heatmaps were made for this split.")
        return section
    column = TASKS[task].value_name  # "probability", or a regression's "value"
    missing = [c for c in (*EXPLANATION_COLUMNS, column) if c not in frame.columns]
    if missing:
        section["notes"].append(f"{name} lacks column(s) {', '.join(missing)}; heatmaps not shown.")
        return section
    value_name, value_format = ("probability", "p") if column == "probability" else ("predicted value", "value")
    root = run_dir.resolve()
    cases = frame["case"].astype(str).str.strip().str.lower()
    for case, title in GALLERIES:
        rows = frame[cases == case]
        cards = [_explanation_card(row, run_dir, root, value_name, value_format, column)
                 for _, row in rows.head(MAX_EXPLANATION_CARDS).iterrows()]
        notes = [f"The first {len(cards)} of {len(rows)} are shown; all are in {name}."] \
            if len(rows) > len(cards) else []
        empty = "None were explained." if case == "correct" else "No errors were explained."
        section["galleries"].append({"title": title, "cards": cards, "notes": notes, "empty": empty})
    methods = [m for m in dict.fromkeys(frame["method"].astype(str).str.strip()) if m]
    described = ", ".join(METHOD_NAMES.get(m, m) for m in methods) or "an unnamed method"
    section["caption"] = (f"Heatmaps by {described}, blended over each image from blue (little relevance) to "
                          "red (most); the white contour encloses the top 10 % of the relevance. "
                          f"The heatmap is of the {_output_kind(task)} named on each card.")
    if not len(frame):
        section["notes"].append(f"{name} lists no images.")
    return section


def _explanation_card(row: pd.Series, run_dir: Path, root: Path, value_name: str, value_format: str,
                      column: str) -> dict[str, Any]:
    path = str(row["path"])
    uri, note = _overlay_uri(str(row["overlay"]), run_dir, root)
    # The file's name reads best on a small card; a volume's frame address (file.dcm#frame=12) keeps its frame.
    file = path.replace("\\", "/").rsplit("/", 1)[-1] or path
    return {"uri": uri, "note": note, "file": file, "path": path, "target": str(row["target"]),
            "value_name": value_name, "value": _fmt(value_format, row[column])}


def _overlay_uri(relative: str, run_dir: Path, root: Path) -> tuple[str | None, str | None]:
    """(a JPEG data URI of the overlay about OVERLAY_PX wide, None) or (None, why it is not shown).

    Only a relative path that stays inside the run folder is read: an absolute one or one climbing
    out (../, or a symbolic link leading out) would let a crafted CSV embed any image the user can
    read into a page meant to be mailed."""
    from PIL import Image

    text = relative.strip()
    if not text:
        return None, "(no overlay file)"
    candidate = Path(text)
    if candidate.is_absolute() or text.startswith(("/", "\\", "~")) or ".." in candidate.parts \
            or ".." in text.replace("\\", "/").split("/"):
        return None, "(overlay not read: its path leads outside the run folder)"
    try:
        resolved = (run_dir / candidate).resolve()
        if not resolved.is_relative_to(root):
            return None, "(overlay not read: its path leads outside the run folder)"
        if not resolved.exists():
            return None, "(overlay file missing)"
    except (OSError, RuntimeError, ValueError):  # a symbolic link loop, a NUL byte in the name
        return None, "(overlay unreadable)"
    try:
        with warnings.catch_warnings():
            # Past PIL's pixel limit a file is a decompression bomb, not an overlay: refused, not decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_regular(resolved, what="overlay", max_bytes=IMAGE_MAX_BYTES, kind="images") as handle, \
                    Image.open(handle) as image:
                image.draft("RGB", (OVERLAY_PX, OVERLAY_PX))  # a JPEG overlay decodes at a reduced scale
                picture = image.convert("RGB")
        picture.thumbnail((OVERLAY_PX, OVERLAY_PX))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
    except Exception:  # corrupt, not an image, a decompression bomb, not a regular file: a note, never a failure
        return None, "(overlay unreadable)"
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), None


# --- formatting -----------------------------------------------------------------------------------


def _table(frame: pd.DataFrame, path_columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """A DataFrame as template rows; numeric columns right-aligned."""
    numeric = {c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])}
    headers = [{"name": str(c), "num": c in numeric} for c in frame.columns]
    rows = []
    for record in frame.itertuples(index=False):
        row = []
        for column, value in zip(frame.columns, record, strict=True):
            cls = "num" if column in numeric else ("path" if column in path_columns else "")
            row.append({"text": _cell(value), "cls": cls})
        rows.append(row)
    return {"headers": headers, "rows": rows}


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:g}" if not value.is_integer() else str(int(value))
    return str(value)


def _metric_name(key: str) -> str:
    if key.endswith("_macro"):
        base = key.removesuffix("_macro")
        return f"{METRIC_NAMES.get(base, base)} (macro)"
    return METRIC_NAMES.get(key, key)


def _output_kind(task: str, plural: bool = False) -> str:
    kind = TASKS[task].output_kind
    return (kind + ("es" if kind == "class" else "s")) if plural else kind


def _with_ci(metric: str, value: Any, interval: Any) -> str:
    """'0.912 (0.871–0.948)'; the value alone without a (finite) interval; n/a when undefined."""
    prefix = metric.split("_")[0] if not metric.startswith("balanced") else metric
    text = _fmt(prefix, value)
    if text == NA or not interval or len(interval) != 2:
        return text
    low, high = _fmt(prefix, interval[0]), _fmt(prefix, interval[1])
    return text if NA in (low, high) else f"{text} ({low}–{high})"


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _thumbnail(path: str, run_dir: Path) -> str | None:
    """A JPEG data URI of the image about THUMBNAIL_PX wide, or None when it cannot be read."""
    from PIL import Image

    from retinafm.data.io import read_image

    candidates = [Path(path)]
    if not Path(path).is_absolute():
        candidates.append(run_dir / path)  # paths relative to where the run was started, or to the run
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            image = Image.fromarray(read_image(candidate).permute(1, 2, 0).numpy())
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
        except Exception:  # unreadable, corrupt, odd mode: a placeholder, never a failed report
            return None
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return None
