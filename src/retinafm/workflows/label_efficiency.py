"""`retinafm label-efficiency`: test performance against the number of labelled training images.

The analysis foundation-model papers publish (RETFound, RETFound-Green, ...): train on
class-stratified subsets of the train split (fractions x seeds; validation and test unchanged)
and plot the test metric's mean +- sd over seeds against the training set size. With the linear
probe (default) every image is embedded once and each point takes seconds; with full
fine-tuning each point is a `finetune` run.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from retinafm.data.sources import DataSourceError, load_labelled
from retinafm.files import claim_dir, write_csv, write_yaml
from retinafm.files.outputs import LABEL_EFFICIENCY_OUTPUTS
from retinafm.plots import plot_label_efficiency
from retinafm.settings import ConfigError, FinetuneSettings
from retinafm.tasks import check_settings, get_task


@dataclass
class LabelEfficiencyResult:
    out: Path
    runs: pd.DataFrame  # one row per (fraction, seed)
    summary: pd.DataFrame  # one row per fraction: n_train and the metric's mean and sd
    metric: str
    plot: Path


def parse_fractions(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"--fractions must be numbers in (0, 1], e.g. 0.05,0.1,0.25,0.5,1; got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise ConfigError(f"--fractions must be numbers in (0, 1], got {text!r}")
    return values


def stratified_subset(strata: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a `fraction` of the items, the same fraction of every stratum (at least one
    of each), drawn with `seed`; fraction 1 keeps everything."""
    if fraction >= 1:
        return np.arange(len(strata))
    rng = np.random.default_rng(seed)
    chosen = []
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        take = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen))


def _strata(task, targets: np.ndarray) -> np.ndarray:
    """What a subset keeps in proportion: the strata the task's bootstrap keeps (none: a plain random subset)."""
    strata = task.bootstrap_strata(targets)
    return np.asarray(strata) if strata is not None else np.zeros(len(targets), dtype=int)


def label_efficiency(cfg: FinetuneSettings, fractions: Sequence[float], seeds: int = 3, *,
                     metric: str | None = None, quiet: bool = False) -> LabelEfficiencyResult:
    """Run the study into cfg.out (cfg.adaptation: 'lp' uses cached features, 'finetune' full runs)."""
    cfg.validate()
    check_settings(cfg)
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    from retinafm.workflows.finetune import training_inputs

    with claim_dir(cfg.out, overwrite=cfg.overwrite, inputs=training_inputs(cfg),
                   outputs=LABEL_EFFICIENCY_OUTPUTS) as claim:
        result = _label_efficiency(cfg, Path(cfg.out), fractions, seeds, metric, quiet)
        claim.remove_stale()
    return result


def _label_efficiency(cfg: FinetuneSettings, out: Path, fractions: Sequence[float], seeds: int, metric: str | None,
                      quiet: bool) -> LabelEfficiencyResult:
    data = load_labelled(cfg.data_path, cfg.manifest, cfg.split, seed=cfg.seed,
                         targets=get_task(cfg.task).targets,
                         columns=cfg.names_list(), oct_frames=cfg.oct_frames)
    if not data.split("test"):
        raise DataSourceError(f"{data.source} has no test split; the study reports test performance")
    if not data.split("val"):
        raise DataSourceError(f"{data.source} has no validation split; it chooses each point's regularisation "
                              "or best epoch (use --split 0.7,0.15,0.15 for an automatic one)")
    if cfg.adaptation == "lp":
        rows, metric = _probe_points(cfg, data, out, fractions, seeds, metric, quiet)
    else:
        rows, metric = _finetune_points(cfg, data, out, fractions, seeds, metric, quiet)
    runs = pd.DataFrame(rows)
    summary = (runs.groupby("fraction")
               .agg(n_train=("n_train", "mean"), mean=(metric, "mean"), sd=(metric, "std"), seeds=("seed", "count"))
               .reset_index())
    summary["sd"] = summary["sd"].fillna(0.0)  # one seed: no spread
    write_csv(out / "label_efficiency_runs.csv", runs)
    write_csv(out / "label_efficiency.csv", summary)
    write_yaml(out / "config.yaml", {**dataclasses.asdict(cfg), "fractions": list(fractions), "seeds": seeds,
                                     "metric": metric})
    adaptation = "linear probe" if cfg.adaptation == "lp" else "fine-tuned"
    plot = plot_label_efficiency(summary, metric, f"{cfg.model} ({adaptation})", out / "label_efficiency.png")
    if not quiet:
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"written: {out / 'label_efficiency.csv'}, {plot}")
    return LabelEfficiencyResult(out, runs, summary, metric, plot)


