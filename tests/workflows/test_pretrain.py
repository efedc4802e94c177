"""`retinafm pretrain`: the run directory, resume, --init, and the checkpoint as --weights."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_pretrain_config

from retinafm.cli import main
from retinafm.data.sources import DataSourceError
from retinafm.engine import trainer as trainer_module
from retinafm.models.registry import create_model, get_spec
from retinafm.models.weights import WeightsError, load_backbone_weights
from retinafm.settings import ConfigError, PretrainSettings
from retinafm.workflows.pretrain import pretrain


@pytest.fixture(scope="module")
def mae_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mae") / "run"
    return pretrain(tiny_pretrain_config(demo_data, out, splits="train,val"), progress=False)


def test_mae_run_writes_a_retfound_mae_checkpoint_and_figures(mae_run):
    run = mae_run.run_dir
    log = pd.read_csv(run / "log.csv")
    assert list(log.columns) == ["epoch", "lr", "train_loss", "seconds"] and len(log) == 2
    state = torch.load(run / "checkpoint-last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["retinafm"]["kind"] == "pretrain" and state["retinafm"]["method"] == "mae"
    assert state["retinafm"]["format"] == 2 and {"optimizer", "rng_cpu"} <= set(state)
    assert state["retinafm"]["images"] == 24 * 3 + 8 * 3  # train + val only: --splits
    keys = set(state["model"])
    assert {"cls_token", "pos_embed", "norm.weight", "mask_token", "decoder_pred.weight"} <= keys
    for epoch in (1, 2):
        assert (run / "plots" / f"reconstructions_epoch{epoch:03d}.png").stat().st_size > 5000
    assert (run / "plots" / "curves.png").is_file() and (run / "config.yaml").is_file()


def test_checkpoint_is_weights_for_finetune_and_embed(mae_run, demo_data, tmp_path):
    from helpers import tiny_finetune_config

    from retinafm.settings import EmbedSettings
    from retinafm.workflows.embed import embed
    from retinafm.workflows.finetune import finetune

    ckpt = str(mae_run.checkpoint)
    model = create_model(get_spec("vit_micro_patch8"), 3, input_size=32, global_pool="avg")
    report = load_backbone_weights(model, ckpt, "timm")
    assert set(report.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    result = finetune(tiny_finetune_config(demo_data, tmp_path / "ft", weights=ckpt, epochs=1))
    assert (result.run_dir / "checkpoint-best.pth").is_file()
    emb = embed(demo_data / "test", tmp_path / "emb.parquet",
                EmbedSettings(model="vit_micro_patch8", weights=ckpt, input_size=32, num_workers=0, device="cpu"),
                progress=False)
    assert emb.count == 24 and emb.dim == 64


def _interrupt_after_first_epoch(cfg: PretrainSettings, monkeypatch) -> None:
    """Stop the run right after epoch 1's checkpoint (what a kill -9 then leaves), then resume it."""
    said = trainer_module._say

    def stop_after_first_epoch(msg: str) -> None:
        said(msg)
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "_say", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, progress=False)
    monkeypatch.setattr(trainer_module, "_say", said)
    assert len(pd.read_csv(Path(cfg.out) / "log.csv")) == 1
    cfg.resume = True
    pretrain(cfg, progress=False)


def _assert_same_run(a: Path, b: Path) -> None:
    resumed = torch.load(a / "checkpoint-last.pth", weights_only=True)["model"]
    straight = torch.load(b / "checkpoint-last.pth", weights_only=True)["model"]
    assert set(resumed) == set(straight)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    assert pd.read_csv(a / "log.csv")["train_loss"].tolist() == pd.read_csv(b / "log.csv")["train_loss"].tolist()


def test_resume_after_interruption_matches_the_uninterrupted_run(mae_run, demo_data, tmp_path, monkeypatch):
    cfg = tiny_pretrain_config(demo_data, tmp_path / "run", splits="train,val")
    _interrupt_after_first_epoch(cfg, monkeypatch)
    _assert_same_run(tmp_path / "run", mae_run.run_dir)


