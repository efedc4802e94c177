"""torchrun with 2 CPU processes (gloo): DDP training, metrics on gathered predictions, rank 0 writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd

from retinafm.train import distributed as dist_utils


def test_single_process_helpers_are_no_ops():
    assert not dist_utils.launched_by_torchrun() or os.environ.get("WORLD_SIZE")
    assert dist_utils.rank() == 0 and dist_utils.world_size() == 1 and dist_utils.is_primary()
    assert dist_utils.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert dist_utils.mean_across_ranks(2.5) == 2.5


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
