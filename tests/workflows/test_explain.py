"""`retinafm explain` and `predict --heatmaps`: a heatmap per image and output at the file's own resolution.

The known answer at this level: with the method replaced by "the brightness of the model's input", the
map written for each file must light up where the file is bright, whatever the recipe did in between
(non-square files, the fundus crop, a DICOM frame, a B-scan of a Heidelberg volume). The methods
themselves are checked against known answers in tests/engine/test_heatmaps.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    assert_one_line_error,
    oct_bscans,
    run_bounded,
    tiny_checkpoint,
    write_dicom,
    write_heidelberg_vol,
)
from PIL import Image

from retinafm.data.sources import DataSourceError
from retinafm.data.synthetic import render_fundus
from retinafm.engine import explain as explain_engine
from retinafm.engine.checkpoint import CheckpointMeta, save_checkpoint
from retinafm.files.outputs import OutputExistsError
from retinafm.models.registry import create_model, get_spec
from retinafm.settings import ConfigError, ExplainSettings, PredictSettings
from retinafm.workflows.explain import explain, file_names, output_file_names
from retinafm.workflows.predict import predict

CLASSES = ["normal", "glaucoma", "a/b:c"]  # a name that cannot be part of a file name as it is
SIZE = 32


def _checkpoint(path: Path, task: str = "multiclass", names: list[str] = CLASSES, **meta) -> Path:
    return tiny_checkpoint(path, names, task, SIZE, **meta)


def _settings(checkpoint: Path, images: Path, out: Path, **kw) -> ExplainSettings:
    return ExplainSettings(checkpoint=str(checkpoint), images=str(images), out=str(out), device="cpu",
                           num_workers=0, **kw)


def _brightness(model, images, targets, method, *, steps=32):
    """Stands in for a method: the (normalised) brightness of the model's input, scaled 0..1."""
    value = images.mean(1)
    low = value.flatten(1).min(1).values[:, None, None]
    high = value.flatten(1).max(1).values[:, None, None]
    return (value - low) / (high - low).clamp(min=1e-6)


def _marked_png(path: Path, height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    image = np.full((height, width, 3), 40, np.uint8)
    top, left, bottom, right = box
    image[top:bottom, left:right] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    truth = np.zeros((height, width), bool)
    truth[top:bottom, left:right] = True
    return truth


def _iou(heat: np.ndarray, truth: np.ndarray) -> float:
    found = heat > 0.5
    return float((found & truth).sum() / (found | truth).sum())


def _heatmap(out: Path, frame: pd.DataFrame, path_part: str) -> np.ndarray:
    row = frame[frame["path"].str.contains(path_part, regex=False)].iloc[0]
    return np.load(out / row["heatmap"])


def test_maps_land_where_each_file_is_bright_at_its_own_resolution(tmp_path, monkeypatch):
    monkeypatch.setattr(explain_engine, "explain_batch", _brightness)
    images = tmp_path / "images"
    truths = {"tall.png": _marked_png(images / "tall.png", 300, 200, (120, 70, 170, 130)),
              "wide.png": _marked_png(images / "sub" / "wide.png", 150, 330, (50, 140, 100, 200))}
    scans = oct_bscans(5, height=48, width=64, seed=1, bright=0.2)
    scans[:, 20:30, 24:40] = 255
    write_dicom(images / "scan.dcm", scans)
    write_heidelberg_vol(images / "volume.vol", scans[:3])
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    result = explain(_settings(_checkpoint(tmp_path / "c.pth", settings={"oct_frames": "all"}), images, out),
                     progress=False)
    frame = pd.read_csv(out / "explanations.csv")
    assert list(frame.columns) == ["path", "target", "probability", "method", "heatmap", "overlay"]
    for name, truth in truths.items():
        heat = _heatmap(out, frame, name)
        assert heat.shape == truth.shape and heat.dtype == np.float32
        assert 0 <= heat.min() and heat.max() == pytest.approx(1.0)
        assert _iou(heat, truth) > 0.6, name
        assert Image.open(out / frame[frame["path"].str.contains(name)].iloc[0]["overlay"]).size == truth.shape[::-1]
    scan_truth = np.zeros((48, 64), bool)
    scan_truth[20:30, 24:40] = True
    for address in ("scan.dcm#frame=3", "volume.vol#frame=1"):  # one map per B-scan, each the B-scan's shape
        heat = _heatmap(out, frame, address)
        assert heat.shape == (48, 64) and _iou(heat, scan_truth) > 0.5, address
    assert frame["path"].str.contains("scan.dcm#frame=").sum() == 5
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped["path"].map(lambda p: Path(p).name)) == ["broken.png"]
    assert len(result.explanations) == len(frame) == 2 + 5 + 3
    assert set(frame["method"]) == {"grad-rollout"}
    assert (frame["probability"].between(0, 1)).all()


