"""`retinafm.load(...)`: predict and embed from Python give what the CLI writes for the same images."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

import retinafm
from retinafm.cli import main
from retinafm.data.embeddings import read_embeddings
from retinafm.data.sources import DataSourceError
from retinafm.engine.checkpoint import CheckpointError


def _cli(*args: str) -> None:
    res = CliRunner().invoke(main, [*args, "--num-workers", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output


def _probabilities(frame: pd.DataFrame) -> np.ndarray:
    return frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy(float)


@pytest.fixture(scope="module")
def folder(demo_data, tmp_path_factory) -> Path:
    """Six test images of two classes (PNG: a file decodes to the pixels PIL gives in memory)."""
    root = tmp_path_factory.mktemp("api") / "images"
    root.mkdir()
    for label in ("glaucoma", "normal"):
        for path in sorted((demo_data / "test" / label).iterdir())[:3]:
            (root / path.name).write_bytes(path.read_bytes())
    return root


def test_predict_matches_the_cli_csv_for_paths_pil_images_and_arrays(trained_run, folder, tmp_path):
    checkpoint = trained_run / "checkpoint-best.pth"
    _cli("predict", "--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(tmp_path / "p.csv"))
    cli = pd.read_csv(tmp_path / "p.csv")
    model = retinafm.load(checkpoint, device="cpu")
    assert isinstance(model, retinafm.RetinaModel) and "multiclass" in repr(model)

    ours = model.predict(folder)
    assert list(ours.columns) == list(cli.columns) and ours["path"].tolist() == cli["path"].tolist()
    assert ours["prediction"].tolist() == cli["prediction"].tolist()
    np.testing.assert_allclose(_probabilities(ours), _probabilities(cli), rtol=0, atol=1e-6)

    files = sorted(folder.iterdir())
    pil = [Image.open(p) for p in files]
    arrays = [np.asarray(image.convert("RGB")) for image in pil]
    for inputs in ([str(p) for p in files], pil, arrays, np.stack(arrays)):
        got = model.predict(inputs, batch_size=4)
        np.testing.assert_allclose(_probabilities(got), _probabilities(cli), rtol=0, atol=1e-6)
    assert model.predict(arrays)["path"].tolist() == [f"<input {i}>" for i in range(len(files))]
    single = model.predict(pil[2])
    np.testing.assert_allclose(_probabilities(single), _probabilities(cli)[2:3], rtol=0, atol=1e-6)


def test_embed_matches_the_cli_embeddings(trained_run, folder, tmp_path):
    checkpoint = trained_run / "checkpoint-best.pth"
    out = tmp_path / "e.parquet"
    _cli("embed", "--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(out), "--dtype", "float32")
    cli = read_embeddings(out)
    model = retinafm.load(checkpoint, device="cpu")
    vectors = model.embed(folder)
    assert vectors.dtype == np.float32 and vectors.shape == cli.vectors.shape
    np.testing.assert_allclose(vectors, cli.vectors, rtol=0, atol=1e-6)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]
    np.testing.assert_allclose(model.embed(arrays, batch_size=5), cli.vectors, rtol=0, atol=1e-6)


def test_a_zoo_name_embeds_with_its_preprocessing_and_has_nothing_to_predict(folder, tmp_path):
    out = tmp_path / "zoo.parquet"
    _cli("embed", "--model", "vit_micro_patch8", "--weights", "none", "--input-size", "32", "--fundus-crop",
         "--images", str(folder), "--out", str(out), "--dtype", "float32")
    cli = read_embeddings(out)
    model = retinafm.load("vit_micro_patch8", weights="none", input_size=32, fundus_crop=True, device="cpu")
    np.testing.assert_allclose(model.embed(folder), cli.vectors, rtol=0, atol=1e-6)
    plain = retinafm.load("vit_micro_patch8", weights="none", input_size=32, device="cpu")
    assert np.abs(plain.embed(folder) - cli.vectors).max() > 1e-3  # the crop made a difference
    with pytest.raises(CheckpointError, match="backbone without a task.*embed"):
        model.predict(folder)


def test_volumes_are_read_frame_by_frame_as_the_cli_reads_them(oct_run, oct_volume_data, tmp_path):
    checkpoint = oct_run / "checkpoint-best.pth"
    images = oct_volume_data / "test" / "amd"
    _cli("predict", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(tmp_path / "p.csv"))
    cli = pd.read_csv(tmp_path / "p.csv")
    ours = retinafm.load(checkpoint, device="cpu").predict(images)
    assert ours["path"].tolist() == cli["path"].tolist() and "#frame=" in ours["path"][0]
    np.testing.assert_allclose(_probabilities(ours), _probabilities(cli), rtol=0, atol=1e-6)


def test_bad_inputs_are_named(trained_run, tmp_path):
    model = retinafm.load(trained_run / "checkpoint-best.pth", device="cpu")
    with pytest.raises(DataSourceError, match="input 0: an array must be HxWx3"):
        model.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(DataSourceError, match="input 1: dict is not an image"):
        model.embed([np.zeros((8, 8, 3), np.uint8), {}])
    with pytest.raises(DataSourceError, match="no such file or folder"):
        model.predict(tmp_path / "nowhere")
    with pytest.raises(DataSourceError, match="pool / input_size go with a zoo name"):
        retinafm.load(trained_run / "checkpoint-best.pth", pool="cls")


def test_import_retinafm_stays_cheap():
    code = ("import sys, retinafm; assert callable(retinafm.load); "
            "print(sorted(m for m in sys.modules if m.startswith('retinafm.workflows')))")
    cheap = subprocess.run([sys.executable, "-c", "import sys, retinafm; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert cheap.stdout.strip() == "False"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"  # the API does not go through the workflows


def test_explain_gives_what_the_cli_writes_for_files_and_maps_for_in_memory_images(trained_run, folder, tmp_path):
    checkpoint = trained_run / "checkpoint-best.pth"
    _cli("explain", "--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(tmp_path / "why"),
         "--method", "rollout")
    written = pd.read_csv(tmp_path / "why" / "explanations.csv")
    model = retinafm.load(checkpoint, device="cpu")
    files = sorted(str(p) for p in folder.iterdir())
    wide = np.asarray(Image.open(files[0]).convert("RGB").resize((90, 50)))
    frame = model.explain([*files, wide], method="rollout")
    assert list(frame.columns) == ["path", "target", "probability", "method", "heatmap"]
    assert frame["path"].iloc[-1] == "<input 6>" and frame["heatmap"].iloc[-1].shape == (50, 90)
    assert frame["target"].iloc[:6].tolist() == written["target"].tolist()
    np.testing.assert_allclose(frame["probability"].iloc[:6], written["probability"], atol=1e-5)
    for heatmap, saved in zip(frame["heatmap"].iloc[:6], written["heatmap"], strict=True):
        np.testing.assert_allclose(heatmap, np.load(tmp_path / "why" / saved), atol=1e-5)
    with pytest.raises(CheckpointError, match="no output to explain"):
        retinafm.load("vit_micro_patch8", weights="none", input_size=32, device="cpu").explain(files[:1])
    with pytest.raises(ValueError, match="not an output of this model"):
        model.explain(files[:1], target="cataract")
