"""`retinafm tune`: Optuna search over any task, driving the one fine-tune loop.

Each trial is an ordinary fine-tuning run (its own run directory under `<study>/trials/`) with
some settings drawn by Optuna's TPE sampler; the median pruner stops trials whose validation
metric falls behind after their early epochs. Trials never evaluate the test split: picking
settings on it would leak it into the result.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from retinafm.engine.loop import NonFiniteLossError
from retinafm.files import atomic_path, claim_dir, write_csv, write_json
from retinafm.files.outputs import STUDY_OUTPUTS
from retinafm.settings import ConfigError, FinetuneSettings, flag_text, setting
from retinafm.settings.base import EPOCHS
from retinafm.tasks import check_settings, get_task


def selection_metric(task: str) -> str:
    """The validation metric a `task` run picks its best epoch by: the search's objective. Read
    from the task class (a dataclass default), since the epoch callback needs it before
    finetune() returns its result."""
    return get_task(task).selection_metric


class TuneError(ValueError):
    """A search that cannot run or produced no usable trial."""


@dataclass
class TuneSettings:
    trials: int = setting(20, bounds=(1, 100_000))
    tune_epochs: int = setting(10, **EPOCHS)
    direction: str = "maximize"
    storage: str | None = None  # e.g. sqlite:///study.db: the study can be continued
    study_name: str | None = None  # default: the study folder's name
    timeout: float | None = setting(None, bounds=(0, None))  # seconds after which no new trial starts


@dataclass
class TuneResult:
    out: Path
    best_value: float
    best_params: dict[str, Any]
    best_trial: int
    command: str
    files: dict[str, Path] = field(default_factory=dict)


def search_space(trial: optuna.Trial, cfg: FinetuneSettings) -> dict[str, Any]:
    """The settings of one trial: only those that act on this configuration."""
    params: dict[str, Any] = {
        "lr": trial.suggest_float("lr", 5e-5, 5e-3, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 0.1, log=True),
    }
    if cfg.adaptation == "finetune":  # a linear probe has no backbone to decay or drop
        params["layer_decay"] = trial.suggest_float("layer_decay", 0.4, 0.95)
        params["drop_path"] = trial.suggest_float("drop_path", 0.0, 0.4)
    if cfg.head in ("mlp", "transformer"):  # the linear head has no dropout, depth or width
        params["head_dropout"] = trial.suggest_float("head_dropout", 0.0, 0.5)
        params["head_depth"] = trial.suggest_int("head_depth", 1, 4)
        params["head_mlp_ratio"] = trial.suggest_float("head_mlp_ratio", 1.0, 4.0)
    if cfg.head == "transformer":
        params["head_num_heads"] = trial.suggest_categorical("head_num_heads", [2, 4, 8])
    params.update(get_task(cfg.task).search_space(trial, cfg))
    return params


def trial_config(base: FinetuneSettings, params: dict[str, Any], epochs: int, out: Path) -> FinetuneSettings:
    """`base` with a trial's settings, shortened to `epochs` with the same share of warmup."""
    warmup = min(round(base.warmup_epochs * epochs / base.epochs), epochs - 1) if base.epochs else 0
    # Trials train by epochs (pruned on validation): a probe searched this way is RETFound's SGD probe.
    return dataclasses.replace(base, **params, lp_mode="sgd", epochs=epochs, warmup_epochs=max(0, warmup), out=str(out),
                               resume=False, overwrite=True)


def tune(base: FinetuneSettings, settings: TuneSettings) -> TuneResult:
    """Run (or continue, with storage) a study; write its summary files into `base.out`."""
    from retinafm.workflows.finetune import training_inputs

    base.validate()
    check_settings(base)
    if settings.trials < 1 or settings.tune_epochs < 1:
        raise ConfigError("--trials and --tune-epochs must be at least 1")
    if settings.direction not in ("maximize", "minimize"):
        raise ConfigError(f"--direction must be maximize or minimize, not {settings.direction!r}")
    out = Path(base.out)
    name = settings.study_name or out.resolve().name
    # A study already in --storage is continued in its folder; anything else needs an empty --out.
    continued = out.is_dir() and any(out.iterdir()) and _study_exists(name, settings.storage)
    with claim_dir(out, overwrite=base.overwrite, resume=continued, inputs=training_inputs(base),
                   results=("trials.csv",), outputs=STUDY_OUTPUTS) as claim:
        result = _tune(base, settings, out, name)
        claim.remove_stale()
    return result


def _tune(base: FinetuneSettings, settings: TuneSettings, out: Path, name: str) -> TuneResult:
    from retinafm.workflows.finetune import finetune

    metric = selection_metric(base.task)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed instead
    study = _open_study(out, name, base, settings)
    finished = [t for t in study.trials if t.state.is_finished()]
    remaining = settings.trials - len(finished)
    if finished:
        print(f"continuing study {study.study_name!r}: {len(finished)} trial(s) done, {max(0, remaining)} to run")

    def objective(trial: optuna.Trial) -> float:
        cfg = trial_config(base, search_space(trial, base), settings.tune_epochs,
                           out / "trials" / f"trial_{trial.number:03d}")
        cfg.validate()

        def report(epoch: int, val: dict[str, float]) -> None:
            value = val.get(metric, float("nan"))
            if math.isfinite(value):
                trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation {metric} {value:.4f} below the median at epoch {epoch + 1}")

        try:
            result = finetune(cfg, on_epoch=report, evaluate_test=False)
        finally:  # pruned or finished, a trial is never resumed
            _drop_checkpoints(Path(cfg.out), keep_best=True)
            _free_memory()  # a pruned trial's model and loader workers go before the next starts
        # NaN (e.g. AUROC undefined on every epoch) makes Optuna mark the trial failed, not best.
        return float(result.best_val.get(metric, float("nan")))

    if remaining > 0:
        # A diverging trial (too high an lr) fails alone; bad data or settings stop the search.
        study.optimize(objective, n_trials=remaining, timeout=settings.timeout, callbacks=[_trial_printer(metric)],
                       catch=(NonFiniteLossError,))
    return _write_summary(study, base, settings, metric)


