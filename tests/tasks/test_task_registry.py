"""A task type is one class plus its entry in tasks.TASKS: settings checks, manifest reading and
report.html pick up a new one without edits elsewhere."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest

from retinafm.data.sources import DataSourceError, TargetColumns, load_labelled
from retinafm.settings import ConfigError, FinetuneSettings
from retinafm.tasks import TASKS, check_settings, get_task, make_task
from retinafm.tasks.base import TaskSetting, VectorTargetTask
from retinafm.workflows.report import write_report


@dataclass(frozen=True)
class LesionCountTask(VectorTargetTask):
    """A toy fourth task type: per lesion type, a count of 0, 1 or 2 lesions."""

    output_names: tuple[str, ...]
    name: str = "lesion_count"
    selection_metric: str = "mae_macro"

    targets = TargetColumns("lesion_count", "--targets", "lesion count", "0, 1 or 2 (or empty for unknown)",
                            strata=lambda values: [0] * len(values),
                            summarise=lambda grouped: grouped.sum().astype(int), allowed=(0, 1, 2))
    own_settings = (TaskSetting(lambda s: s.huber_beta != 1.0, "--huber-beta is not a lesion_count setting"),)
    report_headline = ("mae_macro", "n")
    output_kind = "lesion type"

    @staticmethod
    def error_rows(frame: pd.DataFrame, outputs: list[str], metrics: dict[str, Any], limit: int):
        rows = [(str(path), [{"text": "miscounted"}]) for path in frame["path"][:limit]]
        return [{"name": "what"}], rows, f"{len(rows)} toy error rows."


@pytest.fixture
def toy_task(monkeypatch):
    monkeypatch.setitem(TASKS, "lesion_count", LesionCountTask)
    return LesionCountTask


def test_registry_names_and_unknown_task(toy_task):
    assert get_task("lesion_count") is toy_task
    assert make_task("lesion_count", ["ma", "he"]).output_names == ("ma", "he")
    with pytest.raises(ConfigError, match="--task must be one of multiclass, multilabel, regression, lesion_count"):
        get_task("segmentation")


def test_settings_checks_come_from_the_task_types(toy_task):
    def check(**changes):
        check_settings(FinetuneSettings(**{"out": "run", "task": "lesion_count", "manifest": "m.csv", **changes}))

    check()  # nothing another task type owns: accepted
    with pytest.raises(ConfigError, match="--task lesion_count reads its labels or targets from a CSV"):
        check(manifest=None, data_path="folder")
    # Settings the other task types own are refused with their own messages ...
    with pytest.raises(ConfigError, match="--pos-weight applies to --task multilabel"):
        check(pos_weight=True)
    with pytest.raises(ConfigError, match="--labels applies to --task multilabel"):
        check(labels="ma")
    with pytest.raises(ConfigError, match="--mixup/--cutmix apply to --task multiclass only"):
        check(mixup=0.8)
    # ... and the toy type's own setting is refused for the built-in ones.
    with pytest.raises(ConfigError, match="--huber-beta is not a lesion_count setting"):
        check_settings(FinetuneSettings(out="run", task="regression", manifest="m.csv", huber_beta=2.0))


def test_manifest_reading_uses_the_task_reader(toy_task, tmp_path):
    csv = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "split": ["train", "val", "test"],
                  "ma": [0, 2, ""], "he": [1, 1, 0]}).to_csv(csv, index=False)
    data = load_labelled(manifest=str(csv), targets=get_task("lesion_count").targets)
    assert data.class_names == ["ma", "he"]
    assert data.samples[0].targets == (0.0, 1.0) and np.isnan(data.samples[2].targets[0])
    assert data.counts().loc["val", "ma"] == 2  # the toy reader's summary: the sum per split
    pd.DataFrame({"path": ["a.png"], "split": ["train"], "ma": [3], "he": [1]}).to_csv(csv, index=False)
    with pytest.raises(DataSourceError, match=r"column 'ma' must hold 0, 1 or 2 \(or empty for unknown\)"):
        load_labelled(manifest=str(csv), targets=get_task("lesion_count").targets)
    with pytest.raises(DataSourceError, match="--task lesion_count needs a --manifest CSV"):
        load_labelled(data_path=str(tmp_path), targets=get_task("lesion_count").targets)


def test_report_headline_and_error_rows_come_from_the_task(toy_task, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    metrics = {"mae_macro": 0.25, "n": 2.0, "auroc_macro": 0.9, "mae_ma": 0.5, "mae_he": 0.0,
               "task": {"name": "lesion_count", "outputs": ["ma", "he"], "state": {}}}
    (run / "metrics_test.json").write_text(json.dumps(metrics), encoding="utf-8")
    pd.DataFrame({"path": ["x.png", "y.png"], "ma": [0.1, 1.9], "he": [1.0, 0.0]}).to_csv(
        run / "predictions_test.csv", index=False)
    html = write_report(run, "test").read_text(encoding="utf-8")
    table = html[html.index('<table id="metrics">'):]
    table = table[:table.index("</table>")]
    assert "mae_macro" in table and "auroc_macro" not in table  # the toy headline, not multiclass's
    assert "lesion type" in html  # what one output is called
    assert "2 toy error rows." in html and "miscounted" in html
