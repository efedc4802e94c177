"""Optuna search through the one fine-tune loop: files, search space, resumable studies."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import optuna
import pandas as pd
import pytest

from conftest import tiny_finetune_config
from retinafm.cli import main
from retinafm.config import FinetuneConfig
from retinafm.files import OutputExistsError
from retinafm.hpo import TuneSettings, finetune_command, search_space, trial_config, tune


def _tiny(data, out, **overrides):
    return tiny_finetune_config(data, out, **{"epochs": 4, "warmup_epochs": 1, **overrides})


def test_three_trials_write_the_study_files_and_never_touch_test(demo_data, tmp_path, capsys):
    study = tmp_path / "study"
    result = tune(_tiny(demo_data, study), TuneSettings(trials=3, tune_epochs=2))
    best = json.loads((study / "optuna_best.json").read_text())
    trials = pd.read_csv(study / "trials.csv")
    assert len(trials) == 3 and best["best_trial"] == result.best_trial in set(trials["number"])
    complete = trials[trials["state"] == "COMPLETE"]
    assert best["best_value"] == pytest.approx(complete["value"].max())
    assert best["selection_metric"] == "val_auroc_macro" and best["trials"]["complete"] == len(complete)
    assert (study / "plots" / "optimization_history.png").stat().st_size > 0
    for run in (study / "trials").iterdir():
        names = {p.name for p in run.iterdir()}
        assert {"config.yaml", "log.csv"} <= names
        assert not names & {"metrics_test.json", "predictions_test.csv", "checkpoint-last.pth"}
        assert ("checkpoint-best.pth" in names) == (run.name == f"trial_{result.best_trial:03d}")
    # The printed command repeats the best trial at the full epochs.
    assert result.command in capsys.readouterr().out or result.command == best["command"]
    args = shlex.split(best["command"])
    assert args[:2] == ["retinafm", "finetune"] and args[args.index("--epochs") + 1] == "4"
    assert float(args[args.index("--lr") + 1]) == best["best_params"]["lr"]


def test_search_space_only_holds_what_applies():
    def keys(**cfg):
        trial = optuna.create_study().ask()
        return set(search_space(trial, FinetuneConfig(**cfg)))

    assert keys(adaptation="lp") == {"lr", "weight_decay"}
    assert keys() == {"lr", "weight_decay", "layer_decay", "drop_path"}
    assert keys(task="regression", head="transformer") == {
        "lr", "weight_decay", "layer_decay", "drop_path", "head_dropout", "head_depth", "head_mlp_ratio",
        "head_num_heads", "huber_beta"}
    assert "huber_beta" not in keys(task="regression", loss="mse")
    assert "head_num_heads" not in keys(head="mlp")


def test_trials_are_short_with_the_same_share_of_warmup(tmp_path):
    base = FinetuneConfig(out=str(tmp_path), data_path="d", epochs=50, warmup_epochs=10)
    cfg = trial_config(base, {"lr": 1e-4}, 10, tmp_path / "t")
    assert (cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.out) == (10, 2, 1e-4, str(tmp_path / "t"))
    assert trial_config(base, {}, 1, tmp_path / "t").warmup_epochs == 0


def test_a_stored_study_continues_where_it_stopped(demo_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = tmp_path / "study"
    tune(_tiny(demo_data, study, epochs=1, warmup_epochs=0), TuneSettings(trials=2, tune_epochs=1, storage=storage))
    tune(_tiny(demo_data, study, epochs=1, warmup_epochs=0), TuneSettings(trials=3, tune_epochs=1, storage=storage))
    assert len(pd.read_csv(study / "trials.csv")) == 3
    assert len(list((study / "trials").iterdir())) == 3


def test_an_existing_folder_is_not_overwritten(demo_data, tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        tune(_tiny(demo_data, tmp_path / "study"), TuneSettings(trials=1, tune_epochs=1))


def test_the_printed_command_parses_back_to_the_same_settings(tmp_path):
    cfg = FinetuneConfig(out=str(tmp_path / "best dir"), manifest="m.csv", task="regression", targets="age,sbp",
                         head="transformer", head_num_heads=8, lr=0.00012345678901234, layer_decay=0.71,
                         huber_beta=1.5, pos_weight=False, epochs=30)
    args = shlex.split(finetune_command(cfg))[2:]
    ctx = main.commands["finetune"].make_context("finetune", args)
    parsed = FinetuneConfig(**{k: v for k, v in ctx.params.items() if k != "resume"})
    assert parsed == cfg


def test_tune_command_line(demo_data, tmp_path):
    from click.testing import CliRunner

    args = ["tune", "--data-path", str(demo_data), "--model", "vit_micro_patch8", "--weights", "none",
            "--input-size", "32", "--epochs", "3", "--warmup-epochs", "0", "--randaug-magnitude", "0", "--reprob", "0",
            "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "s"), "--trials", "3",
            "--tune-epochs", "2"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "reproduce the best trial at full epochs with:" in res.output and "retinafm finetune" in res.output
    assert {"optuna_best.json", "trials.csv", "plots", "trials"} <= {p.name for p in (tmp_path / "s").iterdir()}
