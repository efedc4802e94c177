"""`explain --evaluate`: how faithful each heatmap method is to the model, and how well it finds lesions.

Every method (and random patch maps, the baseline any method must beat) explains the same (image, output)
pairs. Faithfulness: deletion and insertion AUC on the model's patch grid against a blurred image
(engine.faithfulness), into faithfulness.csv. Localisation, with --masks: each map laid back on its file
is scored against the file's lesion mask by the pointing game and the share of its energy inside the mask,
beside the mask's share of the image and a centre-bias map, into localisation.csv. Per-image values go to
faithfulness_images.csv, so that other statistics can be run on them.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

from retinafm.data.geometry import to_original
from retinafm.data.io import ImageReadError, read_image
from retinafm.data.sources import DataSourceError
from retinafm.data.volumes import split_address
from retinafm.engine.explain import TracedImages, TracedItem, chosen_outputs
from retinafm.engine.faithfulness import (
    MeasureSummary,
    blurred_baseline,
    centre_bias,
    deletion_insertion,
    energy_in_mask,
    pointing_game,
    random_heatmaps,
    summarise,
)
from retinafm.engine.heatmaps import METHODS, explain_batch
from retinafm.engine.inference import LoadedModel
from retinafm.engine.progress import progress_bar
from retinafm.files import write_csv
from retinafm.runtime import distributed as dist_utils
from retinafm.runtime.device import autocast

RANDOM, CENTRE = "random", "centre-bias"
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif")  # lossless: a JPEG's noise would draw false lesion


def mask_for(masks: Path, path: str) -> Path | None:
    """The mask of an image address: <stem>.png (or .tif, .bmp, .gif) in `masks`; a B-scan's is
    <stem>_frame<N>.png. None when there is none (the image then has no lesion to find)."""
    file, frame, slo = split_address(path)
    stem = Path(file).stem + (f"_frame{frame}" if frame is not None else "") + ("_slo" if slo else "")
    for suffix in MASK_SUFFIXES:
        candidate = masks / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def check_masks(masks: Path, paths: Sequence[str]) -> None:
    """Refuse a --masks folder that holds the mask of none of the images (a wrong folder, or other names)."""
    if not any(mask_for(masks, p) for p in paths):
        example = Path(split_address(paths[0])[0]).stem
        raise DataSourceError(f"--masks {masks}: none of the {len(paths)} images has a mask there (looked for "
                              f"<image stem>{'/'.join(MASK_SUFFIXES)}, e.g. {example}.png)")


def read_mask(path: Path, shape: tuple[int, int], image: str) -> np.ndarray:
    """A bool mask (non-zero in any channel = lesion) of the image's shape; anything else is refused."""
    try:
        pixels = read_image(path)
    except ImageReadError as exc:
        raise DataSourceError(f"--masks: {path} cannot be read ({exc.reason})") from None
    if tuple(pixels.shape[-2:]) != shape:
        raise DataSourceError(f"--masks: {path} is {pixels.shape[2]}x{pixels.shape[1]} pixels but its image {image} "
                              f"is {shape[1]}x{shape[0]}; a mask must have its image's size")
    return (pixels.amax(0) > 0).numpy()


