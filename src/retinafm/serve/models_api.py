"""The Models page's API and the model cache: the checkpoints under --runs, and the ones loaded to predict.

Discovery walks --runs for classifier and probe `.pth` checkpoints and `.onnx` exports. It must stay
cheap on a folder of hundreds of runs, so each file's description is cached by its path, size and
mtime: a `.pth` is opened with `torch.load(weights_only=True, mmap=True)` (the tensors are mapped,
not read: only the pickled metadata is), and a run folder's metrics files are re-read only when they
change. Anything unreadable, and the pretraining / refinement checkpoints predict cannot run, are
left out (listed under "skipped" with the reason) rather than failing the page. Hidden folders
(.jobs, .git) are not entered, folder symlinks are not followed, and a file symlink is listed only
when it resolves inside --runs.

Loaded models (`load_for_inference`) are kept in a least-recently-used cache of
`config.cached_models` entries, reloaded when the file changes. Each checkpoint has its own lock:
`ModelCache.use` holds it while the model is loaded and while the caller runs it, so concurrent
predict requests on one model run one after another (a model's hooks and buffers are not safe to
share between threads), while requests on different models run side by side.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from retinafm.engine.checkpoint import (
    MODEL_KINDS,
    CheckpointError,
    CheckpointMeta,
    kind_of,
    meta_of,
    open_checkpoint,
    upgrade,
)
from retinafm.engine.inference import LoadedModel, load_for_inference, load_onnx
from retinafm.files.inputs import CHECKPOINT_MAX_BYTES, InputFileError, check_torch_zip, open_regular
from retinafm.serve.config import ServeConfig
from retinafm.serve.security import confined

router = APIRouter()

MODEL_SUFFIXES = (".pth", ".onnx")
METRICS_FILE = "metrics_test.json"
LOG_FILE = "log.csv"
Stamp = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino): a file rewritten in place changes one of them


@dataclass(frozen=True)
class ModelInfo:
    """One runnable checkpoint as the API shows it (`public()`), plus what predict needs to run it."""

    id: str  # the checkpoint's path relative to --runs, posix
    path: Path  # resolved, inside --runs
    kind: str  # classifier | probe | onnx
    task: str
    outputs: list[str]
    model: str
    arch: str
    input_size: int
    run: str  # the folder holding it, relative to --runs ("." for --runs itself)
    metrics: dict[str, dict[str, float | None]]
    oct_frames: str | int | None = None  # the B-scans of a volume it was trained on (None: middle)
    epoch: int = -1
    modified: str = ""  # the file's mtime, ISO 8601 UTC
    settings: dict[str, Any] = field(default_factory=dict, repr=False)

    def public(self) -> dict[str, Any]:
        """The GET /api/models entry (the contract's fields, then a few extras the page may show)."""
        return {"id": self.id, "path": self.id, "kind": self.kind, "task": self.task, "outputs": list(self.outputs),
                "model": self.model, "arch": self.arch, "input_size": self.input_size, "run": self.run,
                "metrics": self.metrics, "epoch": self.epoch, "modified": self.modified}


def _stamp(path: Path) -> Stamp | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


def _iso(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9, tz=timezone.utc).isoformat(timespec="seconds")


def _finite(value: Any) -> float | None:
    """A metric as JSON can carry it: NaN and infinities (an AUROC of one class) become null."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _headline(metrics: dict[str, Any], task: str) -> dict[str, float | None]:
    """The task's headline metrics (report.html's, in its order) when it names them, else every number."""
    from retinafm.tasks import TASKS

    numbers = {str(k): _finite(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    task_type = TASKS.get(task)
    headline = getattr(task_type, "report_headline", ()) if task_type is not None else ()
    chosen = {k: numbers[k] for k in headline if k in numbers}
    return chosen or numbers


def read_pth_meta(path: Path) -> tuple[str, CheckpointMeta]:
    """(kind, metadata) of a .pth without reading its tensors: the file passes the same regular-file,
    size and zip-bomb checks as engine.checkpoint.open_checkpoint, then torch maps the tensors
    (mmap) instead of reading them. A file torch cannot map (the legacy, non-zip format) is opened
    the ordinary way, once: the result is cached by mtime."""
    import torch

    try:
        with open_regular(path, what="checkpoint", max_bytes=CHECKPOINT_MAX_BYTES, kind="checkpoints") as fh:
            check_torch_zip(fh, what="checkpoint", path=path)
            zipped = fh.read(4) == b"PK\x03\x04"
    except InputFileError as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:
        raise CheckpointError(f"{path.name} cannot be read ({exc.strerror or exc})") from None
    state: Any = None
    if zipped:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch's own error types: not a checkpoint torch.save wrote
            raise CheckpointError(f"not a retinafm checkpoint ({str(exc).splitlines()[0][:200]})") from None
        state = upgrade(state) if isinstance(state, dict) else state
    else:
        state = open_checkpoint(path, option="checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("retinafm"), dict) or "model" not in state:
        raise CheckpointError("not a retinafm checkpoint (no 'retinafm' metadata)")
    kind = kind_of(state)
    meta = meta_of(state) if kind in MODEL_KINDS else None
    del state  # unmaps the file
    if meta is None:
        raise CheckpointError(f"a {kind} checkpoint, not a model predict can run (fine-tune or probe from it)")
    return kind, meta


def read_onnx_meta(path: Path) -> CheckpointMeta:
    """The metadata `retinafm export` stored in an .onnx file (ONNX Runtime opens it to read them)."""
    _, meta = load_onnx(path)
    return meta


class FairLock:
    """A lock granted in the order it was asked for (a ticket lock). threading.Lock wakes an arbitrary
    waiter, so under 16 concurrent clients some requests on a busy model waited several turns: the
    95th-percentile latency was three times the median. Served in turn, it stays near 16 turns."""

    def __init__(self) -> None:
        self._turn = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> FairLock:
        with self._turn:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._turn.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._turn:
            self._serving += 1
            self._turn.notify_all()


class ModelCache:
    """The checkpoints under `config.runs` (`discover`, `describe`) and the loaded models (`use`)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.root = Path(config.runs).resolve()
        self._lock = threading.Lock()  # guards the dictionaries below, never held while reading a file
        self._described: dict[Path, tuple[Stamp, tuple[str, CheckpointMeta] | str]] = {}
        self._run_metrics: dict[Path, tuple[tuple[Stamp | None, Stamp | None], dict[str, Any]]] = {}
        self._loaded: OrderedDict[Path, tuple[Stamp, LoadedModel]] = OrderedDict()
        self._model_locks: dict[Path, FairLock] = {}
        self.loads = 0  # models loaded since the server started (for tests and the benchmark)

    # ------------------------------------------------------------------ discovery
    def candidates(self) -> Iterator[str]:
        """Every .pth / .onnx under --runs as an id (relative, posix), sorted by folder: hidden folders
        and files skipped, folder symlinks not followed, file symlinks only when they stay inside."""
        for folder, dirs, files in os.walk(self.root, followlinks=False, onerror=lambda _: None):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or not name.lower().endswith(MODEL_SUFFIXES):
                    continue
                path = Path(folder, name)
                if path.is_symlink() and not self._inside(path):
                    continue
                yield path.relative_to(self.root).as_posix()

    def _inside(self, path: Path) -> bool:
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return False
        return resolved == self.root or self.root in resolved.parents

    def discover(self) -> tuple[list[ModelInfo], list[dict[str, str]]]:
        """(the runnable models, the skipped files with their reason), each file read once per change."""
        models, skipped = [], []
        candidates = list(self.candidates())
        listed = set(candidates)
        for model_id in candidates:
            # A run's checkpoint-last.pth (kept to resume training) beside its checkpoint-best.pth would list
            # every run twice; it stays reachable by its id.
            if model_id.endswith("checkpoint-last.pth") and \
                    model_id[:-len("checkpoint-last.pth")] + "checkpoint-best.pth" in listed:
                continue
            try:
                models.append(self._describe(model_id, (self.root / model_id).resolve()))
            except CheckpointError as exc:
                skipped.append({"path": model_id, "reason": str(exc)})
        return models, skipped

    def describe(self, model_id: str) -> ModelInfo:
        """The model a request names: confined to --runs (403 outside, 404 missing), a .pth or .onnx
        outside hidden folders (404 otherwise), and runnable (404 with the reason when not)."""
        path = confined(self.root, model_id, what="checkpoint")
        parts = PurePosixPath(model_id).parts
        if not path.is_file() or not model_id.lower().endswith(MODEL_SUFFIXES) or any(p.startswith(".") for p in parts):
            raise HTTPException(404, f"no model {model_id!r}: give an id from GET /api/models")
        try:
            return self._describe(PurePosixPath(model_id).as_posix(), path)
        except CheckpointError as exc:
            raise HTTPException(404, f"{model_id!r} is not a model this server can run: {exc}") from None

    def _describe(self, model_id: str, path: Path) -> ModelInfo:
        stamp = _stamp(path)
        if stamp is None:
            raise CheckpointError("cannot be read")
        with self._lock:
            cached = self._described.get(path)
        if cached is None or cached[0] != stamp:
            try:
                found: tuple[str, CheckpointMeta] | str = (
                    ("onnx", read_onnx_meta(path)) if path.suffix.lower() == ".onnx" else read_pth_meta(path))
            except CheckpointError as exc:
                found = str(exc)
            except Exception as exc:  # never let one odd file break the listing
                found = f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
            with self._lock:
                self._described[path] = (stamp, found)
            cached = (stamp, found)
        found = cached[1]
        if isinstance(found, str):
            raise CheckpointError(found)
        kind, meta = found
        run_dir = (self.root / model_id).parent
        return ModelInfo(
            id=model_id, path=path, kind=kind, task=meta.task, outputs=[str(n) for n in meta.class_names],
            model=meta.model_name, arch=meta.arch, input_size=int(meta.input_size),
            run=run_dir.relative_to(self.root).as_posix(), metrics=self._metrics(run_dir, meta),
            oct_frames=(meta.settings or {}).get("oct_frames"), epoch=int(meta.epoch), modified=_iso(stamp[0]),
            settings=dict(meta.settings or {}))

    def _metrics(self, run_dir: Path, meta: CheckpointMeta) -> dict[str, dict[str, float | None]]:
        """{"val": the checkpoint's own validation metrics (else its epoch's row of log.csv), "test": the
        run's metrics_test.json}, each reduced to the task's headline metrics."""
        files = run_dir / METRICS_FILE, run_dir / LOG_FILE
        stamps = (_stamp(files[0]), _stamp(files[1]))
        with self._lock:
            cached = self._run_metrics.get(run_dir)
        if cached is None or cached[0] != stamps:
            cached = (stamps, {"test": _read_json(files[0]), "log": _read_log(files[1])})
            with self._lock:
                self._run_metrics[run_dir] = cached
        read = cached[1]
        val = dict(meta.metrics or {})
        if not val and read["log"]:
            rows = read["log"]
            row = next((r for r in rows if r.get("epoch") == meta.epoch), rows[-1])
            val = {k[4:]: v for k, v in row.items() if k.startswith("val_")}
        return {"val": _headline(val, meta.task), "test": _headline(read["test"], meta.task)}

    # ------------------------------------------------------------------ loaded models
    @contextlib.contextmanager
    def use(self, info: ModelInfo) -> Iterator[LoadedModel]:
        """The loaded model of `info`, held under its own lock for the block (loaded on first use,
        reloaded when the file changed, least recently used evicted beyond config.cached_models)."""
        with self._lock:
            lock = self._model_locks.setdefault(info.path, FairLock())
        with lock:
            stamp = _stamp(info.path)
            with self._lock:
                entry = self._loaded.get(info.path)
                if entry is not None and entry[0] == stamp:
                    self._loaded.move_to_end(info.path)
            if entry is None or entry[0] != stamp:
                loaded = load_for_inference(info.path, device="auto")
                with self._lock:
                    self.loads += 1
                    self._loaded[info.path] = (stamp, loaded)  # type: ignore[assignment]
                    self._loaded.move_to_end(info.path)
                    while len(self._loaded) > max(1, self.config.cached_models):
                        self._loaded.popitem(last=False)  # a request still running it keeps its reference
            else:
                loaded = entry[1]
            yield loaded

    def loaded_ids(self) -> list[str]:
        """The checkpoints loaded now, least recently used first."""
        with self._lock:
            return [p.relative_to(self.root).as_posix() for p in self._loaded]


def _read_json(path: Path) -> dict[str, Any]:
    from retinafm.files.inputs import CONFIG_MAX_BYTES

    try:
        with open_regular(path, what=path.name, max_bytes=4 * CONFIG_MAX_BYTES, kind="metrics files") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except (OSError, InputFileError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_log(path: Path) -> list[dict[str, Any]]:
    from retinafm.files.inputs import read_table

    if not path.is_file():
        return []
    try:
        return read_table(path, what=path.name, max_bytes=16 * 2**20).to_dict("records")
    except Exception:  # a damaged log only loses the fallback metrics
        return []


@router.get("/api/models")
async def list_models(request: Request) -> dict[str, Any]:
    """{"models": [...], "skipped": [{"path", "reason"}]}: the runnable checkpoints under --runs."""
    cache: ModelCache = request.app.state.models
    models, skipped = await run_in_threadpool(cache.discover)
    return {"models": [m.public() for m in models], "skipped": skipped}
