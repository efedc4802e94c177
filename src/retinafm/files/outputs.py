"""Atomic output writing and run-directory safety.

Every file the toolkit writes goes to a temporary name in the same folder and is renamed into
place, so an interrupted run never leaves a half-written file where a good one was.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml


class OutputExistsError(FileExistsError):
    """An output already exists and the user did not ask to overwrite or resume it."""


class OutputPathError(ValueError):
    """An output path that cannot be created."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give outputs the permissions a plain open() would (umask).
    os.chmod(tmp_path, 0o666 & ~_current_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as exc:
        full = disk_full_error(path, tmp_path, exc)
        if full is None:
            raise
        raise full from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# A write that fails with less than this left on its disk failed for want of space.
LOW_SPACE = 64 * 2**20


def disk_full_error(path: Path, tmp_path: Path, exc: BaseException) -> OSError | None:
    """A full disk while writing `path` as one OSError(ENOSPC) naming the file and the space left
    (the CLI prints it as one line), or None for any other failure. torch.save writes through C++
    streams, so a full disk reaches Python as a RuntimeError without an errno ("PytorchStreamWriter
    failed writing file", "unexpected pos"): it is recognised by the disk having (almost) nothing left."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return None
    if not ((isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
            or (isinstance(exc, RuntimeError) and (free < LOW_SPACE or "No space left" in str(exc)))):
        return None
    tmp_path.unlink(missing_ok=True)  # the partial file is not part of what the user has left
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
    left = f"{free / 2**20:.1f} MB" if free >= 2**20 else f"{free // 1024} KB"
    return OSError(errno.ENOSPC, f"no space left on device writing {path} ({left} free on that disk)", str(path))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_yaml(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create `path`, refusing a non-empty existing folder unless resuming or overwriting.

    Overwrite does not delete anything: files are replaced one by one as the new run writes them.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"--out {path} exists and is a file; give a folder path.")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise OutputExistsError(
            f"--out {path} already exists and is not empty. Use --resume to continue that run, "
            "--overwrite to replace it, or choose another --out."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise PermissionError(f"cannot create output folder {path}: {exc.strerror}") from exc
    except OSError as exc:  # a parent is a file, a name is too long, the disk is read-only, ...
        raise OutputPathError(f"cannot create output folder {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK):
        raise PermissionError(f"output folder {path} is not writable; choose another --out.")
    return path


def refuse_existing_file(path: str | os.PathLike, *, overwrite: bool, option: str = "--out") -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{option} {path} already exists; pass --overwrite to replace it.")
    return path