def test_the_fundus_crop_is_undone(tmp_path, monkeypatch):
    monkeypatch.setattr(explain_engine, "explain_batch", _brightness)
    fundus = render_fundus(np.random.default_rng(3), "normal", 120)
    photo = np.zeros((180, 400, 3), np.uint8)  # an off-centre disc in a wide black frame
    photo[40:160, 230:350] = fundus
    photo[90:110, 280:300] = 255
    (tmp_path / "images").mkdir()
    Image.fromarray(photo).save(tmp_path / "images" / "photo.png")
    checkpoint = _checkpoint(tmp_path / "c.pth", preprocess={"fundus_crop": True, "oct_crop": None})
    out = tmp_path / "out"
    explain(_settings(checkpoint, tmp_path / "images", out), progress=False)
    heat = np.load(next((out / "heatmaps").glob("photo__*.npy")))
    assert heat.shape == (180, 400)
    assert heat[:, :220].max() == 0  # the black frame the crop removed was never seen
    assert heat[95:105, 285:295].mean() > 0.9  # the white marker is the brightest input


def test_targets_predicted_all_and_named(tmp_path):
    images = tmp_path / "images"
    for i in range(3):
        _marked_png(images / f"im{i}.png", 40 + 10 * i, 48, (5, 5, 20, 20))
    checkpoint = _checkpoint(tmp_path / "c.pth")
    every = explain(_settings(checkpoint, images, tmp_path / "all", target="all", method="rollout"),
                    progress=False).explanations
    assert len(every) == 9 and list(every["target"][:3]) == CLASSES
    assert all((tmp_path / "all" / p).is_file() for p in every["heatmap"])
    assert "a_b_c" in every["heatmap"].iloc[2]  # a class name made safe for a file name
    assert np.allclose(every.groupby("path")["probability"].sum(), 1.0, atol=1e-5)
    predicted = explain(_settings(checkpoint, images, tmp_path / "pred", method="rollout"),
                        progress=False).explanations
    best = every.loc[every.groupby("path")["probability"].idxmax(), ["path", "target"]]
    assert predicted[["path", "target"]].reset_index(drop=True).equals(best.reset_index(drop=True))
    named = explain(_settings(checkpoint, images, tmp_path / "named", target="glaucoma", method="gradcam"),
                    progress=False).explanations
    assert set(named["target"]) == {"glaucoma"} and set(named["method"]) == {"gradcam"}
    with pytest.raises(ConfigError, match="not an output of this model.*normal, glaucoma"):
        explain(_settings(checkpoint, images, tmp_path / "bad", target="cataract"), progress=False)
    with pytest.raises(OutputExistsError):
        explain(_settings(checkpoint, images, tmp_path / "named"), progress=False)


def test_multilabel_and_regression_outputs(tmp_path):
    images = tmp_path / "images"
    for i in range(2):
        _marked_png(images / f"im{i}.png", 40, 48, (5, 5, 20, 20))
    labels = explain(_settings(_checkpoint(tmp_path / "ml.pth", "multilabel", ["dr", "amd"],
                                           task_state={"thresholds": [0.0, 1.0]}),
                               images, tmp_path / "ml", method="rollout"), progress=False).explanations
    assert list(labels["target"]) == ["dr", "dr"]  # at or above its threshold; amd's 1.0 is never reached
    values = explain(_settings(_checkpoint(tmp_path / "reg.pth", "regression", ["cdr", "age"],
                                           task_state={"mean": [0.5, 60.0], "std": [0.1, 10.0]}),
                               images, tmp_path / "reg", method="rollout"), progress=False).explanations
    assert "value" in values.columns and list(values["target"]) == ["cdr", "age", "cdr", "age"]
    assert values.loc[values["target"] == "age", "value"].between(0, 200).all()


