"""Cells of report.html's tables, shared by the report and each task type's error rows."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

NA = "n/a"
UNBOUNDED = ("mae", "rmse")  # in the targets' units: significant digits, not 3 decimals

# (column headers, [(image path, cells)], a note under the table): one task type's worst errors.
ErrorRows = tuple[list[dict[str, Any]], list[tuple[str, list[dict[str, str]]]], str]


def fmt(metric: str, value: Any) -> str:
    """A metric's value as the report shows it; n/a when missing or undefined."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return NA
    if math.isnan(value):
        return NA
    base = metric.removesuffix("_macro")
    if base == "n":
        return f"{value:.0f}"
    if base in UNBOUNDED or base in ("value", "loss"):
        return f"{value:.4g}"
    return f"{value:.3f}"


def number_cell(text: str) -> dict[str, str]:
    return {"text": text, "cls": "num"}


def prob(row: pd.Series, name: Any) -> float:
    """A predictions row's prob_<name>, NaN when absent or not a number."""
    try:
        return float(row[f"prob_{name}"])
    except (KeyError, TypeError, ValueError):
        return float("nan")
