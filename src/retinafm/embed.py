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
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .config import FinetuneConfig, check_preprocessing, parse_oct_frames
from .data.loader import ImageDataset, SkipLog
from .data.sources import SPLITS, DataSourceError, _class_dirs, list_images
from .data.preprocess import check_modality
from .data.transforms import EVAL_CROP_PCT, Preprocessing, eval_transform
from .data.volumes import expand_frames
from .export import OnnxModel, check_onnx_options, is_onnx, load_onnx
from .files import OutputExistsError, atomic_path, refuse_existing_file, write_csv, write_json
from .train import distributed as dist_utils
from .train.loop import infer
from .train.runtime import inference_dtype, precision_name, quantize_for_cpu, resolve_device

POOLS = {"cls": "token", "avg": "avg"}  # --pool -> timm's global_pool
DTYPES = {"float16": np.float16, "float32": np.float32}
FORMATS = (".parquet", ".npy")
EMBEDDING = "embedding"


@dataclass
class EmbedSettings:
    model: Optional[str] = None  # a zoo name or timm architecture ...
    weights: Optional[str] = None  # ... with these weights (None: the zoo entry's own)
    checkpoint: Optional[str] = None  # or a retinafm checkpoint (fine-tuned or imported), or its .onnx export
    pool: Optional[str] = None  # cls | avg; None: the model's own (RETFound: avg)
    tta_flip: bool = False  # average the embeddings of the image and its horizontal flip
    dtype: str = "float16"
    input_size: Optional[int] = None
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"
    shard_size: int = 2048
    oct_frames: str = "middle"  # B-scans of each volume: middle | all | N
    fundus_crop: bool = False  # with --model: crop fundus photographs to their field of view first
    oct_crop: Optional[float] = None  # with --model: keep this central fraction of each B-scan
    modality: Optional[str] = None  # CFP | OCT: what the images are, instead of guessing
    cpu_int8: bool = False  # dynamic int8 Linear layers (CPU only; embeddings change slightly)
    precision: str = "auto"  # autocast: auto (per machine), fp32, bf16 or fp16

    @classmethod
    def for_run(cls, cfg: FinetuneConfig) -> "EmbedSettings":
        """The settings a linear-probe run (finetune --adaptation lp, label-efficiency) embeds with:
        the run's model, image recipe and volumes, float32 for the probe."""
        return cls(model=cfg.model, weights=cfg.weights, input_size=cfg.input_size,
                   pool={"token": "cls", "avg": "avg"}.get(cfg.global_pool or ""), dtype="float32",
                   batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device, precision=cfg.precision,
                   oct_frames=cfg.oct_frames, fundus_crop=cfg.fundus_crop, oct_crop=cfg.oct_crop,
                   modality=cfg.modality)

    def check(self) -> None:
        if (self.model is None) == (self.checkpoint is None):
            raise DataSourceError("give exactly one of --model NAME (with --weights) or --checkpoint FILE")
        if self.checkpoint is not None and self.weights is not None:
            raise DataSourceError("--weights goes with --model; a --checkpoint already holds its weights")
        if self.checkpoint is not None and (self.fundus_crop or self.oct_crop):
            raise DataSourceError("--fundus-crop / --oct-crop go with --model; a --checkpoint applies the "
                                  "preprocessing it was trained with")
        if self.checkpoint is not None and is_onnx(self.checkpoint):
            check_onnx_options(self.checkpoint, self.device, self.cpu_int8, self.precision)
        check_preprocessing(self.oct_crop, self.modality)
        if self.pool is not None and self.pool not in POOLS:
            raise DataSourceError(f"--pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.dtype not in DTYPES:
            raise DataSourceError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        parse_oct_frames(self.oct_frames)
        if self.shard_size < 1 or self.batch_size < 1:
            raise DataSourceError("--shard-size and --batch-size must be at least 1")


@dataclass
class Embeddings:
    """An embeddings file read back: the table without the vectors, the vectors, and how they were made."""

    frame: pd.DataFrame
    vectors: np.ndarray  # (n, dim) float32
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EmbedResult:
    out: Path
    count: int
    dim: int
    skipped: list[tuple[str, str]]
    shards_reused: int


# --------------------------------------------------------------------------- which images
def image_table(images: str | Path | pd.DataFrame, oct_frames: str | int = "middle") -> pd.DataFrame:
    """The images to embed and the columns that travel with them.

    A manifest CSV (a `path` column, relative to the CSV, plus anything else); a labelled folder
    `<split>/<class>/<image>` (path, split, label); any folder of images (path only); or a
    table with a `path` column (from Python, e.g. `finetune --adaptation lp`). Volumes become
    the B-scans `oct_frames` picks (`file#frame=N`), each with its file's columns.
    """
    return expand_rows(_listed(images), oct_frames)


def expand_rows(frame: pd.DataFrame, oct_frames: str | int) -> pd.DataFrame:
    """Each row whose `path` is a volume becomes one row per B-scan `oct_frames` picks, with the file's other columns."""
    pairs = [(row, address) for row, path in enumerate(frame["path"])
             for address, _ in expand_frames([path], oct_frames)]
    if len(pairs) == len(frame):
        return frame
    out = frame.iloc[[row for row, _ in pairs]].reset_index(drop=True)
    out["path"] = [address for _, address in pairs]
    return out


def _listed(images: str | Path | pd.DataFrame) -> pd.DataFrame:
    if isinstance(images, pd.DataFrame):
        if "path" not in images.columns or images.empty:
            raise DataSourceError("the table of images to embed needs rows and a 'path' column")
        return images.reset_index(drop=True)
    images = Path(images)
    if images.is_file() and images.suffix.lower() == ".csv":
        frame = pd.read_csv(images, dtype={"path": str, "split": str, "label": str, "patient_id": str})
        if "path" not in frame.columns:
            raise DataSourceError(f"--images {images}: a manifest needs a 'path' column (has {list(frame.columns)})")
        if frame["path"].isna().any():
            raise DataSourceError(f"--images {images}: empty 'path' on line(s) "
                                  f"{', '.join(str(i + 2) for i in frame.index[frame['path'].isna()][:10])}")
        frame["path"] = [str(p if Path(p).is_absolute() else images.parent / p) for p in frame["path"]]
        return frame.reset_index(drop=True)
    if images.is_dir():
        splits = [s for s in SPLITS if (images / s).is_dir()]
        if splits:
            rows = [(str(p), split, d.name) for split in splits for d in _class_dirs(images / split)
                    for p in list_images(d)]
            frame = pd.DataFrame(rows, columns=["path", "split", "label"])
        else:
            frame = pd.DataFrame({"path": [str(p) for p in list_images(images)]})
        if frame.empty:
            raise DataSourceError(f"--images {images} contains no image files")
        return frame
    if images.is_file():
        return pd.DataFrame({"path": [str(images)]})
    raise DataSourceError(f"--images {images}: no such file or folder")


# --------------------------------------------------------------------------- which features
class PooledFeatures(nn.Module):
    """A timm ViT's pooled, normalised features: what its head sees (RETFound's linear-probe input)."""

    def __init__(self, model: nn.Module, tta_flip: bool = False):
        super().__init__()
        self.model, self.tta_flip = model, tta_flip

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, OnnxModel):  # the exported graph's own features output
            return self.model.features(x)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        if self.tta_flip:
            out = (out + self.features(torch.flip(x, dims=[-1]))) / 2
        return out


