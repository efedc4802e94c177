from __future__ import annotations

import pytest

from retinafm.config import ConfigError, FinetuneConfig, read_yaml_settings, to_dict


def test_defaults_follow_retfound():
    cfg = FinetuneConfig()
    assert (cfg.epochs, cfg.blr, cfg.layer_decay, cfg.weight_decay, cfg.drop_path, cfg.warmup_epochs,
            cfg.smoothing, cfg.mixup, cfg.cutmix) == (50, 5e-3, 0.65, 0.05, 0.2, 10, 0.1, 0.0, 0.0)


def test_yaml_round_trip_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nbatch-size: 8\nmodel: vit_tiny_patch16\n")
    settings = read_yaml_settings(path)
    assert settings == {"epochs": 3, "batch_size": 8, "model": "vit_tiny_patch16"}
    cfg = FinetuneConfig(**{**to_dict(FinetuneConfig()), **settings})
    assert cfg.batch_size == 8
    path.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown setting.*epoch"):
        read_yaml_settings(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml_settings(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml_settings(tmp_path / "none.yaml")


@pytest.mark.parametrize("changes,message", [
    ({"out": ""}, "--out is required"),
    ({"data_path": None}, "exactly one of --data-path"),
    ({"manifest": "m.csv"}, "exactly one of --data-path"),
    ({"adaptation": "full"}, "--adaptation"),
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"warmup_epochs": 99}, "--warmup-epochs"),
    ({"smoothing": 1.5}, "--smoothing"),
    ({"global_pool": "max"}, "--global-pool"),
    ({"device": "tpu"}, "--device"),
])
def test_validation_names_the_option(changes, message):
    cfg = FinetuneConfig(**{"out": "run", "data_path": "data", **changes})
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
