"""Optuna search through the one fine-tune loop: files, search space, resumable studies."""
from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import optuna
import pandas as pd
import pytest
from helpers import tiny_finetune_config

from retinafm.cli import main
from retinafm.files import OutputExistsError
from retinafm.settings import FinetuneSettings
from retinafm.workflows.finetune import FinetuneResult
from retinafm.workflows.tune import (
    TuneError,
    TuneSettings,
    finetune_command,
    search_space,
    selection_metric,
    trial_config,
    tune,
)


def _tiny(data, out, **overrides):
    return tiny_finetune_config(data, out, **{"epochs": 4, "warmup_epochs": 1, **overrides})


@pytest.mark.slow
def test_three_trials_write_the_study_files_and_never_touch_test(demo_data, tmp_path, capsys):
    study = tmp_path / "study"
    result = tune(_tiny(demo_data, study), TuneSettings(trials=3, tune_epochs=2))
    best = json.loads((study / "optuna_best.json").read_text())
    keys = {"best_value", "best_params", "best_trial", "direction", "selection_metric", "trials", "command"}
    assert keys <= set(best)
    trials = pd.read_csv(study / "trials.csv")
    assert len(trials) == 3 and best["best_trial"] == result.best_trial in set(trials["number"])
    assert best["best_value"] == trials.set_index("number").loc[best["best_trial"], "value"] == result.best_value
    complete = trials[trials["state"] == "COMPLETE"]
    assert best["best_value"] == pytest.approx(complete["value"].max())
    assert best["selection_metric"] == "val_auroc_macro" and best["trials"]["complete"] == len(complete)
    assert (study / "plots" / "optimization_history.png").stat().st_size > 0
    for run in (study / "trials").iterdir():
        names = {p.name for p in run.iterdir()}
        assert {"config.yaml", "log.csv"} <= names
        assert not names & {"metrics_test.json", "predictions_test.csv", "checkpoint-last.pth"}
        assert ("checkpoint-best.pth" in names) == (run.name == f"trial_{result.best_trial:03d}")
    printed = capsys.readouterr().out
    assert all(f"trial {n}: " in printed for n in range(3))  # one line per finished trial
    # The command repeats the best trial at the full epochs, into <study>/best.
    assert result.command == best["command"]
    args = shlex.split(best["command"])
    assert args[:2] == ["retinafm", "finetune"] and args[args.index("--epochs") + 1] == "4"
    assert args[args.index("--out") + 1] == str(study / "best") and "--overwrite" not in args
    assert float(args[args.index("--lr") + 1]) == best["best_params"]["lr"]


def test_search_space_only_holds_what_applies():
    def keys(**cfg):
        trial = optuna.create_study().ask()
        return set(search_space(trial, FinetuneSettings(**cfg)))

    assert keys(adaptation="lp") == {"lr", "weight_decay"}
    assert keys() == {"lr", "weight_decay", "layer_decay", "drop_path"}
    assert keys(task="regression", head="transformer") == {
        "lr", "weight_decay", "layer_decay", "drop_path", "head_dropout", "head_depth", "head_mlp_ratio",
        "head_num_heads", "huber_beta"}
    assert "huber_beta" not in keys(task="regression", loss="mse")
    assert "head_num_heads" not in keys(head="mlp")


def test_trials_are_short_with_the_same_share_of_warmup(tmp_path):
    base = FinetuneSettings(out=str(tmp_path), data_path="d", epochs=50, warmup_epochs=10)
    cfg = trial_config(base, {"lr": 1e-4}, 10, tmp_path / "t")
    assert (cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.out) == (10, 2, 1e-4, str(tmp_path / "t"))
    assert trial_config(base, {}, 1, tmp_path / "t").warmup_epochs == 0


