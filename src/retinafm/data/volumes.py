"""Files that hold several images: multi-frame DICOM, Heidelberg .vol / .e2e OCT, multi-page TIFF.

A frame (B-scan) is addressed as `file#frame=12` (0-based) in every CSV, and the scanning laser
image (SLO / fundus localizer) of a Heidelberg file as `file#slo`. `--oct-frames` picks which
B-scans of a volume go through the model: `middle` (one per volume, the default), `all`, or an
integer N (N B-scans evenly spread from the first to the last).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

from retinafm.data.dicom import (
    DicomError,
    dicom_frame_count,
    looks_like_dicom,
    read_dicom_frame,
    stretch_to_uint8,
)
from retinafm.files.inputs import (
    HEIDELBERG_MAX_BYTES,
    TIFF_MAX_BYTES,
    InputFileError,
    check_regular,
    open_regular,
    regular_file_problem,
)
from retinafm.settings import OctFrames, parse_oct_frames

EYEPY_SUFFIXES = frozenset({".vol", ".e2e"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
_ADDRESS = re.compile(r"^(?P<file>.+)#(?:frame=(?P<frame>\d+)|(?P<slo>slo))$")


class VolumeError(Exception):
    """A volume (or one of its frames) that cannot be read; the message says why."""


def split_address(path: str) -> tuple[str, int | None, bool]:
    """`file#frame=3` -> (file, 3, False); `file#slo` -> (file, None, True); a plain path -> (path, None, False).
    A file whose real name ends like an address is taken as that file."""
    match = _ADDRESS.match(str(path))
    if match is None or Path(path).exists():
        return str(path), None, False
    frame = match.group("frame")
    return match.group("file"), (int(frame) if frame is not None else None), match.group("slo") is not None


def frame_address(path: str, frame: int) -> str:
    return f"{path}#frame={frame}"


def select_frames(count: int, oct_frames: OctFrames) -> list[int]:
    """The frame indices of a `count`-frame volume that `oct_frames` picks."""
    choice = parse_oct_frames(oct_frames)
    if count <= 1:
        return [0]
    if choice == "middle":
        return [count // 2]
    if choice == "all" or choice >= count:
        return list(range(count))
    if choice == 1:
        return [count // 2]
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, choice)})


_SINGLE_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})


def is_volume_candidate(path: str | Path) -> bool:
    """Could this file hold several frames? (Reading the count is then needed to know.) Common
    single-image formats are decided by name; anything else (e.g. DICOM without a suffix) by content."""
    suffix = Path(path).suffix.lower()
    if suffix in _SINGLE_IMAGE_SUFFIXES:
        return False
    return suffix in EYEPY_SUFFIXES or suffix in TIFF_SUFFIXES or looks_like_dicom(path)


def frame_count(path: str | Path) -> int:
    """Frames (B-scans) in the file; 1 for an ordinary image. Reads headers, not pixels, where it can."""
    suffix = Path(path).suffix.lower()
    if regular_file_problem(path):
        return 1  # a FIFO, device or folder is never opened here; reading it reports the skip
    try:
        if suffix in EYEPY_SUFFIXES:
            return int(_eyepy_volume(str(path), *_stamp(path))[0].shape[0])
        if looks_like_dicom(path):
            return dicom_frame_count(path)
        if suffix in TIFF_SUFFIXES:
            from PIL import Image

            with open_regular(path, what="", max_bytes=TIFF_MAX_BYTES, kind="TIFF stacks") as fh, Image.open(fh) as img:
                return int(getattr(img, "n_frames", 1))
    except (DicomError, VolumeError, InputFileError):
        return 1  # unreadable: listed once, and reported as skipped when it is read
    except (OSError, ValueError, SyntaxError):
        return 1
    return 1


def expand_frames(paths: Iterable[str], oct_frames: OctFrames = "middle") -> list[tuple[str, str]]:
    """(address, source file) for every frame `oct_frames` picks from each path, in order.
    Paths that already name a frame, and single-frame files, are kept as they are."""
    out = []
    for path in paths:
        file, frame, slo = split_address(path)
        if frame is not None or slo or not is_volume_candidate(file):
            out.append((str(path), file))
            continue
        count = frame_count(file)
        if count <= 1:
            out.append((str(path), file))
            continue
        out += [(frame_address(file, k), file) for k in select_frames(count, oct_frames)]
    return out


def read_volume_image(path: str, frame: int | None, slo: bool) -> np.ndarray | None:
    """(H, W, 3) uint8 for a DICOM / Heidelberg / multi-page-TIFF frame or SLO image; None when the
    file is none of those (an ordinary image: the caller decodes it)."""
    suffix = Path(path).suffix.lower()
    if suffix in EYEPY_SUFFIXES:
        bscans, localizer = _eyepy_volume(path, *_stamp(path))
        if slo:
            if localizer is None:
                raise VolumeError("has no SLO / localizer image")
            return _gray_to_rgb(localizer)
        index = bscans.shape[0] // 2 if frame is None else frame
        if index >= bscans.shape[0]:
            raise VolumeError(f"has {bscans.shape[0]} B-scan(s); frame {index} does not exist")
        return _gray_to_rgb(bscans[index])
    if slo:
        raise VolumeError("#slo addresses only Heidelberg .vol / .e2e files")
    if looks_like_dicom(path):
        try:
            return read_dicom_frame(path, frame or 0)
        except DicomError as exc:
            raise VolumeError(str(exc)) from None
    if frame is not None and suffix in TIFF_SUFFIXES:
        return _tiff_page(path, frame)
    if frame is not None:
        raise VolumeError(f"#frame={frame} given, but this file type holds a single image")
    return None


def _tiff_page(path: str, frame: int) -> np.ndarray:
    from PIL import Image

    from retinafm.data.pixels import to_rgb_array

    try:
        with open_regular(path, what="", max_bytes=TIFF_MAX_BYTES, kind="TIFF stacks") as fh, Image.open(fh) as img:
            pages = int(getattr(img, "n_frames", 1))
            if frame >= pages:
                raise VolumeError(f"has {pages} page(s); frame {frame} does not exist")
            img.seek(frame)
            img.load()
            return to_rgb_array(img)
    except InputFileError as exc:
        raise VolumeError(exc.reason) from None


def _stamp(path: str | Path) -> tuple[int, int]:
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=2)  # per process: a DataLoader worker reads many B-scans of the same volume in a row
def _eyepy_volume(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    import eyepy

    try:  # eyepy opens the path itself and parses the whole file: regular files within the limit only
        check_regular(path, what="", max_bytes=HEIDELBERG_MAX_BYTES, kind="Heidelberg volumes")
    except InputFileError as exc:
        raise VolumeError(exc.reason) from None
    reader = eyepy.import_heyex_e2e if path.lower().endswith(".e2e") else eyepy.import_heyex_vol
    try:
        volume = reader(path)
        bscans = np.asarray(volume.data)
        localizer = np.asarray(volume.localizer.data) if volume.localizer is not None else None
    except Exception as exc:  # eyepy surfaces parser errors of several kinds (construct, struct, ValueError)
        text = str(exc).strip().splitlines()
        reason = (text[0] if text else type(exc).__name__)[:160]
        raise VolumeError(f"not a readable Heidelberg {Path(path).suffix} file ({reason})") from None
    if bscans.ndim != 3 or bscans.shape[0] == 0:
        raise VolumeError(f"holds no B-scans (data of shape {bscans.shape})")
    return bscans, localizer


def _gray_to_rgb(array: np.ndarray) -> np.ndarray:
    values = np.asarray(array)
    if values.dtype != np.uint8:
        values = stretch_to_uint8(values)
    if values.ndim == 3:
        return np.ascontiguousarray(values[..., :3]) if values.shape[-1] >= 3 else np.repeat(values[..., :1], 3, axis=2)
    return np.repeat(values[..., None], 3, axis=2)
