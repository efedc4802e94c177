"""End to end through the public function on generated data (CPU, tiny ViT)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_finetune_config
from PIL import Image

from retinafm.data.sources import DataSourceError
from retinafm.engine.checkpoint import load_checkpoint
from retinafm.files import OutputExistsError
from retinafm.settings import ConfigError
from retinafm.workflows.finetune import finetune

RUN_FILES = {"config.yaml", "log.csv", "checkpoint-best.pth", "checkpoint-last.pth", "metrics_test.json",
             "metrics_test.csv", "predictions_test.csv"}


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ft") / "run"
    cfg = tiny_finetune_config(demo_data, run, epochs=3)
    return cfg, finetune(cfg)


def test_run_directory_contract(trained, demo_data):
    cfg, result = trained
    run = Path(cfg.out)
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    assert {p.name for p in (run / "plots").iterdir()} >= {"confusion_matrix.png", "roc.png", "curves.png"}
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [0, 1, 2]
    assert {"lr", "train_loss", "val_loss", "val_auroc_macro", "val_accuracy"} <= set(log.columns)
    metrics = json.loads((run / "metrics_test.json").read_text())
    assert metrics["n"] == 24 and 0.0 <= metrics["auroc_macro"] <= 1.0
    preds = pd.read_csv(run / "predictions_test.csv")
    assert list(preds.columns[:3]) == ["path", "prediction", "label"]
    probs = preds[[c for c in preds.columns if c.startswith("prob_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # The best checkpoint is the epoch with the highest validation AUROC (ties: lower loss).
    best = load_checkpoint(run / "checkpoint-best.pth")
    ranked = log.sort_values(["val_auroc_macro", "val_loss"], ascending=[False, True])
    assert best["retinafm"]["epoch"] == int(ranked.iloc[0]["epoch"]) == result.best_epoch
    assert best["retinafm"]["class_names"] == ["diabetic_retinopathy", "glaucoma", "normal"]
    assert "optimizer" not in best and "optimizer" in load_checkpoint(run / "checkpoint-last.pth")


def test_existing_run_is_refused_and_resume_continues(trained, demo_data):
    cfg, _ = trained
    with pytest.raises(OutputExistsError, match="--resume"):
        finetune(tiny_finetune_config(demo_data, cfg.out, epochs=3))
    more = tiny_finetune_config(demo_data, cfg.out, epochs=4, resume=True)
    finetune(more)
    log = pd.read_csv(Path(cfg.out) / "log.csv")
    assert list(log["epoch"]) == [0, 1, 2, 3]


def test_resume_without_a_run(tmp_path, demo_data):
    with pytest.raises(ConfigError, match="checkpoint-last.pth does not exist"):
        finetune(tiny_finetune_config(demo_data, tmp_path / "new", resume=True))


def test_unreadable_training_images_are_skipped_and_listed(tmp_path, demo_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    (data / "train" / "normal" / "broken.png").write_bytes(b"\x89PNG truncated")
    (data / "test" / "glaucoma" / "empty.jpg").write_bytes(b"")
    run = tmp_path / "run"
    finetune(tiny_finetune_config(data, run, epochs=1, warmup_epochs=0))
    skipped = pd.read_csv(run / "skipped.csv")
    assert set(Path(p).name for p in skipped["path"]) == {"broken.png", "empty.jpg"}
    assert len(pd.read_csv(run / "predictions_test.csv")) == 24


def test_automatic_split_is_saved(tmp_path):
    from retinafm.data.synthetic import render_fundus

    rng = np.random.default_rng(0)
    for cls in ("glaucoma", "normal"):
        (tmp_path / "flat" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(render_fundus(rng, cls, size=48)).save(tmp_path / "flat" / cls / f"{i}.png")
    run = tmp_path / "run"
    finetune(tiny_finetune_config(tmp_path / "flat", run, epochs=1, warmup_epochs=0, split="0.6,0.2,0.2"))
    split = pd.read_csv(run / "split.csv")
    assert list(split.columns) == ["path", "split", "label", "patient_id"]
    assert split["split"].value_counts().to_dict() == {"train": 12, "val": 4, "test": 4}


def test_no_validation_split_is_a_clear_error(tmp_path):
    from retinafm.data.synthetic import render_fundus

    rng = np.random.default_rng(0)
    for cls in ("glaucoma", "normal"):
        (tmp_path / "d" / "train" / cls).mkdir(parents=True)
        Image.fromarray(render_fundus(rng, cls, size=48)).save(tmp_path / "d" / "train" / cls / "a.png")
    with pytest.raises(DataSourceError, match="no validation images"):
        finetune(tiny_finetune_config(tmp_path / "d", tmp_path / "run"))


def test_sgd_linear_probe_only_trains_the_head(tmp_path, demo_data):
    run = tmp_path / "lp"
    finetune(tiny_finetune_config(demo_data, run, epochs=1, warmup_epochs=0, adaptation="lp", lp_mode="sgd",
                                  mixup=0.8, cutmix=1.0))
    # Start from a saved random backbone to compare: the lp run's backbone must equal its init.
    state = load_checkpoint(run / "checkpoint-last.pth")
    torch.manual_seed(0)
    from retinafm.models.registry import create_model, get_spec

    fresh = create_model(get_spec("vit_micro_patch8"), 3, input_size=32)
    trained_blocks = {k: v for k, v in state["model"].items() if k.startswith("blocks.0.")}
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained_blocks.items())
    assert not torch.equal(state["model"]["head.weight"], torch.zeros_like(state["model"]["head.weight"]))


def test_linear_probe_defaults_to_cached_features(tmp_path, demo_data):
    """--adaptation lp embeds each image once and fits the scikit-learn probe into the run dir."""
    from retinafm.data.embeddings import read_embeddings
    from retinafm.settings import PredictSettings
    from retinafm.workflows.predict import predict

    run = tmp_path / "lp"
    result = finetune(tiny_finetune_config(demo_data, run, adaptation="lp"))
    assert result.test["auroc_macro"] > 0.7 and result.selection_metric == "auroc_macro"
    emb = read_embeddings(run / "embeddings.parquet")
    assert len(emb.frame) == 120 and list(emb.frame.columns) == ["path", "split", "label"]
    assert emb.vectors.dtype == np.float32
    assert json.loads((run / "metrics_test.json").read_text())["auroc_macro"] == result.test["auroc_macro"]
    expected = pd.read_csv(run / "predictions_test.csv").set_index("path")
    predicted = predict(PredictSettings(checkpoint=run / "checkpoint-best.pth", images=demo_data / "test",
                                        out=tmp_path / "p.csv", num_workers=0, device="cpu"), progress=False)
    got = pd.read_csv(predicted.out).set_index("path").loc[expected.index]
    np.testing.assert_allclose(got.filter(like="prob_").to_numpy(), expected.filter(like="prob_").to_numpy(), atol=1e-4)
    with pytest.raises(ConfigError, match="--lp-mode sgd"):
        finetune(tiny_finetune_config(demo_data, tmp_path / "mlp", adaptation="lp", head="mlp"))


@pytest.mark.slow
def test_retfound_mae_vit_large_checkpoint_fine_tunes(tmp_path, capsys):
    """A RETFound-MAE file with real ViT-L/16 keys (decoder included) loads and fine-tunes a step."""
    import argparse

    import timm

    from retinafm.data.synthetic import render_fundus

    torch.manual_seed(0)
    encoder = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, global_pool="token")
    sd = dict(encoder.state_dict())
    dec = 512
    sd.update({"mask_token": torch.zeros(1, 1, 1024), "decoder_embed.weight": torch.zeros(dec, 1024),
               "decoder_embed.bias": torch.zeros(dec), "decoder_pos_embed": torch.zeros(1, 197, dec),
               "decoder_norm.weight": torch.ones(dec), "decoder_norm.bias": torch.zeros(dec),
               "decoder_pred.weight": torch.zeros(16 * 16 * 3, dec), "decoder_pred.bias": torch.zeros(16 * 16 * 3)})
    decoder_block = timm.create_model("vit_tiny_patch16_224", embed_dim=dec, depth=1, num_heads=16).blocks[0]
    for i in range(8):  # MAE ViT-L's decoder: 8 blocks of width 512
        for k, v in decoder_block.state_dict().items():
            sd[f"decoder_blocks.{i}.{k}"] = v
    before = {k: sd[k].clone() for k in ("blocks.0.attn.qkv.weight", "blocks.23.mlp.fc2.weight")}
    ckpt = tmp_path / "RETFound_mae_natureCFP.pth"
    torch.save({"model": sd, "epoch": 799, "args": argparse.Namespace(model="mae_vit_large_patch16")}, ckpt)
    del encoder, sd

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("glaucoma", "normal"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(render_fundus(rng, cls, size=48)).save(tmp_path / "d" / split / cls / f"{i}.png")
    cfg = tiny_finetune_config(tmp_path / "d", tmp_path / "run", model="vit_large_patch16", weights=str(ckpt),
                               input_size=32, epochs=1, warmup_epochs=0, batch_size=4, layer_decay=0.65)
    result = finetune(cfg)
    printed = capsys.readouterr().out
    assert "retfound_mae layout" in printed
    assert ("newly initialised (not in the checkpoint): fc_norm.bias, fc_norm.weight, head.bias, head.weight\n"
            in printed)
    assert "decoder_blocks.7" not in printed.split("not used by this model:")[0]
    best = load_checkpoint(tmp_path / "run" / "checkpoint-best.pth")
    assert best["retinafm"]["arch"] == "vit_large_patch16_224" and best["model"]["pos_embed"].shape == (1, 5, 1024)
    for k, v in before.items():  # loaded, then moved by one optimiser step (not left at random init)
        delta = (best["model"][k] - v).abs().max().item()
        assert 0 < delta < 1e-2, (k, delta)
    assert result.best_epoch == 0


def test_finetune_on_oct_volumes_uses_every_bscan(oct_run):
    """DICOM, .vol and multi-page TIFF volumes train and evaluate B-scan by B-scan (--oct-frames all)."""
    predictions = pd.read_csv(oct_run / "predictions_test.csv")
    # test: 2 + 2 five-frame DICOMs, a 4-frame .vol and a 3-frame TIFF
    assert len(predictions) == 4 * 5 + 4 + 3
    assert predictions["path"].str.contains("#frame=").all()
    assert predictions["path"].str.contains(r"heyex\.vol#frame=3").any()
    assert predictions["path"].str.contains(r"stack\.tif#frame=2").any()
    summary = pd.read_csv(oct_run / "data_summary.csv")
    assert summary.set_index("split").loc["train", ["amd", "normal"]].tolist() == [30, 30]
    assert not (oct_run / "skipped.csv").exists()


@pytest.mark.slow
def test_run_killed_mid_training_resumes_to_the_same_result(tmp_path, demo_data):
    """kill -9 during training, then --resume: the final metrics equal an uninterrupted run's (CPU)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["--data-path", str(demo_data), "--model", "vit_micro_patch8", "--weights", "none", "--input-size", "32",
            "--epochs", "6", "--warmup-epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--layer-decay", "1.0",
            "--randaug-magnitude", "5", "--reprob", "0.25", "--smoothing", "0.1", "--num-workers", "0",
            "--device", "cpu", "--bootstrap", "0", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "retinafm", "finetune"]
    subprocess.run([*command, *args, "--out", str(tmp_path / "whole")], env=env, check=True, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen([*command, *args, "--out", str(run)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.csv").is_file() and len(pd.read_csv(run / "log.csv")) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics_test.json").exists()
    subprocess.run([*command, "--resume", str(run)], env=env, check=True, capture_output=True)

    whole = json.loads((tmp_path / "whole" / "metrics_test.json").read_text())
    resumed = json.loads((run / "metrics_test.json").read_text())
    for key in ("auroc_macro", "accuracy", "kappa", "loss"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key
    log_whole, log_resumed = pd.read_csv(tmp_path / "whole" / "log.csv"), pd.read_csv(run / "log.csv")
    np.testing.assert_allclose(log_resumed["train_loss"], log_whole["train_loss"], atol=1e-6)


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_model(tmp_path, demo_data):
    """--grad-checkpointing trades compute for memory; the numbers must not change (CPU, same seed)."""
    plain = finetune(tiny_finetune_config(demo_data, tmp_path / "plain", epochs=1, warmup_epochs=0, drop_path=0.1))
    saved = finetune(tiny_finetune_config(demo_data, tmp_path / "ckpt", epochs=1, warmup_epochs=0, drop_path=0.1,
                                          grad_checkpointing=True))
    a, b = pd.read_csv(tmp_path / "plain" / "log.csv"), pd.read_csv(tmp_path / "ckpt" / "log.csv")
    np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=1e-5)
    assert saved.test["auroc_macro"] == pytest.approx(plain.test["auroc_macro"], abs=1e-6)


@pytest.mark.slow
def test_bf16_autocast_on_a_cpu_trains_and_is_recorded(tmp_path, demo_data, capsys):
    """--precision bf16 is what auto picks on CPUs with AMX or AVX-512-BF16: the training step,
    validation and test run under CPU autocast, the weights stay fp32 and the run records it."""
    import yaml

    with pytest.warns(UserWarning, match="without AMX or AVX-512-BF16"):
        bf16 = finetune(tiny_finetune_config(demo_data, tmp_path / "bf16", epochs=1, warmup_epochs=0, precision="bf16"))
    fp32 = finetune(tiny_finetune_config(demo_data, tmp_path / "fp32", epochs=1, warmup_epochs=0))
    printed = capsys.readouterr().out
    assert "on cpu in bf16 for 1 epochs" in printed and "on cpu in fp32 for 1 epochs" in printed
    assert yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())["precision"] == "bf16"
    state = load_checkpoint(tmp_path / "bf16" / "checkpoint-best.pth")["model"]
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    a, b = pd.read_csv(tmp_path / "fp32" / "log.csv"), pd.read_csv(tmp_path / "bf16" / "log.csv")
    assert b["train_loss"][0] != a["train_loss"][0]  # it did run in bf16 ...
    np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=0.02)  # ... and learns the same
    assert np.isfinite(bf16.test["auroc_macro"]) and np.isfinite(fp32.test["auroc_macro"])


def test_unknown_precision_is_a_config_error(tmp_path, demo_data):
    with pytest.raises(ConfigError, match="--precision must be one of auto, fp32, bf16, fp16, not 'half'"):
        finetune(tiny_finetune_config(demo_data, tmp_path / "run", precision="half"))
