"""The text cells of the CSV files people open in a spreadsheet.

Excel, LibreOffice and Google Sheets run a cell that starts with `=`, `+`, `-` or `@` (or a tab or
carriage return before one) as a formula, so an image named `=HYPERLINK("http://x", "open").png`, or a
class label read from someone else's manifest, would become a live formula in a clinician's
spreadsheet (CSV injection). Every CSV the toolkit writes goes through `protect_frame`:

- Paths stay exact for programs: a relative path that starts with such a character is written as
  `./=name.png`, the same file to pandas, `open()` and the toolkit, and plain text to a spreadsheet.
  Absolute paths start with `/` and need nothing.
- Any other text cell that starts with such a character, and is not a plain number (`-1`, `+0.5`
  stay numbers), gets a leading apostrophe, the mark spreadsheets use for "this is text":
  `=SUM(A1)` is written `'=SUM(A1)`. Column names (class and target names) are treated alike.

The toolkit's own readers (`restore_frame`, used by files.inputs) take the apostrophe off again, so a
label round-trips exactly through `split`, `embed`, `probe` and `compare`; other programs reading
these CSVs see the apostrophe and can strip it the same way (a text cell `'` + one of `=+-@`).
"""
from __future__ import annotations

import re
from collections.abc import Callable

import pandas as pd

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_PROTECTED = re.compile(r"^'[=+\-@\t\r]")


def is_path_column(name: object) -> bool:
    return isinstance(name, str) and (name == "path" or name.endswith("_path"))


def protect_cell(value: object, *, path: bool = False) -> object:
    """`value` as a spreadsheet shows it as text; anything but a risky string is returned as it is."""
    if not isinstance(value, str) or not value.startswith(TRIGGERS):
        return value
    if path:
        return "./" + value
    if _NUMBER.match(value.strip()):
        return value
    return "'" + value


def restore_cell(value: object) -> object:
    """The inverse of protect_cell for a text cell (a path written as ./=x is already the same file)."""
    if isinstance(value, str) and _PROTECTED.match(value):
        return value[1:]
    return value


def protect_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` whose text cells and column names a spreadsheet will not run (the frame itself
    is returned when nothing needs protecting, the usual case)."""
    return _map_text(frame, lambda v: isinstance(v, str) and v.startswith(TRIGGERS),
                     lambda v, column: protect_cell(v, path=is_path_column(column)))


def restore_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A CSV the toolkit wrote, read back: the apostrophes protect_frame added taken off again."""
    return _map_text(frame, lambda v: isinstance(v, str) and bool(_PROTECTED.match(v)),
                     lambda v, _column: restore_cell(v))


def _map_text(frame: pd.DataFrame, risky: Callable[[object], bool],
              convert: Callable[[object, object], object]) -> pd.DataFrame:
    """`convert(value, column)` applied to the column names and to the text columns holding a `risky`
    cell; `frame` itself when nothing changes (no copy of a frame with nothing to protect)."""
    columns = [convert(c, None) if risky(c) else c for c in frame.columns]
    changed = {}
    for name in frame.columns:
        column = frame[name]
        if (column.dtype == object or pd.api.types.is_string_dtype(column.dtype)) and column.map(risky).any():
            changed[name] = column.map(lambda v, name=name: convert(v, name) if risky(v) else v)
    if not changed and columns == list(frame.columns):
        return frame
    out = frame.copy()
    for name, values in changed.items():
        out[name] = values
    out.columns = columns
    return out
