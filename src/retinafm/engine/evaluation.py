"""Evaluate a model on a labelled split and write metrics (with bootstrap confidence intervals),
predictions, plots and the HTML report.

The end of `finetune` and the `evaluate` command both come through `evaluate_samples` and
`write_evaluation`, so a number in metrics_test.json always means the same thing.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from retinafm.data.loader import ImageDataset
from retinafm.data.sources import (
    DataSourceError,
    Sample,
)
from retinafm.engine.infer import infer
from retinafm.files import write_csv, write_json
from retinafm.runtime import distributed as dist_utils
from retinafm.stats.bootstrap import bootstrap_ci, bootstrap_samples
from retinafm.stats.metrics import metrics_to_frame

# Bootstrap CIs at this level; replicates run in worker processes once there are enough of them
# to pay for starting the workers.
CI_LEVEL = 0.95
PARALLEL_REPLICATES = 500


@dataclass
class SplitEvaluation:
    split: str
    paths: list[str]
    targets: np.ndarray  # class indices (multiclass) or (N, outputs) floats with NaN = unknown
    outputs: np.ndarray  # probabilities, or predictions in original units (regression)
    loss: float
    metrics: dict[str, float]
    skipped: list[tuple[str, str]]
    task: Any = None  # the task as evaluated (with thresholds chosen on this split when calibrated)
    patient_ids: list[str | None] = field(default_factory=list)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (low, high)
    bootstrap: dict[str, Any] = field(default_factory=dict)  # how the CIs were made
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. absent_classes, label_map


def confidence_intervals(task, targets: np.ndarray, outputs: np.ndarray, patient_ids: Sequence[str | None],
                         replicates: int, seed: int = 0) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    """Percentile bootstrap CIs of every metric the task reports (counts and thresholds excluded):
    stratified as the task says (by class for multi-class), resampling whole patients when the
    data has patient ids, since one patient's images are not independent."""
    groups = np.asarray(patient_ids, dtype=object) if any(p is not None for p in patient_ids) else None
    samples = bootstrap_samples(len(outputs), replicates, seed, strata=task.bootstrap_strata(targets), groups=groups)

    def statistic(rows: np.ndarray) -> dict[str, float]:
        return {k: v for k, v in task.metrics(targets[rows], outputs[rows]).items() if _has_ci(k)}

    ci = bootstrap_ci(statistic, samples, level=CI_LEVEL, n_jobs=-1 if replicates >= PARALLEL_REPLICATES else 1)
    info = {"replicates": replicates, "seed": seed, "level": CI_LEVEL, "method": "percentile",
            "unit": "patient" if groups is not None else "image",
            "stratified": task.bootstrap_strata(targets) is not None}
    return ci, info


def _has_ci(metric: str) -> bool:
    return metric != "n" and not metric.startswith(("n_", "threshold_"))


def evaluate_samples(
    model: nn.Module,
    task,
    samples: Sequence[Sample],
    transform,
    device: torch.device,
    *,
    split: str,
    batch_size: int,
    num_workers: int = 0,
    progress: bool = True,
    calibrate: bool = False,
    bootstrap: int = 0,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,  # the run's (train.runtime.amp_dtype); None: fp32
) -> SplitEvaluation:
    """Inference over labelled samples, then loss and the task's metrics on the readable ones.

    `calibrate` lets the task choose what it picks on validation (multilabel Youden thresholds)
    from these outputs before the metrics are computed. `bootstrap` replicates (0: none) add 95%
    confidence intervals to every metric.
    """
    dataset = ImageDataset([s.path for s in samples], task.dataset_targets(samples), transform)
    result = infer(model, dataset, device, batch_size=batch_size, num_workers=num_workers,
                   amp_dtype=autocast_dtype, desc=split, progress=progress)
    if len(result.indices) == 0:
        raise DataSourceError(f"none of the {len(samples)} {split} images could be read (see skipped.csv)")
    read = [samples[i] for i in result.indices]
    targets = task.target_array(read)
    logits = torch.from_numpy(result.logits)
    outputs = task.activate(logits)
    if calibrate:
        task = task.calibrate(targets, outputs)
    ev = SplitEvaluation(
        split=split,
        paths=[s.path for s in read],
        targets=targets,
        outputs=outputs,
        loss=task.loss(logits, targets),
        metrics=task.metrics(targets, outputs),
        skipped=result.skipped,
        task=task,
        patient_ids=[s.patient_id for s in read],
    )
    if bootstrap and dist_utils.is_primary():  # the other ranks only wait for rank 0's files
        ev.ci, ev.bootstrap = confidence_intervals(task, targets, outputs, ev.patient_ids, bootstrap, seed)
    return ev


def write_evaluation(out_dir: Path, task, ev: SplitEvaluation, *, plots: bool = True) -> dict[str, Path]:
    """metrics_<split>.json/.csv (point estimates beside their CIs), predictions_<split>.csv and
    (unless `plots` is False) the task's plots under plots/."""
    out_dir = Path(out_dir)
    metrics: dict[str, Any] = {"split": ev.split, "loss": ev.loss, **ev.metrics}
    if ev.ci:
        metrics["ci"] = {k: list(v) for k, v in ev.ci.items()}
        metrics["bootstrap"] = ev.bootstrap
    metrics["task"] = {"name": task.name, "outputs": list(task.output_names), "state": task.state()}
    metrics.update(ev.notes)
    predictions = task.prediction_frame(ev.paths, ev.outputs, ev.targets)
    if any(p is not None for p in ev.patient_ids):  # lets `compare` resample patients too
        predictions.insert(1, "patient_id", ev.patient_ids)
    written = {
        "metrics_json": write_json(out_dir / f"metrics_{ev.split}.json", metrics),
        "metrics_csv": write_csv(out_dir / f"metrics_{ev.split}.csv", metrics_to_frame(ev.metrics, ev.ci)),
        "predictions": write_csv(out_dir / f"predictions_{ev.split}.csv", predictions),
    }
    if plots:
        written.update(task.plots(ev.targets, ev.outputs, out_dir / "plots"))
    return written
