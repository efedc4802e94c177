"""Evaluate a model on a labelled split and write metrics, predictions and plots.

The end of `finetune` and the `evaluate` command both come through `write_evaluation`, so a
number in metrics_test.json always means the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..data.loader import ImageDataset, SkipLog
from ..data.sources import DataSourceError, Sample, load_folder, load_manifest
from ..data.transforms import eval_transform
from ..files import prepare_output_dir, write_csv, write_json
from ..train import distributed as dist_utils
from ..train.checkpoint import load_checkpoint, model_from_checkpoint, task_of
from ..train.loop import infer
from ..train.runtime import amp_dtype, resolve_device
from .metrics import metrics_to_frame


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
) -> SplitEvaluation:
    """Inference over labelled samples, then loss and the task's metrics on the readable ones.

    `calibrate` lets the task choose what it picks on validation (multilabel Youden thresholds)
    from these outputs before the metrics are computed.
    """
    dataset = ImageDataset([s.path for s in samples], task.dataset_targets(samples), transform)
    result = infer(model, dataset, device, batch_size=batch_size, num_workers=num_workers,
                   amp_dtype=amp_dtype(device), desc=split, progress=progress)
    if len(result.indices) == 0:
        raise DataSourceError(f"none of the {len(samples)} {split} images could be read (see skipped.csv)")
    read = [samples[i] for i in result.indices]
    targets = task.target_array(read)
    logits = torch.from_numpy(result.logits)
    outputs = task.activate(logits)
    if calibrate:
        task = task.calibrate(targets, outputs)
    return SplitEvaluation(
        split=split,
        paths=[s.path for s in read],
        targets=targets,
        outputs=outputs,
        loss=task.loss(logits, targets),
        metrics=task.metrics(targets, outputs),
        skipped=result.skipped,
        task=task,
    )


def write_evaluation(out_dir: Path, task, ev: SplitEvaluation) -> dict[str, Path]:
    """metrics_<split>.json/.csv, predictions_<split>.csv and the task's plots under plots/."""
    out_dir = Path(out_dir)
    metrics = {"split": ev.split, "loss": ev.loss, **ev.metrics}
    written = {
        "metrics_json": write_json(out_dir / f"metrics_{ev.split}.json", metrics),
        "metrics_csv": write_csv(out_dir / f"metrics_{ev.split}.csv", metrics_to_frame(ev.metrics)),
        "predictions": write_csv(out_dir / f"predictions_{ev.split}.csv",
                                 task.prediction_frame(ev.paths, ev.outputs, ev.targets)),
    }
    written.update(task.plots(ev.targets, ev.outputs, out_dir / "plots"))
    return written


def evaluate_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    data_path: Optional[str] = None,
    manifest: Optional[str] = None,
    split: str = "test",
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int = 2,
    overwrite: bool = False,
) -> SplitEvaluation:
    """`retinafm evaluate`: a fine-tuned checkpoint against a labelled folder or manifest split."""
    state = load_checkpoint(checkpoint)
    model, meta = model_from_checkpoint(state)
    if manifest:
        data = load_manifest(manifest, class_names=meta.class_names, task=meta.task)
    elif meta.task != "multiclass":
        raise DataSourceError(f"this {meta.task} checkpoint is evaluated on a --manifest CSV with columns "
                              f"{', '.join(meta.class_names)}")
    elif data_path:
        data = load_folder(data_path, class_names=meta.class_names, flat_split=split)
    else:
        raise DataSourceError("give --data-path DIR or --manifest FILE.csv to evaluate on")
    samples = data.split(split)
    if not samples:
        raise DataSourceError(f"{data.source} has no {split!r} images")
    dev = resolve_device(device)
    dist_utils.init_distributed(dev)
    out_dir = Path(out)
    if dist_utils.is_primary():
        prepare_output_dir(out_dir, overwrite=overwrite)
    task = task_of(meta)
    ev = evaluate_samples(model.to(dev), task, samples, eval_transform(meta.input_size, meta.mean, meta.std), dev,
                          split=split, batch_size=batch_size, num_workers=num_workers)
    if dist_utils.is_primary():
        write_evaluation(out_dir, task, ev)
        if ev.skipped:
            log = SkipLog()
            log.add(ev.skipped)
            write_csv(out_dir / "skipped.csv", log.frame())
    return ev
