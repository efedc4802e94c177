"""`retinafm refine`: vision-language refinement of a zoo backbone from image-report pairs.

Writes a run directory: config.yaml, log.csv (epoch, lr, train_loss and each objective's,
val_loss when the pairs have a val split), checkpoint-last.pth (every epoch; `--resume`),
checkpoint-best.pth (lowest val_loss), plots/curves.png, and `backbone.safetensors`: the refined
vision backbone in the zoo model's timm key layout, which `finetune --weights`, `embed --weights`
(and so `probe`) take directly. With `--probe-on DATA`, linear probes on DATA's embeddings from
the backbone before and after refinement, side by side in probe_comparison.csv.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from retinafm.data.images import expand_rows
from retinafm.data.loader import ImageDataset, SkipLog, make_loader
from retinafm.data.sources import SPLITS, DataSourceError
from retinafm.data.transforms import Preprocessing, eval_transform, pretrain_transform
from retinafm.engine.checkpoint import versions
from retinafm.engine.loop import StepSettings, train_one_epoch
from retinafm.engine.optim import build_optimizer, build_scheduler, current_lr
from retinafm.engine.run import begin_run, restore_training
from retinafm.files import atomic_path, save_torch, write_csv, write_yaml
from retinafm.models.registry import create_model, get_spec
from retinafm.models.weights import (
    load_backbone_weights,
    read_checkpoint,
    resolve_weights,
)
from retinafm.objectives.vision_language import (
    RefineObjective,
    VisionLanguage,
    load_text_model,
)
from retinafm.runtime import distributed as dist_utils
from retinafm.runtime.device import amp_dtype, autocast, precision_name
from retinafm.runtime.rng import rng_state
from retinafm.settings import ConfigError, RefineSettings, to_dict

META_KEY = "retinafm_refine"
BACKBONE = "backbone.safetensors"


@dataclass
class RefineResult:
    run_dir: Path
    backbone: Path
    epochs: int
    final_loss: float
    probe: Optional[pd.DataFrame] = None  # metric, before, after, change
    files: dict[str, Path] = field(default_factory=dict)


def _say(msg: str) -> None:
    if dist_utils.is_primary():
        print(msg, flush=True)


def read_pairs(path: str | Path, oct_frames: str | int = "middle") -> pd.DataFrame:
    """path (relative to the CSV or absolute), report, split ('train' when absent); volumes become
    the B-scans `oct_frames` picks, each with its volume's report."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"--pairs {path}: no such file")
    try:
        frame = pd.read_csv(path, dtype={"path": str, "report": str, "split": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataSourceError(f"--pairs {path} is not a readable CSV: {str(exc).splitlines()[0]}") from None
    missing = [c for c in ("path", "report") if c not in frame.columns]
    if missing:
        raise DataSourceError(f"--pairs {path}: needs columns path and report (missing {', '.join(missing)}; "
                              f"has {list(frame.columns)})")
    empty = frame.index[frame["path"].isna() | frame["report"].fillna("").str.strip().eq("")]
    if len(empty):
        raise DataSourceError(f"--pairs {path}: empty path or report on line(s) "
                              f"{', '.join(str(i + 2) for i in empty[:10])}")
    frame["split"] = frame["split"].fillna("(empty)").str.strip().str.lower() if "split" in frame.columns else "train"
    unknown = sorted(set(frame["split"]) - set(SPLITS))
    if unknown:
        raise DataSourceError(f"--pairs {path}: unknown split value(s) {unknown}; use train, val or test")
    frame["path"] = [str(p if Path(p).is_absolute() else path.parent / p) for p in frame["path"]]
    out = expand_rows(frame[["path", "report", "split"]], oct_frames).reset_index(drop=True)
    if not (out["split"] == "train").any():
        raise DataSourceError(f"--pairs {path}: no train rows to refine on")
    return out


def refine(cfg: RefineSettings, *, progress: bool = True) -> RefineResult:
    cfg.validate()
    device, run_dir, last_path = begin_run(cfg.out, device=cfg.device, resume=cfg.resume, overwrite=cfg.overwrite,
                                           seed=cfg.seed)
    weights = cfg.loss_weight_map()
    pairs = read_pairs(cfg.pairs, cfg.oct_frames)
    spec = get_spec(cfg.model)
    input_size = cfg.input_size or spec.input_size
    if input_size % spec.patch_size:
        raise ConfigError(f"--input-size {input_size} must be a multiple of the patch size {spec.patch_size} of {spec.name}")

    text, tokenizer = load_text_model(cfg.text_model)
    vision = create_model(spec, 0, input_size=input_size)
    resume_state = read_checkpoint(last_path) if cfg.resume else None
    weights_file = None
    if resume_state is None:
        weights_file = resolve_weights(spec, cfg.weights) if dist_utils.is_primary() else None
        dist_utils.barrier()
        weights_file = weights_file or resolve_weights(spec, cfg.weights)
        if weights_file:
            _say(load_backbone_weights(vision, weights_file, spec.family).summary())
        else:
            _say(f"model {spec.name}: random initialisation (--weights none)")
    if getattr(text, "pooler", None) is not None:
        text.pooler.requires_grad_(False)  # BERT's pooler is not used by any objective
    encoded = tokenizer(pairs["report"].tolist(), padding="longest", truncation=True, max_length=cfg.max_length,
                        return_tensors="pt")
    model = VisionLanguage(vision, text, fusion_layers=cfg.fusion_layers,
                           embed_dim=cfg.embed_dim)
    special = [t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) if t is not None]
    objective = RefineObjective(model, encoded["input_ids"], encoded["attention_mask"],
                                torch.as_tensor(pd.factorize(pairs["report"])[0]), weights=weights,
                                mask_token_id=tokenizer.mask_token_id, vocab_size=text.config.vocab_size,
                                special_ids=special, mlm_probability=cfg.mlm_probability)
    if resume_state is not None:
        _check_resume_fits(resume_state, cfg, spec)
        model.load_state_dict(resume_state["model"], strict=True)
    objective.to(device)

    preprocessing = Preprocessing(cfg.fundus_crop, cfg.oct_crop)
    train_rows = [int(i) for i in pairs.index[pairs["split"] == "train"]]
    val_rows = [int(i) for i in pairs.index[pairs["split"] == "val"]]
    train_ds = ImageDataset(pairs["path"][train_rows].tolist(), train_rows,
                            pretrain_transform(input_size, spec.mean, spec.std, cfg.crop_min_scale, preprocessing))
    sampler = DistributedSampler(train_ds, num_replicas=dist_utils.world_size(), rank=dist_utils.rank(), shuffle=True,
                                 seed=cfg.seed)
    per_rank = len(train_ds) // dist_utils.world_size()
    if per_rank < 2:
        raise DataSourceError(f"--pairs {cfg.pairs}: {len(train_ds)} train pairs; the contrastive and matching "
                              "objectives need at least two per batch")
    # drop_last keeps every batch at two or more pairs (a batch of one has no negatives)
    loader = make_loader(train_ds, cfg.batch_size, num_workers=cfg.num_workers, sampler=sampler,
                         drop_last=per_rank > cfg.batch_size, seed=cfg.seed, pin_memory=device.type == "cuda",
                         persistent=True)
    val_loader = make_loader(ImageDataset(pairs["path"][val_rows].tolist(), val_rows,
                                          eval_transform(input_size, spec.mean, spec.std, preprocessing=preprocessing)),
                             cfg.batch_size, num_workers=cfg.num_workers) if val_rows else None
    train_model: nn.Module = objective
    if dist_utils.is_distributed():
        # Objectives left out leave their heads without gradients.
        train_model = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=len(weights) < 4)
    optimizer = build_optimizer(objective, cfg.lr, cfg.weight_decay, None)
    steps_per_epoch = max(1, len(loader))
    scheduler = build_scheduler(optimizer, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                                warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr)
    dtype = amp_dtype(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    meta = {"model_name": spec.name, "arch": spec.arch, "arch_kwargs": dict(spec.arch_kwargs), "input_size": input_size,
            "global_pool": str(vision.global_pool), "text_model": cfg.text_model, "losses": weights,
            "weights_file": weights_file, "pairs": len(pairs), "settings": to_dict(cfg), "versions": versions()}

    start_epoch, rows, best_loss = 0, [], math.inf
    if resume_state is not None:
        start_epoch, best_loss = int(resume_state["epoch"]) + 1, float(resume_state.get("best_loss", math.inf))
        meta["weights_file"] = resume_state[META_KEY].get("weights_file")
        rows = restore_training(resume_state, optimizer, scaler, run_dir, start_epoch)
        _say(f"resuming {run_dir} at epoch {start_epoch}")
    if dist_utils.is_primary():
        write_yaml(run_dir / "config.yaml", {**to_dict(cfg), "input_size": input_size})

    skip_log = SkipLog()
    _say(f"refining {spec.name} with {cfg.text_model} on {device} in {precision_name(dtype)}: "
         f"{len(train_rows)} train / {len(val_rows)} val pairs, "
         f"objectives {', '.join(f'{k}×{w:g}' for k, w in weights.items())}, {cfg.epochs} epochs, lr {cfg.lr:.3g}")
    for epoch in range(start_epoch, cfg.epochs):
        start = time.time()
        sampler.set_epoch(epoch)
        objective.reset_components()
        loss = train_one_epoch(train_model, loader, None, optimizer, scheduler, device, epoch=epoch,
                               settings=StepSettings(1, cfg.clip_grad, dtype), scaler=scaler, skip_log=skip_log,
                               progress=progress)
        row: dict[str, Any] = {"epoch": epoch, "lr": current_lr(optimizer), "train_loss": loss,
                               **{k: dist_utils.mean_across_ranks(v) for k, v in objective.component_means().items()}}
        if val_loader is not None:
            row["val_loss"] = _validation_loss(objective, val_loader, device, dtype, skip_log)
        row["seconds"] = round(time.time() - start, 2)
        rows.append(row)
        improved = row.get("val_loss", loss) < best_loss
        best_loss = min(best_loss, row.get("val_loss", loss))
        if dist_utils.is_primary():
            write_csv(run_dir / "log.csv", pd.DataFrame(rows))
            state = {"model": model.state_dict(), "epoch": epoch, META_KEY: meta, "best_loss": best_loss, **rng_state()}
            if improved:
                save_torch(run_dir / "checkpoint-best.pth", state)
            state["optimizer"] = optimizer.state_dict()
            if scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            save_torch(last_path, state)
        parts = "".join(f"  {k.removeprefix('loss_')} {row[k]:.3f}" for k in row if k.startswith("loss_"))
        val = f"  val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""
        _say(f"epoch {epoch + 1}/{cfg.epochs}  train_loss {loss:.4f}{parts}{val}  ({row['seconds']:.1f}s)")
        dist_utils.barrier()

    result = RefineResult(run_dir, run_dir / BACKBONE, len(rows), float(rows[-1]["train_loss"]) if rows else math.nan)
    if dist_utils.is_primary():
        from retinafm.plots import plot_training_curves

        source = run_dir / "checkpoint-best.pth" if (run_dir / "checkpoint-best.pth").is_file() else last_path
        export_backbone(source, result.backbone)
        result.files["curves"] = plot_training_curves(pd.DataFrame(rows), run_dir / "plots" / "curves.png")
        if len(skip_log):
            result.files["skipped"] = write_csv(run_dir / "skipped.csv", skip_log.frame())
        _say(f"refined backbone: {result.backbone} (from {source.name}; use it as --weights with --model {spec.name})")
    dist_utils.barrier()
    if cfg.probe_on:
        result.probe = probe_before_after(cfg, spec.name, meta["weights_file"], result.backbone, input_size, run_dir)
    return result


@torch.no_grad()
def _validation_loss(objective: RefineObjective, loader, device: torch.device, dtype, skip_log: SkipLog) -> float:
    """The same weighted objective on the val pairs (fixed crops; MLM masks drawn as in training)."""
    objective.eval()
    total, count = 0.0, 0
    for batch in loader:
        skip_log.add(batch.skipped)
        if len(batch.targets) < 2:
            continue
        with autocast(device, dtype):
            loss = objective(batch.images.to(device), batch.targets.to(device))
        total, count = total + float(loss) * len(batch.targets), count + len(batch.targets)
    objective.train()
    return total / count if count else math.nan


def export_backbone(checkpoint: Path, out: Path) -> Path:
    """The vision backbone of a refinement checkpoint, flat in timm's key layout (no head), as
    safetensors with the model's name and input size in its metadata."""
    from safetensors.torch import save_file

    state = read_checkpoint(checkpoint)
    vision = {k.removeprefix("vision."): v.contiguous() for k, v in state["model"].items() if k.startswith("vision.")}
    meta = state[META_KEY]
    info = {"format": "retinafm refined backbone", "model": meta["model_name"], "arch": meta["arch"],
            "input_size": str(meta["input_size"]), "global_pool": meta["global_pool"], "text_model": meta["text_model"],
            "epoch": str(state["epoch"])}
    with atomic_path(out) as tmp:
        save_file(vision, str(tmp), metadata=info)
    return out


def _check_resume_fits(state: dict[str, Any], cfg: RefineSettings, spec) -> None:
    meta = state.get(META_KEY)
    if not isinstance(meta, dict):
        raise ConfigError(f"--resume: {cfg.out}/checkpoint-last.pth is not a retinafm refinement checkpoint")
    if meta["model_name"] != spec.name or meta["text_model"] != cfg.text_model:
        raise ConfigError(f"--resume: the run refines {meta['model_name']} with {meta['text_model']}, not "
                          f"--model {spec.name} --text-model {cfg.text_model}")


def probe_before_after(cfg: RefineSettings, model_name: str, original: Optional[str], refined: Path, input_size: int,
                       run_dir: Path) -> pd.DataFrame:
    """Linear probes on `cfg.probe_on` with the backbone before and after refinement, as RetFiner's
    table compares them: test metrics (validation when there is no test split) side by side."""
    from retinafm.engine.features import EmbedSettings
    from retinafm.workflows.embed import embed
    from retinafm.workflows.probe import ProbeSettings, probe

    results = {}
    for name, weights in (("before", original or "none"), ("after", str(refined))):
        emb = embed(cfg.probe_on, run_dir / f"probe_{name}" / "embeddings.parquet",
                    EmbedSettings(model=model_name, weights=weights, input_size=input_size, device=cfg.device,
                                  precision=cfg.precision, num_workers=cfg.num_workers, oct_frames=cfg.oct_frames,
                                  dtype="float32"),
                    overwrite=True, progress=False)
        if not dist_utils.is_primary():
            continue
        fitted = probe(emb.out, run_dir / f"probe_{name}",
                       ProbeSettings(bootstrap=cfg.probe_bootstrap, seed=cfg.seed), overwrite=True, quiet=True)
        split = "test" if "test" in fitted.evaluations else "val"
        results[name] = (split, fitted.evaluations[split].metrics)
    if not dist_utils.is_primary():
        return pd.DataFrame()
    split, before = results["before"]
    after = results["after"][1]
    keys = [k for k in before if k != "n" and isinstance(before[k], (int, float)) and k in after]
    table = pd.DataFrame({"split": split, "metric": keys, "before": [before[k] for k in keys],
                          "after": [after[k] for k in keys]})
    table["change"] = table["after"] - table["before"]
    write_csv(run_dir / "probe_comparison.csv", table)
    shown = table[table["metric"].isin(["auroc_macro", "auprc_macro", "accuracy", "balanced_accuracy", "f1_macro",
                                        "kappa"])]
    _say(f"linear probe on {cfg.probe_on} ({split}), before → after refinement:\n"
         + shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table
