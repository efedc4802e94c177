"""User-given files opened safely: regular files only, size limits, bounded parsers.

Every file a user names (an option such as --config or --manifest, a manifest row, an image in a
folder, a checkpoint) goes through `open_regular` before anything reads it:

- it is opened with O_NONBLOCK, so a FIFO (named pipe) never blocks the open, and then refused;
- anything that is not a regular file is refused (a device such as /dev/zero, a FIFO, a socket, a
  folder; symlinks are followed, so a symlink to /dev/zero is a device);
- a file over the size limit of its kind is refused before a byte of it is read.

On top of that: `read_table` reads CSVs so that class names such as None, NA, null or N/A stay
text; `load_yaml` refuses YAML whose aliases would expand past a bound (the "billion laughs"),
measured on the composed node graph without expanding it; `check_torch_zip` refuses a torch
checkpoint whose zip members would inflate far beyond their stored size, before decompression.

The refusals raise InputFileError, a ValueError, which the CLI prints as one line (exit 2);
image readers turn its `reason` into a skip. This module imports nothing of retinafm's.
"""
from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from retinafm.files.cells import restore_frame

KiB, MiB, GiB = 2**10, 2**20, 2**30

# A settings file is a few hundred bytes; a thousand times that is still nothing to parse, while
# PyYAML (pure Python here) would take minutes and gigabytes on a file of hundreds of megabytes.
CONFIG_MAX_BYTES = 1 * MiB
# Manifests, prediction tables, logs: a million-row manifest is ~100 MB, and pandas needs a few
# times the file size in memory, so 1 GiB is generous for real tables and bounded for anything else.
TABLE_MAX_BYTES = 1 * GiB
# 2-D images (PNG, JPEG, TIFF pages, BMP...): JPEGs are read whole into memory before decoding;
# the largest widefield photographs are tens of MB. (PIL's pixel limit bounds the decoded size.)
IMAGE_MAX_BYTES = 1 * GiB
# DICOM: pydicom reads the header and then only the requested frame (pixel_array(index=...)), so
# a multi-frame OCT volume never has to fit in memory whole; large cubes run to a few GB.
DICOM_MAX_BYTES = 16 * GiB
# Heidelberg .vol / .e2e: eyepy parses the whole file into memory (B-scans as arrays), so the
# limit is what a worker can hold; real Spectralis volumes are a few hundred MB.
HEIDELBERG_MAX_BYTES = 4 * GiB
# Multi-page TIFF stacks: PIL seeks to the one page it decodes, so they are not read whole.
TIFF_MAX_BYTES = 16 * GiB
# Checkpoints and backbone weights: the largest backbones are tens of GB (DINOv3 ViT-7B in fp32 is
# ~27 GB); torch.load holds the whole state dict in memory. check_torch_zip does the finer check.
CHECKPOINT_MAX_BYTES = 64 * GiB
# YAML: nodes after alias expansion. A settings file has tens; a saved config.yaml a few hundred
# (class names, per-class thresholds); a billion-laughs document has 10**9.
YAML_MAX_NODES = 100_000
# torch.save stores zip members uncompressed; weights compress by less than 2x even when someone
# re-zips a file. A member that inflates more than this (plus the slack, for small pickles and
# text records that compress well) is not a checkpoint torch.save wrote.
ZIP_MAX_INFLATION = 4
ZIP_SLACK_BYTES = 1 * MiB

# The strings pandas reads as missing by default (pandas' STR_NA_VALUES): in text columns they are
# real values (grades named "None", "NA", "N/A"); in other columns they keep meaning missing.
PANDAS_NA_STRINGS = ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null")
# The manifest columns that hold text (names, ids, splits, reports), never numbers or missing markers.
TEXT_COLUMNS = ("path", "split", "label", "patient_id", "report", "prediction")


class InputFileError(ValueError):
    """A user-given file refused before it was read: not a regular file, too large, or a bomb.

    `reason` is the plain-words cause without the file ("not a regular file (a FIFO)"), for skip
    lists; str() is the whole one-line message naming the option or file."""

    def __init__(self, what: str, path: str | Path, reason: str, hint: str = "") -> None:
        name = f"{what} {path}" if what else str(path)
        super().__init__(f"{name}: {reason}" + (f"; {hint}" if hint else ""))
        self.path = str(path)
        self.reason = reason


