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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from retinafm.data.images import expand_rows
from retinafm.data.loader import ImageDataset, make_loader
from retinafm.data.sources import SPLITS, DataSourceError
from retinafm.data.transforms import Preprocessing, eval_transform, pretrain_transform
from retinafm.engine.checkpoint import open_checkpoint, versions
from retinafm.engine.trainer import Hooks, Trainer, TrainerSettings, final_loss
from retinafm.files import atomic_path, claim_dir, write_csv, write_yaml
from retinafm.files.inputs import read_table
from retinafm.models.registry import check_input_size, create_model, get_spec
from retinafm.models.weights import (
    load_backbone_weights,
    resolve_weights,
)
from retinafm.objectives.vision_language import (
    RefineObjective,
    VisionLanguage,
    load_text_model,
)
from retinafm.runtime import distributed as dist_utils
from retinafm.runtime.device import autocast, precision_name
from retinafm.settings import ConfigError, RefineSettings, to_dict

BACKBONE = "backbone.safetensors"


@dataclass
class RefineResult:
    run_dir: Path
    backbone: Path
    epochs: int
    final_loss: float
    probe: pd.DataFrame | None = None  # metric, before, after, change
    files: dict[str, Path] = field(default_factory=dict)


def _say(msg: str) -> None:
    if dist_utils.is_primary():
        print(msg, flush=True)


def read_pairs(path: str | Path, oct_frames: str | int = "middle") -> pd.DataFrame:
    """path (relative to the CSV or absolute), report, split ('train' when absent); volumes become
    the B-scans `oct_frames` picks, each with its volume's report."""
    path = Path(path)
    if not path.exists():
        raise DataSourceError(f"--pairs {path}: no such file")
    try:
        frame = read_table(path, what="--pairs", text=("path", "report", "split"))
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