def test_names_are_safe_and_unique():
    assert file_names(["a/x.png", "b/x.png", "c/x.jpg", "v.dcm#frame=12", "../../.hidden name.png"]) == \
        ["x", "x-2", "x-3", "v_frame12", "hidden_name"]
    assert output_file_names(["a/b", "a_b", "ok"]) == ["a_b-0", "a_b-1", "ok"]


def test_evaluate_writes_faithfulness_of_every_method_against_random(tmp_path):
    images = tmp_path / "images"
    for i in range(4):
        _marked_png(images / f"im{i}.png", 48, 48, (8 * i, 4, 8 * i + 12, 20))
    out = tmp_path / "out"
    result = explain(_settings(_checkpoint(tmp_path / "c.pth"), images, out, evaluate=True, bootstrap=100,
                               faithfulness_steps=4, steps=4), progress=False)
    table = pd.read_csv(out / "faithfulness.csv")
    assert list(table["method"]) == ["grad-rollout", "rollout", "gradcam", "integrated-gradients", "random"]
    for column in ("deletion_auc", "insertion_auc"):
        assert table[column].between(0, 1).all()
        assert (table[f"{column}_ci_low"] <= table[column]).all()
        assert (table[column] <= table[f"{column}_ci_high"]).all()
    assert table["deletion_auc_n"].eq(4).all() and table["insertion_auc_n"].eq(4).all()
    assert np.isnan(table.loc[table["method"] == "random", "deletion_auc_gain_vs_random"]).all()
    per_image = pd.read_csv(out / "faithfulness_images.csv")
    assert len(per_image) == 4 * 5
    assert result.files["faithfulness"] == out / "faithfulness.csv"


def test_masks_need_evaluate_and_onnx_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--masks is used by --evaluate"):
        ExplainSettings(checkpoint="c.pth", images="i", out="o", masks="m").validate()
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "images").mkdir()
    outcome = run_bounded("explain", "--checkpoint", str(tmp_path / "model.onnx"), "--images",
                          str(tmp_path / "images"), "--out", str(tmp_path / "out"), timeout=120)
    assert_one_line_error(outcome, "ONNX model", "neither gradients nor attention", ".pth checkpoint")
    with pytest.raises(ConfigError, match="--cpu-int8 layers have no gradients"):
        PredictSettings(checkpoint="c.pth", images="i", out="p.csv", heatmaps="h", cpu_int8=True).validate()


def test_predict_heatmaps_writes_the_explain_folder_beside_the_predictions(tmp_path):
    images = tmp_path / "images"
    for i in range(3):
        _marked_png(images / f"im{i}.png", 40, 56, (5, 5, 20, 20))
    checkpoint = _checkpoint(tmp_path / "c.pth")
    settings = dict(checkpoint=str(checkpoint), images=str(images), out=str(tmp_path / "p.csv"),
                    heatmaps=str(tmp_path / "maps"), device="cpu", num_workers=0)
    result = predict(PredictSettings(**settings), progress=False)
    frame = pd.read_csv(tmp_path / "maps" / "explanations.csv")
    predictions = pd.read_csv(tmp_path / "p.csv")
    assert list(frame["path"]) == list(predictions["path"])
    assert list(frame["target"]) == list(predictions["prediction"])  # the predicted class is explained
    probs = [predictions.loc[i, f"prob_{t}"] for i, t in enumerate(frame["target"])]
    np.testing.assert_allclose(frame["probability"], probs, atol=1e-5)
    assert all(np.load(tmp_path / "maps" / p).shape == (40, 56) for p in frame["heatmap"])
    assert result.explanations is not None and len(result.explanations) == 3
    with pytest.raises(OutputExistsError):  # the folder is claimed like any output
        predict(PredictSettings(**{**settings, "out": str(tmp_path / "q.csv")}), progress=False)