def describe_size(size: int) -> str:
    """12 * 2**30 -> '12 GiB'; 1536 -> '1.5 KiB'; 500 -> '500 bytes'; up to EiB (what an attention map
    of an absurd input size would take)."""
    for unit, scale in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale:
            return f"{size // scale} {unit}" if size % scale == 0 else f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words ('a FIFO', 'a character device')."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not an ordinary file"


def not_regular_reason(mode: int) -> str:
    return f"not a regular file ({file_kind(mode)})"


def too_large_reason(size: int, max_bytes: int, kind: str) -> str:
    return f"file is {describe_size(size)}, over the {describe_size(max_bytes)} limit for {kind}"


def _open_flags() -> int:
    # O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting for one (the
    # fstat below then refuses it); O_NOCTTY: a terminal device never becomes our controlling tty.
    return os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


@contextmanager
def open_regular(path: str | Path, *, what: str, max_bytes: int, kind: str = "this kind of file",
                 hint: str = "give the path of an ordinary file") -> Iterator[IO[bytes]]:
    """The file at `path` opened for binary reading, once it is known to be a regular file of at
    most `max_bytes`; InputFileError otherwise, naming `what` (the option, e.g. '--manifest', or
    what the file is for) and `kind` (what the limit is for, e.g. 'CSV tables').

    OSError (FileNotFoundError, PermissionError) passes through for the caller's own message."""
    fd = os.open(os.fspath(path), _open_flags())
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputFileError(what, path, not_regular_reason(info.st_mode), hint)
        if info.st_size > max_bytes:
            raise InputFileError(what, path, too_large_reason(info.st_size, max_bytes, kind))
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def check_regular(path: str | Path, *, what: str, max_bytes: int, kind: str = "this kind of file",
                  hint: str = "give the path of an ordinary file") -> int:
    """open_regular's checks for a library that opens the path itself; returns the file's size.
    (Opening, not stat(): the same checks on the same object, and a FIFO never blocks.)"""
    with open_regular(path, what=what, max_bytes=max_bytes, kind=kind, hint=hint) as fh:
        return os.fstat(fh.fileno()).st_size