def _open_study(out: Path, name: str, base: FinetuneSettings, settings: TuneSettings) -> optuna.Study:
    # Pruning waits for 3 complete trials (the median of 2 is their mean, one lucky trial would set
    # the bar) and never judges a trial during its lr warmup or the first third of its epochs, when
    # every setting still looks poor. With 3 trials x 2 epochs nothing is pruned, and that is right.
    warmup = trial_config(base, {}, settings.tune_epochs, out).warmup_epochs
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3,
                                         n_warmup_steps=max(1, warmup, settings.tune_epochs // 3))
    study = optuna.create_study(study_name=name, storage=settings.storage, direction=settings.direction,
                                pruner=pruner, load_if_exists=True)
    # TPE's first trials are random draws from its seeded generator: a continued study seeded
    # like the first session would repeat the first session's trials, so the seed moves on with
    # the number of trials already run (a new study still uses --seed itself).
    study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials))
    return study


def _study_exists(name: str, storage: str | None) -> bool:
    if not storage:
        return False
    try:
        optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return False
    return True


def _trial_printer(metric: str):
    def say(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """One line per finished trial (Optuna's own log is at WARNING)."""
        shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in trial.params.items()}
        value = "" if trial.value is None else f" val_{metric} {trial.value:.4f}"
        print(f"trial {trial.number}: {trial.state.name.lower()}{value}  {shown}", flush=True)

    return say


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _drop_checkpoints(run: Path, keep_best: bool) -> None:
    """Trials keep their config, log and plots; weights only matter for the best one."""
    (run / "checkpoint-last.pth").unlink(missing_ok=True)
    if not keep_best:
        (run / "checkpoint-best.pth").unlink(missing_ok=True)


def _write_summary(study: optuna.Study, base: FinetuneSettings, settings: TuneSettings, metric: str) -> TuneResult:
    out = Path(base.out)
    states = pd.Series([t.state.name for t in study.trials]).value_counts().to_dict()
    files = {"trials": write_csv(out / "trials.csv", study.trials_dataframe())}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        for trial in study.trials:  # no trial's weights are worth keeping
            _drop_checkpoints(out / "trials" / f"trial_{trial.number:03d}", keep_best=False)
        raise TuneError(f"no trial completed: all {len(study.trials)} were pruned or failed "
                        f"({states.get('PRUNED', 0)} pruned, {states.get('FAIL', 0)} failed); see {files['trials']} "
                        f"and each trial's log.csv under {out / 'trials'}")
    best = study.best_trial
    for trial in study.trials:  # only the best trial's weights are worth their disk space
        if trial.number != best.number:
            _drop_checkpoints(out / "trials" / f"trial_{trial.number:03d}", keep_best=False)
    best_cfg = trial_config(base, best.params, base.epochs, out / "best")
    best_cfg = dataclasses.replace(best_cfg, warmup_epochs=base.warmup_epochs, overwrite=False)
    command = finetune_command(best_cfg)
    files["best"] = write_json(out / "optuna_best.json", {
        "best_value": best.value, "best_params": best.params, "best_trial": best.number,
        "selection_metric": f"val_{metric}", "direction": settings.direction, "tune_epochs": settings.tune_epochs,
        "trials": {"complete": states.get("COMPLETE", 0), "pruned": states.get("PRUNED", 0),
                   "failed": states.get("FAIL", 0)},
        "best_run": str(out / "trials" / f"trial_{best.number:03d}"), "command": command,
    })
    files["history"] = _plot_history(study, out / "plots" / "optimization_history.png", metric)
    return TuneResult(out, float(best.value), dict(best.params), best.number, command, files)


def _plot_history(study: optuna.Study, path: Path, metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    # Optuna switches matplotlib to its ggplot style globally; keep that inside this figure.
    with warnings.catch_warnings(), plt.style.context("default"):
        # Optuna flags its matplotlib backend as experimental; the plot is what we want.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_optimization_history(study, target_name=f"validation {metric}")
    figure = ax.figure
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def finetune_command(cfg: FinetuneSettings) -> str:
    """The `retinafm finetune` command line for `cfg`: the data source, --out and every setting
    that differs from the default, shell-quoted."""
    defaults = FinetuneSettings()
    parts = ["retinafm", "finetune"]
    for f in dataclasses.fields(FinetuneSettings):
        value = getattr(cfg, f.name)
        if f.name in ("resume", "overwrite") or value is None:
            continue
        if value == getattr(defaults, f.name) and f.name not in ("out", "data_path", "manifest"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                parts.append(flag)
            continue
        parts += [flag, flag_text(value)]
    return " ".join(shlex.quote(p) for p in parts)