@pytest.mark.slow
def test_a_stored_study_continues_where_it_stopped(demo_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = tmp_path / "study"
    tune(_tiny(demo_data, study, epochs=1, warmup_epochs=0), TuneSettings(trials=2, tune_epochs=1, storage=storage))
    tune(_tiny(demo_data, study, epochs=1, warmup_epochs=0), TuneSettings(trials=3, tune_epochs=1, storage=storage))
    trials = pd.read_csv(study / "trials.csv")
    assert len(trials) == 3 and list(trials["number"]) == [0, 1, 2]
    assert len(list((study / "trials").iterdir())) == 3
    # The continued session does not replay the first session's random draws.
    assert trials["params_lr"][2] not in set(trials["params_lr"][:2])


def test_an_existing_folder_is_not_overwritten(demo_data, tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        tune(_tiny(demo_data, tmp_path / "study"), TuneSettings(trials=1, tune_epochs=1))


def test_the_printed_command_parses_back_to_the_same_settings(tmp_path):
    cfg = FinetuneSettings(out=str(tmp_path / "best dir"), manifest="m.csv", task="regression", targets="age,sbp",
                         head="transformer", head_num_heads=8, lr=0.00012345678901234, layer_decay=0.71,
                         huber_beta=1.5, pos_weight=False, epochs=30)
    other = FinetuneSettings(out="o", data_path="it's here", task="multiclass", adaptation="lp", lp_mode="sgd",
                             lr=0.1 + 0.2, weight_decay=1e-6 * 3, head="mlp", head_dropout=0.30000000000000004,
                             warmup_epochs=3)
    labels = FinetuneSettings(out="o", manifest="m.csv", task="multilabel", labels="a,b", pos_weight=True,
                            threshold="youden", overwrite=True)
    for config in (cfg, other, labels):
        args = shlex.split(finetune_command(config))
        assert args[:2] == ["retinafm", "finetune"] and "--overwrite" not in args and "--resume" not in args
        ctx = main.commands["finetune"].make_context("finetune", args[2:])
        parsed = FinetuneSettings(**{k: v for k, v in ctx.params.items() if k != "resume"})
        assert parsed == dataclasses.replace(config, overwrite=False)
    assert "--pos-weight" in shlex.split(finetune_command(labels))


def test_the_metric_table_matches_the_tasks():
    from retinafm.tasks import MulticlassTask, MultilabelTask, RegressionTask

    assert [selection_metric(t) for t in ("multiclass", "multilabel", "regression")] == [
        "auroc_macro", "auroc_macro", "r2_macro"]
    assert MulticlassTask(("a", "b")).selection_metric == selection_metric("multiclass")
    assert MultilabelTask(("a",)).selection_metric == selection_metric("multilabel")
    assert RegressionTask(("a",)).selection_metric == selection_metric("regression")


def _fake_finetune(scores):
    """A stand-in for finetune: `scores(trial_number, epoch)` is the validation AUROC."""
    def finetune(cfg, *, on_epoch=None, evaluate_test=True):
        assert not evaluate_test and not cfg.resume and cfg.overwrite
        run = Path(cfg.out)
        run.mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "log.csv", "checkpoint-best.pth", "checkpoint-last.pth"):
            (run / name).write_text("x")
        number = int(run.name.split("_")[1])
        for epoch in range(cfg.epochs):
            on_epoch(epoch, {"loss": 1.0, "auroc_macro": scores(number, epoch)})
        return FinetuneResult(run, cfg.epochs - 1, {"auroc_macro": scores(number, cfg.epochs - 1)})

    return finetune


def test_poor_trials_are_pruned_and_lose_their_weights(monkeypatch, tmp_path, capsys):
    # Three good trials set the median; the later, poor ones stop after the pruner's warm-up.
    monkeypatch.setattr("retinafm.workflows.finetune.finetune", _fake_finetune(lambda n, e: 0.9 if n < 3 else 0.1))
    study = tmp_path / "study"
    result = tune(_tiny(None, study, data_path="unused"), TuneSettings(trials=5, tune_epochs=3))
    best = json.loads((study / "optuna_best.json").read_text())
    assert best["trials"] == {"complete": 3, "pruned": 2, "failed": 0} and result.best_trial < 3
    states = pd.read_csv(study / "trials.csv").set_index("number")["state"]
    assert list(states) == ["COMPLETE"] * 3 + ["PRUNED"] * 2
    assert "trial 4: pruned" in capsys.readouterr().out
    kept = sorted(p.parent.name for p in study.glob("trials/*/checkpoint*.pth"))
    assert kept == [f"trial_{result.best_trial:03d}"] and (study / "trials" / "trial_004" / "log.csv").is_file()


def test_nan_trials_fail_and_the_search_goes_on(monkeypatch, tmp_path):
    nan = float("nan")
    fake = _fake_finetune(lambda n, e: nan if n == 0 else 0.5 + n / 10)
    monkeypatch.setattr("retinafm.workflows.finetune.finetune", fake)
    result = tune(_tiny(None, tmp_path / "s", data_path="unused"), TuneSettings(trials=3, tune_epochs=1))
    assert result.best_trial == 2 and result.best_value == pytest.approx(0.7)
    best = json.loads((tmp_path / "s" / "optuna_best.json").read_text())
    assert best["trials"] == {"complete": 2, "pruned": 0, "failed": 1}


def test_no_completed_trial_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("retinafm.workflows.finetune.finetune", _fake_finetune(lambda n, e: float("nan")))
    study = tmp_path / "s"
    with pytest.raises(TuneError, match="pruned or failed.*trials.csv") as err:
        tune(_tiny(None, study, data_path="unused"), TuneSettings(trials=2, tune_epochs=1))
    assert isinstance(err.value, ValueError)  # the CLI reports it as one line
    assert list(pd.read_csv(study / "trials.csv")["state"]) == ["FAIL", "FAIL"]
    assert not list(study.glob("trials/*/checkpoint*.pth"))


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