class _LowestLoss:
    """Refinement's validation: the weighted objective on the val pairs each epoch (the training
    loss when there are none); the best epoch has the lowest."""

    def __init__(self, objective: RefineObjective, loader, trainer: Trainer) -> None:
        self.objective, self.loader, self.trainer = objective, loader, trainer
        self.best_loss = math.inf

    def __call__(self, epoch: int, row: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        values = {} if self.loader is None else {"val_loss": self.validation_loss()}
        loss = values.get("val_loss", row["train_loss"])
        improved = loss < self.best_loss
        self.best_loss = min(self.best_loss, loss)
        return values, improved

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The same weighted objective on the val pairs (fixed crops; MLM masks drawn as in training)."""
        self.objective.eval()
        total, count = 0.0, 0
        for batch in self.loader:
            self.trainer.skip_log.add(batch.skipped)
            if len(batch) < 2:  # a pair alone has no negatives
                continue
            with autocast(self.trainer.device, self.trainer.dtype):
                loss = self.objective(batch.to(self.trainer.device))["loss"]
            total, count = total + float(loss) * len(batch), count + len(batch)
        self.objective.train()
        return total / count if count else math.nan

    def state(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best_loss = float(state.get("best_loss", math.inf))


def _describe(epochs: int) -> Callable[[dict[str, Any], bool], str]:
    def line(row: dict[str, Any], improved: bool) -> str:
        parts = "".join(f"  {k.removeprefix('loss_')} {row[k]:.3f}" for k in row if k.startswith("loss_"))
        val = f"  val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""
        return (f"epoch {row['epoch'] + 1}/{epochs}  train_loss {row['train_loss']:.4f}{parts}{val}  "
                f"({row['seconds']:.1f}s)")

    return line


def refine(cfg: RefineSettings, *, progress: bool = True) -> RefineResult:
    cfg.validate()
    check_input_size(cfg.model, cfg.input_size)
    inputs = [("--pairs", cfg.pairs), ("--weights", cfg.weights), ("--text-model", cfg.text_model)]
    with claim_dir(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume, inputs=inputs) as claim:
        result = _refine(cfg, progress)
        claim.remove_stale()
    return result


def _refine(cfg: RefineSettings, progress: bool) -> RefineResult:
    trainer = Trainer(TrainerSettings(
        out=cfg.out, kind="refine", device=cfg.device, precision=cfg.precision, seed=cfg.seed, resume=cfg.resume,
        overwrite=cfg.overwrite, epochs=cfg.epochs, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        clip_grad=cfg.clip_grad, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs,
        min_lr=cfg.min_lr, progress=progress))
    run_dir, device = trainer.run_dir, trainer.device
    weights = cfg.loss_weight_map()
    # Objectives left out leave their heads without gradients, which DDP must be told.
    trainer.settings.find_unused_parameters = len(weights) < 4
    pairs = read_pairs(cfg.pairs, cfg.oct_frames)
    spec = get_spec(cfg.model)
    input_size = spec.input_size_for(cfg.input_size)

    text, tokenizer = load_text_model(cfg.text_model)
    vision = create_model(spec, 0, input_size=input_size)
    weights_file = None
    if not trainer.resuming:
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
    if trainer.resume_state is not None:
        _check_resume_fits(trainer.resume_state, cfg, spec)
        weights_file = trainer.resume_state["retinafm"].get("weights_file")

    preprocessing = Preprocessing(cfg.fundus_crop, cfg.oct_crop)
    train_rows = [int(i) for i in pairs.index[pairs["split"] == "train"]]
    val_rows = [int(i) for i in pairs.index[pairs["split"] == "val"]]
    train_ds = ImageDataset(pairs["path"][train_rows].tolist(), train_rows,
                            pretrain_transform(input_size, spec.mean, spec.std, cfg.crop_min_scale, preprocessing))
    if len(train_ds) // dist_utils.world_size() < 2:
        raise DataSourceError(f"--pairs {cfg.pairs}: {len(train_ds)} train pairs; the contrastive and matching "
                              "objectives need at least two per batch")
    # The trainer drops a ragged last batch, which keeps every batch at two or more pairs (one has no negatives).
    val_loader = make_loader(ImageDataset(pairs["path"][val_rows].tolist(), val_rows,
                                          eval_transform(input_size, spec.mean, spec.std, preprocessing=preprocessing)),
                             cfg.batch_size, num_workers=cfg.num_workers) if val_rows else None
    meta = {"model_name": spec.name, "arch": spec.arch, "arch_kwargs": dict(spec.arch_kwargs), "input_size": input_size,
            "global_pool": str(vision.global_pool), "text_model": cfg.text_model, "losses": weights,
            "weights_file": weights_file, "pairs": len(pairs), "settings": to_dict(cfg), "versions": versions()}
    if dist_utils.is_primary():
        write_yaml(run_dir / "config.yaml", {**to_dict(cfg), "input_size": input_size})

    banner = (f"refining {spec.name} with {cfg.text_model} on {device} in {precision_name(trainer.dtype)}: "
              f"{len(train_rows)} train / {len(val_rows)} val pairs, "
              f"objectives {', '.join(f'{k}×{w:g}' for k, w in weights.items())}, {cfg.epochs} epochs, lr {cfg.lr:.3g}")
    hooks = Hooks(validate=_LowestLoss(objective, val_loader, trainer), describe=_describe(cfg.epochs))
    rows = trainer.fit(objective, train_ds, model=model, meta=lambda: meta, hooks=hooks, banner=banner)

    result = RefineResult(run_dir, run_dir / BACKBONE, len(rows), final_loss(rows))
    skipped = trainer.write_skipped()
    if dist_utils.is_primary():
        source = trainer.best_path if trainer.best_path.is_file() else trainer.last_path
        export_backbone(source, result.backbone)
        result.files.update(trainer.files)
        if skipped is not None:
            result.files["skipped"] = skipped
        _say(f"refined backbone: {result.backbone} (from {source.name}; use it as --weights with --model {spec.name})")
    dist_utils.barrier()
    if cfg.probe_on:
        result.probe = probe_before_after(cfg, spec.name, meta["weights_file"], result.backbone, input_size, run_dir)
    return result


def export_backbone(checkpoint: Path, out: Path) -> Path:
    """The vision backbone of a refinement checkpoint, flat in timm's key layout (no head), as
    safetensors with the model's name and input size in its metadata."""
    from safetensors.torch import save_file

    state = open_checkpoint(checkpoint)  # this layout or the one before it ("retinafm_refine")
    vision = {k.removeprefix("vision."): v.contiguous() for k, v in state["model"].items() if k.startswith("vision.")}
    meta = state["retinafm"]
    info = {"format": "retinafm refined backbone", "model": meta["model_name"], "arch": meta["arch"],
            "input_size": str(meta["input_size"]), "global_pool": meta["global_pool"], "text_model": meta["text_model"],
            "epoch": str(state["epoch"])}
    with atomic_path(out) as tmp:
        save_file(vision, str(tmp), metadata=info)
    return out


def _check_resume_fits(state: dict[str, Any], cfg: RefineSettings, spec) -> None:
    meta = state["retinafm"]
    if meta["model_name"] != spec.name or meta["text_model"] != cfg.text_model:
        raise ConfigError(f"--resume: the run refines {meta['model_name']} with {meta['text_model']}, not "
                          f"--model {spec.name} --text-model {cfg.text_model}")


def probe_before_after(cfg: RefineSettings, model_name: str, original: str | None, refined: Path, input_size: int,
                       run_dir: Path) -> pd.DataFrame:
    """Linear probes on `cfg.probe_on` with the backbone before and after refinement, as RetFiner's
    table compares them: test metrics (validation when there is no test split) side by side."""
    from retinafm.settings import EmbedSettings
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
