"""The GPU path on a real CUDA device: bf16 autocast (fp16 + GradScaler where bf16 is absent), fused
AdamW, pinned memory with non-blocking copies, torch.compile and gradient checkpointing, and that
what a GPU run writes is used on a CPU.

Skipped without a GPU (CI has none). On a GPU machine: `pytest tests/test_gpu.py`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_finetune_config, tiny_pretrain_config, tiny_refine_config

from retinafm.data.embeddings import read_embeddings
from retinafm.data.synthetic import write_report_pairs
from retinafm.engine.optim import build_optimizer
from retinafm.runtime.device import amp_dtype
from retinafm.settings import EmbedSettings, PredictSettings
from retinafm.workflows.embed import embed
from retinafm.workflows.finetune import finetune
from retinafm.workflows.predict import predict
from retinafm.workflows.pretrain import pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_run(demo_data, tmp_path_factory):
    """Fine-tuned on the GPU with every speed option a user can turn on."""
    out = tmp_path_factory.mktemp("gpu") / "run"
    return finetune(tiny_finetune_config(demo_data, out, device="cuda", num_workers=2, compile=True,
                                         grad_checkpointing=True, epochs=3, mixup=0.8, cutmix=1.0,
                                         smoothing=0.1))


def test_gpu_autocasts_in_bf16_and_uses_the_fused_optimizer():
    device = torch.device("cuda")
    assert amp_dtype(device) == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).to(device)
    assert build_optimizer(model, 1e-3, 0.05, None).defaults["fused"] is True


def test_gpu_run_checkpoint_is_plain_and_predicts_on_cpu_like_on_gpu(gpu_run, demo_data, tmp_path):
    checkpoint = gpu_run.run_dir / "checkpoint-best.pth"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    # torch.compile's wrapper is not saved: the keys stay RETFound's
    assert not any(k.startswith("_orig_mod.") for k in state["model"])
    assert np.isfinite(pd.read_csv(gpu_run.run_dir / "log.csv")["train_loss"]).all()
    cpu = predict(PredictSettings(checkpoint=checkpoint, images=demo_data / "test", out=tmp_path / "cpu.csv",
                                  device="cpu", num_workers=0), progress=False).predictions
    gpu = predict(PredictSettings(checkpoint=checkpoint, images=demo_data / "test", out=tmp_path / "gpu.csv",
                                  device="cuda", num_workers=2), progress=False).predictions
    assert list(cpu["path"]) == list(gpu["path"])
    probs = [c for c in cpu.columns if c.startswith("prob_")]
    # bf16 on the GPU against fp32 on the CPU: close, not equal
    np.testing.assert_allclose(gpu[probs].to_numpy(), cpu[probs].to_numpy(), atol=0.03)


def test_fp16_with_gradient_scaler_trains_and_resumes(demo_data, tmp_path, monkeypatch):
    """GPUs without bf16 (before Ampere) train in fp16 with a GradScaler, saved for --resume."""
    import retinafm.workflows.finetune as finetune_module

    monkeypatch.setattr(finetune_module, "amp_dtype", lambda device: torch.float16)
    run = tmp_path / "run"
    finetune(tiny_finetune_config(demo_data, run, device="cuda", epochs=1, warmup_epochs=0))
    state = torch.load(run / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert state["scaler"]["scale"] > 0
    result = finetune(tiny_finetune_config(demo_data, run, device="cuda", epochs=2, warmup_epochs=0, resume=True))
    log = pd.read_csv(result.run_dir / "log.csv")
    assert list(log["epoch"]) == [0, 1] and np.isfinite(log["train_loss"]).all()


def test_gpu_embeddings_match_cpu(gpu_run, demo_data, tmp_path):
    checkpoint = str(gpu_run.run_dir / "checkpoint-best.pth")
    files = {}
    for device in ("cpu", "cuda"):
        settings = EmbedSettings(checkpoint=checkpoint, device=device, num_workers=2, dtype="float32")
        embed(demo_data / "test", tmp_path / f"{device}.parquet", settings, progress=False)
        files[device] = read_embeddings(tmp_path / f"{device}.parquet")
    assert list(files["cpu"].frame["path"]) == list(files["cuda"].frame["path"])
    cpu, gpu = files["cpu"].vectors, files["cuda"].vectors
    assert np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu) < 0.02


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_pretraining_on_gpu_gives_weights_finetune_takes(method, demo_data, tmp_path):
    result = pretrain(tiny_pretrain_config(demo_data, tmp_path / "pretrain", method=method, device="cuda",
                                           num_workers=2, epochs=2), progress=False)
    assert np.isfinite(pd.read_csv(result.run_dir / "log.csv")["train_loss"]).all()
    run = finetune(tiny_finetune_config(demo_data, tmp_path / "finetune", device="cuda", epochs=1,
                                        warmup_epochs=0, weights=str(result.checkpoint)))
    assert (run.run_dir / "checkpoint-best.pth").is_file()


def test_refinement_on_gpu(tiny_text_model, demo_data, tmp_path):
    from retinafm.workflows.refine import refine

    pairs = write_report_pairs(tmp_path / "pairs", n_train=24, n_val=8, size=48, seed=0)
    result = refine(tiny_refine_config(pairs, tiny_text_model, tmp_path / "run", device="cuda", num_workers=2,
                                       probe_on=str(demo_data)), progress=False)
    assert np.isfinite(result.final_loss) and result.backbone.is_file()
    assert set(result.probe["metric"]) >= {"auroc_macro"}