def _probe_points(cfg, data, out: Path, fractions, seeds, metric, quiet):
    from retinafm.data.embeddings import read_embeddings
    from retinafm.settings import EmbedSettings
    from retinafm.workflows.embed import embed
    from retinafm.workflows.finetune import samples_table
    from retinafm.workflows.probe import (
        ProbeSettings,
        choose_strength,
        fit_linear,
        head_outputs,
        probe_data,
    )

    embeddings = out / "embeddings.parquet"
    embed(samples_table(data), embeddings, EmbedSettings.for_run(cfg), overwrite=cfg.overwrite, progress=not quiet)
    emb = read_embeddings(embeddings)
    columns = ",".join(data.class_names) if get_task(cfg.task).named_columns else None
    settings = ProbeSettings(task=cfg.task, columns=columns,
                             threshold=cfg.threshold_value(), bootstrap=0, seed=cfg.seed)
    task0, splits, targets = probe_data(emb, settings)
    x = emb.vectors.astype(np.float64)
    metric = metric or task0.selection_metric
    train, val, test = splits["train"], splits["val"], splits["test"]
    rows = []
    for fraction in fractions:
        for seed in range(seeds):
            subset = train[stratified_subset(_strata(task0, targets[train]), fraction, cfg.seed + seed)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tiny subsets: labels without positives, undefined metrics
                task = task0.fit(targets[subset])
                strength, _ = choose_strength(task, x[subset], targets[subset], (x[val], targets[val]), settings)
                head = fit_linear(task, x[subset], targets[subset], strength, settings)
                task = task.calibrate(targets[val], head_outputs(task, head, x[val])[0])
                metrics = task.metrics(targets[test], head_outputs(task, head, x[test])[0])
            _check_metric(metric, metrics)
            rows.append({"fraction": fraction, "seed": seed, "n_train": len(subset), "strength": strength,
                         **_reported(metric, metrics)})
            if not quiet:
                print(f"fraction {fraction:g}, seed {seed}: {len(subset)} training images, "
                      f"{metric} {metrics[metric]:.4f}")
    return rows, metric


_HEADLINE = ("auroc_macro", "auprc_macro", "accuracy", "kappa", "r2_macro", "mae_macro")


def _reported(metric: str, metrics: dict[str, float]) -> dict[str, float]:
    """The study's metric first, then the other headline metrics the task has."""
    return {metric: metrics[metric], **{k: metrics[k] for k in _HEADLINE if k in metrics and k != metric}}


def _check_metric(metric: str, metrics: dict[str, float]) -> None:
    if metric not in metrics:
        raise ConfigError(f"--metric {metric!r} is not reported for this task; choose one of {', '.join(metrics)}")


def _finetune_points(cfg, data, out: Path, fractions, seeds, metric, quiet):
    from retinafm.tasks import task_from_config
    from retinafm.workflows.finetune import finetune, samples_table

    table = samples_table(data)
    table["path"] = [str(Path(p).resolve()) for p in table["path"]]  # the subset manifests live elsewhere
    task = task_from_config(cfg, data.class_names)
    metric = metric or task.selection_metric
    train = np.flatnonzero(table["split"].to_numpy() == "train")
    train_targets = task.target_array(data.split("train"))
    rows = []
    for fraction in fractions:
        for seed in range(seeds):
            subset = train[stratified_subset(_strata(task, train_targets), fraction, cfg.seed + seed)]
            keep = np.concatenate([subset, np.flatnonzero(table["split"].to_numpy() != "train")])
            name = f"fraction_{fraction:g}_seed_{seed}"
            manifest = write_csv(out / "subsets" / f"{name}.csv", table.iloc[np.sort(keep)])
            run_cfg = dataclasses.replace(cfg, data_path=None, manifest=str(manifest), split=None, out=str(out / name),
                                          seed=cfg.seed + seed, bootstrap=0, overwrite=cfg.overwrite, resume=False)
            result = finetune(run_cfg)
            _check_metric(metric, result.test or {})
            rows.append({"fraction": fraction, "seed": seed, "n_train": len(subset), **_reported(metric, result.test)})
    return rows, metric
