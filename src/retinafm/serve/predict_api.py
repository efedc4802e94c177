"""POST /api/predict: uploaded images → predictions, probabilities and heatmap overlays (or the CSV).

The request is multipart: one or more `file` fields, `checkpoint` (a model id from GET /api/models),
optional `heatmaps` ("true" / "false", default true) and `oct_frames` (middle / all / N; default: as
the model was trained). `?format=csv` answers with the predictions CSV `retinafm predict` writes
(`filename` in place of `path`).

Uploads are the server's exposure to whatever a client sends, so:
- the body is parsed as it arrives (python-multipart's streaming parser) and each file is written
  straight into a private temporary folder (mkdtemp, mode 0700) under a name made here: the
  client's filename is only ever shown back, never used as a path. A file keeps its suffix when it
  is one data/io.py reads (so .dcm / .tif volumes are recognised), otherwise it gets none, and
  DICOM files without a suffix are still recognised by their content;
- the per-file, per-request and file-count limits of the config are enforced while counting
  (and the Content-Length up front): 413 naming the limit, before the rest is read. Nothing holds a
  whole request or file in memory;
- the folder is removed after the request, whatever happened;
- files are decoded by the CLI's own readers (ImageDataset / read_image, volumes expanded into
  B-scans by data.volumes); a file that is not an image or is damaged is listed under "skipped"
  with the reason, by the client's filename.

Inference and the heatmaps run in a worker thread (never on the event loop) under the model's lock
(see models_api.ModelCache.use). Every refusal is JSON {"detail": message} with its status: an
unknown id 404, an id leading out of --runs 403, no files 422, anything unforeseen 500.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from retinafm.data.io import IMAGE_SUFFIXES
from retinafm.serve.config import MiB, ServeConfig
from retinafm.serve.models_api import ModelCache, ModelInfo
from retinafm.serve.security import error

router = APIRouter()
log = logging.getLogger(__name__)

FILE_FIELD = "file"
TEXT_FIELDS = ("checkpoint", "heatmaps", "oct_frames")
TEXT_FIELD_MAX = 4096  # bytes of any field that is not a file
OVERLAY_SIDE = 384  # the overlays' longer side in the JSON: enough for the page, small enough to embed
BATCH_SIZE = 16
FILENAME_MAX = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


class Refused(Exception):
    """A request refused while it is read: its status and the message the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"


# --------------------------------------------------------------------------- receiving the upload
@dataclass
class Upload:
    """One uploaded file: the name the client gave (shown, never used as a path) and where it is."""

    filename: str
    path: Path
    size: int = 0


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    upload: Upload | None = None
    handle: BinaryIO | None = None
    text: bytearray = field(default_factory=bytearray)


