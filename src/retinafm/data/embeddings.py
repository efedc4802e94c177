"""The embeddings file `embed` writes (.parquet, or .npy with a .csv index) read back."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retinafm.data.sources import DataSourceError
from retinafm.files import (
    atomic_path,
    read_table,
    regular_file_problem,
    write_csv,
    write_json,
)

EMBEDDING = "embedding"


@dataclass
class Embeddings:
    """An embeddings file read back: the table without the vectors, the vectors, and how they were made."""

    frame: pd.DataFrame
    vectors: np.ndarray  # (n, dim) float32
    info: dict[str, Any] = field(default_factory=dict)


def write_embeddings(out: Path, frame: pd.DataFrame, vectors: np.ndarray, info: dict[str, Any]) -> None:
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
        raise DataSourceError(f"--embeddings {path}: {regular_file_problem(path) or 'no such file'}")
    if path.suffix == ".npy":
        index, meta = path.with_suffix(".csv"), path.with_suffix(".json")
        if not index.is_file():
            raise DataSourceError(f"--embeddings {path}: its index {index.name} is missing beside it")
        try:  # memory-mapped first: a header claiming more rows than the file holds fails here, unallocated
            vectors = np.load(path, mmap_mode="r", allow_pickle=False).astype(np.float32)
        except ValueError as exc:
            raise DataSourceError(f"--embeddings {path} is not a readable .npy file ({exc})") from None
        frame = read_table(index, what="--embeddings index")  # class names such as "NA" stay text
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
