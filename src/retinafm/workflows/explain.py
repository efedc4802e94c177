"""`retinafm explain`: where the model looked, per image and output, laid back on each file.

Writes, in `--out`: explanations.csv (path, target, probability or value, method, heatmap, overlay),
heatmaps/<stem>__<target>.npy (float32 0..1 at the file's own resolution), overlays/<stem>__<target>.png
(the image under a colour map with the top 10 % contoured), skipped.csv for unreadable files, and with
--evaluate faithfulness.csv (and localisation.csv with --masks). `predict --heatmaps` and the report's
overlays use the same writer (`write_explanations`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from retinafm.data.images import collect_images, image_table
from retinafm.data.loader import SkipLog
from retinafm.data.sources import DataSourceError
from retinafm.data.volumes import split_address
from retinafm.engine.explain import GIVEN, TracedImages, explain_dataset, resolve_target
from retinafm.engine.inference import LoadedModel, load_for_inference
from retinafm.files import atomic_path, claim_dir, write_csv
from retinafm.files.outputs import EXPLAIN_OUTPUTS
from retinafm.overlays import write_overlay
from retinafm.runtime import distributed as dist_utils
from retinafm.settings import ConfigError, ExplainSettings

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NAME_MAX = 80  # characters of a file or output name kept in a heatmap's file name


@dataclass
class ExplainResult:
    explanations: pd.DataFrame
    out: Path
    skipped: pd.DataFrame
    files: dict[str, Path] = field(default_factory=dict)


def explain(settings: ExplainSettings, *, progress: bool = True) -> ExplainResult:
    """`retinafm explain` (see the module's docstring for what it writes)."""
    settings.validate()
    s = settings
    inputs = [("--checkpoint", s.checkpoint), ("--images", s.images), ("--masks", s.masks)]
    with claim_dir(s.out, overwrite=s.overwrite, inputs=[i for i in inputs if i[1]], outputs=EXPLAIN_OUTPUTS,
                   results=(), option="--out") as claim:
        result = _explain(s, Path(s.out), progress)
        claim.remove_stale()
    return result


def image_paths(images: str | Path, oct_frames: str | int) -> list[str]:
    """The files (B-scans as `file#frame=N`) a file, a folder or a manifest CSV with a path column names."""
    images = Path(images)
    if images.is_file() and images.suffix.lower() == ".csv":
        return [str(p) for p in image_table(images, oct_frames)["path"]]
    return collect_images(images, oct_frames)


def _explain(s: ExplainSettings, out: Path, progress: bool) -> ExplainResult:
    loaded = load_for_inference(s.checkpoint, device=s.device, precision=s.precision)
    target = check_target(s.target, loaded.task.output_names)
    paths = image_paths(s.images, s.oct_frames or loaded.meta.settings.get("oct_frames") or "middle")
    if dist_utils.is_primary():
        loaded.check_modality(paths, s.modality)
    if s.evaluate and s.masks:  # before any work
        from retinafm.workflows.explain_measures import check_masks

        check_masks(Path(s.masks), paths)
    frame, skipped = write_explanations(loaded, paths, out, method=s.method, target=s.target,
                                        batch_size=s.batch_size, num_workers=s.num_workers, steps=s.steps,
                                        progress=progress)
    if frame.empty:
        raise DataSourceError(f"none of the {len(paths)} images under {s.images} could be read: "
                              f"{skipped.head(3).to_dict('records')}")
    files = {}
    if dist_utils.is_primary():
        files["explanations"] = write_csv(out / "explanations.csv", frame)
        if len(skipped):
            files["skipped"] = write_csv(out / "skipped.csv", skipped)
    if s.evaluate:
        from retinafm.workflows.explain_measures import measure

        files.update(measure(loaded, paths, out, s, target, progress=progress))
    return ExplainResult(frame, out, skipped, files)


def file_names(paths: Sequence[str]) -> list[str]:
    """A short, safe, unique name per image address: the file's stem (plus `_frame12` / `_slo` for a
    B-scan or a volume's fundus image), other characters replaced, repeats numbered in order."""
    names, seen = [], {}
    for path in paths:
        file, frame, slo = split_address(str(path))
        name = _safe(Path(file).stem) + (f"_frame{frame}" if frame is not None else "") + ("_slo" if slo else "")
        count = seen.get(name, 0)
        seen[name] = count + 1
        names.append(name if count == 0 else f"{name}-{count + 1}")
    return names


def _safe(text: str) -> str:
    """Only letters, digits, '.', '_' and '-' (no separators, no leading dot), at most _NAME_MAX characters."""
    return _UNSAFE.sub("_", str(text)).lstrip(".")[:_NAME_MAX] or "_"


def output_file_names(output_names: Sequence[str]) -> list[str]:
    """Safe names of a model's outputs for file names; outputs that would share one are numbered."""
    safe = [_safe(name) for name in output_names]
    return [name if safe.count(name) == 1 else f"{name}-{i}" for i, name in enumerate(safe)]


def write_explanations(loaded: LoadedModel, paths: Sequence[str], folder: Path, *, method: str, target: str,
                       batch_size: int, num_workers: int = 0, steps: int = 32, heatmaps: bool = True,
                       outputs: Sequence[list[int]] | None = None, relative_to: Path | None = None,
                       progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Explain `paths` into `folder` (heatmaps/*.npy when `heatmaps`, overlays/*.png) and return the
    explanations table (every rank's rows, in input order) and the unreadable files. `outputs` (per path)
    explains the outputs given instead of `target`; the table's file paths are relative to `relative_to`
    (default: `folder`)."""
    task = loaded.task
    chosen = GIVEN if outputs is not None else check_target(target, task.output_names)
    dataset = TracedImages(paths, loaded.transform, outputs)
    names, targets = file_names(paths), output_file_names(task.output_names)
    base = relative_to or folder
    value_column = task.value_name
    rows, skip_log = [], SkipLog()
    dist_utils.barrier()  # rank 0 has claimed (and cleared) the folder before anyone writes into it
    for item in explain_dataset(loaded.model, task, dataset, loaded.device, method=method, target=chosen,
                                batch_size=batch_size, skip_log=skip_log, num_workers=num_workers,
                                amp_dtype=loaded.autocast_dtype, steps=steps, progress=progress):
        stem = f"{names[item.index]}__{targets[item.output]}"
        row = {"path": item.path, "target": item.target, value_column: item.value, "method": method}
        if heatmaps:
            heat_file = folder / "heatmaps" / f"{stem}.npy"
            with atomic_path(heat_file) as tmp:
                np.save(tmp, item.heatmap.astype(np.float32, copy=False))
            row["heatmap"] = heat_file.relative_to(base).as_posix()
        overlay = write_overlay(folder / "overlays" / f"{stem}.png", item.image.permute(1, 2, 0).numpy(),
                                item.heatmap)
        row["overlay"] = overlay.relative_to(base).as_posix()
        rows.append((item.index, item.output, row))
    parts = dist_utils.all_gather_objects((rows, skip_log.frame()))
    ordered = sorted((r for part, _ in parts for r in part), key=lambda r: (r[0], r[1]))
    columns = ["path", "target", value_column, "method", *(["heatmap"] if heatmaps else []), "overlay"]
    frame = pd.DataFrame([r for _, _, r in ordered], columns=columns)
    skipped = pd.concat([s for _, s in parts], ignore_index=True) if parts else skip_log.frame()
    return frame, skipped


def check_target(target: str, output_names: Sequence[str]) -> str | int:
    """`--target` as engine.explain takes it; a name the model lacks is refused with the ones it has."""
    try:
        return resolve_target(target, output_names)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def explain_report_cases(loaded: LoadedModel, run_dir: Path, split: str, count: int, *, seed: int = 0,
                         method: str = "grad-rollout", batch_size: int = 8, progress: bool = True) -> Path | None:
    """report.html's heatmaps: the task's `count` most confident errors and `count` correct cases of
    predictions_<split>.csv (`explain_cases`), explained into explanations_<split>/overlays/ with
    explanations_<split>.csv beside (paths relative to `run_dir`). None when there is nothing to explain,
    or the model cannot be explained (an ONNX export, int8 layers): the report then says there are none."""
    from retinafm.files.inputs import read_table

    dist_utils.barrier()  # rank 0 has written the predictions: every rank decides alike, then explains its share
    predictions = run_dir / f"predictions_{split}.csv"
    if count < 1 or loaded.onnx or loaded.precision == "int8" or not predictions.is_file():
        return None
    metrics_file = run_dir / f"metrics_{split}.json"
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
    task = loaded.task
    names = list(task.output_names)
    cases = task.explain_cases(read_table(predictions, what="predictions"), names, metrics, count, count, seed)
    if not cases:
        return None
    paths = list(dict.fromkeys(case.path for case in cases))
    outputs = [[names.index(c.target) for c in cases if c.path == path] for path in paths]
    frame, _ = write_explanations(loaded, paths, run_dir / f"explanations_{split}", method=method, target="given",
                                  batch_size=batch_size, outputs=outputs, heatmaps=False, relative_to=run_dir,
                                  progress=progress)
    kind = {(c.path, c.target): c.case for c in cases}  # in the task's order: errors, then correct cases
    order = {key: i for i, key in enumerate(kind)}
    keys = list(zip(frame["path"], frame["target"], strict=True))
    frame["case"] = [kind[key] for key in keys]
    frame = frame.iloc[np.argsort([order[key] for key in keys], kind="stable")]
    if not dist_utils.is_primary():
        return None
    return write_csv(run_dir / f"explanations_{split}.csv", frame.reset_index(drop=True))