def client_filename(raw: bytes | str, index: int) -> str:
    """The client's filename for display: its last path component, without control characters, at
    most 255 characters (`file<index>` when nothing is left)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = _CONTROL.sub("", re.split(r"[/\\]", text)[-1]).strip()
    return text[:FILENAME_MAX] or f"file{index}"


def safe_name(index: int, filename: str) -> str:
    """The name a file gets in the private folder: a number, plus the client's suffix only when it is
    an image suffix data/io.py knows (anything else: none, so DICOM is recognised by content)."""
    suffix = Path(filename).suffix.lower()
    return f"upload{index:04d}{suffix if suffix in IMAGE_SUFFIXES else ''}"


class MultipartReceiver:
    """python-multipart callbacks that write file parts into `folder` as they arrive, counting every
    limit of `config`; text fields are kept (at most TEXT_FIELD_MAX bytes each)."""

    def __init__(self, folder: Path, config: ServeConfig) -> None:
        self.folder, self.config = folder, config
        self.uploads: list[Upload] = []
        self.fields: dict[str, str] = {}
        self.files_seen = 0
        self.finished = False
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._pending: list[tuple[BinaryIO, bytes]] = []
        self._to_close: list[BinaryIO] = []
        self._to_remove: list[Path] = []
        self._open: list[BinaryIO] = []

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_end": self.on_end}

    def on_part_begin(self) -> None:
        self._part, self._disposition = _Part(), b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]
        if len(self._header_name) > TEXT_FIELD_MAX:
            raise Refused(413, f"a part's header is longer than {TEXT_FIELD_MAX} bytes")

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        if len(self._header_value) > TEXT_FIELD_MAX:
            raise Refused(413, f"a part's header is longer than {TEXT_FIELD_MAX} bytes")

    def on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name, self._header_value = bytearray(), bytearray()

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        part = self._part
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            return  # a text field
        part.filename = client_filename(options[b"filename"], self.files_seen + 1)
        if part.name != FILE_FIELD:
            return  # a file under another name: read past, not stored (the request limit still counts it)
        self.files_seen += 1
        if self.files_seen > self.config.max_files:
            raise Refused(413, f"too many files: at most {self.config.max_files} per request (max_files)")
        upload = Upload(part.filename, self.folder / safe_name(self.files_seen, part.filename))
        fd = os.open(upload.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        part.upload, part.handle = upload, os.fdopen(fd, "wb")
        self._open.append(part.handle)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part, chunk = self._part, data[start:end]
        if part.upload is not None and part.handle is not None:
            part.upload.size += len(chunk)
            if part.upload.size > self.config.max_file_bytes:
                raise Refused(413, f"file {part.upload.filename!r} is larger than the limit of "
                                   f"{_size(self.config.max_file_bytes)} per file (max_file_bytes)")
            self._pending.append((part.handle, chunk))
        elif part.filename is None:
            part.text += chunk
            if len(part.text) > TEXT_FIELD_MAX:
                raise Refused(413, f"field {part.name!r} is longer than {TEXT_FIELD_MAX} bytes")

    def on_part_end(self) -> None:
        part = self._part
        if part.upload is not None and part.handle is not None:
            self._to_close.append(part.handle)
            if part.upload.size == 0 and not part.filename:
                self.files_seen -= 1  # an empty file input of a browser form: no file chosen
                self._to_remove.append(part.upload.path)
            else:
                self.uploads.append(part.upload)
        elif part.filename is None and part.name in TEXT_FIELDS:
            self.fields.setdefault(part.name, part.text.decode("utf-8", "replace").strip())

    def on_end(self) -> None:
        self.finished = True

    def flush(self) -> None:
        """Write what the last chunk delivered and close the finished files (in a worker thread)."""
        pending, closing, removing = self._pending, self._to_close, self._to_remove
        self._pending, self._to_close, self._to_remove = [], [], []
        for handle, chunk in pending:
            handle.write(chunk)
        for handle in closing:
            handle.close()
        for path in removing:
            path.unlink(missing_ok=True)

    def close_all(self) -> None:
        for handle in self._open:
            handle.close()


async def receive(request: Request, folder: Path, config: ServeConfig) -> MultipartReceiver:
    """Stream the multipart body into `folder`; Refused (413, 415, 422) when it breaks a rule."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise Refused(415, "send the images as multipart/form-data: one or more 'file' fields and a 'checkpoint' "
                           "field (a model id from GET /api/models)")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise Refused(400, "the Content-Length header is not a number")
        if int(length) > config.max_request_bytes:
            raise Refused(413, f"the request ({_size(int(length))}) is larger than the limit of "
                               f"{_size(config.max_request_bytes)} per request (max_request_bytes)")
    receiver = MultipartReceiver(folder, config)
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > config.max_request_bytes:
                raise Refused(413, f"the request is larger than the limit of {_size(config.max_request_bytes)} per "
                                   "request (max_request_bytes)")
            parser.write(chunk)
            await anyio.to_thread.run_sync(receiver.flush)
        parser.finalize()
        await anyio.to_thread.run_sync(receiver.flush)
    except FormParserError as exc:
        raise Refused(422, f"the multipart body cannot be parsed ({exc})") from None
    finally:
        receiver.close_all()
    if not receiver.finished:
        raise Refused(422, "the multipart body ended before its closing boundary")
    return receiver


# --------------------------------------------------------------------------- predicting
@dataclass
class Prediction:
    """What one request's inference gave: the JSON's parts and the CSV's table."""

    model: ModelInfo
    results: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    csv: str
    note: str | None = None


def _display(address: str, names: dict[str, str]) -> str:
    """`<temp>/upload0003.dcm#frame=3` -> `scan.dcm#frame=3`: the client's name with the frame part."""
    for path, name in names.items():
        if address == path:
            return name
        if address.startswith(path + "#"):
            return name + address[len(path):]
    return Path(address).name


