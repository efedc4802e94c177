"""DICOM pixel data to the model's 8-bit RGB, one frame at a time (pydicom).

Ophthalmic photographs are usually single-frame RGB (or YBR, which pydicom converts to RGB);
OCT volumes are multi-frame monochrome files whose frames are B-scans, addressed as
`file.dcm#frame=12` everywhere a path appears. Only the requested frame is decoded.

The 8-bit rule for monochrome data, in the order the DICOM standard applies it:
1. the modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence);
2. the first VOI window the file gives (Window Center / Width) mapped linearly onto 0–255, or its
   VOI LUT Sequence; without either, 8-bit stored data is kept as is and anything deeper is
   scaled from the frame's own minimum–maximum onto 0–255 (exports rarely use the full 12/16-bit
   range, so dividing by 2**bits would give near-black images);
3. MONOCHROME1 (white is zero) is inverted; the gray value is repeated into three channels.
RGB data deeper than 8 bits is scaled by 255 / (2**BitsStored − 1); PALETTE COLOR goes through
its colour LUT.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from retinafm.files.inputs import DICOM_MAX_BYTES, InputFileError, check_regular, open_regular

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
# Pillow's decompression-bomb limit (twice MAX_IMAGE_PIXELS), so a DICOM frame is held to what any other
# image is: ~179 M pixels, far above a wide-field photograph (4000 x 4000) or an OCT B-scan.
MAX_FRAME_PIXELS = 2 * 89_478_485
_PREAMBLE = 128  # a DICOM file: 128-byte preamble, then b"DICM"


class DicomError(Exception):
    """A DICOM file (or frame) that cannot become an image; the message says why in plain words."""


def looks_like_dicom(path: str | Path, head: bytes | None = None) -> bool:
    """By content, not name: many exports have no .dcm suffix."""
    if head is None:
        try:
            # Only the header is read, so any size will do; a FIFO or device is refused unread.
            with open_regular(path, what="", max_bytes=2**63 - 1) as fh:
                head = fh.read(_PREAMBLE + 4)
        except (OSError, InputFileError):
            return False
    return head[_PREAMBLE:_PREAMBLE + 4] == b"DICM" or Path(path).suffix.lower() in DICOM_SUFFIXES


def dicom_frame_count(path: str | Path) -> int:
    """Number of frames, from the header alone, refused when the file is too small to hold them (each
    frame is listed once per volume, so a header claiming 10**9 frames would be a list of 10**9 paths)."""
    ds = _header(path)
    frames = _dimension(ds, "NumberOfFrames") or 1
    size = Path(path).stat().st_size
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    # An encapsulated frame takes at least an 8-byte item header; a native one its full pixel bytes
    # (a deflated file holds native pixels in fewer bytes: one byte a frame is all that can be said).
    if getattr(syntax, "is_deflated", False):
        per_frame = 1
    elif getattr(syntax, "is_compressed", False):
        per_frame = 8
    else:
        bits = (_dimension(ds, "Rows") * _dimension(ds, "Columns") * (_dimension(ds, "SamplesPerPixel") or 1)
                * (_dimension(ds, "BitsAllocated") or 8))
        per_frame = max(1, bits // 8)
    if frames * per_frame > size:
        raise DicomError(f"its header claims {frames:,} frames, more than its {size:,} bytes can hold")
    return frames


def _header(path: str | Path):
    """The dataset up to its pixel data, refused when its frames claim more pixels than an image may
    have: pydicom allocates a frame from Rows x Columns before it finds the data short (a 12 KB file
    claiming 60000 x 60000 pixels is a MemoryError, not a skip)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        check_regular(path, what="", max_bytes=DICOM_MAX_BYTES, kind="DICOM files")  # before pydicom opens it
    except InputFileError as exc:
        raise DicomError(exc.reason) from None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise DicomError(f"not a valid DICOM file ({_first_line(exc)})") from None
    except (EOFError, OSError, ValueError, KeyError) as exc:
        raise DicomError(f"not a readable DICOM file ({_first_line(exc)})") from None
    rows, columns = _dimension(ds, "Rows"), _dimension(ds, "Columns")
    if rows * columns > MAX_FRAME_PIXELS:
        raise DicomError(f"image too large to decode safely (its header claims {rows} x {columns} pixels per frame, "
                         f"over {MAX_FRAME_PIXELS:,})")
    return ds


