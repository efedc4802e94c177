"""kill -9 during training, then --resume: pretraining (MAE, DINO) and refinement end exactly where
an uninterrupted run ends (CPU, one thread): the same log and the same final weights.
(Fine-tuning has its own in test_finetune.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from retinafm.data.synthetic import write_report_pairs

DRIVER = """
import json, sys
kind, settings = sys.argv[1], json.loads(sys.argv[2])
if kind == "pretrain":
    from retinafm.settings import PretrainSettings
    from retinafm.workflows.pretrain import pretrain
    pretrain(PretrainSettings(**settings), progress=False)
else:
    from retinafm.settings import RefineSettings
    from retinafm.workflows.refine import refine
    refine(RefineSettings(**settings), progress=False)
"""


def _settings(case: str, demo_data: Path, text_model: Path, tmp_path: Path) -> tuple[str, dict]:
    common = dict(model="vit_micro_patch8", input_size=32, epochs=5, warmup_epochs=1, lr=1e-3, num_workers=0,
                  device="cpu", seed=3)
    if case == "refine":
        pairs = write_report_pairs(tmp_path / "pairs", n_train=16, n_val=8, size=48, seed=0)
        return "refine", dict(common, pairs=str(pairs), weights="none", text_model=str(text_model), batch_size=8,
                              embed_dim=16, max_length=32)
    return "pretrain", dict(common, images=str(demo_data), method=case, splits="val", batch_size=8, decoder_dim=32,
                            decoder_depth=1, decoder_heads=4, reconstructions=0, out_dim=32, local_crops=2)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mae", "dino", "refine"])
def test_killed_run_resumes_to_the_uninterrupted_result(case, demo_data, tiny_text_model, tmp_path):
    kind, settings = _settings(case, demo_data, tiny_text_model, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def command(out: Path, **extra) -> list[str]:
        return [sys.executable, "-c", DRIVER, kind, json.dumps({**settings, "out": str(out), **extra})]

    subprocess.run(command(tmp_path / "whole"), env=env, check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(command(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.csv").is_file() and len(pd.read_csv(run / "log.csv")) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(pd.read_csv(run / "log.csv")) < settings["epochs"]
    subprocess.run(command(run, resume=True), env=env, check=True, capture_output=True)

    whole, resumed = pd.read_csv(tmp_path / "whole" / "log.csv"), pd.read_csv(run / "log.csv")
    pd.testing.assert_frame_equal(resumed.drop(columns="seconds"), whole.drop(columns="seconds"), check_exact=True)
    a = torch.load(tmp_path / "whole" / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(run / "checkpoint-last.pth", weights_only=True)["model"]
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