def _score(model: torch.nn.Module, task, outputs: torch.Tensor, device: torch.device, amp_dtype):
    """score(images) -> the activated explained output of each image (what the deletion curve follows)."""
    def score(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(device, amp_dtype):
            logits = model(images).float().cpu()
        return torch.as_tensor(task.activate(logits)).gather(1, outputs.view(-1, 1))[:, 0]

    return score


def _maps(model, images: torch.Tensor, outputs: torch.Tensor, patch: tuple[int, int], seed: int, offset: int,
          device: torch.device, amp_dtype, steps: int) -> dict[str, torch.Tensor]:
    maps = {}
    for method in METHODS:
        with autocast(device, amp_dtype):
            maps[method] = explain_batch(model, images, outputs, method, steps=steps).float()
    generator = torch.Generator(device=images.device).manual_seed(seed + offset)  # per chunk: any sharding agrees
    maps[RANDOM] = random_heatmaps(len(images), tuple(images.shape[-2:]), patch, generator)
    return maps


def _measure_items(loaded: LoadedModel, items: list[TracedItem], paths: Sequence[str], s: Any, target: str | int,
                   masks: Path | None) -> list[dict[str, Any]]:
    model, task, device, amp = loaded.model, loaded.task, loaded.device, loaded.autocast_dtype
    images = torch.stack([item.input for item in items]).to(device)
    with torch.no_grad(), autocast(device, amp):
        activated = task.activate(model(images).float().cpu())
    pairs = [(b, k) for b, ks in enumerate(chosen_outputs(task, activated, target)) for k in ks]
    patch = tuple(model.patch_embed.patch_size)
    records = []
    for start in range(0, len(pairs), s.batch_size):
        chunk = pairs[start:start + s.batch_size]
        rows = torch.tensor([b for b, _ in chunk], device=device)
        outputs = torch.tensor([k for _, k in chunk])
        chunk_images = images[rows]
        maps = _maps(model, chunk_images, outputs, patch, s.seed, items[chunk[0][0]].index * 1009 + start,
                     device, amp, s.steps)
        baseline = blurred_baseline(chunk_images)
        score = _score(model, task, outputs, device, amp)
        scores = {m: deletion_insertion(score, chunk_images, heat, patch=patch, steps=s.faithfulness_steps,
                                        baseline=baseline) for m, heat in maps.items()}
        if masks is not None:
            maps[CENTRE] = torch.from_numpy(centre_bias(tuple(chunk_images.shape[-2:]))).expand(len(chunk), -1, -1)
        for j, (b, k) in enumerate(chunk):
            item = items[b]
            mask = None
            if masks is not None:
                found = mask_for(masks, paths[item.index])
                mask = read_mask(found, (item.trace.height, item.trace.width), paths[item.index]) if found else None
            for method, heat in maps.items():
                record = {"path": paths[item.index], "target": task.output_names[k], "method": method,
                          "_order": (item.index, k)}
                if method in scores:
                    record["deletion_auc"] = float(scores[method].deletion[j])
                    record["insertion_auc"] = float(scores[method].insertion[j])
                if masks is not None:
                    record.update(_localise(heat[j].cpu(), item, mask))
                records.append(record)
    return records


def _localise(heat: torch.Tensor, item: TracedItem, mask: np.ndarray | None) -> dict[str, float]:
    if mask is None or not mask.any():
        return {"pointing_hit": math.nan, "energy_in_mask": math.nan, "mask_area": math.nan}
    on_file = to_original(heat, item.trace)
    hit = pointing_game(on_file, mask)
    energy = energy_in_mask(on_file, mask)
    return {"pointing_hit": math.nan if hit is None else float(hit),
            "energy_in_mask": math.nan if energy is None else energy[0],
            "mask_area": float(mask.mean())}


def measure(loaded: LoadedModel, paths: Sequence[str], out: Path, s: Any, target: str | int, *,
            progress: bool = True) -> dict[str, Path]:
    """Write faithfulness.csv, faithfulness_images.csv and (with `s.masks`) localisation.csv for the outputs
    `target` chooses (engine.explain.resolve_target); return their paths."""
    masks = Path(s.masks) if s.masks else None
    if masks is not None:
        check_masks(masks, paths)
    if not hasattr(loaded.model, "patch_embed"):
        raise DataSourceError("--evaluate removes and restores the model's patches, and this model has no patch grid")
    dataset = TracedImages(paths, loaded.transform)
    shard = Subset(dataset, list(range(dist_utils.rank(), len(dataset), dist_utils.world_size())))
    loader = DataLoader(shard, batch_size=s.batch_size, num_workers=s.num_workers, collate_fn=list)
    records = []
    for batch in progress_bar(loader, "faithfulness", progress):
        items = [item for item in batch if isinstance(item, TracedItem)]
        if items:
            records += _measure_items(loaded, items, paths, s, target, masks)
    records = [r for part in dist_utils.all_gather_objects(records) for r in part]
    records.sort(key=lambda r: (r["_order"], list(METHODS + (RANDOM, CENTRE)).index(r["method"])))
    frame = pd.DataFrame(records).drop(columns="_order")
    files: dict[str, Path] = {}
    if not dist_utils.is_primary():
        return files
    files["faithfulness_images"] = write_csv(out / "faithfulness_images.csv", frame)
    faithful = frame[frame["method"] != CENTRE]
    files["faithfulness"] = write_csv(out / "faithfulness.csv", _table(
        faithful, {"deletion_auc": True, "insertion_auc": False}, s))
    if masks is not None:
        files["localisation"] = write_csv(out / "localisation.csv", _table(
            frame, {"pointing_hit": False, "energy_in_mask": False, "mask_area": False}, s))
    return files


def _table(frame: pd.DataFrame, measures: dict[str, bool], s: Any) -> pd.DataFrame:
    """One row per method: each measure's mean, 95% CI and paired gain over the random maps (with its CI
    and p); without --bootstrap the means only."""
    methods = list(dict.fromkeys(frame["method"]))
    table = pd.DataFrame({"method": methods})
    for column, lower_is_better in measures.items():
        values = {m: frame.loc[frame["method"] == m, column].to_numpy(float) for m in methods}
        if s.bootstrap:
            rows = summarise(values, reference=RANDOM, lower_is_better=lower_is_better, replicates=s.bootstrap,
                             seed=s.seed)
        else:
            rows = [_means_only(m, v) for m, v in values.items()]
        part = pd.DataFrame([dataclasses.asdict(r) for r in rows])
        if column == "mask_area":  # the same for every method: the share a map spread evenly would score
            table[column] = part["mean"].to_numpy()
            continue
        names = {"mean": column, "ci_low": f"{column}_ci_low", "ci_high": f"{column}_ci_high", "n": f"{column}_n",
                 "gain": f"{column}_gain_vs_random", "gain_ci_low": f"{column}_gain_ci_low",
                 "gain_ci_high": f"{column}_gain_ci_high", "p_value": f"{column}_p_vs_random"}
        table = table.join(part.drop(columns="method").rename(columns=names))
    return table


def _means_only(method: str, values: np.ndarray) -> MeasureSummary:
    finite = values[np.isfinite(values)]
    mean = float(finite.mean()) if finite.size else math.nan
    return MeasureSummary(method, mean, math.nan, math.nan, int(finite.size), math.nan, math.nan, math.nan, math.nan)
