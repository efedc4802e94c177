"""`retinafm refine`: image-report pairs in, a refined backbone out that finetune takes, probes before/after."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_refine_config

from retinafm.cli import main
from retinafm.data.sources import DataSourceError
from retinafm.data.synthetic import write_report_pairs
from retinafm.engine import trainer as trainer_module
from retinafm.models.registry import create_model, get_spec
from retinafm.models.weights import load_backbone_weights
from retinafm.settings import ConfigError
from retinafm.workflows import refine as run_module
from retinafm.workflows.refine import refine


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_report_pairs(tmp_path_factory.mktemp("pairs"), n_train=24, n_val=8, size=48, seed=0)


@pytest.fixture(scope="module")
def refined(pairs, tiny_text_model, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("refine") / "run"
    return refine(tiny_refine_config(pairs, tiny_text_model, out, probe_on=str(demo_data)), progress=False)


def test_run_directory_and_log(refined):
    run = refined.run_dir
    log = pd.read_csv(run / "log.csv")
    assert list(log.columns) == ["epoch", "lr", "train_loss", "loss_itc", "loss_itm", "loss_mlm", "loss_gm",
                                 "val_loss", "seconds"]
    assert len(log) == 2 and log[["train_loss", "val_loss"]].notna().all().all()
    for name in ("config.yaml", "checkpoint-last.pth", "checkpoint-best.pth", "backbone.safetensors",
                 "plots/curves.png"):
        assert (run / name).is_file(), name


def test_backbone_loads_through_finetune_with_only_head_keys_missing(refined, demo_data, tmp_path):
    from helpers import tiny_finetune_config
    from safetensors import safe_open

    from retinafm.workflows.finetune import finetune

    with safe_open(str(refined.backbone), "pt") as fh:
        assert fh.metadata()["model"] == "vit_micro_patch8"
        saved = {k: fh.get_tensor(k) for k in fh.keys()}
    model = create_model(get_spec("vit_micro_patch8"), 3, input_size=32)
    report = load_backbone_weights(model, str(refined.backbone), "timm")
    assert set(report.missing) == {"head.weight", "head.bias"}
    torch.testing.assert_close(model.blocks[1].attn.proj.weight, saved["blocks.1.attn.proj.weight"])
    # the exported weights are the best (lowest val loss) epoch's vision tower
    best = torch.load(refined.run_dir / "checkpoint-best.pth", weights_only=True)["model"]
    torch.testing.assert_close(saved["blocks.1.attn.proj.weight"], best["vision.blocks.1.attn.proj.weight"])
    result = finetune(tiny_finetune_config(demo_data, tmp_path / "ft", weights=str(refined.backbone), epochs=1))
    assert (result.run_dir / "metrics_test.json").is_file()


def test_probe_before_and_after_side_by_side(refined):
    table = pd.read_csv(refined.run_dir / "probe_comparison.csv")
    assert list(table.columns) == ["split", "metric", "before", "after", "change"]
    auroc = table.set_index("metric").loc["auroc_macro"]
    assert auroc["split"] == "test" and 0 <= auroc["before"] <= 1 and 0 <= auroc["after"] <= 1
    assert auroc["change"] == pytest.approx(auroc["after"] - auroc["before"])
    probe_before = refined.run_dir / "probe_before"
    assert (probe_before / "checkpoint.pth").is_file() or any(probe_before.iterdir())


def test_resume_after_interruption_matches_the_uninterrupted_run(pairs, tiny_text_model, tmp_path, monkeypatch):
    straight = refine(tiny_refine_config(pairs, tiny_text_model, tmp_path / "straight"), progress=False)
    said = trainer_module._say

    def stop_after_first_epoch(msg: str) -> None:
        said(msg)
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    cfg = tiny_refine_config(pairs, tiny_text_model, tmp_path / "resumed")
    monkeypatch.setattr(trainer_module, "_say", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        refine(cfg, progress=False)
    monkeypatch.setattr(trainer_module, "_say", said)
    cfg.resume = True
    refine(cfg, progress=False)
    a = torch.load(straight.run_dir / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint-last.pth", weights_only=True)["model"]
    assert set(a) == set(b) and any(k.startswith("cross.") for k in a)
    for key in a:  # vision tower, text encoder, cross-attention and heads alike
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    log_a, log_b = pd.read_csv(straight.run_dir / "log.csv"), pd.read_csv(tmp_path / "resumed" / "log.csv")
    pd.testing.assert_frame_equal(log_a.drop(columns="seconds"), log_b.drop(columns="seconds"), check_exact=True)


def test_a_subset_of_objectives_with_weights(pairs, tiny_text_model, tmp_path):
    result = refine(tiny_refine_config(pairs, tiny_text_model, tmp_path / "run", losses="itc,mlm", loss_weights="1,0.5",
                                       epochs=1), progress=False)
    log = pd.read_csv(result.run_dir / "log.csv")
    assert {"loss_itc", "loss_mlm"} <= set(log.columns) and "loss_itm" not in log.columns
    assert log["train_loss"][0] == pytest.approx(log["loss_itc"][0] + 0.5 * log["loss_mlm"][0], rel=1e-5)


def test_cli_and_bad_inputs(pairs, tiny_text_model, tmp_path):
    args = ["refine", "--pairs", str(pairs), "--model", "vit_micro_patch8", "--weights", "none", "--input-size", "32",
            "--text-model", str(tiny_text_model), "--epochs", "1", "--batch-size", "8", "--embed-dim", "16",
            "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "backbone.safetensors" in res.output and "run directory:" in res.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.output

    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\na.png,hello\n")
    with pytest.raises(DataSourceError, match="needs columns path and report"):
        run_module.read_pairs(bad)
    bad.write_text("path,report\na.png,\nb.png,fine\n")
    with pytest.raises(DataSourceError, match="empty path or report on line"):
        run_module.read_pairs(bad)
    bad.write_text("path,report,split\na.png,x,training\n")
    with pytest.raises(DataSourceError, match="unknown split"):
        run_module.read_pairs(bad)
    with pytest.raises(ConfigError, match="--losses"):
        tiny_refine_config(pairs, tiny_text_model, tmp_path / "x", losses="itc,clip").validate()
    with pytest.raises(ConfigError, match="--loss-weights"):
        tiny_refine_config(pairs, tiny_text_model, tmp_path / "x", loss_weights="1,2").validate()
