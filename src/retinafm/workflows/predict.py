"""`retinafm predict`: a folder (or file) of new images → predictions CSV, from a checkpoint alone."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from retinafm.data.images import collect_images
from retinafm.data.io import IMAGE_SUFFIXES
from retinafm.data.loader import ImageDataset, SkipLog
from retinafm.data.sources import DataSourceError
from retinafm.data.volumes import split_address
from retinafm.engine.infer import infer
from retinafm.engine.inference import load_for_inference
from retinafm.files import claim_dir, claim_file, write_csv
from retinafm.files.outputs import EXPLAIN_OUTPUTS
from retinafm.runtime import distributed as dist_utils
from retinafm.settings import ConfigError, PredictSettings


@dataclass
class PredictResult:
    predictions: pd.DataFrame
    out: Path
    skipped: pd.DataFrame
    skipped_path: Path | None
    volumes: pd.DataFrame | None = None  # one row per OCT volume when several of its B-scans were predicted
    volumes_path: Path | None = None
    explanations: pd.DataFrame | None = None  # --heatmaps: the rows of <heatmaps>/explanations.csv


def volume_table(frame: pd.DataFrame, multiclass: bool) -> pd.DataFrame | None:
    """One row per volume with several predicted B-scans: path (the file), frames, then the mean
    and the maximum of every probability column (regression: the mean of each target), and for
    a multi-class model the class with the highest mean probability. None when there are none."""
    addresses = [split_address(p) for p in frame["path"]]
    files = [file if frame_index is not None else None for file, frame_index, _ in addresses]
    frame = frame.assign(_file=files).dropna(subset=["_file"])
    counts = frame.groupby("_file", sort=False).size()
    frame = frame[frame["_file"].isin(counts.index[counts > 1])]
    if frame.empty:
        return None
    probs = [c for c in frame.columns if c.startswith("prob_")]
    values = probs or [c for c in frame.columns if c not in ("path", "prediction", "_file")
                       and pd.api.types.is_numeric_dtype(frame[c])]
    grouped = frame.groupby("_file", sort=False)
    table = pd.DataFrame({"path": list(grouped.groups), "frames": grouped.size().to_numpy()})
    means = grouped[values].mean().add_prefix("mean_" if probs else "")
    table = table.join(means.reset_index(drop=True))
    if probs:
        table = table.join(grouped[probs].max().add_prefix("max_").reset_index(drop=True))
    if multiclass:
        table.insert(2, "prediction", [c[len("mean_prob_"):] for c in means.idxmax(axis=1)])
    return table


def predict(settings: PredictSettings, *, progress: bool = True) -> PredictResult:
    """Write `settings.out`: path first, then the task's columns (multiclass: prediction,
    prob_<class>...; multilabel: prediction, prob_<label>...; regression: one column per target in
    original units). Unreadable files go to `<out>_skipped.csv` beside it. When several B-scans of a volume
    are predicted (`oct_frames` all or N; None: as the model was trained), `<out>_volumes.csv` has
    one row per volume (mean and max). A `checkpoint` ending in .onnx (`retinafm export`) runs with
    ONNX Runtime on the CPU. `heatmaps`: also a folder as `retinafm explain` writes it (explanations.csv,
    heatmaps/, overlays/), for `heatmap_target` with `heatmap_method`."""
    settings.validate()
    s = settings
    out = Path(s.out)
    if out.suffix.lower() in IMAGE_SUFFIXES:  # a CSV under an image's name could replace one of the images
        raise ConfigError(f"--out {out}: the predictions are a CSV table; give a name ending in .csv")
    skipped_file, volumes_file = side_files(out)
    inputs = [("--checkpoint", s.checkpoint), ("--images", s.images)]
    with claim_file(out, side_files=(skipped_file, volumes_file), overwrite=s.overwrite, inputs=inputs) as claim, \
            (claim_dir(s.heatmaps, overwrite=s.overwrite, inputs=inputs, outputs=EXPLAIN_OUTPUTS, results=(),
                       option="--heatmaps") if s.heatmaps else contextlib.nullcontext()) as heat_claim:
        result = _predict(s, out, skipped_file, volumes_file, progress)
        claim.remove_stale([result.out, result.skipped_path, result.volumes_path])
        if heat_claim is not None:
            heat_claim.remove_stale()
    return result


def side_files(out: Path) -> tuple[Path, Path]:
    """The files predict may write beside `out`, named after it: the unreadable files, the volumes' rows."""
    return out.with_name(out.stem + "_skipped.csv"), out.with_name(out.stem + "_volumes.csv")


def _predict(s: PredictSettings, out: Path, skipped_file: Path, volumes_file: Path, progress: bool) -> PredictResult:
    loaded = load_for_inference(s.checkpoint, device=s.device, precision=s.precision, cpu_int8=s.cpu_int8)
    if s.heatmaps:  # a wrong --heatmap-target is refused before any prediction runs
        from retinafm.workflows.explain import check_target

        check_target(s.heatmap_target, loaded.task.output_names)
    paths = collect_images(s.images, s.oct_frames or loaded.meta.settings.get("oct_frames") or "middle")
    if dist_utils.is_primary():
        loaded.check_modality(paths, s.modality)
    dataset = ImageDataset(paths, [None] * len(paths), loaded.transform)
    result = infer(loaded.model, dataset, loaded.device, batch_size=s.batch_size, num_workers=s.num_workers,
                   amp_dtype=loaded.autocast_dtype, desc="predict", progress=progress)
    if len(result.indices) == 0:
        raise DataSourceError(f"none of the {len(paths)} images under {s.images} could be read: {result.skipped[:3]}")
    task = loaded.task
    outputs = task.activate(torch.from_numpy(result.logits))
    frame = task.prediction_frame([paths[i] for i in result.indices], outputs)
    skip_log = SkipLog()
    skip_log.add(result.skipped)
    skipped_path = volumes_path = None
    volumes = volume_table(frame, multiclass=task.one_class_per_image)
    if dist_utils.is_primary():
        write_csv(out, frame)
        if len(skip_log):
            skipped_path = write_csv(skipped_file, skip_log.frame())
        if volumes is not None:
            volumes_path = write_csv(volumes_file, volumes)
    explanations = None
    if s.heatmaps:
        from retinafm.workflows.explain import write_explanations

        folder = Path(s.heatmaps)
        readable = [paths[i] for i in result.indices]  # the unreadable ones are in the predictions' skipped list
        explanations, _ = write_explanations(loaded, readable, folder, method=s.heatmap_method,
                                             target=s.heatmap_target, batch_size=s.batch_size,
                                             num_workers=s.num_workers, progress=progress)
        if dist_utils.is_primary():
            write_csv(folder / "explanations.csv", explanations)
    return PredictResult(frame, out, skip_log.frame(), skipped_path, volumes, volumes_path, explanations)
