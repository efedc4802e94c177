"""retinafm label-efficiency: stratified subsets, the study's table and plot, bad options."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_finetune_config

from retinafm.data.sources import DataSourceError
from retinafm.settings import ConfigError
from retinafm.workflows.label_efficiency import (
    label_efficiency,
    parse_fractions,
    stratified_subset,
)


def test_subsets_keep_each_class_fraction_and_are_seeded():
    strata = np.repeat([0, 1, 2], [100, 40, 3])
    subset = stratified_subset(strata, 0.25, seed=0)
    assert np.bincount(strata[subset]).tolist() == [25, 10, 1]  # every class kept, even the rare one
    assert len(set(subset)) == len(subset) and np.all(np.diff(subset) > 0)
    np.testing.assert_array_equal(subset, stratified_subset(strata, 0.25, seed=0))
    assert not np.array_equal(subset, stratified_subset(strata, 0.25, seed=1))
    np.testing.assert_array_equal(stratified_subset(strata, 1.0, seed=3), np.arange(len(strata)))


def test_fractions_are_parsed_sorted_and_checked():
    assert parse_fractions("0.5, 0.05,1,0.5") == [0.05, 0.5, 1.0]
    for bad in ("0,0.5", "1.5", "ten", ""):
        with pytest.raises(ConfigError, match="--fractions"):
            parse_fractions(bad)


def test_linear_probe_study_writes_table_runs_and_plot(demo_data, tmp_path):
    cfg = tiny_finetune_config(demo_data, tmp_path / "study", adaptation="lp")
    label_efficiency(cfg, [0.25, 1.0], seeds=2, quiet=True)
    runs = pd.read_csv(tmp_path / "study" / "label_efficiency_runs.csv")
    assert list(runs.columns[:5]) == ["fraction", "seed", "n_train", "strength", "auroc_macro"]
    assert len(runs) == 4
    summary = pd.read_csv(tmp_path / "study" / "label_efficiency.csv")
    assert list(summary.columns) == ["fraction", "n_train", "mean", "sd", "seeds"]
    assert summary["n_train"].tolist() == [18, 72]  # 24 per class: 6 and 24 of each
    full = runs[runs["fraction"] == 1.0]["auroc_macro"]
    assert summary.loc[1, "sd"] == 0.0 and full.nunique() == 1  # the whole train split: the same probe twice
    np.testing.assert_allclose(summary.loc[0, "mean"], runs[runs["fraction"] == 0.25]["auroc_macro"].mean())
    assert summary.loc[1, "mean"] > 0.6
    assert (tmp_path / "study" / "label_efficiency.png").stat().st_size > 10_000
    assert (tmp_path / "study" / "embeddings.parquet").is_file()


def test_finetune_study_trains_one_run_per_point(demo_data, tmp_path):
    cfg = tiny_finetune_config(demo_data, tmp_path / "study", epochs=1, warmup_epochs=0)
    result = label_efficiency(cfg, [0.5], seeds=1, quiet=True)
    assert result.runs["n_train"].tolist() == [36]
    subset = pd.read_csv(tmp_path / "study" / "subsets" / "fraction_0.5_seed_0.csv")
    assert (subset["split"] == "train").sum() == 36 and (subset["split"] == "test").sum() == 24
    assert (tmp_path / "study" / "fraction_0.5_seed_0" / "metrics_test.json").is_file()


def test_study_needs_val_and_test_and_a_known_metric(demo_data, tmp_path):
    no_val = tmp_path / "no_val"
    shutil.copytree(demo_data, no_val)
    shutil.rmtree(no_val / "val")
    with pytest.raises(DataSourceError, match="no validation split"):
        label_efficiency(tiny_finetune_config(no_val, tmp_path / "a", adaptation="lp"), [1.0], quiet=True)
    with pytest.raises(ConfigError, match="--metric 'dice' is not reported"):
        label_efficiency(tiny_finetune_config(demo_data, tmp_path / "b", adaptation="lp"), [1.0], 1, metric="dice",
                         quiet=True)
    with pytest.raises(ConfigError, match="--seeds must be at least 1"):
        label_efficiency(tiny_finetune_config(demo_data, tmp_path / "c", adaptation="lp"), [1.0], 0, quiet=True)