def test_bad_masks_a_wrong_target_and_an_output_inside_the_images_each_end_in_one_line(tmp_path):
    images = tmp_path / "images"
    _marked_png(images / "im0.png", 40, 48, (5, 5, 20, 20))
    checkpoint = _checkpoint(tmp_path / "c.pth")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "im0.png")
    common = ("--checkpoint", str(checkpoint), "--images", str(images), "--device", "cpu", "--num-workers", "0")
    outcome = run_bounded("explain", *common, "--out", str(tmp_path / "o1"), "--evaluate", "--masks", str(masks),
                          timeout=180)
    assert_one_line_error(outcome, "im0.png is 10x10 pixels", "48x40", "a mask must have its image's size")
    outcome = run_bounded("explain", *common, "--out", str(images / "why"), timeout=180)
    assert_one_line_error(outcome, "--out", "inside")
    assert not (images / "why").exists()
    (tmp_path / "other_masks").mkdir()
    with pytest.raises(DataSourceError, match="none of the 1 images has a mask there"):
        explain(_settings(checkpoint, images, tmp_path / "o2", evaluate=True, masks=str(tmp_path / "other_masks")),
                progress=False)
    assert not (tmp_path / "o2").exists()  # a fresh folder is removed when the run fails


def test_probe_checkpoints_and_mlp_or_transformer_heads_are_explained(tmp_path):
    """A probe's file holds only its linear head and names the checkpoint its frozen backbone came from."""
    from retinafm.engine.checkpoint import save_probe_checkpoint
    from retinafm.engine.inference import load_model
    from retinafm.models.heads import HeadSettings

    images = tmp_path / "images"
    _marked_png(images / "im0.png", 40, 48, (5, 5, 20, 20))
    backbone = _checkpoint(tmp_path / "backbone.pth")
    model, meta = load_model(backbone)
    head = {k: torch.randn_like(v) for k, v in model.state_dict().items() if k.startswith("head.")}
    fields = {**meta.__dict__, "backbone": {"checkpoint": str(backbone)}}
    probe = save_probe_checkpoint(tmp_path / "probe.pth", CheckpointMeta(**fields), head)
    frame = explain(_settings(probe, images, tmp_path / "probe"), progress=False).explanations
    assert len(frame) == 1 and np.load(tmp_path / "probe" / frame["heatmap"][0]).shape == (40, 48)

    for kind in ("mlp", "transformer"):
        spec = get_spec("vit_micro_patch8")
        settings = HeadSettings(kind=kind, depth=1)
        torch.manual_seed(0)
        model = create_model(spec, 3, input_size=SIZE, global_pool="avg", head=settings)
        checkpoint = save_checkpoint(tmp_path / f"{kind}.pth", model, CheckpointMeta(**{
            **meta.__dict__, "head": dict(settings.__dict__)}))
        frame = explain(_settings(checkpoint, images, tmp_path / kind, target="all"), progress=False).explanations
        assert len(frame) == 3, kind
        maps = [np.load(tmp_path / kind / p) for p in frame["heatmap"]]
        assert all(m.shape == (40, 48) and m.max() == pytest.approx(1.0) for m in maps), kind


def test_masks_are_found_by_stem_and_read_as_lesion_pixels(tmp_path):
    """workflows.explain_measures: <stem>.png (or a lossless sibling) per image, `_frame<N>` for a B-scan;
    any non-zero value is lesion; a mask of another size is refused naming both files."""
    from retinafm.workflows.explain_measures import check_masks, mask_for, read_mask

    masks = tmp_path / "masks"
    masks.mkdir()
    lesion = np.zeros((6, 8), np.uint8)
    lesion[2:4, 3:5] = 1  # a 0/1 mask: 1 is a lesion as much as 255 is
    Image.fromarray(lesion).save(masks / "eye.png")
    Image.fromarray(lesion * 255).save(masks / "scan_frame3.tif")
    assert mask_for(masks, "data/eye.jpg") == masks / "eye.png"
    assert mask_for(masks, "data/scan.dcm#frame=3") == masks / "scan_frame3.tif"
    assert mask_for(masks, "data/other.png") is None
    np.testing.assert_array_equal(read_mask(masks / "eye.png", (6, 8), "data/eye.jpg"), lesion > 0)
    with pytest.raises(DataSourceError, match=r"eye.png is 8x6 pixels but its image data/eye.jpg is 9x6"):
        read_mask(masks / "eye.png", (6, 9), "data/eye.jpg")
    check_masks(masks, ["data/other.png", "data/eye.jpg"])  # one image with a mask is enough
    with pytest.raises(DataSourceError, match="none of the 1 images has a mask there"):
        check_masks(masks, ["data/other.png"])
