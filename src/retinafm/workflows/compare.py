"""`retinafm compare`: paired comparison of models evaluated on the same images.

Each run is a fine-tune run directory or an `evaluate` output folder (anything holding
predictions_<split>.csv and metrics_<split>.json). The first run is the reference; every other
run is compared with it on the images both predicted:

- the headline metric (default: the task's selection metric, e.g. macro AUROC) and its
  difference with a paired bootstrap 95% CI and p-value (same resampled images for both runs,
  stratified as the task says, whole patients when patient ids are known);
- for AUROCs, DeLong's test per ROC curve (each class one-vs-rest, each label, and the headline
  when it is a single curve, as in binary tasks) — the analytic test papers report.

A run may also be a folder of runs, one per task (runs/retfound/{aptos,idrid,...}); runs are then
matched by sub-folder name, compared per task, and across tasks a Wilcoxon signed-rank test on
the per-task metrics says whether one model is better in general, as RetFiner reports.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from retinafm.engine.evaluation import CI_LEVEL, PARALLEL_REPLICATES
from retinafm.files import claim_dir, write_csv, write_json
from retinafm.files.inputs import read_table
from retinafm.files.outputs import COMPARISON_OUTPUTS
from retinafm.plots import plot_forest
from retinafm.stats.bootstrap import bootstrap_samples, paired_bootstrap
from retinafm.stats.delong import delong_test
from retinafm.tasks import make_task


class CompareError(ValueError):
    """Runs that cannot be compared as given; the message names the run and what to do."""


@dataclass
class RunOutputs:
    """One run's predictions on one split, as arrays aligned with `paths`."""

    name: str
    folder: Path
    task: Any
    paths: list[str]
    targets: np.ndarray
    outputs: np.ndarray
    patient_ids: list[Any] | None = None


@dataclass
class ComparisonRow:
    task: str  # the task folder's name in multi-task comparisons, "" otherwise
    reference: str
    model: str
    metric: str
    reference_value: float
    model_value: float
    difference: float  # model − reference
    ci_low: float
    ci_high: float
    p_value: float
    test: str  # "paired bootstrap" or "DeLong"
    n_images: int


@dataclass
class CompareResult:
    rows: list[ComparisonRow]
    wilcoxon: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.rows])