def _dimension(ds, name: str) -> int:
    try:
        return max(0, int(ds.get(name, 0) or 0))
    except (TypeError, ValueError):
        raise DicomError(f"its header's {name} is not a number") from None


def read_dicom_frame(path: str | Path, frame: int = 0) -> np.ndarray:
    """Frame `frame` (0-based) of a DICOM file as an (H, W, 3) uint8 array."""
    import pydicom
    from pydicom.pixels import pixel_array

    frames = dicom_frame_count(path)  # also refuses files that are not DICOM, with their reason
    if frame >= frames:
        raise DicomError(f"has {frames} frame(s); frame {frame} does not exist")
    header = pydicom.Dataset()  # receives the pixel module of the header
    try:
        raw = pixel_array(str(path), index=frame, ds_out=header)
    except AttributeError as exc:
        if "pixel data" in str(exc).lower():
            raise DicomError("DICOM file without pixel data (a report, plan or other non-image object)") from None
        raise DicomError(f"unreadable DICOM file ({_first_line(exc)})") from None
    except (IndexError, ValueError, EOFError, OSError, RuntimeError, NotImplementedError, KeyError) as exc:
        raise DicomError(f"cannot decode its pixel data{_transfer_syntax(path)} ({_first_line(exc)})") from None
    return to_rgb8(raw, header)


def to_rgb8(raw: np.ndarray, ds) -> np.ndarray:
    """One decoded frame (H, W) or (H, W, 3) with its header as (H, W, 3) uint8 (rule in the module doc)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    bits = int(ds.get("BitsStored", 8) or 8)
    if raw.ndim == 3 and raw.shape[-1] == 3:  # RGB (YBR already converted by pydicom)
        if bits > 8 or raw.dtype != np.uint8:
            raw = np.asarray(raw, dtype=np.float64) * (255.0 / (2 ** bits - 1))
        return np.clip(np.rint(raw), 0, 255).astype(np.uint8)
    if raw.ndim != 2:
        raise DicomError(f"unexpected pixel array of shape {raw.shape} for one frame")
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, ds).astype(np.float64)
        peak = 255.0 if rgb.max() <= 255 else 65535.0  # 8- or 16-bit LUT entries
        return np.clip(np.rint(rgb * (255.0 / peak)), 0, 255).astype(np.uint8)
    values = apply_modality_lut(raw, ds).astype(np.float64)
    centre, width = _window(ds)
    if centre is not None:
        low, high = centre - width / 2, centre + width / 2
        gray = (values - low) * (255.0 / max(high - low, 1e-9))
    elif "VOILUTSequence" in ds:
        gray = stretch_to_uint8(apply_voi_lut(values, ds))
    elif bits <= 8 and "RescaleSlope" not in ds and values.min() >= 0 and values.max() <= 255:
        gray = values
    else:
        gray = stretch_to_uint8(values)
    gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return np.repeat(gray[..., None], 3, axis=2)


def _window(ds) -> tuple[float | None, float]:
    """The first (centre, width) the file gives; several pairs are alternative views."""
    from pydicom.multival import MultiValue

    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None:
        return None, 0.0
    try:
        c, w = (float(v[0] if isinstance(v, (MultiValue, list, tuple)) else v) for v in (centre, width))
    except (TypeError, ValueError, IndexError):
        return None, 0.0
    return (c, w) if w > 0 else (None, 0.0)


def stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Deep (12/16-bit, float) gray values scaled from their own min–max onto 0–255 as uint8: the one
    rule for DICOM without a window, 16-bit PNG/TIFF and volume data (NaN becomes 0)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    scaled = np.zeros_like(values) if not high > low else (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)


def _transfer_syntax(path: str | Path) -> str:
    import pydicom

    try:
        uid = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        return f" (transfer syntax {uid.name})"
    except Exception:  # the header itself is damaged; the decoder's message says enough
        return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
