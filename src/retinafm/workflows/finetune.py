"""`retinafm finetune`: a pretrained backbone + a task head, trained RETFound's way.

Writes the run directory: config.yaml, data_summary.csv, log.csv, checkpoint-best.pth,
checkpoint-last.pth, metrics_test.json/.csv (with bootstrap CIs), predictions_test.csv,
plots/*.png, report.html (and split.csv, skipped.csv when they apply).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn as nn

from retinafm.data.loader import ImageDataset, SkipLog
from retinafm.data.preprocess import check_modality
from retinafm.data.sources import DataSourceError, LabelledData, load_labelled
from retinafm.data.transforms import (
    AugmentSettings,
    Preprocessing,
    eval_transform,
    train_transform,
)
from retinafm.engine.checkpoint import CheckpointMeta, load_checkpoint, meta_of
from retinafm.engine.evaluation import evaluate_samples, write_evaluation
from retinafm.engine.inference import task_of
from retinafm.engine.trainer import Hooks, Trainer, TrainerSettings
from retinafm.files import claim_dir, write_csv, write_yaml
from retinafm.models.heads import HeadSettings, init_head
from retinafm.models.registry import ModelSpec, check_input_size, create_model, get_spec
from retinafm.models.weights import load_backbone_weights, resolve_weights
from retinafm.objectives.supervised import Supervised
from retinafm.runtime import distributed as dist_utils
from retinafm.runtime.device import precision_name
from retinafm.settings import ConfigError, FinetuneSettings, to_dict
from retinafm.tasks import check_settings, get_task, task_from_config
from retinafm.workflows.report import write_report


@dataclass
class FinetuneResult:
    run_dir: Path
    best_epoch: int
    best_val: dict[str, float]
    test: dict[str, float] | None = None
    selection_metric: str = "auroc_macro"  # the validation metric that chose best_epoch
    files: dict[str, Path] = field(default_factory=dict)


def _say(msg: str) -> None:
    if dist_utils.is_primary():
        print(msg, flush=True)


EpochCallback = Callable[[int, dict[str, float]], None]


def finetune(cfg: FinetuneSettings, *, on_epoch: EpochCallback | None = None,
             evaluate_test: bool = True) -> FinetuneResult:
    """Fine-tune (or linear-probe) a zoo model on a labelled folder or manifest.

    `on_epoch(epoch, val_metrics)` runs after each epoch's validation (metrics include `loss`);
    an exception it raises (Optuna's TrialPruned) stops the run. `evaluate_test=False` leaves the
    test split untouched, as a hyperparameter search must.
    """
    cfg.validate()
    check_settings(cfg)
    check_input_size(cfg.model, cfg.input_size)
    # No barrier on failure: a rank that raised must exit so torchrun stops the others.
    with claim_dir(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume, inputs=training_inputs(cfg)) as claim:
        result = _finetune(cfg, on_epoch, evaluate_test)
        claim.remove_stale()
    dist_utils.barrier()
    return result


def training_inputs(cfg: FinetuneSettings) -> list[tuple[str, str | None]]:
    """The paths a fine-tune reads, which its run folder must not be (or be inside)."""
    return [("--data-path", cfg.data_path), ("--manifest", cfg.manifest), ("--weights", cfg.weights)]


def samples_table(data: LabelledData, include_test: bool = True) -> pd.DataFrame:
    """path, split, the label (class name) or target columns, patient_id: what `embed` carries along."""
    rows = []
    for s in data.samples:
        if s.split == "test" and not include_test:
            continue
        row: dict[str, Any] = {"path": s.path, "split": s.split}
        if s.label is not None:
            row["label"] = data.class_names[s.label]
        elif s.targets is not None:
            row.update(zip(data.class_names, s.targets, strict=False))
        row["patient_id"] = s.patient_id
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.drop(columns="patient_id") if frame["patient_id"].isna().all() else frame


def _feature_probe(cfg: FinetuneSettings, data: LabelledData, run_dir: Path, evaluate_test: bool) -> FinetuneResult:
    """--adaptation lp: every image through the frozen backbone once, then the scikit-learn probe."""
    from retinafm.settings import EmbedSettings
    from retinafm.workflows.embed import embed
    from retinafm.workflows.probe import ProbeSettings, probe

    embeddings = run_dir / "embeddings.parquet"
    settings = EmbedSettings.for_run(cfg)
    _say(f"linear probe on {cfg.model} features: embedding {len(data.samples)} images once")
    embed(samples_table(data, include_test=evaluate_test), embeddings, settings, overwrite=cfg.overwrite)
    if not dist_utils.is_primary():  # the ranks shared the embedding; fitting the probe takes one process
        return FinetuneResult(run_dir, -1, {})
    columns = ",".join(data.class_names) if get_task(cfg.task).named_columns else None
    result = probe(embeddings, run_dir, ProbeSettings(task=cfg.task, columns=columns, threshold=cfg.threshold_value(),
                                                      bootstrap=cfg.bootstrap, seed=cfg.seed),
                   overwrite=True)
    val, test = result.evaluations.get("val"), result.evaluations.get("test")
    return FinetuneResult(run_dir, -1, {**val.metrics, "loss": val.loss} if val else {},
                          test.metrics if test else None, result.task.selection_metric,
                          {"checkpoint": result.checkpoint, "embeddings": embeddings})


class _BestOnValidation:
    """Finetune's validation: the task's metrics on the val split each epoch; the best epoch is the
    one the task ranks first (`task.is_better`). Each checkpoint keeps the task state (e.g.
    validation thresholds) of its own weights."""

    def __init__(self, model: nn.Module, task, samples, transform, trainer: Trainer, cfg: FinetuneSettings,
                 meta: CheckpointMeta) -> None:
        self.model, self.task, self.samples, self.transform = model, task, samples, transform
        self.trainer, self.cfg, self.meta = trainer, cfg, meta
        self.best: dict[str, float] | None = None
        self.best_loss, self.best_epoch = float("inf"), -1
        self.last: dict[str, float] = {}

    def __call__(self, epoch: int, row: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        val = evaluate_samples(self.model, self.task, self.samples, self.transform, self.trainer.device, split="val",
                               batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers, progress=False,
                               calibrate=True, autocast_dtype=self.trainer.dtype)
        self.trainer.skip_log.add(val.skipped)
        improved = self.task.is_better(val.metrics, val.loss, self.best, self.best_loss)
        if improved:
            self.best, self.best_loss, self.best_epoch = dict(val.metrics), val.loss, epoch
        self.meta.epoch, self.meta.metrics, self.meta.task_state = epoch, dict(val.metrics), val.task.state()
        self.last = {"loss": val.loss, **val.metrics}
        return {"val_loss": val.loss, **{f"val_{k}": v for k, v in val.metrics.items() if k != "n"}}, improved

    def state(self) -> dict[str, Any]:
        return {"best_metrics": self.best, "best_loss": self.best_loss, "best_epoch": self.best_epoch}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best = state.get("best_metrics") or None
        self.best_loss = float(state.get("best_loss", float("inf")))
        self.best_epoch = int(state.get("best_epoch", -1))

    def describe(self, row: dict[str, Any], improved: bool) -> str:
        metric = self.task.selection_metric
        return (f"epoch {row['epoch'] + 1}/{self.cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                f"val_loss {row['val_loss']:.4f}  val_{metric} {row.get(f'val_{metric}', float('nan')):.4f}"
                f"{'  *best*' if improved else ''}  ({row['seconds']:.1f}s)")


def _finetune(cfg: FinetuneSettings, on_epoch: EpochCallback | None, evaluate_test: bool) -> FinetuneResult:
    trainer = Trainer(TrainerSettings(
        out=cfg.out, kind="classifier", device=cfg.device, precision=cfg.precision, seed=cfg.seed, resume=cfg.resume,
        overwrite=cfg.overwrite, epochs=cfg.epochs, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        accum_iter=cfg.accum_iter, clip_grad=cfg.clip_grad, lr=cfg.lr, blr=cfg.blr, weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay if cfg.adaptation == "finetune" else None, warmup_epochs=cfg.warmup_epochs,
        min_lr=cfg.min_lr, compile=cfg.compile))
    run_dir, device = trainer.run_dir, trainer.device

    data = load_labelled(cfg.data_path, cfg.manifest, cfg.split, seed=cfg.seed, targets=get_task(cfg.task).targets,
                         columns=cfg.names_list(), oct_frames=cfg.oct_frames)
    train_samples, val_samples, test_samples = data.split("train"), data.split("val"), data.split("test")
    if not val_samples:
        raise DataSourceError(
            f"{data.source} has no validation images; add a val split (the best epoch is chosen on it) "
            "or use --split 0.7,0.15,0.15."
        )
    if get_task(cfg.task).one_class_per_image and len(data.class_names) < 2:
        raise DataSourceError(f"{data.source} has a single class {data.class_names}; classification needs two or more")
    if cfg.adaptation == "lp" and cfg.lp_mode == "features":
        return _feature_probe(cfg, data, run_dir, evaluate_test)
    spec = get_spec(cfg.model)
    input_size = spec.input_size_for(cfg.input_size)
    task = task_from_config(cfg, data.class_names)
    task = task.fit(task.target_array(train_samples))  # e.g. target statistics from train only
    head = HeadSettings(cfg.head, cfg.head_depth, cfg.head_num_heads, cfg.head_mlp_ratio, cfg.head_dropout)

    if dist_utils.is_primary():
        write_yaml(run_dir / "config.yaml", {**to_dict(cfg), "input_size": input_size,
                                             "class_names": list(data.class_names)})
        if data.auto_split:
            write_csv(run_dir / "split.csv", data.table())
        counts = data.counts()
        write_csv(run_dir / "data_summary.csv", counts.reset_index())
        _say(f"data: {data.source}\n{counts.to_string()}")

    model = create_model(spec, task.num_outputs, input_size=input_size, drop_path=cfg.drop_path,
                         global_pool=cfg.global_pool, head=head)
    global_pool = str(model.global_pool)
    if trainer.resume_state is not None:
        _check_resume_fits(trainer.resume_state, data, cfg)  # the trainer puts its weights back
    else:
        _load_pretrained(model, spec, cfg.weights)
    if cfg.adaptation == "lp":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)

    augment = AugmentSettings(cfg.crop_min_scale, cfg.randaug_magnitude, reprob=cfg.reprob)
    preprocessing = Preprocessing(cfg.fundus_crop, cfg.oct_crop)
    if dist_utils.is_primary():
        check_modality([s.path for s in train_samples], spec.modality, spec.name, cfg.modality)
    train_ds = ImageDataset([s.path for s in train_samples], task.dataset_targets(train_samples),
                            train_transform(input_size, spec.mean, spec.std, augment, preprocessing))
    eval_tf = eval_transform(input_size, spec.mean, spec.std, preprocessing=preprocessing)
    objective = Supervised.for_task(model, task, smoothing=cfg.smoothing, mixup=cfg.mixup, cutmix=cfg.cutmix)

    meta = CheckpointMeta(
        model_name=spec.name, arch=spec.arch, arch_kwargs=dict(spec.arch_kwargs), task=task.name,
        class_names=list(task.class_names), input_size=input_size, mean=list(spec.mean), std=list(spec.std),
        global_pool=global_pool, modality=spec.modality, patch_size=spec.patch_size, settings=to_dict(cfg),
        task_state=task.state(), head=dataclasses.asdict(head), preprocess=preprocessing.state(),
    )
    validation = _BestOnValidation(model, task, val_samples, eval_tf, trainer, cfg, meta)

    def after_epoch(epoch: int, _row: dict[str, Any]) -> None:
        if on_epoch is not None:
            on_epoch(epoch, validation.last)

    hooks = Hooks(validate=validation, describe=validation.describe, after_epoch=after_epoch)
    banner = (f"training {spec.name} ({cfg.adaptation}) on {device} in {precision_name(trainer.dtype)} for "
              f"{cfg.epochs} epochs, lr {trainer.lr:.3g}, {len(train_ds)} train / {len(val_samples)} val images")
    trainer.fit(objective, train_ds, model=model, meta=lambda: dict(meta.__dict__), hooks=hooks, banner=banner)

    result = FinetuneResult(run_dir, validation.best_epoch, validation.best or {},
                            selection_metric=task.selection_metric, files=dict(trainer.files))
    if test_samples and evaluate_test:
        result.test = _evaluate_best(model, test_samples, eval_tf, device, trainer.dtype, cfg, run_dir,
                                     trainer.skip_log, result)
    elif evaluate_test:
        _say("no test split: skipping the test evaluation")
    skipped = trainer.write_skipped()
    if skipped is not None:
        result.files["skipped"] = skipped
        _say(f"{trainer.skipped_count} unreadable file(s) skipped; see {skipped}")
    if result.test is not None and cfg.report_heatmaps:
        _explain_test_cases(run_dir, cfg)
    if evaluate_test and dist_utils.is_primary():
        result.files["report"] = write_report(run_dir, "test")
        _say(f"report: {result.files['report']}")
    return result


def _explain_test_cases(run_dir: Path, cfg: FinetuneSettings) -> None:
    """report.html's heatmaps of the best checkpoint's most confident test errors and some correct cases."""
    from retinafm.engine.inference import load_for_inference
    from retinafm.workflows.explain import explain_report_cases

    loaded = load_for_inference(run_dir / "checkpoint-best.pth", device=cfg.device)
    explain_report_cases(loaded, run_dir, "test", cfg.report_heatmaps, seed=cfg.seed,
                         batch_size=min(cfg.batch_size, 8), progress=False)


def _load_pretrained(model: nn.Module, spec: ModelSpec, weights: str | None) -> None:
    # Rank 0 downloads first; the others then resolve from their own node's cache (on other
    # nodes rank 0's path may not exist) instead of racing it for the same file.
    path = resolve_weights(spec, weights) if dist_utils.is_primary() else None
    dist_utils.barrier()
    if not dist_utils.is_primary():
        path = resolve_weights(spec, weights)
    if not path:
        _say(f"model {spec.name}: random initialisation (no pretrained weights)")
        return
    report = load_backbone_weights(model, path, spec.family)
    # RETFound's near-zero head suits a pretrained backbone; on a random one it would starve
    # the backbone's gradients, so random init keeps timm's initialisation.
    init_head(model)
    _say(report.summary())


def _evaluate_best(model, samples, transform, device, dtype: torch.dtype | None, cfg: FinetuneSettings,
                   run_dir: Path, skip_log: SkipLog, result: FinetuneResult) -> dict[str, float]:
    """Test metrics, predictions and plots of the best checkpoint (not the last epoch), with the
    task state (thresholds) chosen on validation for those weights."""
    best_state = load_checkpoint(run_dir / "checkpoint-best.pth")
    model.load_state_dict(best_state["model"], strict=True)
    task = task_of(meta_of(best_state))
    if cfg.bootstrap and dist_utils.is_primary():
        _say(f"test metrics: {cfg.bootstrap} bootstrap replicates for the 95% confidence intervals")
    test = evaluate_samples(model, task, samples, transform, device, split="test", batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers, bootstrap=cfg.bootstrap, seed=cfg.seed,
                            autocast_dtype=dtype)
    skip_log.add(test.skipped)
    if dist_utils.is_primary():
        result.files.update(write_evaluation(run_dir, task, test))
        _say(f"test ({len(test.paths)} images, best epoch {result.best_epoch + 1}): "
             f"{task.summary(test.metrics, test.ci)}")
    return test.metrics


def _check_resume_fits(state: dict[str, Any], data: LabelledData, cfg: FinetuneSettings) -> None:
    meta = meta_of(state)
    if meta.task != cfg.task:
        raise ConfigError(f"--resume: the run is a {meta.task} task, not --task {cfg.task}")
    if list(meta.class_names) != list(data.class_names):
        raise ConfigError(
            f"--resume: the run was trained on classes {meta.class_names} but the data now has {data.class_names}"
        )
    if get_spec(cfg.model).arch != meta.arch:
        raise ConfigError(f"--resume: the run used --model {meta.model_name}, not {cfg.model}")