def _scrub(reason: str, folder: Path, names: dict[str, str]) -> str:
    """A skip reason with every temporary path replaced by the client's filename."""
    for path, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
        reason = reason.replace(path, name)
    return reason.replace(str(folder) + os.sep, "").replace(str(folder), "")


def overlay_uri(image: np.ndarray, heatmap: np.ndarray, side: int = OVERLAY_SIDE) -> str:
    """The overlay (overlays.render_overlay) of `image` ((H, W, 3) uint8) and `heatmap` ((H, W), 0..1),
    scaled so its longer side is at most `side`, as a PNG data URI. Scaled before rendering: the colour
    blend and contour of an 8000 px photograph would cost seconds for a picture shown at 384 px."""
    from PIL import Image

    from retinafm.overlays import render_overlay

    height, width = heatmap.shape
    scale = side / max(height, width)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
        heatmap = np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    overlay = render_overlay(image, np.clip(heatmap, 0.0, 1.0))
    buffer = io.BytesIO()
    Image.fromarray(overlay).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _overlays(loaded: Any, addresses: Sequence[str], method: str) -> dict[int, tuple[str, str]]:
    """{index into addresses: (the output explained, its overlay's data URI)}: the predicted class (every
    label at its threshold: the first; regression: the first target), at most OVERLAY_SIDE px."""
    from retinafm.data.loader import SkipLog
    from retinafm.engine.explain import TracedImages, explain_dataset

    target: str | int = 0 if loaded.meta.task == "regression" else "predicted"
    found: dict[int, tuple[str, str]] = {}
    for item in explain_dataset(loaded.model, loaded.task, TracedImages(list(addresses), loaded.transform),
                                loaded.device, method=method, target=target, batch_size=BATCH_SIZE,
                                skip_log=SkipLog(), amp_dtype=loaded.autocast_dtype, progress=False):
        if item.index not in found:
            found[item.index] = (item.target, overlay_uri(item.image.permute(1, 2, 0).numpy(), item.heatmap))
    return found


def run_prediction(cache: ModelCache, info: ModelInfo, uploads: Sequence[Upload], folder: Path, *, heatmaps: bool,
                   oct_frames: str | int | None, method: str) -> Prediction:
    """Predict `uploads` with `info`'s model (in a worker thread, under the model's lock): the CLI's
    readers and inference loop, then the overlays of the readable images."""
    import torch

    from retinafm.data.loader import ImageDataset
    from retinafm.data.volumes import expand_frames
    from retinafm.engine.infer import infer
    from retinafm.files.cells import protect_frame

    names = {str(u.path): u.filename for u in uploads}
    with cache.use(info) as loaded:
        frames = oct_frames or loaded.meta.settings.get("oct_frames") or "middle"
        addresses = [address for address, _ in expand_frames([str(u.path) for u in uploads], frames)]
        dataset = ImageDataset(addresses, [None] * len(addresses), loaded.transform)
        # One request is a batch or two: no CPU tuning (its two streams would change torch's thread
        # count, process-wide, under the feet of a request running another model).
        result = infer(loaded.model, dataset, loaded.device, batch_size=BATCH_SIZE, num_workers=0,
                       amp_dtype=loaded.autocast_dtype, progress=False, cpu_tuning=False)
        task = loaded.task
        readable = [addresses[i] for i in result.indices]
        outputs = task.activate(torch.from_numpy(result.logits)) if readable else np.zeros((0, len(task.output_names)))
        overlays: dict[int, tuple[str, str]] = {}
        note = None
        if heatmaps and readable:
            if loaded.onnx or loaded.precision == "int8":
                note = ("no heatmaps: this is an ONNX export (or int8 model), which has no gradients to explain "
                        "with; predict with its .pth checkpoint to see them")
            else:
                try:
                    overlays = _overlays(loaded, readable, method)
                except Exception as exc:  # the predictions stand without their pictures
                    log.exception("heatmaps failed")
                    note = f"the heatmaps could not be made ({type(exc).__name__}: {str(exc)[:200]})"
    shown = [_display(a, names) for a in readable]
    results = [_result(loaded.meta.task, task, name, row, overlays.get(i)) for i, (name, row)
               in enumerate(zip(shown, outputs, strict=True))]
    skipped = [{"filename": _display(path, names), "reason": _scrub(reason, folder, names)}
               for path, reason in result.skipped]
    frame = task.prediction_frame(shown, outputs).rename(columns={"path": "filename"})
    return Prediction(info, results, skipped, protect_frame(frame).to_csv(index=False), note)


