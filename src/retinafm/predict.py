"""`retinafm predict`: a folder (or file) of new images → predictions CSV, from a checkpoint alone."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from .data.io import is_image_file
from .data.loader import ImageDataset, SkipLog
from .data.sources import DataSourceError, list_images
from .data.transforms import eval_transform
from .files import refuse_existing_file, write_csv
from .train import distributed as dist_utils
from .train.checkpoint import load_checkpoint, model_from_checkpoint, task_of
from .train.loop import infer
from .train.runtime import amp_dtype, resolve_device


@dataclass
class PredictResult:
    predictions: pd.DataFrame
    out: Path
    skipped: pd.DataFrame
    skipped_path: Optional[Path]


def collect_images(images: str | Path) -> list[str]:
    """A single image file, or every image under a folder (recursively, sorted)."""
    images = Path(images)
    if images.is_file():
        if not is_image_file(images):
            raise DataSourceError(f"--images {images} is not an image file this tool reads")
        return [str(images)]
    if images.is_dir():
        found = [str(p) for p in list_images(images)]
        if not found:
            raise DataSourceError(f"--images {images} contains no image files (png, jpg, tif, bmp, gif, webp)")
        return found
    raise DataSourceError(f"--images {images}: no such file or folder")


def predict(
    checkpoint: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> PredictResult:
    """Write `out`: path first, then the task's columns (multiclass: prediction, prob_<class>...;
    multilabel: prediction, prob_<label>...; regression: one column per target in original
    units). Unreadable files go to skipped.csv beside it."""
    out = Path(out)
    refuse_existing_file(out, overwrite=overwrite)
    state = load_checkpoint(checkpoint)
    model, meta = model_from_checkpoint(state)
    paths = collect_images(images)
    dev = resolve_device(device)
    dist_utils.init_distributed(dev)
    task = task_of(meta)
    dataset = ImageDataset(paths, [None] * len(paths), eval_transform(meta.input_size, meta.mean, meta.std, meta.eval_crop_pct))
    result = infer(model.to(dev), dataset, dev, batch_size=batch_size, num_workers=num_workers,
                   amp_dtype=amp_dtype(dev), desc="predict", progress=progress)
    if len(result.indices) == 0:
        raise DataSourceError(f"none of the {len(paths)} images under {images} could be read: {result.skipped[:3]}")
    outputs = task.activate(torch.from_numpy(result.logits))
    frame = task.prediction_frame([paths[i] for i in result.indices], outputs)
    skip_log = SkipLog()
    skip_log.add(result.skipped)
    skipped_path = None
    if dist_utils.is_primary():
        write_csv(out, frame)
        if len(skip_log):
            skipped_path = write_csv(out.with_name("skipped.csv"), skip_log.frame())
    return PredictResult(frame, out, skip_log.frame(), skipped_path)
