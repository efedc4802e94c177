"""Atomic output writing, and outputs claimed before any work.

Every file the toolkit writes goes to a temporary name in the same folder and is renamed into
place, so an interrupted run never leaves a half-written file where a good one was.

A command claims what it will write before it starts (`claim_file`, `claim_dir`): an exclusive lock,
so two runs into one output cannot both proceed; every file it may write (its side files too:
`<out>_skipped.csv`, an .npy's .csv index) refused if it exists, unless --overwrite; none of them one
of the command's inputs; a run folder never inside an input folder. A fresh folder that a failed run
leaves without a checkpoint is removed, so the corrected rerun is not blocked by it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from retinafm.files.cells import protect_frame


class OutputExistsError(FileExistsError):
    """An output already exists and the user did not ask to overwrite or resume it."""


class OutputPathError(ValueError):
    """An output path that cannot be created, or one that is also an input."""


class OutputInUseError(OutputExistsError):
    """Another run holds the output's lock."""


LOCK_NAME = ".retinafm.lock"  # inside a claimed run folder; a file output's lock is .<name>.lock beside it
# The files of an earlier run that --overwrite removes from its folder, by the kind of command that
# wrote them: a run writes some only sometimes (skipped.csv when files were unreadable, split.csv on an
# automatic split, test results when there is a test split), and an earlier run's copy left beside the
# new results would be read as this run's. Other files in the folder, the user's or another command's
# (an evaluation written into a training run's folder leaves its checkpoints and log), are never removed.
EVALUATION_OUTPUTS: tuple[str, ...] = (
    "skipped.csv", "report.html", "predictions_*.csv", "metrics_*.csv", "metrics_*.json", "plots/*.png",
    "explanations_*.csv", "explanations_*/overlays/*.png",  # the report's overlays
)
EXPLAIN_OUTPUTS: tuple[str, ...] = (
    "explanations.csv", "skipped.csv", "faithfulness.csv", "faithfulness_images.csv", "localisation.csv",
    "heatmaps/*.npy", "overlays/*.png",
)
PROBE_OUTPUTS: tuple[str, ...] = (
    *EVALUATION_OUTPUTS, "config.yaml", "data_summary.csv", "checkpoint-best.pth", "probe_grid.csv",
    "knn/*.csv", "knn/*.json",
)
RUN_OUTPUTS: tuple[str, ...] = (  # finetune, pretrain, refine (and a feature probe's files in finetune's folder)
    *PROBE_OUTPUTS, "log.csv", "split.csv", "checkpoint-*.pth", "embeddings.parquet", "backbone.safetensors",
    "probe_comparison.csv", "probe_before/*", "probe_after/*",
)
COMPARISON_OUTPUTS: tuple[str, ...] = ("comparison.csv", "comparison.json", "forest.png")
STUDY_OUTPUTS: tuple[str, ...] = ("trials.csv", "optuna_best.json", "plots/*.png", "trials/*")
LABEL_EFFICIENCY_OUTPUTS: tuple[str, ...] = (
    "config.yaml", "label_efficiency*.csv", "label_efficiency.png", "subsets/*.csv", "embeddings.parquet",
)


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
    """`frame` as CSV, its text cells protected from spreadsheets running them as formulas (files.cells)."""
    with atomic_path(path) as tmp:
        protect_frame(frame).to_csv(tmp, index=False)
    return Path(path)


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create `path`, refusing a non-empty existing folder unless resuming or overwriting (the lock file
    of a claim does not count). Deletes nothing: what --overwrite removes is claim_dir's business."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"--out {path} exists and is a file; give a folder path.")
    if path.is_dir() and _entries(path) and not (overwrite or resume):
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


# The folders this process holds: a workflow that runs another inside its own folder (finetune --adaptation lp
# probes into its run folder) must not be refused by its own lock.
_HELD: dict[str, Claim] = {}


def _entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != LOCK_NAME]


def _primary() -> bool:
    """Under torchrun only rank 0 claims and writes (files cannot import runtime; RANK is torchrun's)."""
    return os.environ.get("RANK", "0") == "0"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b) or a.resolve() == b.resolve()
    except OSError:
        return False


def _inside(child: Path, folder: Path) -> bool:
    try:
        child.resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


def _present(inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> list[tuple[str, Path]]:
    return [(option, Path(path)) for option, path in inputs if path not in (None, "")]


@dataclass
class Claim:
    """What a command holds while it runs: the lock, and the paths it may write."""

    path: Path
    overwrite: bool
    lock: Path
    _fd: int = -1
    fresh: bool = False  # a folder that did not exist or was empty: the run owns everything in it
    before: dict[Path, tuple[int, int]] = field(default_factory=dict)  # a file's side files: (inode, mtime)

    def remove_stale(self, written: Iterable[str | os.PathLike | None] = ()) -> list[Path]:
        """After success under --overwrite: delete the side files an earlier run left that this run did not
        write again (p_skipped.csv of a run that had unreadable files, when this one had none). A claimed
        folder's earlier outputs were removed when it was claimed, so there is nothing left to do for it."""
        if not self.overwrite:
            return []
        keep = {Path(p).resolve() for p in written if p is not None}
        # An output this run wrote was replaced by a rename (a new inode); one with the old inode and time is stale.
        stale = [old for old, stamp in self.before.items()
                 if old.is_file() and _fingerprint(old) == stamp and old.resolve() not in keep]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = _read_holder(self.lock)
                raise OutputInUseError(f"--out {self.path} is in use by another retinafm run{holder}; wait for "
                                       "it to finish or choose another --out") from None
            # The previous holder may have removed the lock file between our open and flock: then we locked
            # a file no longer at that name, which a third run could create and lock too. Retry on the new one.
            try:
                if os.stat(self.lock).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd

    def _release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.lock)  # unlinked while still locked, so no other run locks the stale file
            os.close(self._fd)
            self._fd = -1