def _result(kind: str, task: Any, filename: str, row: np.ndarray, overlay: tuple[str, str] | None) -> dict[str, Any]:
    """One image's entry: multiclass the class and every probability; multilabel the labels at their
    thresholds and every probability; regression the value of every target."""
    names = [str(n) for n in task.output_names]
    entry: dict[str, Any] = {"filename": filename}
    if kind == "regression":
        entry["values"] = {n: float(v) for n, v in zip(names, row, strict=True)}
    else:
        if kind == "multilabel":
            thresholds = np.asarray(task.decision_thresholds, dtype=float)
            entry["prediction"] = [n for n, p, t in zip(names, row, thresholds, strict=True) if p >= t]
        else:
            entry["prediction"] = names[int(np.argmax(row))]
        entry["probabilities"] = {n: float(p) for n, p in zip(names, row, strict=True)}
    entry["overlay"] = overlay[1] if overlay else None
    if overlay:
        entry["overlay_target"] = overlay[0]
    return entry


# --------------------------------------------------------------------------- the route
def _flag(value: str | None, name: str, default: bool) -> bool:
    if value is None:
        return default
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise Refused(422, f"field {name!r} must be true or false, not {value[:50]!r}")


@router.post("/api/predict", response_model=None)
async def predict(request: Request, format: str = "json") -> Response:
    """Uploads → predictions (see the module's docstring): JSON, or the CSV with ?format=csv."""
    from retinafm.engine.checkpoint import CheckpointError
    from retinafm.engine.infer import NonFiniteOutputError
    from retinafm.settings import ConfigError, parse_oct_frames

    config: ServeConfig = request.app.state.config
    cache: ModelCache = request.app.state.models
    if format not in ("json", "csv"):
        return error(422, f"format must be json or csv, not {format[:50]!r}")
    folder = Path(tempfile.mkdtemp(prefix="retinafm-upload-"))  # 0700: this user's only
    try:
        received = await receive(request, folder, config)
        model_id = received.fields.get("checkpoint", "")
        if not model_id:
            raise Refused(422, "field 'checkpoint' is missing: give a model id from GET /api/models")
        heatmaps = _flag(received.fields.get("heatmaps"), "heatmaps", True)
        frames = received.fields.get("oct_frames") or None
        try:
            oct_frames = parse_oct_frames(frames) if frames else None
        except ConfigError as exc:
            raise Refused(422, str(exc).replace("--oct-frames", "field 'oct_frames'")) from None
        if not received.uploads:
            raise Refused(422, "no files: send one or more images as 'file' fields")
        info = await run_in_threadpool(cache.describe, model_id)
        prediction = await run_in_threadpool(run_prediction, cache, info, received.uploads, folder,
                                             heatmaps=heatmaps, oct_frames=oct_frames, method=config.heatmap_method)
    except Refused as exc:
        return error(exc.status, exc.message)
    except HTTPException as exc:
        return error(exc.status_code, str(exc.detail))
    except ClientDisconnect:
        return error(400, "the client went away before the upload was complete")
    except (CheckpointError, ConfigError, NonFiniteOutputError) as exc:
        return error(422, str(exc).replace(str(folder) + os.sep, ""))
    except Exception as exc:  # nothing a client sends may take the server down, or leak a traceback
        log.exception("predict failed")
        return error(500, f"prediction failed ({type(exc).__name__}); the server's log has the details")
    finally:
        await run_in_threadpool(shutil.rmtree, folder, True)
    if format == "csv":
        return Response(prediction.csv, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="predictions.csv"'})
    body: dict[str, Any] = {"model": info.id, "task": info.task, "outputs": list(info.outputs),
                            "results": prediction.results, "skipped": prediction.skipped}
    if prediction.note:
        body["note"] = prediction.note
    return JSONResponse(body)
