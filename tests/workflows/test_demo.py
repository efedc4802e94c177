"""The embedded demo runs the whole path and never deletes a folder it did not write."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retinafm.files import OutputExistsError
from retinafm.workflows.demo import (
    AUROC_TARGET,
    demo_config,
    demo_pretrain_config,
    run_demo,
    write_real_images,
)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = run_demo(out, epochs=1, pretrain_epochs=1)
    assert (out / "run" / "checkpoint-best.pth").is_file() and (out / "evaluation" / "metrics_test.json").is_file()
    # MAE pretraining, then the main run fine-tuned from it, beside the from-scratch baseline
    assert (out / "pretrain" / "plots" / "reconstructions_epoch001.png").is_file()
    assert (out / "run_from_scratch" / "metrics_test.json").is_file() and summary.scratch_auroc is not None
    import yaml

    settings = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert settings["weights"] == str(out / "pretrain" / "checkpoint-last.pth")
    preds = pd.read_csv(out / "predictions.csv")
    names = {p.rsplit("/", 1)[-1] for p in preds["path"]}
    assert {"skimage_retina.jpg", "skimage_microaneurysms.png"} <= names
    maps = pd.read_csv(out / "heatmaps" / "explanations.csv")  # a heatmap of each prediction, at its resolution
    assert maps["path"].tolist() == preds["path"].tolist()
    retina = maps[maps["path"].str.endswith("skimage_retina.jpg")].iloc[0]
    assert np.load(out / "heatmaps" / retina["heatmap"]).shape == Image.open(retina["path"]).size[::-1]
    assert (out / "run" / "explanations_test.csv").is_file()  # the report's overlays
    assert 0.0 <= summary.test_auroc <= 1.0 and summary.passed == (summary.test_auroc >= AUROC_TARGET)
    printed = capsys.readouterr().out
    assert "Held-out test macro AUROC" in printed and "skimage_retina.jpg" in printed
    assert "Without MAE pretraining (from scratch)" in printed
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_demo(out, epochs=1, pretrain_epochs=0)


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="not written by the demo"):
        run_demo(tmp_path, epochs=1, overwrite=True, pretrain_epochs=0)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_real_images_and_config(tmp_path):
    paths = write_real_images(tmp_path)
    assert [p.name for p in paths] == ["skimage_retina.jpg", "skimage_microaneurysms.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    cfg = demo_config(tmp_path)
    cfg.validate()
    assert cfg.model == "vit_micro_patch8" and cfg.device == "cpu" and cfg.weights == "none"
    pre = demo_pretrain_config(tmp_path)
    pre.validate()
    assert pre.method == "mae" and pre.splits == ["train", "val"]  # the test images stay unseen
