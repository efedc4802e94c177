from __future__ import annotations

import pytest

from retinafm.settings import ConfigError, FinetuneSettings, read_yaml_settings, to_dict
from retinafm.tasks import check_settings


def test_defaults_follow_retfound():
    cfg = FinetuneSettings()
    assert (cfg.epochs, cfg.blr, cfg.layer_decay, cfg.weight_decay, cfg.drop_path, cfg.warmup_epochs,
            cfg.smoothing, cfg.mixup, cfg.cutmix) == (50, 5e-3, 0.65, 0.05, 0.2, 10, 0.1, 0.0, 0.0)


def test_yaml_round_trip_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nbatch-size: 8\nmodel: vit_tiny_patch16\n")
    settings = read_yaml_settings(path, FinetuneSettings)
    assert settings == {"epochs": 3, "batch_size": 8, "model": "vit_tiny_patch16"}
    cfg = FinetuneSettings(**{**to_dict(FinetuneSettings()), **settings})
    assert cfg.batch_size == 8
    path.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown setting.*epoch"):
        read_yaml_settings(path, FinetuneSettings)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml_settings(path, FinetuneSettings)
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml_settings(tmp_path / "none.yaml", FinetuneSettings)


@pytest.mark.parametrize("changes,message", [
    ({"out": ""}, "--out is required"),
    ({"data_path": None}, "exactly one of --data-path"),
    ({"manifest": "m.csv"}, "exactly one of --data-path"),
    ({"adaptation": "full"}, "--adaptation"),
    ({"epochs": 0}, "--epochs must be between 1 and 100,000, got 0"),
    ({"warmup_epochs": 99}, "--warmup-epochs"),
    ({"smoothing": 1.5}, "--smoothing"),
    ({"layer_decay": -1.0}, r"--layer-decay must be in \(0, 1\]"),
    ({"layer_decay": 0.0}, r"--layer-decay must be in \(0, 1\]"),
    ({"global_pool": "max"}, "--global-pool"),
    ({"device": "tpu"}, "--device"),
    ({"task": "segmentation"}, "--task must be one of multiclass, multilabel, regression"),
    ({"task": "regression"}, "--task regression reads its labels or targets from a CSV: give --manifest"),
    ({"labels": "drusen"}, "--labels applies to --task multilabel"),
    ({"targets": "age"}, "--targets applies to --task regression"),
    ({"head": "conv"}, "--head must be one of linear, mlp, transformer"),
    ({"head_depth": 0}, "--head-depth must be between 1 and 64, got 0"),
    ({"head_dropout": 1.0}, "--head-dropout must be in"),
    ({"loss": "huber"}, "--loss applies to --task regression"),
    ({"huber_beta": 0.0}, "--huber-beta must be positive"),
    ({"pos_weight": True}, "--pos-weight applies to --task multilabel"),
    ({"threshold": "0.3"}, "--threshold applies to --task multilabel"),
    ({"data_path": None, "manifest": "m.csv", "task": "multilabel", "threshold": "1.5"},
     r"--threshold must be in \(0, 1\)"),
    ({"data_path": None, "manifest": "m.csv", "task": "multilabel", "threshold": "best"}, "or 'youden'"),
    ({"data_path": None, "manifest": "m.csv", "task": "regression", "mixup": 0.8}, "--mixup/--cutmix apply to"),
])
def test_validation_names_the_option(changes, message):
    cfg = FinetuneSettings(**{"out": "run", "data_path": "data", **changes})
    with pytest.raises(ConfigError, match=message):
        cfg.validate()  # the settings' own checks, then those of the task type (as finetune runs them)
        check_settings(cfg)


def test_task_columns_and_thresholds():
    cfg = FinetuneSettings(out="r", manifest="m.csv", task="multilabel", labels=" drusen, srf ,", threshold="youden")
    cfg.validate()
    check_settings(cfg)
    assert cfg.names_list() == ["drusen", "srf"] and cfg.threshold_value() is None
    assert FinetuneSettings(out="r", manifest="m.csv", task="multilabel").threshold_value() == 0.5
    with pytest.raises(ConfigError, match="lists a column twice"):
        FinetuneSettings(out="r", manifest="m.csv", task="regression", targets="age,age").names_list()
