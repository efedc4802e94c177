"""The one training run: what finetune, pretrain (MAE, DINO) and refine share.

A `Trainer` owns the run directory (an existing run is refused unless resuming or overwriting;
only rank 0 writes), per-rank seeding, the epoch-seeded DistributedSampler and its loader, DDP,
the optimiser and its schedule, the gradient scaler, `--resume` from checkpoint-last.pth
(weights, optimiser, scaler, every RNG state, the log's rows), log.csv, checkpoint-last.pth every
epoch and checkpoint-best.pth when the validation hook says so, plots/curves.png and skipped.csv.

What differs between runs is the objective (an `nn.Module` whose forward(batch) returns
{"loss": ...}) and a few hooks: validation and best-epoch selection, a step hook (DINO's momentum
teacher), epoch hooks (DINO's temperature warmup, MAE's reconstruction figure).

    trainer = Trainer(TrainerSettings(...))      # run dir + seeds, before any model is built
    ... build the model and objective (trainer.resume_state holds checkpoint-last.pth on --resume) ...
    trainer.fit(objective, dataset, model=model, kind="classifier", meta=..., hooks=Hooks(...))
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from retinafm.data.loader import SkipLog, make_loader
from retinafm.engine.checkpoint import model_weights, open_checkpoint, write_checkpoint
from retinafm.engine.loop import StepSettings, train_one_epoch
from retinafm.engine.optim import build_optimizer, build_scheduler, current_lr, effective_lr
from retinafm.files import prepare_output_dir, write_csv
from retinafm.files.inputs import read_table
from retinafm.runtime import distributed as dist_utils
from retinafm.runtime.device import amp_dtype, resolve_device
from retinafm.runtime.rng import restore_rng_state, rng_state, seed_everything
from retinafm.settings import ConfigError

# How a --resume names a checkpoint-last.pth of the wrong kind of run.
_RUN_NOUNS = {"classifier": "fine-tuning", "pretrain": "pretraining", "refine": "refinement"}


def _say(msg: str) -> None:
    if dist_utils.is_primary():
        print(msg, flush=True)


@dataclass
class TrainerSettings:
    """What the trainer needs from a workflow's settings. `lr` None: `blr` scaled by the effective
    batch (batch × accum × GPUs) / 256."""

    out: str
    kind: str  # the checkpoint kind this run writes (see engine.checkpoint)
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    epochs: int = 1
    batch_size: int = 32
    num_workers: int = 0
    accum_iter: int = 1
    clip_grad: float | None = None
    lr: float | None = None
    blr: float = 1e-3
    weight_decay: float = 0.05
    layer_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: int = 0
    min_lr: float = 0.0
    compile: bool = False
    progress: bool = True
    find_unused_parameters: bool = False  # DDP: objectives that leave some heads without gradients


class Validator(Protocol):
    """Per-epoch validation and best-epoch selection. Called on every rank after the training epoch."""

    def __call__(self, epoch: int, row: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The epoch's log columns after train_loss (e.g. val_loss, val metrics), and whether the
        epoch is the best so far (then checkpoint-best.pth is written)."""

    def state(self) -> dict[str, Any]:
        """The best-so-far bookkeeping, saved in checkpoint-last.pth."""

    def load_state(self, state: dict[str, Any]) -> None:
        """Put `state()` back from a resumed checkpoint-last.pth."""


def _epoch_line(epochs: int) -> Callable[[dict[str, Any], bool], str]:
    return lambda row, improved: (f"epoch {row['epoch'] + 1}/{epochs}  loss {row['train_loss']:.4f}  "
                                  f"({row['seconds']:.1f}s)")


@dataclass
class Hooks:
    """What a run adds to the shared loop; every hook is optional."""

    validate: Validator | None = None
    describe: Callable[[dict[str, Any], bool], str] | None = None  # the printed line of an epoch
    before_epoch: Callable[[int], None] | None = None  # e.g. DINO's teacher temperature warmup
    after_step: Callable[[int], None] | None = None  # after each optimiser step, with the global update
    after_epoch: Callable[[int, dict[str, Any]], None] | None = None  # every rank, after the checkpoints


