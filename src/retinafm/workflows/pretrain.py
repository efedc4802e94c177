"""`retinafm pretrain`: self-supervised pretraining on unlabelled images (MAE or DINO).

Writes a run directory like finetune's: config.yaml, log.csv (epoch, lr, train_loss, seconds),
checkpoint-last.pth (every epoch; `--resume` continues from it), plots/curves.png and, for MAE,
plots/reconstructions_epochNNN.png. checkpoint-last.pth (kind "pretrain") is what `finetune
--weights`, `embed --weights` and `pretrain --init` take: MAE's weights in RETFound-MAE's layout
(encoder + decoder under `model`), DINO's in DINO's names (`student.` / `teacher.` with
`backbone.` and `head.`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn

from retinafm.data.loader import ImageDataset
from retinafm.data.sources import DataSourceError
from retinafm.data.transforms import (
    MultiCrop,
    Preprocessing,
    eval_transform,
    pretrain_transform,
)
from retinafm.engine.checkpoint import versions
from retinafm.engine.trainer import Hooks, Trainer, TrainerSettings, final_loss
from retinafm.files import claim_dir, write_yaml
from retinafm.models.registry import ModelSpec, check_input_size, get_spec
from retinafm.models.weights import (
    WeightsError,
    load_backbone_weights,
    read_checkpoint,
    resolve_weights,
)
from retinafm.objectives.dino import Dino
from retinafm.objectives.mae import DECODER_PREFIXES, MaskedAutoencoder
from retinafm.runtime import distributed as dist_utils
from retinafm.runtime.device import precision_name
from retinafm.settings import ConfigError, PretrainSettings, to_dict


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path
    epochs: int
    final_loss: float
    files: dict[str, Path] = field(default_factory=dict)


def _say(msg: str) -> None:
    if dist_utils.is_primary():
        print(msg, flush=True)


def pretrain(cfg: PretrainSettings, *, progress: bool = True) -> PretrainResult:
    cfg.validate()
    check_input_size(cfg.model, cfg.input_size)
    inputs = [("--images", cfg.images), ("--init", cfg.init)]
    with claim_dir(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume, inputs=inputs) as claim:
        result = _pretrain(cfg, progress)
        claim.remove_stale()
    return result


def _pretrain(cfg: PretrainSettings, progress: bool) -> PretrainResult:
    trainer = Trainer(TrainerSettings(
        out=cfg.out, kind="pretrain", device=cfg.device, precision=cfg.precision, seed=cfg.seed, resume=cfg.resume,
        overwrite=cfg.overwrite, epochs=cfg.epochs, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        accum_iter=cfg.accum_iter, clip_grad=cfg.clip_grad, lr=cfg.lr, blr=cfg.method_default("blr"),
        weight_decay=cfg.method_default("weight_decay"), betas=(0.9, 0.95) if cfg.method == "mae" else (0.9, 0.999),
        warmup_epochs=int(cfg.method_default("warmup_epochs")), min_lr=cfg.min_lr, progress=progress))
    run_dir, device = trainer.run_dir, trainer.device

    paths = pretraining_images(cfg)
    spec = get_spec(cfg.model)
    input_size = spec.input_size_for(cfg.input_size)
    if trainer.resume_state is not None:
        _check_resume_fits(trainer.resume_state, cfg, spec)
    encoder = build_encoder(spec, input_size, dynamic_size=cfg.method == "dino")
    init_path = None
    if cfg.init and cfg.init.lower() != "none" and not trainer.resuming:
        # Rank 0 downloads first; the others then find the file in their cache.
        init_path = resolve_weights(spec, cfg.init) if dist_utils.is_primary() else None
        dist_utils.barrier()
        init_path = init_path or resolve_weights(spec, cfg.init)
        _say(load_backbone_weights(encoder, init_path, spec.family).summary())
    preprocessing = Preprocessing(cfg.fundus_crop, cfg.oct_crop)

    hooks = Hooks()
    if cfg.method == "mae":
        mae = MaskedAutoencoder(encoder, decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                                decoder_heads=cfg.decoder_heads, mask_ratio=cfg.mask_ratio,
                                norm_pix_loss=cfg.norm_pix_loss)
        if init_path is not None:
            _load_decoder(mae, init_path)
        elif not trainer.resuming:
            mae.init_encoder_position()
        mae.grad_checkpointing = cfg.grad_checkpointing
        objective: nn.Module = mae
        transform = pretrain_transform(input_size, spec.mean, spec.std, cfg.crop_min_scale, preprocessing)
        shown = _reconstruction_batch(paths, cfg, input_size, spec, preprocessing) \
            if cfg.reconstructions and dist_utils.is_primary() else None
        if shown is not None:
            def draw(epoch: int, _row: dict[str, Any]) -> None:
                trainer.files["reconstructions"] = _draw_reconstructions(mae, shown, spec, device, epoch, run_dir)

            hooks.after_epoch = draw
    else:
        local_size = (spec.input_size_for(cfg.local_size, "--local-size") if cfg.local_size  # patches, tokens
                      else max(2, round(input_size * 96 / 224 / spec.patch_size)) * spec.patch_size)
        dino = Dino(encoder, out_dim=cfg.out_dim, teacher_temp=cfg.teacher_temp,
                    warmup_teacher_temp=cfg.warmup_teacher_temp, warmup_teacher_epochs=cfg.warmup_teacher_epochs,
                    momentum=cfg.momentum_teacher)
        objective = dino
        transform = MultiCrop(input_size, local_size, spec.mean, spec.std, local_crops=cfg.local_crops,
                              preprocessing=preprocessing)
        hooks.before_epoch, hooks.after_step = dino.set_epoch, dino.update_teacher
    if cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)  # DINO runs the timm model's own forward

    dataset = ImageDataset(paths, [None] * len(paths), transform)
    if cfg.method == "dino":
        dino.total_steps = max(1, cfg.epochs * trainer.updates_per_epoch(len(dataset)))
    meta = {"method": cfg.method, "model_name": spec.name, "arch": spec.arch, "arch_kwargs": dict(spec.arch_kwargs),
            "input_size": input_size, "patch_size": spec.patch_size, "mean": list(spec.mean), "std": list(spec.std),
            "images": len(paths), "settings": to_dict(cfg), "init": init_path, "versions": versions()}
    if dist_utils.is_primary():
        write_yaml(run_dir / "config.yaml", {**to_dict(cfg), "input_size": input_size})
    banner = (f"pretraining {spec.name} with {cfg.method.upper()} on {device} in {precision_name(trainer.dtype)}: "
              f"{len(paths)} images, {cfg.epochs} epochs, lr {trainer.lr:.3g}")
    rows = trainer.fit(objective, dataset, meta=lambda: meta, hooks=hooks, banner=banner)

    skipped = trainer.write_skipped()
    if dist_utils.is_primary():
        if skipped is not None:
            _say(f"{trainer.skipped_count} unreadable file(s) skipped: {skipped}")
        _say(f"checkpoint: {trainer.last_path} (use it as --weights for finetune / embed, or --init to continue)")
    dist_utils.barrier()
    return PretrainResult(run_dir, trainer.last_path, len(rows), final_loss(rows), dict(trainer.files))


def pretraining_images(cfg: PretrainSettings) -> list[str]:
    """Every image `--images` names (labels ignored), restricted to `--splits` when given."""
    from retinafm.data.images import image_table

    table = image_table(cfg.images, cfg.oct_frames)
    wanted = cfg.split_list()
    if wanted:
        if "split" not in table.columns:
            raise DataSourceError(f"--splits {','.join(wanted)}: {cfg.images} has no split (no train/val/test folders, "
                                  "no split column)")
        table = table[table["split"].isin(wanted)]
        if table.empty:
            raise DataSourceError(f"--splits {','.join(wanted)}: no images of those splits in {cfg.images}")
    return table["path"].tolist()


def build_encoder(spec: ModelSpec, input_size: int, *, dynamic_size: bool = False) -> nn.Module:
    """The ViT to pretrain: class-token pooling with its final norm (MAE's and DINO's encoder),
    no head; `dynamic_size` for DINO's smaller local crops."""
    kwargs: dict[str, Any] = dict(spec.arch_kwargs)
    kwargs.update(pretrained=False, num_classes=0, global_pool="token", img_size=input_size)
    if dynamic_size:
        kwargs["dynamic_img_size"] = True
    return timm.create_model(spec.arch, **kwargs)