def embedding_model(settings: EmbedSettings) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone (eval mode) and its image recipe and provenance for the file's metadata."""
    from .models.registry import create_model, get_spec
    from .models.weights import load_backbone_weights, resolve_weights
    from .train.checkpoint import load_checkpoint, model_from_checkpoint

    if settings.checkpoint is not None:
        if is_onnx(settings.checkpoint):
            model, meta = load_onnx(settings.checkpoint)
        else:
            model, meta = model_from_checkpoint(load_checkpoint(settings.checkpoint))
        pool = str(model.global_pool)
        if settings.pool is not None and POOLS[settings.pool] != pool:
            raise DataSourceError(f"--pool {settings.pool}: {settings.checkpoint} was trained with the "
                                  f"{'class token' if pool == 'token' else 'average'} pool; its features are that one")
        if settings.input_size is not None and settings.input_size != meta.input_size:
            raise DataSourceError(f"--input-size {settings.input_size}: {settings.checkpoint} takes {meta.input_size} px")
        recipe = dict(input_size=meta.input_size, mean=list(meta.mean), std=list(meta.std), crop_pct=meta.eval_crop_pct,
                      preprocess=Preprocessing.from_state(meta.preprocess).state())
        source = dict(checkpoint=str(Path(settings.checkpoint).resolve()), model=meta.model_name, arch=meta.arch,
                      class_names=list(meta.class_names), task=meta.task, modality=meta.modality)
    else:
        spec = get_spec(settings.model)
        input_size = settings.input_size or spec.input_size
        if input_size % spec.patch_size:
            raise DataSourceError(f"--input-size {input_size} must be a multiple of {spec.name}'s patch size "
                                  f"{spec.patch_size}")
        path = resolve_weights(spec, settings.weights)
        # A random backbone (--weights none) is seeded, so a probe fitted on its features can rebuild it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_model(spec, 0, input_size=input_size,
                                 global_pool=POOLS[settings.pool] if settings.pool else None)
        if path is not None:
            load_backbone_weights(model, path, spec.family)
        pool = str(model.global_pool)
        recipe = dict(input_size=input_size, mean=list(spec.mean), std=list(spec.std), crop_pct=EVAL_CROP_PCT,
                      preprocess=Preprocessing(settings.fundus_crop, settings.oct_crop).state())
        source = dict(model=spec.name, arch=spec.arch, weights=settings.weights if path is not None else "none",
                      weights_file=path, modality=spec.modality)
    info = {**source, **recipe, "pool": "cls" if pool == "token" else pool, "tta_flip": settings.tta_flip,
            "cpu_int8": settings.cpu_int8,
            "dtype": settings.dtype}
    return model.eval(), info


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
    settings.check()
    out = Path(out)
    if out.suffix not in FORMATS:
        raise DataSourceError(f"--out {out}: write .parquet (one table) or .npy (+ a .csv index beside it)")
    parts = _parts_dir(out)
    if overwrite and parts.exists() and dist_utils.is_primary():
        shutil.rmtree(parts)
    if not parts.exists():  # an unfinished run's output does not exist yet
        refuse_existing_file(out, overwrite=overwrite)
    table = image_table(images, settings.oct_frames)
    model, info = embedding_model(settings)
    onnx = isinstance(model, OnnxModel)
    dev = resolve_device("cpu" if onnx else settings.device)
    # ONNX Runtime and int8 layers run in their own precision; the rest autocasts per machine.
    autocast_dtype = None if onnx else inference_dtype(dev, settings.precision, cpu_int8=settings.cpu_int8)
    # Recorded with the embeddings, and resumed shards must match it.
    info["precision"] = "onnx" if onnx else "int8" if settings.cpu_int8 else precision_name(autocast_dtype)
    dist_utils.init_distributed(dev)
    if settings.cpu_int8:
        model = quantize_for_cpu(model, dev)
    extractor = PooledFeatures(model, settings.tta_flip).to(dev)
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
    if dist_utils.is_primary():
        frame = table.iloc[kept].reset_index(drop=True)
        info.update(dim=int(vectors.shape[1]), count=len(kept), skipped=len(skipped))
        _write(out, frame, vectors, info)
        if skipped:
            log = SkipLog()
            log.add(skipped)
            write_csv(out.with_name(out.stem + "_skipped.csv"), log.frame())
        shutil.rmtree(parts)
    return EmbedResult(out, len(kept), int(vectors.shape[1]), skipped, reused)


