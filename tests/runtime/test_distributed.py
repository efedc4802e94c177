"""torchrun with 2 CPU processes (gloo): DDP training, metrics on gathered predictions, rank 0 writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from retinafm.runtime import distributed as dist_utils


def test_single_process_helpers_are_no_ops():
    assert not dist_utils.launched_by_torchrun() or os.environ.get("WORLD_SIZE")
    assert dist_utils.rank() == 0 and dist_utils.world_size() == 1 and dist_utils.is_primary()
    assert dist_utils.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert dist_utils.mean_across_ranks(2.5) == 2.5


@pytest.mark.slow
def test_torchrun_two_cpu_processes(demo_data, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "retinafm",
           "finetune", "--data-path", str(demo_data), "--out", str(run), "--model", "vit_micro_patch8",
           "--weights", "none", "--input-size", "32", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "8",
           "--lr", "1e-3", "--layer-decay", "1.0", "--randaug-magnitude", "0", "--reprob", "0", "--num-workers", "0",
           "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("epoch 2/2") == 1 and proc.stdout.count("run directory:") == 1  # only rank 0 prints
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [0, 1]
    preds = pd.read_csv(run / "predictions_test.csv")
    # Every test image exactly once, although each rank saw only half of them.
    assert len(preds) == preds["path"].nunique() == 24
    metrics = json.loads((run / "metrics_test.json").read_text())
    assert metrics["n"] == 24
    # lr scales with the world size: blr is not used (lr given), so the head's peak lr is 1e-3.
    assert log["lr"].max() <= 1e-3 + 1e-12


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "retinafm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_torchrun_predict_and_embed_merge_shards_in_input_order(trained_run, demo_data, tmp_path):
    from retinafm.data.embeddings import read_embeddings
    from retinafm.settings import EmbedSettings, PredictSettings
    from retinafm.workflows.embed import embed
    from retinafm.workflows.predict import predict

    checkpoint = trained_run / "checkpoint-best.pth"
    # fp32 on both sides: the suite pins --precision auto to fp32 in this process only, and torchrun's
    # processes would choose bf16 on a CPU with AMX or AVX-512-BF16, moving 30 of the 72 probabilities
    # by up to ~2.7e-4 (measured with --precision bf16). Shards, batch sizes and thread counts move them
    # by under 1e-7.
    proc = _torchrun("predict", "--checkpoint", str(checkpoint), "--images", str(demo_data / "test"),
                     "--out", str(tmp_path / "ddp.csv"), "--num-workers", "0", "--device", "cpu", "--precision", "fp32")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("predictions written") == 1  # rank 0 alone writes and reports
    single = predict(PredictSettings(checkpoint=checkpoint, images=demo_data / "test", out=tmp_path / "one.csv",
                                     num_workers=0, device="cpu", precision="fp32"), progress=False).predictions
    both = pd.read_csv(tmp_path / "ddp.csv")
    assert both["path"].tolist() == single["path"].tolist()  # every image once, in input order
    probs = [c for c in both.columns if c.startswith("prob_")]
    np.testing.assert_allclose(both[probs].to_numpy(), single[probs].to_numpy(), atol=1e-4)  # other batch sizes

    proc = _torchrun("embed", "--images", str(demo_data), "--out", str(tmp_path / "ddp.parquet"), "--model",
                     "vit_micro_patch8", "--weights", "none", "--input-size", "32", "--shard-size", "50",
                     "--num-workers", "0", "--device", "cpu", "--dtype", "float32", "--precision", "fp32")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ddp = read_embeddings(tmp_path / "ddp.parquet")
    one = read_embeddings(embed(demo_data, tmp_path / "one.parquet",
                                EmbedSettings(model="vit_micro_patch8", weights="none", input_size=32, num_workers=0,
                                              device="cpu", dtype="float32", precision="fp32"),
                                progress=False).out)
    assert ddp.frame["path"].tolist() == one.frame["path"].tolist() and len(ddp.frame) == 120
    np.testing.assert_allclose(ddp.vectors, one.vectors, atol=1e-4)
    assert not (tmp_path / "ddp.parquet.parts").exists()


@pytest.mark.slow
def test_torchrun_pretrain_mae_and_dino(demo_data, tmp_path):
    import torch

    common = ["--images", str(demo_data / "train"), "--model", "vit_micro_patch8", "--input-size", "32",
              "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--num-workers", "0", "--device", "cpu"]
    proc = _torchrun("pretrain", "--out", str(tmp_path / "mae"), "--decoder-dim", "32", "--decoder-depth", "1",
                     "--decoder-heads", "4", "--reconstructions", "1", *common)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("epoch 2/2") == 1 and proc.stdout.count("run directory:") == 1  # rank 0 prints
    state = torch.load(tmp_path / "mae" / "checkpoint-last.pth", weights_only=True)
    assert state["epoch"] == 1 and "decoder_pred.weight" in state["model"]
    log = pd.read_csv(tmp_path / "mae" / "log.csv")
    assert list(log["epoch"]) == [0, 1] and np.isfinite(log["train_loss"]).all()

    proc = _torchrun("pretrain", "--method", "dino", "--out", str(tmp_path / "dino"), "--out-dim", "32",
                     "--local-crops", "2", *common)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    state = torch.load(tmp_path / "dino" / "checkpoint-last.pth", weights_only=True)
    # The teacher's centre was averaged over both ranks' batches: one value, finite.
    assert torch.isfinite(state["model"]["loss_fn.center"]).all()


@pytest.mark.slow
def test_torchrun_refine_gathers_negatives_across_ranks(tiny_text_model, tmp_path):
    import torch

    from retinafm.data.synthetic import write_report_pairs

    pairs = write_report_pairs(tmp_path / "pairs", n_train=16, n_val=4, size=48, seed=0)
    proc = _torchrun("refine", "--pairs", str(pairs), "--model", "vit_micro_patch8", "--weights", "none",
                     "--input-size", "32", "--text-model", str(tiny_text_model), "--epochs", "2", "--batch-size", "4",
                     "--embed-dim", "16", "--lr", "1e-3", "--num-workers", "0", "--device", "cpu",
                     "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("epoch 2/2") == 1 and proc.stdout.count("refined backbone:") == 1  # rank 0 prints
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    # With 2 ranks of 4 pairs, each image's contrastive softmax runs over 8 texts: chance is ln 8, not ln 4.
    assert log["loss_itc"].iloc[0] > np.log(4) + 0.3
    state = torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)
    assert state["epoch"] == 1 and (tmp_path / "run" / "backbone.safetensors").is_file()


@pytest.mark.slow
def test_torchrun_explain_shares_the_images_and_writes_what_one_process_writes(trained_run, demo_data, tmp_path):
    from retinafm.settings import ExplainSettings
    from retinafm.workflows.explain import explain

    checkpoint = trained_run / "checkpoint-best.pth"
    images = demo_data / "test" / "glaucoma"
    proc = _torchrun("explain", "--checkpoint", str(checkpoint), "--images", str(images), "--out",
                     str(tmp_path / "ddp"), "--num-workers", "0", "--device", "cpu", "--precision", "fp32",
                     "--method", "rollout", "--batch-size", "3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("heatmaps of") == 1  # rank 0 alone reports
    one = explain(ExplainSettings(checkpoint=str(checkpoint), images=str(images), out=str(tmp_path / "one"),
                                  num_workers=0, device="cpu", precision="fp32", method="rollout"),
                  progress=False).explanations
    both = pd.read_csv(tmp_path / "ddp" / "explanations.csv")
    assert both["path"].tolist() == one["path"].tolist() and len(both) == 8  # every image once, in input order
    for a, b in zip(both["heatmap"], one["heatmap"], strict=True):
        np.testing.assert_allclose(np.load(tmp_path / "ddp" / a), np.load(tmp_path / "one" / b), atol=1e-4)
