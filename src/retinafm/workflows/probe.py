"""`retinafm probe`: linear probing (and kNN) on embeddings from `retinafm embed`, in seconds.

A linear probe on frozen features is RETFound's second adaptation mode; RETFound trains it by
running the backbone over every image in every epoch. Here the features are computed once and
the head is fitted by scikit-learn: multinomial logistic regression (multi-class), one logistic
regression per label (multi-label) or ridge regression per target (regression), with the
regularisation strength chosen on the validation split (k-fold on train when there is none).
A kNN classifier / regressor on cosine distance is reported beside it, as in the RETFound-Green
and DINOv2 evaluations.

The run directory has the fine-tuning layout (metrics with CIs, predictions, plots, report.html)
and a checkpoint-best.pth that `predict` and `evaluate` use: the fitted head, as a timm Linear on
standardised features folded back into raw-feature weights, plus a reference to the backbone it
was fitted on (its checkpoint or pretrained weights), so the file stays small.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from retinafm.data.embeddings import Embeddings, read_embeddings
from retinafm.data.sources import DataSourceError
from retinafm.engine.evaluation import (
    SplitEvaluation,
    confidence_intervals,
    write_evaluation,
)
from retinafm.files import claim_dir, write_csv, write_yaml
from retinafm.files.outputs import PROBE_OUTPUTS
from retinafm.plots import plot_probe_grid
from retinafm.settings import ProbeSettings
from retinafm.tasks import TASKS


def check_probe(settings: ProbeSettings) -> None:
    """The probe's settings (settings.ProbeSettings.check) and its task: a known type, given the columns a
    multi-label or regression probe reads."""
    try:
        settings.check()
    except ValueError as exc:  # a probe's refusals are data-source errors, one line on the command line
        raise DataSourceError(str(exc)) from None
    if settings.task not in TASKS:
        raise DataSourceError(f"--task must be one of {', '.join(TASKS)}, got {settings.task!r}")
    if TASKS[settings.task].named_columns and not settings.columns:
        raise DataSourceError(f"a {settings.task} probe needs {TASKS[settings.task].probe_columns_help}")


@dataclass
class LinearHead:
    """Outputs = features @ weight.T + bias, on raw (unstandardised) features."""

    weight: np.ndarray  # (outputs, dim)
    bias: np.ndarray  # (outputs,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


@dataclass
class ProbeResult:
    run_dir: Path
    task: Any
    strength: float  # the chosen C (logistic) or alpha (ridge)
    grid: pd.DataFrame
    evaluations: dict[str, SplitEvaluation]  # linear probe per split
    knn: dict[str, SplitEvaluation]
    checkpoint: Path


# --------------------------------------------------------------------------- data
def probe_data(emb: Embeddings, settings: ProbeSettings):
    """(task before fit, {split: row indices}, targets array) from an embeddings table."""
    frame = emb.frame
    if "split" not in frame.columns:
        raise DataSourceError("the embeddings have no 'split' column; embed a train|val|test folder or a manifest "
                              "with a split column")
    splits = {s: np.flatnonzero(frame["split"].astype(str).to_numpy() == s) for s in ("train", "val", "test")}
    unknown = sorted(set(frame["split"].astype(str)) - {"train", "val", "test"})
    if unknown:
        raise DataSourceError(f"the embeddings' split column has unknown value(s) {unknown}; use train, val, test")
    if len(splits["train"]) == 0:
        raise DataSourceError("the embeddings have no 'train' rows to fit a probe on")
    return TASKS[settings.task].probe_targets(frame, splits, settings)


# --------------------------------------------------------------------------- fitting
def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return mean, np.where(std > 1e-12, std, 1.0)


def _fold(weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, std: np.ndarray) -> LinearHead:
    """A head on standardised features as the same head on raw features."""
    w = weight / std
    return LinearHead(w.astype(np.float64), (bias - w @ mean).astype(np.float64))


def fit_linear(task, x: np.ndarray, y: np.ndarray, strength: float, settings: ProbeSettings) -> LinearHead:
    """The task's linear model at one regularisation strength, as a LinearHead on raw features."""
    mean, std = _standardiser(x)
    weight, bias = task.fit_probe((x - mean) / std, y, strength, settings.max_iter, settings.seed)
    return _fold(weight, bias, mean, std)