def _claim_parts(parts: Path, key: dict[str, Any]) -> None:
    job = parts / "job.json"
    if job.is_file():
        saved = json.loads(job.read_text(encoding="utf-8"))
        if saved != json.loads(json.dumps(key)):
            changed = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
            raise OutputExistsError(f"{parts} holds an unfinished embedding run with other settings ({', '.join(changed)} "
                                    "differ); run the same command to finish it, or pass --overwrite to start again")
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


def _write(out: Path, frame: pd.DataFrame, vectors: np.ndarray, info: dict[str, Any]) -> None:
    if out.suffix == ".npy":
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, vectors)
        write_csv(out.with_suffix(".csv"), frame)
        write_json(out.with_suffix(".json"), info)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
    table = table.append_column(EMBEDDING, pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
    metadata = dict(table.schema.metadata or {})
    metadata[b"retinafm"] = json.dumps(info).encode()
    with atomic_path(out) as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), tmp)


def read_embeddings(path: str | Path) -> Embeddings:
    """An `embed` output (.parquet, or .npy with its .csv/.json) as table, float32 vectors and metadata."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"--embeddings {path}: no such file")
    if path.suffix == ".npy":
        index, meta = path.with_suffix(".csv"), path.with_suffix(".json")
        if not index.is_file():
            raise DataSourceError(f"--embeddings {path}: its index {index.name} is missing beside it")
        vectors = np.load(path, allow_pickle=False).astype(np.float32)
        frame = pd.read_csv(index, dtype={"path": str, "split": str, "label": str, "patient_id": str})
        info = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow's own error types
            raise DataSourceError(f"--embeddings {path} is not a readable parquet file ({exc})") from None
        if EMBEDDING not in table.column_names:
            raise DataSourceError(f"--embeddings {path} has no '{EMBEDDING}' column; write it with `retinafm embed`")
        column = table.column(EMBEDDING).combine_chunks()
        dim = column.type.list_size
        vectors = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
        frame = table.drop([EMBEDDING]).to_pandas()
        info = json.loads((table.schema.metadata or {}).get(b"retinafm", b"{}"))
    else:
        raise DataSourceError(f"--embeddings {path}: expected a .parquet or .npy file from `retinafm embed`")
    if len(frame) != len(vectors):
        raise DataSourceError(f"--embeddings {path}: {len(vectors)} vectors for {len(frame)} index rows")
    return Embeddings(frame, vectors, info)