def _read_holder(lock: Path) -> str:
    try:
        pid, _, started = lock.read_text(encoding="utf-8").strip().partition(" ")
    except OSError:
        return ""
    return f" (process {pid}, started {started})" if pid.isdigit() else ""


def _fingerprint(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _check_not_inputs(outputs: list[Path], inputs: list[tuple[str, Path]], option: str) -> None:
    for out in outputs:
        for input_option, given in inputs:
            if _same(out, given):
                what = "" if out.name == Path(option).name else f" (it would write {out.name} there)"
                raise OutputPathError(f"{option} would overwrite {input_option} {given}{what}; choose another "
                                      f"{option}")


@contextlib.contextmanager
def claim_file(path: str | os.PathLike, *, side_files: Iterable[str | os.PathLike] = (), overwrite: bool = False,
               inputs: Iterable[tuple[str, str | os.PathLike | None]] = (), option: str = "--out") -> Iterator[Claim]:
    """Hold `path` and its `side_files` (the other files the command may write, named after it) while the
    block runs. Refused: another run holding them (a lock file .<name>.lock beside `path`); any of them
    existing without `overwrite`; any of them being one of `inputs` ((option, path) pairs) or a folder."""
    path = Path(path)
    outputs = [path, *(Path(p) for p in side_files)]
    _check_not_inputs(outputs, _present(inputs), option)
    for out in outputs:
        if out.is_dir():
            raise OutputPathError(f"{option} {path}: {out} is a folder; give a file path")
        if out.exists() and not out.is_file():  # /dev/null, a FIFO: a rename onto it would replace the device
            raise OutputPathError(f"{option} {path}: {out} is not a regular file; give the path of a file to write")
    if not _primary():
        yield Claim(path, overwrite, path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)  # an OSError names the path (the CLI prints it as one line)
    claim = Claim(path, overwrite, path.with_name(f".{path.name}.lock"))
    claim._acquire()
    try:
        existing = [p for p in outputs if p.exists()]
        if existing and not overwrite:
            first = existing[0]
            which = "" if first == path else f" (its {first.name}, from an earlier run)"
            raise OutputExistsError(f"{option} {path}{which} already exists; pass --overwrite to replace it, or "
                                    f"choose another {option}")
        claim.before = {p: _fingerprint(p) for p in existing}
        yield claim
    finally:
        claim._release()


@contextlib.contextmanager
def claim_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
              inputs: Iterable[tuple[str, str | os.PathLike | None]] = (), option: str = "--out",
              results: tuple[str, ...] = ("checkpoint-*.pth",),
              outputs: tuple[str, ...] = RUN_OUTPUTS) -> Iterator[Claim]:
    """Hold the run folder `path` while the block runs: created if needed, locked (.retinafm.lock inside),
    refused when another run holds it, when it is not empty (unless `overwrite` or `resume`), or when it
    lies inside an input folder (a run in a class folder would become a class; a pretraining run in its
    --images folder would train on its own plots). If the block fails in a folder that was fresh and holds
    none of its `results` (files worth keeping: a checkpoint to resume, a study's trials), the folder is
    removed again, so that the corrected command can be rerun as it is. `overwrite` removes the files
    matching `outputs` (what this kind of command writes) when the folder is claimed, never an input."""
    path = Path(path)
    given = _present(inputs)
    for input_option, folder in given:
        if folder.is_dir() and _inside(path, folder):
            raise OutputPathError(f"{option} {path} is inside {input_option} {folder}; a run folder there would be "
                                  f"read as data. Choose an {option} outside it")
    _check_not_inputs([path], [(o, p) for o, p in given if p.is_file()], option)
    held = _HELD.get(str(path.resolve()))
    if held is not None or not _primary():  # a step of this process's own run (finetune's probe), or rank > 0
        yield held or Claim(path, overwrite, path / LOCK_NAME)
        return
    created = not path.exists()
    prepare_output_dir(path, overwrite=True, resume=resume)  # create (clear messages for bad paths); checked below
    claim = Claim(path, overwrite, path / LOCK_NAME)
    claim._acquire()
    _HELD[str(path.resolve())] = claim
    try:
        entries = _entries(path)
        if entries and not (overwrite or resume):
            raise OutputExistsError(f"{option} {path} already exists and is not empty. Use --resume to continue "
                                    f"that run, --overwrite to replace it, or choose another {option}.")
        claim.fresh = not entries
        if overwrite and not resume:
            # The earlier run's outputs go now, not as the new run rewrites them: a report written by the new
            # run must not list the old run's skipped files, nor a figure of a split this run has not got.
            # What this command reads stays, even where it looks like an output (evaluate --checkpoint RUN/
            # checkpoint-best.pth --out RUN --overwrite must not delete the checkpoint it is about to load).
            for old in path.rglob("*"):
                if old.is_file() and any(fnmatch.fnmatch(old.relative_to(path).as_posix(), pattern)
                                         for pattern in outputs) \
                        and not any(_same(old, given_path) or _inside(old, given_path) for _, given_path in given):
                    old.unlink()
        try:
            yield claim
        except BaseException:
            if claim.fresh and not any(any(path.glob(pattern)) for pattern in results):
                _empty(path, remove_folder=created)
            raise
    finally:
        _HELD.pop(str(path.resolve()), None)
        claim._release()


def _empty(folder: Path, *, remove_folder: bool) -> None:
    for entry in _entries(folder):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if remove_folder:
        with contextlib.suppress(OSError):
            (folder / LOCK_NAME).unlink(missing_ok=True)
            folder.rmdir()