def _load_decoder(mae: MaskedAutoencoder, path: str) -> None:
    """The MAE decoder from an --init file that has one (MAE / RETFound pretraining checkpoints)."""
    ckpt = read_checkpoint(path)
    inner = ckpt.get("model", ckpt) if isinstance(ckpt.get("model", ckpt), dict) else ckpt
    decoder = {k.removeprefix("module."): v for k, v in inner.items()
               if isinstance(v, torch.Tensor) and k.removeprefix("module.").startswith(DECODER_PREFIXES)}
    if not decoder:
        _say(f"{path} has no MAE decoder: the decoder starts fresh")
        return
    expected = mae.decoder_state_dict()
    if "decoder_pos_embed" in decoder and decoder["decoder_pos_embed"].shape != expected["decoder_pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        grid = mae._grid
        decoder["decoder_pos_embed"] = resample_abs_pos_embed(decoder["decoder_pos_embed"], list(grid),
                                                              num_prefix_tokens=1)
    wrong = sorted(k for k in decoder if k in expected and decoder[k].shape != expected[k].shape)
    if set(decoder) != set(expected) or wrong:
        missing, extra = sorted(set(expected) - set(decoder)), sorted(set(decoder) - set(expected))
        raise WeightsError(
            f"{path}: its MAE decoder does not fit --decoder-dim/--decoder-depth/--decoder-heads "
            f"({', '.join(f'{k} {tuple(decoder[k].shape)}' for k in wrong[:3]) or ''}"
            f"{' missing ' + ', '.join(missing[:3]) if missing else ''}"
            f"{' extra ' + ', '.join(extra[:3]) if extra else ''}). "
            "Give the decoder settings it was trained with (RETFound / MAE ViT-L: 512, 8, 16)."
        )
    mae.load_state_dict(decoder, strict=False)  # the key set was checked above
    _say(f"decoder: {len(decoder)} tensors from {path}")


def _check_resume_fits(state: dict[str, Any], cfg: PretrainSettings, spec: ModelSpec) -> None:
    meta = state["retinafm"]
    if meta["method"] != cfg.method or meta["model_name"] != spec.name:
        raise ConfigError(f"--resume: the run is {meta['method']} on {meta['model_name']}, not --method {cfg.method} "
                          f"--model {spec.name}")


def _reconstruction_batch(paths: list[str], cfg: PretrainSettings, input_size: int, spec: ModelSpec,
                          preprocessing: Preprocessing) -> torch.Tensor | None:
    """The first readable images, centre-cropped, drawn after every epoch with the same mask."""
    dataset = ImageDataset(paths[: cfg.reconstructions * 3], [None] * min(len(paths), cfg.reconstructions * 3),
                           eval_transform(input_size, spec.mean, spec.std, preprocessing=preprocessing))
    images = [item[0] for item in (dataset[i] for i in range(len(dataset))) if item[0] is not None]
    return torch.stack(images[: cfg.reconstructions]) if images else None


def _draw_reconstructions(mae: MaskedAutoencoder, images: torch.Tensor, spec: ModelSpec, device: torch.device,
                          epoch: int, run_dir: Path) -> Path:
    from retinafm.plots import plot_reconstructions

    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    noise = torch.rand(images.shape[0], mae._grid[0] * mae._grid[1], generator=torch.Generator().manual_seed(0))
    was_training = mae.training
    mae.eval()
    masked, recon = mae.reconstruct(images.to(device), noise.to(device))
    mae.train(was_training)

    def picture(x: torch.Tensor) -> np.ndarray:
        return (x.float().cpu() * std + mean).permute(0, 2, 3, 1).numpy()

    rows = list(zip(picture(images), picture(masked), picture(recon), strict=True))
    return plot_reconstructions(rows, run_dir / "plots" / f"reconstructions_epoch{epoch + 1:03d}.png",
                                title=f"MAE reconstructions after epoch {epoch + 1} (mask ratio {mae.mask_ratio:g})")