def compare_runs(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    split: str = "test",
    metric: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> CompareResult:
    """Compare runs[1:] with runs[0] on `split`; write comparison.csv/.json and forest.png to `out`."""
    if len(runs) < 2:
        raise CompareError("give at least two runs to compare (the first is the reference)")
    if bootstrap < 100:
        raise CompareError(f"--bootstrap must be at least 100 replicates for a 95% interval, got {bootstrap}")
    folders = [Path(r) for r in runs]
    for folder in folders:
        if not folder.is_dir():
            raise CompareError(f"{folder} is not a folder; give run directories or `retinafm evaluate` outputs")
    per_task = _task_folders(folders, split)
    out_dir = Path(out)
    with claim_dir(out_dir, overwrite=overwrite, inputs=[("run", f) for f in folders],
                   outputs=COMPARISON_OUTPUTS) as claim:
        result = _compare(per_task, folders, out_dir, split, metric, bootstrap, seed)
        claim.remove_stale()
    return result


def _compare(per_task: dict[str, list[Path]], folders: list[Path], out_dir: Path, split: str, metric: str | None,
             bootstrap: int, seed: int) -> CompareResult:
    rows: list[ComparisonRow] = []
    for task_name, task_runs in per_task.items():
        loaded = [load_run(f, split, name=_label(f, folders, task_name)) for f in task_runs]
        reference = loaded[0]
        for other in loaded[1:]:
            rows += compare_pair(reference, other, metric=metric, bootstrap=bootstrap, seed=seed, task_label=task_name)
    result = CompareResult(rows)
    if len(per_task) > 1:
        result.wilcoxon = _wilcoxon_across_tasks(rows)

    headline = [r for r in rows if r.test == "paired bootstrap"]
    result.files["csv"] = write_csv(out_dir / "comparison.csv", result.table())
    result.files["json"] = write_json(out_dir / "comparison.json", {
        "split": split, "runs": [str(f) for f in folders], "reference": str(folders[0]),
        "bootstrap": {"replicates": bootstrap, "seed": seed, "level": CI_LEVEL, "method": "paired percentile"},
        "comparisons": [asdict(r) for r in rows], "wilcoxon": result.wilcoxon,
    })
    forest_rows = [{"label": f"{r.model}" + (f" — {r.task}" if r.task else ""), "difference": r.difference,
                    "ci_low": r.ci_low, "ci_high": r.ci_high, "p_value": r.p_value} for r in headline]
    result.files["forest"] = plot_forest(forest_rows, out_dir / "forest.png", metric=headline[0].metric,
                                         reference=headline[0].reference)
    return result


def compare_pair(reference: RunOutputs, other: RunOutputs, *, metric: str | None = None, bootstrap: int = 1000,
                 seed: int = 0, task_label: str = "") -> list[ComparisonRow]:
    """The headline metric by paired bootstrap, then DeLong per ROC curve when the metric is an AUROC."""
    task = reference.task
    _check_same_task(reference, other)
    a, b = _aligned(reference, other)
    metric = metric or task.selection_metric
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-class undefined-metric warnings were given at evaluation
        full_a, full_b = task.metrics(a.targets, a.outputs), task.metrics(b.targets, b.outputs)
    if metric not in full_a:
        raise CompareError(f"--metric {metric!r} is not a {task.name} metric; choose one of {', '.join(full_a)}")

    groups = _groups(a.patient_ids)
    samples = bootstrap_samples(len(a.paths), bootstrap, seed, strata=task.bootstrap_strata(a.targets), groups=groups)

    def statistic(rows: np.ndarray) -> tuple[float, float]:
        return (task.metrics(a.targets[rows], a.outputs[rows])[metric],
                task.metrics(b.targets[rows], b.outputs[rows])[metric])

    paired = paired_bootstrap(statistic, samples, level=CI_LEVEL, full=(full_a[metric], full_b[metric]),
                              n_jobs=-1 if bootstrap >= PARALLEL_REPLICATES else 1)
    rows = [ComparisonRow(task_label, reference.name, other.name, metric, paired.a, paired.b, paired.difference,
                          paired.ci_low, paired.ci_high, paired.p_value, "paired bootstrap", len(a.paths))]
    if metric.startswith("auroc"):
        for name, y, score_a, score_b in _roc_curves(task, a, b):
            if np.unique(y).size < 2:
                continue  # one outcome only: no ROC curve (the metrics already say NaN)
            result = delong_test(y, score_a, score_b, level=CI_LEVEL)
            rows.append(ComparisonRow(task_label, reference.name, other.name, f"auroc_{name}", result.auc_a,
                                      result.auc_b, result.difference, result.ci_low, result.ci_high,
                                      result.p_value, "DeLong", len(y)))
    return rows


def load_run(folder: str | Path, split: str = "test", name: str | None = None) -> RunOutputs:
    """A run's predictions on `split` with its task rebuilt from metrics_<split>.json."""
    folder = Path(folder)
    predictions, metrics_file = folder / f"predictions_{split}.csv", folder / f"metrics_{split}.json"
    for needed in (predictions, metrics_file):
        if not needed.is_file():
            raise CompareError(f"{folder} has no {needed.name}; compare runs that finished their {split} evaluation, "
                               f"or run `retinafm evaluate --split {split}` into a folder")
    info = json.loads(metrics_file.read_text(encoding="utf-8")).get("task")
    if not info:
        raise CompareError(f"{metrics_file} predates task records; re-create it with `retinafm evaluate`")
    task = make_task(info["name"], info["outputs"], **info.get("state", {}))
    frame = read_table(predictions, what="compare input", text=("path", "label", "patient_id", "prediction"))
    try:
        targets, outputs = task.from_prediction_frame(frame)
    except ValueError as exc:
        raise CompareError(f"{predictions}: {exc}") from None
    patients = frame["patient_id"].where(frame["patient_id"].notna(), None).tolist() if "patient_id" in frame else None
    return RunOutputs(name or folder.name, folder, task, frame["path"].astype(str).tolist(), targets, outputs, patients)


def _check_same_task(a: RunOutputs, b: RunOutputs) -> None:
    if a.task.name != b.task.name:
        raise CompareError(f"{a.folder} is a {a.task.name} run but {b.folder} is {b.task.name}; compare like with like")
    if list(a.task.output_names) != list(b.task.output_names):
        raise CompareError(f"{a.folder} predicts {list(a.task.output_names)} but {b.folder} predicts "
                           f"{list(b.task.output_names)}; evaluate both on the same classes (--label-map)")


def _aligned(a: RunOutputs, b: RunOutputs) -> tuple[RunOutputs, RunOutputs]:
    """Both runs restricted to the images both predicted, in the reference's order; their truths must agree."""
    index_b = {p: i for i, p in enumerate(b.paths)}
    rows_a = [i for i, p in enumerate(a.paths) if p in index_b]
    if not rows_a:
        raise CompareError(f"{a.folder} and {b.folder} share no image paths; a paired comparison needs the same "
                           "images (evaluate both models on one data set)")
    rows_b = [index_b[a.paths[i]] for i in rows_a]
    dropped = (len(a.paths) - len(rows_a), len(b.paths) - len(rows_b))
    if any(dropped):
        warnings.warn(f"comparing on the {len(rows_a)} images both runs predicted ({a.name}: {dropped[0]} others, "
                      f"{b.name}: {dropped[1]} others)", UserWarning, stacklevel=3)
    ta, tb = a.targets[rows_a], b.targets[rows_b]
    if not np.array_equal(ta, tb, equal_nan=np.issubdtype(ta.dtype, np.floating)):
        bad = a.paths[rows_a[int(np.flatnonzero(~_same(ta, tb))[0])]]
        raise CompareError(f"{a.folder} and {b.folder} disagree on the truth of {bad}; they were not evaluated "
                           "on the same labels")
    return _subset(a, rows_a), _subset(b, rows_b)


def _same(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    same = (x == y) | (np.isnan(x) & np.isnan(y)) if np.issubdtype(x.dtype, np.floating) else x == y
    return same.reshape(len(x), -1).all(axis=1)


def _subset(run: RunOutputs, rows: list[int]) -> RunOutputs:
    patients = [run.patient_ids[i] for i in rows] if run.patient_ids is not None else None
    return RunOutputs(run.name, run.folder, run.task, [run.paths[i] for i in rows], run.targets[rows],
                      run.outputs[rows], patients)


def _groups(patient_ids: list[Any] | None) -> np.ndarray | None:
    if patient_ids is None or all(p is None for p in patient_ids):
        return None
    return np.asarray(patient_ids, dtype=object)


def _roc_curves(task, a: RunOutputs, b: RunOutputs):
    """(name, 0/1 truth, scores of A, scores of B) for every ROC curve behind the task's AUROCs."""
    return task.roc_curves(a.targets, a.outputs, b.outputs)


def _wilcoxon_across_tasks(rows: list[ComparisonRow]) -> list[dict[str, Any]]:
    """Per model: Wilcoxon signed-rank test of its headline metric against the reference's over the tasks."""
    headline = [r for r in rows if r.test == "paired bootstrap"]
    out = []
    for model in dict.fromkeys(r.model for r in headline):
        pairs = [(r.reference_value, r.model_value) for r in headline
                 if r.model == model and not (np.isnan(r.reference_value) or np.isnan(r.model_value))]
        entry: dict[str, Any] = {"model": model, "reference": headline[0].reference, "metric": headline[0].metric,
                                 "tasks": len(pairs), "model_better": sum(b > a for a, b in pairs)}
        differences = [b - a for a, b in pairs]
        if len(pairs) < 2 or not any(differences):
            entry.update(statistic=float("nan"), p_value=float("nan"),
                         note="needs at least two tasks with a non-zero difference")
        else:
            test = wilcoxon(differences)
            entry.update(statistic=float(test.statistic), p_value=float(test.pvalue))
            if len(pairs) < 6:
                floor = 2 / 2 ** len(pairs)
                entry["note"] = f"with {len(pairs)} tasks the exact two-sided p cannot go below {floor:.3g}"
        out.append(entry)
    return out


def _task_folders(folders: list[Path], split: str) -> dict[str, list[Path]]:
    """{task name: one folder per run}: {"": folders} for single runs, or sub-folders matched by name."""
    is_run = [(f / f"predictions_{split}.csv").is_file() for f in folders]
    if all(is_run):
        return {"": folders}
    if any(is_run):
        odd = [str(f) for f, r in zip(folders, is_run, strict=True) if not r]
        raise CompareError(f"{', '.join(odd)} hold(s) no predictions_{split}.csv while the other runs do; give runs "
                           "of one kind (run folders, or folders of runs with one sub-folder per task)")
    names = [{d.name for d in f.iterdir() if (d / f"predictions_{split}.csv").is_file()} for f in folders]
    common = sorted(set.intersection(*names))
    if not common:
        raise CompareError(f"none of {', '.join(map(str, folders))} holds predictions_{split}.csv, nor sub-folders "
                           "with the same names that do (one per task)")
    for folder, have in zip(folders, names, strict=True):
        extra = sorted(have - set(common))
        if extra:
            warnings.warn(f"{folder}: task folder(s) {extra} have no counterpart in every run; left out",
                          UserWarning, stacklevel=3)
    return {name: [f / name for f in folders] for name in common}


def _label(folder: Path, runs: list[Path], task_name: str) -> str:
    """A run's name in tables: its folder name, or the path when two runs share a name."""
    run = folder.parent if task_name else folder
    names = [r.name for r in runs]
    return run.name if names.count(run.name) == 1 else str(run)
