"""`retinafm embed`: one pooled feature vector per image, computed once and written to a file.

Linear probing and label-efficiency studies then train on these vectors in seconds instead of
running the frozen backbone over every image in every epoch (RETFound's way). The output is a
table: the image's path, the columns it came with (split, label, targets, patient id), and the
embedding (float16 by default: half the size, and well within a probe's precision).

Work is done in shards of `shard_size` images kept beside the output until the end, so an
interrupted run continues where it stopped (same command again) without recomputing them.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retinafm.data.embeddings import write_embeddings
from retinafm.data.images import image_table
from retinafm.data.loader import ImageDataset, SkipLog
from retinafm.data.preprocess import check_modality
from retinafm.data.sources import DataSourceError
from retinafm.data.transforms import Preprocessing, eval_transform
from retinafm.engine.features import (
    DTYPES,
    EmbedSettings,
    PooledFeatures,
    embedding_model,
)
from retinafm.engine.infer import infer
from retinafm.engine.inference import prepare_for_inference
from retinafm.files import (
    OutputExistsError,
    atomic_path,
    claim_file,
    write_csv,
    write_json,
)
from retinafm.models.onnx import OnnxModel
from retinafm.runtime import distributed as dist_utils

FORMATS = (".parquet", ".npy")


@dataclass
class EmbedResult:
    out: Path
    count: int
    dim: int
    skipped: list[tuple[str, str]]
    shards_reused: int
    written: list[Path] = field(default_factory=list)  # the files beside `out` (index, metadata, skip list)


# --------------------------------------------------------------------------- the work
def _job_key(table: pd.DataFrame, info: dict[str, Any], shard_size: int) -> dict[str, Any]:
    """What must match for saved shards to be reused: the images, the model, the recipe."""
    digest = hashlib.sha256("\n".join(table["path"]).encode()).hexdigest()
    return {"paths_sha256": digest, "n": len(table), "shard_size": shard_size,
            **{k: v for k, v in info.items() if k not in ("weights_file",)}}


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def embed(images: str | Path | pd.DataFrame, out: str | Path, settings: EmbedSettings, *, overwrite: bool = False,
          progress: bool = True) -> EmbedResult:
    """Embed every image `images` names into `out` (.parquet, or .npy with a .csv index beside it)."""
    settings.validate()
    out = Path(out)
    if out.suffix not in FORMATS:
        raise DataSourceError(f"--out {out}: write .parquet (one table) or .npy (+ a .csv index beside it)")
    inputs = [("--images", None if isinstance(images, pd.DataFrame) else images),
              ("--checkpoint", settings.checkpoint), ("--weights", settings.weights)]
    with claim_file(out, side_files=side_files(out), overwrite=overwrite, inputs=inputs) as claim:
        try:
            result = _embed(images, out, settings, overwrite, progress)
        except BaseException:
            parts = _parts_dir(out)  # kept for a rerun only when it holds finished work
            if dist_utils.is_primary() and parts.is_dir() and not any(parts.glob("shard-*.npz")):
                shutil.rmtree(parts, ignore_errors=True)
            raise
        claim.remove_stale([out, *result.written])
    return result


def side_files(out: Path) -> list[Path]:
    """The files embed may write beside `out`, named after it: a .npy's index and metadata, the skip list."""
    index = [out.with_suffix(".csv"), out.with_suffix(".json")] if out.suffix == ".npy" else []
    return [*index, out.with_name(out.stem + "_skipped.csv")]


