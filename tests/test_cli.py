"""The command line: verbs, --config YAML, and bad input as one clear line, never a traceback."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from retinafm.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_models_lists_the_zoo():
    res = run("models")
    assert res.exit_code == 0
    assert "RETFound_mae_natureCFP" in res.output and "YukunZhou/RETFound_mae_natureCFP" in res.output
    assert "dinov3_vit7b16" in res.output and "CC-BY-NC-4.0" in res.output


@pytest.mark.parametrize("args,message", [
    (["finetune", "--data-path", "/nonexistent", "--out", "{tmp}/r"], "--data-path /nonexistent is not a folder"),
    (["finetune", "--data-path", "{data}", "--out", "{tmp}/r", "--model", "vit_huge_nonsense"], "unknown model"),
    (["finetune", "--data-path", "{data}", "--out", "{tmp}/r", "--weights", "{tmp}/missing.pth"], "no such file"),
    (["finetune", "--data-path", "{data}", "--out", "{tmp}/r", "--split", "0.8,0.1,0.1"], "already has split folders"),
    (["finetune", "--out", "{tmp}/r"], "exactly one of --data-path"),
    (["predict", "--checkpoint", "{tmp}/nope.pth", "--images", "{data}", "--out", "{tmp}/p.csv"], "no such file"),
])
def test_bad_input_gives_one_clear_line(args, message, demo_data, tmp_path):
    args = [a.format(tmp=tmp_path, data=demo_data) for a in args]
    res = run(*args)
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_config_file_and_flags(demo_data, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data-path": str(demo_data), "model": "vit_micro_patch8", "weights": "none", "input_size": 32,
        "epochs": 1, "warmup_epochs": 0, "batch_size": 16, "lr": 1e-3, "randaug_magnitude": 0, "reprob": 0.0,
        "num_workers": 0, "device": "cpu", "layer_decay": 1.0, "bootstrap": 0}))
    res = run("finetune", "--config", str(config), "--out", str(tmp_path / "run"), "--drop-path", "0.05")
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["drop_path"] == 0.05 and saved["model"] == "vit_micro_patch8"
    assert saved["class_names"] == ["diabetic_retinopathy", "glaucoma", "normal"]
    # Re-running into the same --out is refused; --resume RUN_DIR continues from its own config.
    again = run("finetune", "--config", str(config), "--out", str(tmp_path / "run"))
    assert again.exit_code == 2 and "already exists" in again.output
    resumed = run("finetune", "--resume", str(tmp_path / "run"), "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    assert list(pd.read_csv(tmp_path / "run" / "log.csv")["epoch"]) == [0, 1]

    res = run("predict", "--checkpoint", str(tmp_path / "run" / "checkpoint-best.pth"), "--images",
              str(demo_data / "val"), "--out", str(tmp_path / "p.csv"), "--num-workers", "0")
    assert res.exit_code == 0 and "24 predictions written" in res.output
    res = run("evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoint-best.pth"), "--data-path",
              str(demo_data), "--split", "val", "--out", str(tmp_path / "ev"), "--num-workers", "0")
    assert res.exit_code == 0 and "AUROC" in res.output
    assert (tmp_path / "ev" / "metrics_val.json").is_file()


def test_unknown_config_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochz: 3\n")
    res = CliRunner().invoke(main, ["finetune", "--config", str(config), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "unknown setting(s) epochz" in res.output


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "retinafm", "--help"], capture_output=True, text=True, check=True)
    for verb in ("finetune", "tune", "evaluate", "compare", "report", "import", "predict", "models", "demo",
                 "embed", "probe", "label-efficiency"):
        assert verb in out.stdout


@pytest.mark.slow
def test_regression_through_the_command_line(regression_manifest, tmp_path):
    common = ["--manifest", str(regression_manifest), "--model", "vit_micro_patch8", "--weights", "none",
              "--input-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "0", "--device", "cpu"]
    res = run("finetune", *common, "--task", "regression", "--targets", "cup_to_disc", "--head", "mlp",
              "--huber-beta", "0.5", "--out", str(tmp_path / "run"))
    assert res.exit_code == 0, res.output
    assert "macro R²" in res.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    # --targets is a list setting: config.yaml holds it as a YAML list (a comma string still reads back).
    assert (saved["task"], saved["targets"], saved["head"], saved["huber_beta"]) == ("regression", ["cup_to_disc"],
                                                                                     "mlp", 0.5)
    res = run("evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoint-best.pth"), "--manifest",
              str(regression_manifest), "--split", "val", "--out", str(tmp_path / "ev"), "--num-workers", "0")
    assert res.exit_code == 0 and "val: 40 images  macro R²" in res.output
    assert list(pd.read_csv(tmp_path / "ev" / "predictions_val.csv").columns) == ["path", "true_cup_to_disc",
                                                                                "cup_to_disc"]
    bad = run("finetune", *common, "--task", "regression", "--targets", "age", "--out", str(tmp_path / "r2"))
    assert bad.exit_code == 2 and "has no column(s) ['age'] (--targets)" in bad.output
    bad = run("finetune", *common, "--task", "multilabel", "--out", str(tmp_path / "r3"))
    assert bad.exit_code == 2 and "column 'cup_to_disc' must hold 0 or 1" in bad.output


@pytest.mark.slow
def test_evaluate_compare_and_report_verbs(trained_run, demo_data, tmp_path):
    import json
    import shutil

    run_copy = tmp_path / "run"
    shutil.copytree(trained_run, run_copy)
    res = run("evaluate", "--checkpoint", str(run_copy / "checkpoint-best.pth"), "--data-path", str(demo_data),
              "--out", str(tmp_path / "ev"), "--num-workers", "0", "--bootstrap", "100", "--seed", "4")
    assert res.exit_code == 0, res.output
    assert "test: 24 images" in res.output and "AUROC" in res.output and "–" in res.output  # value (low–high)
    metrics = json.loads((tmp_path / "ev" / "metrics_test.json").read_text())
    assert metrics["bootstrap"]["replicates"] == 100 and metrics["bootstrap"]["seed"] == 4
    assert (tmp_path / "ev" / "report.html").is_file()

    bad = run("evaluate", "--checkpoint", str(run_copy / "checkpoint-best.pth"), "--data-path", str(demo_data),
              "--out", str(tmp_path / "ev2"), "--bootstrap", "50")
    assert bad.exit_code == 2 and "--bootstrap" in bad.output

    # The same checkpoint on the same images: no difference, p = 1.
    res = run("compare", str(run_copy), str(tmp_path / "ev"), "--out", str(tmp_path / "cmp"), "--bootstrap", "100")
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert list(table["test"]) == ["paired bootstrap"] + ["DeLong"] * 3
    assert table["difference"].abs().max() < 1e-9 and (table["p_value"] == 1).all()
    assert (tmp_path / "cmp" / "forest.png").is_file() and "reference: run" in res.output
    again = run("compare", str(run_copy), str(tmp_path / "ev"), "--out", str(tmp_path / "cmp"))
    assert again.exit_code == 2 and "already exists" in again.output
    missing = run("compare", str(run_copy), str(tmp_path / "ev"), "--on", "val", "--out", str(tmp_path / "c2"))
    assert missing.exit_code == 2 and "predictions_val.csv" in missing.output

    (run_copy / "report.html").unlink()
    res = run("report", str(run_copy))
    assert res.exit_code == 0 and (run_copy / "report.html").is_file()


@pytest.mark.slow
def test_embed_probe_and_label_efficiency_verbs(demo_data, tmp_path):
    tiny = ["--model", "vit_micro_patch8", "--weights", "none", "--input-size", "32", "--num-workers", "0",
            "--device", "cpu"]
    res = run("embed", "--images", str(demo_data), "--out", str(tmp_path / "e.parquet"), "--shard-size", "50", *tiny)
    assert res.exit_code == 0, res.output
    assert "120 embeddings of dimension 64 written" in res.output
    again = run("embed", "--images", str(demo_data), "--out", str(tmp_path / "e.parquet"), *tiny)
    assert again.exit_code == 2 and "already exists" in again.output
    res = run("probe", "--embeddings", str(tmp_path / "e.parquet"), "--out", str(tmp_path / "probe"),
              "--bootstrap", "0")
    assert res.exit_code == 0, res.output
    assert "linear probe, test: AUROC" in res.output and (tmp_path / "probe" / "checkpoint-best.pth").is_file()
    bad = run("probe", "--embeddings", str(tmp_path / "e.parquet"), "--out", str(tmp_path / "p2"), "--task",
              "multilabel")
    assert bad.exit_code == 2 and "needs --labels" in bad.output and "Traceback" not in bad.output
    res = run("label-efficiency", "--data-path", str(demo_data), "--out", str(tmp_path / "le"), "--adaptation", "lp",
              "--fractions", "0.5,1", "--seeds", "2", *tiny)
    assert res.exit_code == 0, res.output
    assert pd.read_csv(tmp_path / "le" / "label_efficiency.csv")["n_train"].tolist() == [36, 72]
    bad = run("label-efficiency", "--data-path", str(demo_data), "--out", str(tmp_path / "le2"), "--fractions", "2")
    assert bad.exit_code == 2 and "--fractions" in bad.output


def test_bounded_options_give_their_range_in_help():
    result = CliRunner().invoke(main, ["finetune", "--help"], terminal_width=200)
    assert "Range: 0 to 4,294,967,295." in result.output and "Range: 1 to 4,096." in result.output
