"""The benchmark scripts still run against the library's current API (make bench is never run by CI):
each on a handful of images, timings ignored."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_inference_benchmark_runs_every_row_kind():
    out = _run("benchmarks/inference.py", "--images", "4", "--models", "vit_tiny_patch16", "--cases",
               "fundus_jpeg_2000", "--tasks", "predict,embed,train,predict_int8", "--workers", "0", "--batch-size", "2")
    rows = [line.split()[2] for line in out.splitlines() if line.startswith("fundus_jpeg_2000")]
    assert rows == ["predict", "embed", "train", "predict_int8"]


@pytest.mark.slow
def test_probe_benchmark_runs():
    out = _run("benchmarks/probe.py", "--per-class", "8", "--epochs", "2", "--batch-size", "8", "--num-workers", "0")
    assert "speed-up:" in out


def test_explain_speed_benchmark_runs_every_method(tmp_path):
    # In process, on a 32 px ViT-Ti and 2 integrated-gradients steps: seconds, not the minutes of the real run.
    import importlib.util

    from retinafm.engine.heatmaps import METHODS

    spec = importlib.util.spec_from_file_location("explain_speed", ROOT / "benchmarks" / "explain_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    assert bench.main(["--models", "vit_tiny_patch16_224", "--image-size", "32", "--batch-size", "2",
                       "--ig-batch-size", "1", "--warmup", "0", "--repeats", "1", "--steps", "2", "--threads", "1",
                       "--append", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n## ") and "heatmap cost" in text
    rows = {tuple(line.split(" | ")[1:3]) for line in text.splitlines() if line.startswith("| ViT-Ti/16 |")}
    expected = {("predict", "2"), ("predict", "1")}
    expected |= {(m, "1" if m == "integrated-gradients" else "2") for m in METHODS}
    assert rows == expected  # integrated gradients at its own batch, against predict at that batch


@pytest.mark.slow
def test_segmentation_heads_benchmark_runs_both_heads_and_baselines():
    out = _run("benchmarks/segmentation_heads.py", "--train", "8", "--val", "4", "--test", "4", "--epochs", "1")
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["all background", "thresholded intensity", "vit_micro_patch8 + linear head",
                        "vit_micro_patch8 + unetr head"]