def _embed(images: str | Path | pd.DataFrame, out: Path, settings: EmbedSettings, overwrite: bool,
           progress: bool) -> EmbedResult:
    parts = _parts_dir(out)
    if overwrite and parts.exists() and dist_utils.is_primary():
        shutil.rmtree(parts)
    table = image_table(images, settings.oct_frames)
    model, info = embedding_model(settings)
    model, dev, autocast_dtype, info["precision"] = prepare_for_inference(  # recorded; resumed shards must match it
        model, onnx=isinstance(model, OnnxModel), device=settings.device, precision=settings.precision,
        cpu_int8=settings.cpu_int8)
    extractor = PooledFeatures(model, settings.tta_flip)
    transform = eval_transform(info["input_size"], info["mean"], info["std"], info["crop_pct"],
                               Preprocessing.from_state(info["preprocess"]))
    if dist_utils.is_primary():
        check_modality(table["path"].tolist(), info["modality"], info["model"], settings.modality)
    key = _job_key(table, info, settings.shard_size)
    if dist_utils.is_primary():
        _claim_parts(parts, key)
    dist_utils.barrier()

    dtype = DTYPES[settings.dtype]
    paths = table["path"].tolist()
    n_shards = -(-len(paths) // settings.shard_size)
    reused, skipped = 0, []
    for shard in range(n_shards):
        shard_file = parts / f"shard-{shard:05d}.npz"
        if shard_file.is_file():
            reused += 1
            continue
        rows = range(shard * settings.shard_size, min(len(paths), (shard + 1) * settings.shard_size))
        dataset = ImageDataset([paths[i] for i in rows], [None] * len(rows), transform)
        result = infer(extractor, dataset, dev, batch_size=settings.batch_size, num_workers=settings.num_workers,
                       amp_dtype=autocast_dtype, desc=f"embed {shard + 1}/{n_shards}", progress=progress)
        if dist_utils.is_primary():
            with atomic_path(shard_file) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, rows=np.asarray(rows)[result.indices], vectors=result.logits.astype(dtype),
                             skipped=np.asarray(result.skipped, dtype=str).reshape(-1, 2))
    dist_utils.barrier()
    vectors, kept, skipped = _gather_shards(parts, n_shards)
    if len(kept) == 0:
        raise DataSourceError(f"none of the {len(paths)} images could be read; e.g. {skipped[:3]}")
    if not np.isfinite(vectors).all():  # float16 shards: an fp32 vector beyond 65504 becomes inf
        raise DataSourceError(f"some embeddings are beyond the range of --dtype {settings.dtype}; nothing was "
                              f"written. Use --dtype float32 (and --overwrite to recompute the shards in {parts})")
    dist_utils.barrier()  # every rank has read the shards before rank 0 removes them
    written: list[Path] = []
    if dist_utils.is_primary():
        frame = table.iloc[kept].reset_index(drop=True)
        info.update(dim=int(vectors.shape[1]), count=len(kept), skipped=len(skipped))
        write_embeddings(out, frame, vectors, info)
        written += side_files(out)[:-1]
        if skipped:
            log = SkipLog()
            log.add(skipped)
            written.append(write_csv(side_files(out)[-1], log.frame()))
        shutil.rmtree(parts)
    return EmbedResult(out, len(kept), int(vectors.shape[1]), skipped, reused, written)


def _claim_parts(parts: Path, key: dict[str, Any]) -> None:
    job = parts / "job.json"
    if job.is_file():
        saved = json.loads(job.read_text(encoding="utf-8"))
        if saved != json.loads(json.dumps(key)):
            changed = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
            raise OutputExistsError(f"{parts} holds an unfinished embedding run with other settings "
                                    f"({', '.join(changed)} differ); run the same command to finish it, "
                                    "or pass --overwrite to start again")
        return
    parts.mkdir(parents=True, exist_ok=True)
    write_json(job, key)


def _gather_shards(parts: Path, n_shards: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    vectors, rows, skipped = [], [], []
    for shard in range(n_shards):
        with np.load(parts / f"shard-{shard:05d}.npz") as data:
            vectors.append(data["vectors"])
            rows.append(data["rows"])
            skipped += [tuple(s) for s in data["skipped"].tolist()]
    all_rows = np.concatenate(rows)
    order = np.argsort(all_rows, kind="stable")
    return np.concatenate(vectors)[order], all_rows[order], skipped
