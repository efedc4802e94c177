"""`retinafm evaluate`: a checkpoint on a labelled folder or manifest: metrics with CIs, predictions, plots, report."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from retinafm.data.loader import SkipLog
from retinafm.data.sources import (
    DataSourceError,
    expand_volumes,
    load_folder,
    load_manifest,
    parse_label_map,
)
from retinafm.engine.evaluation import (
    SplitEvaluation,
    evaluate_samples,
    write_evaluation,
)
from retinafm.engine.inference import load_for_inference
from retinafm.files import claim_dir, write_csv
from retinafm.files.outputs import EVALUATION_OUTPUTS
from retinafm.runtime import distributed as dist_utils
from retinafm.settings import EvaluateSettings
from retinafm.tasks import get_task, grade_order
from retinafm.workflows.explain import explain_report_cases
from retinafm.workflows.report import write_report


def evaluate(settings: EvaluateSettings, *, progress: bool = True, report: bool = True) -> SplitEvaluation:
    """`retinafm evaluate`: a fine-tuned checkpoint against a labelled folder or manifest split,
    its own or an external data set (`label_map`, "data=model,...", renames that set's classes or
    columns to the model's; model classes the set lacks are reported in the metrics, not an error).
    `report`: also write report.html."""
    settings.validate()
    inputs = [("--checkpoint", settings.checkpoint), ("--data-path", settings.data_path),
              ("--manifest", settings.manifest)]
    with claim_dir(settings.out, overwrite=settings.overwrite, inputs=inputs, outputs=EVALUATION_OUTPUTS) as claim:
        ev = _evaluate(settings, progress, report)
        claim.remove_stale()
    return ev


def _evaluate(cfg: EvaluateSettings, progress: bool, report: bool) -> SplitEvaluation:
    checkpoint, split, label_map = cfg.checkpoint, cfg.split, parse_label_map(cfg.label_map)
    loaded = load_for_inference(checkpoint, device=cfg.device, precision=cfg.precision, cpu_int8=cfg.cpu_int8)
    meta = loaded.meta
    if cfg.manifest:
        data = load_manifest(cfg.manifest, class_names=meta.class_names, targets=get_task(meta.task).targets,
                             label_map=label_map, absent_unknown=True)
    elif not get_task(meta.task).targets.from_folders:
        raise DataSourceError(f"this {meta.task} checkpoint is evaluated on a --manifest CSV with columns "
                              f"{', '.join(meta.class_names)}")
    else:
        data = load_folder(cfg.data_path, class_names=meta.class_names, flat_split=split, label_map=label_map)
    samples = expand_volumes(data, cfg.oct_frames or meta.settings.get("oct_frames") or "middle").split(split)
    if not samples:
        raise DataSourceError(f"{data.source} has no {split!r} images")
    out_dir = Path(cfg.out)
    task = loaded.task
    if cfg.ordinal and not task.one_class_per_image:
        raise DataSourceError("--ordinal applies to multi-class checkpoints (graded classes such as DR 0-4)")
    if cfg.ordinal and not task.ordinal:
        task = dataclasses.replace(task, grade_order=grade_order(task.output_names, ordinal=True))
    if dist_utils.is_primary():
        loaded.check_modality([s.path for s in samples], cfg.modality)
    ev = evaluate_samples(loaded.model, task, samples, loaded.transform, loaded.device,
                          split=split, batch_size=cfg.batch_size, num_workers=cfg.num_workers, bootstrap=cfg.bootstrap,
                          seed=cfg.seed, autocast_dtype=loaded.autocast_dtype, progress=progress)
    ev.notes = _external_notes(task, ev.targets, label_map)
    if dist_utils.is_primary():
        write_evaluation(out_dir, task, ev)
        if ev.skipped:
            log = SkipLog()
            log.add(ev.skipped)
            write_csv(out_dir / "skipped.csv", log.frame())
    if report:
        explain_report_cases(loaded, out_dir, split, cfg.report_heatmaps, seed=cfg.seed,
                             batch_size=min(cfg.batch_size, 8), progress=progress)
    if report and dist_utils.is_primary():
        write_report(out_dir, split, title=f"{Path(checkpoint).name} on {data.source}")
    return ev


def _external_notes(task, targets: np.ndarray, label_map: dict[str, str] | None) -> dict[str, Any]:
    """What a reader of external-set metrics must know: outputs the set has no examples of (their
    per-class metrics are undefined) and how its labels were mapped."""
    absent = task.absent_outputs(targets)
    notes: dict[str, Any] = {}
    if absent:
        warnings.warn(f"the evaluated set has no examples of {absent}; their per-class metrics are undefined (NaN) "
                      "and left out of macro averages", UserWarning, stacklevel=2)
        notes["absent_classes"] = absent
    if label_map:
        notes["label_map"] = dict(label_map)
    return notes