def test_init_continues_encoder_and_decoder(mae_run, demo_data, tmp_path):
    # lr 0: the weights stay what --init loaded, so both halves must equal the file's.
    result = pretrain(tiny_pretrain_config(demo_data, tmp_path / "cont", init=str(mae_run.checkpoint), lr=0.0,
                                           epochs=1, reconstructions=0), progress=False)
    before = torch.load(mae_run.checkpoint, weights_only=True)["model"]
    after = torch.load(result.checkpoint, weights_only=True)["model"]
    assert set(before) == set(after)
    for key in ("blocks.0.attn.qkv.weight", "decoder_blocks.0.mlp.fc1.weight", "decoder_pred.bias", "mask_token"):
        torch.testing.assert_close(after[key], before[key], msg=key)
    with pytest.raises(WeightsError, match="decoder does not fit"):
        pretrain(tiny_pretrain_config(demo_data, tmp_path / "bad", init=str(mae_run.checkpoint), decoder_dim=64,
                                      epochs=1), progress=False)


def test_init_from_a_finetuned_or_plain_encoder_starts_a_fresh_decoder(demo_data, tmp_path, capsys):
    encoder = create_model(get_spec("vit_micro_patch8"), 0, input_size=32, global_pool="token")
    torch.save(encoder.state_dict(), tmp_path / "encoder.pth")
    result = pretrain(tiny_pretrain_config(demo_data, tmp_path / "run", init=str(tmp_path / "encoder.pth"), epochs=1,
                                           lr=0.0, reconstructions=0), progress=False)
    assert "the decoder starts fresh" in capsys.readouterr().out
    after = torch.load(result.checkpoint, weights_only=True)["model"]
    torch.testing.assert_close(after["blocks.1.mlp.fc2.weight"], encoder.state_dict()["blocks.1.mlp.fc2.weight"])


def test_dino_run_saves_a_teacher_that_loads_as_weights(demo_data, tmp_path):
    result = pretrain(tiny_pretrain_config(demo_data, tmp_path / "dino", method="dino", epochs=1), progress=False)
    state = torch.load(result.checkpoint, weights_only=True)
    assert {"model", "retinafm", "optimizer"} <= set(state) and state["retinafm"]["method"] == "dino"
    assert {k.split(".")[0] for k in state["model"]} == {"student", "teacher", "loss_fn"}
    assert pd.read_csv(result.run_dir / "log.csv")["train_loss"].notna().all()
    model = create_model(get_spec("vit_micro_patch8"), 3, input_size=32, global_pool="avg")
    report = load_backbone_weights(model, str(result.checkpoint), "timm")
    assert set(report.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    teacher_qkv = state["model"]["teacher.backbone.blocks.0.attn.qkv.weight"]
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, teacher_qkv)


def test_cli_runs_and_refuses_an_existing_run(demo_data, tmp_path):
    args = ["pretrain", "--images", str(demo_data / "train"), "--out", str(tmp_path / "run"), "--model",
            "vit_micro_patch8", "--input-size", "32", "--epochs", "1", "--batch-size", "16", "--decoder-dim", "32",
            "--decoder-depth", "1", "--decoder-heads", "4", "--num-workers", "0", "--device", "cpu",
            "--reconstructions", "1"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "checkpoint-last.pth" in first.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.output and "--resume" in again.output


@pytest.mark.parametrize("overrides, message", [
    (dict(images=""), "--images is required"),
    (dict(method="simclr"), "--method must be"),
    (dict(mask_ratio=1.0), "--mask-ratio"),
    (dict(warmup_epochs=5), "--warmup-epochs"),
    (dict(splits="train"), "has no split"),
])
def test_bad_settings_are_named(overrides, message, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 40), (120, 60, 30)).save(images / "a.png")
    cfg = tiny_pretrain_config(images, tmp_path / "run")
    for name, value in overrides.items():
        setattr(cfg, name, value)
    with pytest.raises((ConfigError, DataSourceError), match=message):
        pretrain(cfg, progress=False)