class Trainer:
    """One training run. Constructing it opens the run directory and seeds every generator, so
    build it before the model (whose random initialisation then follows the seed)."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = s = settings
        self.device = resolve_device(s.device)
        dist_utils.init_distributed(self.device)
        self.run_dir = Path(s.out)
        self.last_path = self.run_dir / "checkpoint-last.pth"
        self.best_path = self.run_dir / "checkpoint-best.pth"
        if s.resume and not self.last_path.is_file():
            raise ConfigError(f"--resume: {self.last_path} does not exist; start a new run without --resume")
        if dist_utils.is_primary():
            prepare_output_dir(self.run_dir, overwrite=s.overwrite, resume=s.resume)
        dist_utils.barrier()
        seed_everything(s.seed + dist_utils.rank())
        self.dtype: torch.dtype | None = amp_dtype(self.device, s.precision)
        self.lr = effective_lr(s.lr, s.blr, s.batch_size, s.accum_iter, dist_utils.world_size())
        self.skip_log = SkipLog()
        self.rows: list[dict[str, Any]] = []
        self.files: dict[str, Path] = {}  # what the run wrote besides the checkpoints: curves, skipped.csv...
        self.skipped_count = 0
        # On --resume, checkpoint-last.pth (upgraded to the current layout); `fit` puts its state back.
        self.resume_state: dict[str, Any] | None = \
            open_checkpoint(self.last_path, "--resume") if s.resume else None
        if self.resume_state is not None and self.resume_state["retinafm"]["kind"] != s.kind:
            raise ConfigError(f"--resume: {self.last_path} is not a retinafm {_RUN_NOUNS.get(s.kind, s.kind)} "
                              "checkpoint")

    @property
    def resuming(self) -> bool:
        return self.resume_state is not None

    def updates_per_epoch(self, dataset_size: int) -> int:
        """Optimiser steps per epoch for a training set of `dataset_size`, as `fit` will load it."""
        s, world = self.settings, dist_utils.world_size()
        per_rank = -(-dataset_size // world)  # DistributedSampler pads every rank to the same count
        batches = per_rank // s.batch_size if self._drop_last(dataset_size) else -(-per_rank // s.batch_size)
        return max(1, -(-batches // s.accum_iter))

    def _drop_last(self, dataset_size: int) -> bool:
        # A ragged last batch is dropped unless it is the only one.
        return dataset_size // dist_utils.world_size() > self.settings.batch_size

    def fit(self, objective: nn.Module, dataset: Dataset, *, meta: Callable[[], dict[str, Any]],
            model: nn.Module | None = None, hooks: Hooks | None = None, banner: str = "") -> list[dict[str, Any]]:
        """Train `objective` on `dataset` for the remaining epochs; returns the log rows.

        `model` is what the checkpoints save under 'model' and what the optimiser's groups come
        from (layer decay needs the timm model itself); default: the objective. `meta()` gives
        the checkpoint metadata at each save."""
        s, hooks, device = self.settings, hooks or Hooks(), self.device
        model = model if model is not None else objective
        describe = hooks.describe or _epoch_line(s.epochs)
        if self.resume_state is not None:
            model.load_state_dict(self.resume_state["model"], strict=True)
        objective.to(device)
        train_module: nn.Module = objective
        if dist_utils.is_distributed():
            train_module = DistributedDataParallel(
                objective, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=s.find_unused_parameters)
        if s.compile:
            train_module = torch.compile(train_module)  # checkpoints still save `model`, the uncompiled module

        # An epoch-seeded sampler even on one process, so a resumed run sees the same order.
        sampler = DistributedSampler(dataset, num_replicas=dist_utils.world_size(), rank=dist_utils.rank(),
                                     shuffle=True, seed=s.seed)
        loader = make_loader(dataset, s.batch_size, num_workers=s.num_workers, sampler=sampler,
                             drop_last=self._drop_last(len(dataset)), seed=s.seed, pin_memory=device.type == "cuda",
                             persistent=True)
        optimizer = build_optimizer(model, self.lr, s.weight_decay, s.layer_decay, betas=s.betas)
        steps_per_epoch = max(1, -(-len(loader) // s.accum_iter))
        scheduler = build_scheduler(optimizer, steps_per_epoch=steps_per_epoch, epochs=s.epochs,
                                    warmup_epochs=s.warmup_epochs, min_lr=s.min_lr)
        scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        start_epoch = self._restore(optimizer, scaler, hooks.validate)
        if banner:
            _say(banner)

        step = StepSettings(s.accum_iter, s.clip_grad, self.dtype)
        for epoch in range(start_epoch, s.epochs):
            started = time.time()
            sampler.set_epoch(epoch)
            if hooks.before_epoch is not None:
                hooks.before_epoch(epoch)
            train = train_one_epoch(train_module, loader, optimizer, scheduler, device, epoch=epoch, settings=step,
                                    scaler=scaler, skip_log=self.skip_log, progress=s.progress,
                                    after_step=hooks.after_step)
            row: dict[str, Any] = {"epoch": epoch, "lr": current_lr(optimizer), "train_loss": train.pop("loss"),
                                   **train}
            improved = False
            if hooks.validate is not None:
                values, improved = hooks.validate(epoch, row)
                row.update(values)
            row["seconds"] = round(time.time() - started, 2)
            self.rows.append(row)
            if dist_utils.is_primary():
                self._save(epoch, model, meta(), improved, optimizer, scaler, hooks.validate)
            _say(describe(row, improved))
            dist_utils.barrier()
            if hooks.after_epoch is not None:
                hooks.after_epoch(epoch, row)

        dist_utils.barrier()
        if dist_utils.is_primary():
            from retinafm.plots import plot_training_curves

            self.files["curves"] = plot_training_curves(pd.DataFrame(self.rows), self.run_dir / "plots" / "curves.png")
        return self.rows

    def _restore(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 validate: Validator | None) -> int:
        """A resumed run's optimiser, scaler, random state, best-so-far and log rows; the epoch to start at."""
        state = self.resume_state
        if state is None:
            return 0
        start_epoch = int(state["epoch"]) + 1
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state)
        if validate is not None:
            validate.load_state(state)
        log = self.run_dir / "log.csv"
        # The resumed run rewrites the rows of the epochs it repeats.
        self.rows = read_table(log, what="").query("epoch < @start_epoch").to_dict("records") if log.is_file() else []
        _say(f"resuming {self.run_dir} at epoch {start_epoch}")
        return start_epoch

    def _save(self, epoch: int, model: nn.Module, meta: dict[str, Any], improved: bool,
              optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, validate: Validator | None) -> None:
        kind = self.settings.kind
        write_csv(self.run_dir / "log.csv", pd.DataFrame(self.rows))
        weights = model_weights(model)
        if improved:
            write_checkpoint(self.best_path, weights, kind, meta, {"epoch": epoch})
        training: dict[str, Any] = {"epoch": epoch, "optimizer": optimizer.state_dict(), **rng_state()}
        if scaler.is_enabled():
            training["scaler"] = scaler.state_dict()
        if validate is not None:
            training.update(validate.state())
        write_checkpoint(self.last_path, weights, kind, meta, training)

    def write_skipped(self) -> Path | None:
        """skipped.csv with the unreadable files every rank met, written once by rank 0 (None when
        there were none, and on the other ranks)."""
        parts = dist_utils.all_gather_objects(self.skip_log.frame().values.tolist())
        if not dist_utils.is_primary():
            return None
        merged = SkipLog()
        for part in parts:
            merged.add([tuple(r) for r in part])
        if not len(merged):
            return None
        self.files["skipped"] = write_csv(self.run_dir / "skipped.csv", merged.frame())
        self.skipped_count = len(merged)
        return self.files["skipped"]


def final_loss(rows: list[dict[str, Any]]) -> float:
    return float(rows[-1]["train_loss"]) if rows else math.nan
