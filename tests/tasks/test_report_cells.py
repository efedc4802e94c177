"""report_cells: how report.html writes a metric's value (shared by the report and the tasks' error rows)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from retinafm.tasks.report_cells import NA, fmt, number_cell, prob


@pytest.mark.parametrize("metric,value,text", [
    ("auroc_macro", 0.91234, "0.912"),  # bounded metrics: three decimals
    ("kappa", -0.05, "-0.050"),
    ("n", 24.0, "24"),
    ("mae_macro", 1234.5678, "1235"),  # in the targets' units: four significant digits
    ("rmse", 0.000123456, "0.0001235"),
    ("loss", 0.5, "0.5"),
    ("auroc", math.nan, NA),  # undefined (a class absent from the set)
    ("auroc", None, NA),
    ("auroc", "not a number", NA),
])
def test_metric_values_as_the_report_shows_them(metric, value, text):
    assert fmt(metric, value) == text


def test_probability_cells():
    row = pd.Series({"path": "a.png", "prob_dr": "0.25", "prob_bad": "x"})
    assert prob(row, "dr") == 0.25
    assert math.isnan(prob(row, "bad")) and math.isnan(prob(row, "absent"))
    assert number_cell("0.912") == {"text": "0.912", "cls": "num"}