def regular_file_problem(path: str | Path) -> str | None:
    """Why `path` (symlinks followed) cannot be an input file, from stat alone, or None when it is a
    regular file or does not exist. For listing folders without opening every file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else not_regular_reason(mode)


# --------------------------------------------------------------------------- tables
def read_table(path: str | Path, *, what: str, text: bool | Collection[str] = TEXT_COLUMNS,
               max_bytes: int = TABLE_MAX_BYTES, **read_csv: Any) -> Any:
    """A CSV as a pandas DataFrame, opened with open_regular.

    `text`: the columns read as strings where only an empty cell is missing, so class names such
    as None, NA, null, N/A or nan stay themselves (True: every column). Other columns keep pandas'
    usual reading (numbers parse, 'NA' or 'nan' is missing). Extra keyword arguments go to
    pandas.read_csv and win (e.g. na_values=() to keep empty cells as ''). Text cells that
    files.cells marked for spreadsheets ('=x) are read back as written (=x)."""
    import pandas as pd

    with open_regular(path, what=what, max_bytes=max_bytes, kind="CSV tables",
                      hint="give the path of a CSV file") as fh:
        if text is True:
            options: dict[str, Any] = dict(dtype=str, keep_default_na=False, na_values=[""])
        else:
            wanted = {str(c) for c in text}
            header = pd.read_csv(fh, nrows=0).columns if wanted else []
            fh.seek(0)
            texts = [c for c in header if str(c).strip() in wanted]
            # Per-column missing markers (keep_default_na=False + a dict): text columns only "", the
            # others pandas' defaults, so a numeric target column reads as before.
            options = dict(keep_default_na=False,
                           na_values={c: ([""] if c in texts else list(PANDAS_NA_STRINGS)) for c in header},
                           dtype=dict.fromkeys(texts, str)) if texts else {}
        options.update(read_csv)
        # A CSV retinafm wrote has its risky text cells marked for spreadsheets (files.cells): unmarked here.
        return restore_frame(pd.read_csv(fh, **options))


# --------------------------------------------------------------------------- YAML
def load_yaml(path: str | Path, *, what: str, max_bytes: int = CONFIG_MAX_BYTES,
              max_nodes: int = YAML_MAX_NODES) -> Any:
    """A YAML file read with yaml's safe loader, opened with open_regular, after checking that the
    document's aliases expand to at most `max_nodes` nodes (counted on the composed graph, where an
    alias is one shared node, so a billion-laughs document is measured without being expanded).

    Raises InputFileError for a refused file or document, yaml.YAMLError for invalid YAML and
    UnicodeDecodeError for text that is not UTF-8; OSError passes through."""
    import yaml

    with open_regular(path, what=what, max_bytes=max_bytes, kind="YAML settings files",
                      hint="give the path of a YAML file") as fh:
        text = fh.read().decode("utf-8")
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise InputFileError(what, path, "its YAML is nested too deeply to read") from None
        if node is None:
            return None
        size = expanded_size(node, stop_above=max_nodes)
        if size > max_nodes:
            raise InputFileError(what, path, f"its YAML aliases expand to more than {max_nodes:,} values "
                                 "(an alias bomb, or a document that refers to itself)",
                                 "write the settings out without '&' anchors and '*' aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def expanded_size(root: Any, stop_above: int) -> int:
    """The number of nodes of a composed YAML node graph once every alias is expanded, counted with
    one memo entry per node (iteratively: no recursion limit). A cycle counts as unbounded. The
    count stops growing past `stop_above` (returns stop_above + 1)."""
    import yaml

    bound = stop_above + 1
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            sizes[key] = min(bound, 1 + sum(sizes[id(c)] for c in _children(node, yaml)))
            continue
        if key in sizes:
            continue
        if key in on_path:
            return bound  # the node contains itself: expands without end
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node, yaml):
            if id(child) in on_path:
                return bound
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: Any, yaml: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


# --------------------------------------------------------------------------- torch checkpoints
def check_torch_zip(handle: IO[bytes], *, what: str, path: str | Path) -> None:
    """Refuse a zip-format torch checkpoint whose members would inflate far beyond what the file
    holds, from its central directory alone, before torch.load decompresses anything. A file that
    is not a zip (torch's legacy format, anything else) passes: torch.load says what it is."""
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    if not zipfile.is_zipfile(handle):
        handle.seek(0)
        return
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InputFileError(what, path, f"a damaged zip archive, not a checkpoint torch.save wrote ({exc})") from None
    finally:
        handle.seek(0)
    hint = "re-save it with torch.save, or use the file the run or model page gave"
    total = 0
    for member in members:
        if member.compress_size > size:
            raise InputFileError(what, path, f"not a checkpoint torch.save wrote: member {member.filename} claims "
                                 f"{describe_size(member.compress_size)} in a {describe_size(size)} file", hint)
        if member.file_size > ZIP_MAX_INFLATION * member.compress_size + ZIP_SLACK_BYTES:
            raise InputFileError(what, path, f"not a checkpoint torch.save wrote: member {member.filename} inflates "
                                 f"from {describe_size(member.compress_size)} to {describe_size(member.file_size)}",
                                 hint)
        total += member.file_size
    if total > ZIP_MAX_INFLATION * size + ZIP_SLACK_BYTES:
        raise InputFileError(what, path, f"not a checkpoint torch.save wrote: its members inflate from "
                             f"{describe_size(size)} to {describe_size(total)}", hint)


def check_safetensors_header(handle: IO[bytes], *, what: str, path: str | Path) -> None:
    """A .safetensors file starts with an 8-byte little-endian header length and a JSON header of
    that length; refuse a length beyond the file (the library would try to allocate it)."""
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    prefix = handle.read(8)
    handle.seek(0)
    if len(prefix) < 8:
        raise InputFileError(what, path, "not a valid safetensors file (shorter than its 8-byte header)")
    length = int.from_bytes(prefix, "little")
    if length > size - 8 or length > 100 * MiB:
        raise InputFileError(what, path, f"not a valid safetensors file (its header claims {describe_size(length)} "
                             f"in a {describe_size(size)} file)")


__all__ = [
    "CHECKPOINT_MAX_BYTES", "CONFIG_MAX_BYTES", "DICOM_MAX_BYTES", "HEIDELBERG_MAX_BYTES", "IMAGE_MAX_BYTES",
    "TABLE_MAX_BYTES", "TIFF_MAX_BYTES", "YAML_MAX_NODES", "InputFileError", "check_regular",
    "check_safetensors_header", "check_torch_zip", "describe_size", "expanded_size", "load_yaml", "open_regular",
    "read_table", "regular_file_problem",
]