def head_outputs(task, head: LinearHead, x: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """The task's outputs (probabilities, or targets in their units) and the raw logits."""
    logits = torch.from_numpy(head.logits(x).astype(np.float32))
    return task.activate(logits), logits


def _score(task, targets: np.ndarray, outputs: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = task.metrics(targets, outputs).get(task.selection_metric, math.nan)
    return float(value)


def choose_strength(task, x: np.ndarray, y: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None,
                    settings: ProbeSettings) -> tuple[float, pd.DataFrame]:
    """The grid value with the best validation selection metric (ties: the stronger regularisation)."""
    grid = task.probe_grid  # strongest regularisation first
    rows = []
    for strength in grid:
        if val is not None:
            head = fit_linear(task, x, y, strength, settings)
            score = _score(task, val[1], head_outputs(task, head, val[0])[0])
            scheme = "validation"
        else:
            predictions = np.zeros((len(y), task.num_outputs))
            for train_rows, held_rows in task.probe_folds(y, settings.folds, settings.seed):
                head = fit_linear(task, x[train_rows], y[train_rows], strength, settings)
                predictions[held_rows] = head_outputs(task, head, x[held_rows])[0]
            score = _score(task, y, predictions)
            scheme = f"{min(settings.folds, len(y))}-fold"
        rows.append({task.probe_strength_name: strength, task.selection_metric: score,
                     "scheme": scheme})
    table = pd.DataFrame(rows)
    scores = table[task.selection_metric].to_numpy(dtype=float)
    best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else len(grid) // 2
    return float(grid[best]), table


def knn_outputs(task, x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """kNN on cosine distance: class (label) probabilities, or the neighbours' mean target."""
    return task.knn_outputs(x_train, y_train, x, k)


# --------------------------------------------------------------------------- the workflow
def probe(embeddings: str | Path | Embeddings, out: str | Path, settings: ProbeSettings | None = None, *,
          overwrite: bool = False, quiet: bool = False) -> ProbeResult:
    """Fit, select, evaluate and save a linear probe (and evaluate kNN) on an embeddings file
    (`settings`: the defaults of ProbeSettings when not given)."""
    settings = settings if settings is not None else ProbeSettings()
    check_probe(settings)
    emb = embeddings if isinstance(embeddings, Embeddings) else read_embeddings(embeddings)
    task, splits, targets = probe_data(emb, settings)
    source = None if isinstance(embeddings, Embeddings) else embeddings
    with claim_dir(out, overwrite=overwrite, inputs=[("--embeddings", source)], outputs=PROBE_OUTPUTS) as claim:
        result = _probe(emb, task, splits, targets, Path(out), settings, quiet)
        claim.remove_stale()
    return result


def _probe(emb: Embeddings, task, splits: dict[str, np.ndarray], targets: np.ndarray, run_dir: Path,
           settings: ProbeSettings, quiet: bool) -> ProbeResult:
    x = emb.vectors.astype(np.float64)
    train = splits["train"]
    task = task.fit(targets[train])
    val = (x[splits["val"]], targets[splits["val"]]) if len(splits["val"]) else None
    strength, grid = choose_strength(task, x[train], targets[train], val, settings)
    head = fit_linear(task, x[train], targets[train], strength, settings)
    if val is not None:
        task = task.calibrate(val[1], head_outputs(task, head, val[0])[0])  # multi-label Youden thresholds

    paths = emb.frame["path"].astype(str).tolist()
    patients = emb.frame["patient_id"] if "patient_id" in emb.frame.columns else None
    evaluations, knn = {}, {}
    for split in ("val", "test"):
        rows = splits[split]
        if len(rows) == 0:
            continue
        outputs, logits = head_outputs(task, head, x[rows])
        evaluations[split] = _evaluation(task, split, rows, targets, outputs, logits, paths, patients,
                                         settings if split == "test" else None)
        knn_out = knn_outputs(task, x[train], targets[train], x[rows], settings.knn_k)
        knn[split] = _evaluation(task, split, rows, targets, knn_out, None, paths, patients,
                                 settings if split == "test" else None)
    for split, ev in evaluations.items():
        write_evaluation(run_dir, task, ev)
        write_evaluation(run_dir / "knn", task, knn[split], plots=False)  # a reference point: numbers suffice
    checkpoint = _save_probe_checkpoint(run_dir, emb, task, head, strength, settings, evaluations.get("val"))
    write_csv(run_dir / "probe_grid.csv", grid)
    write_csv(run_dir / "data_summary.csv", _summary(emb.frame, splits, task, targets))
    write_yaml(run_dir / "config.yaml", {"adaptation": "linear probe (embeddings)", **asdict(settings),
                                         "chosen_" + grid.columns[0]: strength, "embeddings": emb.info,
                                         "class_names": list(task.output_names)})
    plot_probe_grid(grid, task.selection_metric, run_dir / "plots" / "probe_grid.png")
    if "test" in evaluations:
        from retinafm.workflows.report import write_report

        write_report(run_dir, "test", title=f"linear probe on {emb.info.get('model', 'embeddings')}")
    if not quiet:
        name = grid.columns[0]
        print(f"{name} = {strength:g} chosen by {grid['scheme'].iloc[0]} {task.selection_metric}")
        for split, ev in evaluations.items():
            print(f"linear probe, {split}: {task.summary(ev.metrics, ev.ci or None)}")
            print(f"kNN (k={settings.knn_k}), {split}: {task.summary(knn[split].metrics, knn[split].ci or None)}")
    return ProbeResult(run_dir, task, strength, grid, evaluations, knn, checkpoint)


def _evaluation(task, split: str, rows: np.ndarray, targets: np.ndarray, outputs: np.ndarray,
                logits: torch.Tensor | None, paths: Sequence[str], patients: pd.Series | None,
                ci_settings: ProbeSettings | None) -> SplitEvaluation:
    y = targets[rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined per-class metrics on small splits are NaN, as documented
        metrics = task.metrics(y, outputs)
    loss = task.loss(logits, y) if logits is not None else math.nan
    ids = [None if pd.isna(patients.iloc[i]) else str(patients.iloc[i]) for i in rows] if patients is not None \
        else [None] * len(rows)
    ev = SplitEvaluation(split, [paths[i] for i in rows], y, outputs, loss, metrics, [], task, ids)
    if ci_settings is not None and ci_settings.bootstrap:
        ev.ci, ev.bootstrap = confidence_intervals(task, y, outputs, ids, ci_settings.bootstrap, ci_settings.seed)
    return ev


def _summary(frame: pd.DataFrame, splits: dict[str, np.ndarray], task, targets: np.ndarray) -> pd.DataFrame:
    rows = [task.probe_summary(split, targets[index]) for split, index in splits.items()]
    return pd.DataFrame(rows)


def _save_probe_checkpoint(run_dir: Path, emb: Embeddings, task, head: LinearHead, strength: float,
                           settings: ProbeSettings, val: SplitEvaluation | None) -> Path:
    from retinafm.engine.checkpoint import CheckpointMeta, save_probe_checkpoint
    from retinafm.engine.features import backbone_fields

    fields, reference, backbone_state = backbone_fields(emb.info)
    meta = CheckpointMeta(
        model_name=f"{fields.pop('model_name')} + linear probe", task=task.name,
        class_names=list(task.output_names), task_state=task.state(),
        settings={**asdict(settings), "strength": strength}, metrics=dict(val.metrics) if val else {},
        backbone=reference, **fields)
    weights = {"head.weight": torch.from_numpy(head.weight.astype(np.float32)),
               "head.bias": torch.from_numpy(head.bias.astype(np.float32))}
    return save_probe_checkpoint(run_dir / "checkpoint-best.pth", meta, weights, backbone_state)
