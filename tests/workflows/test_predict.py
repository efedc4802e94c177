"""`predict` needs only the checkpoint and images; the CSV layout is a contract."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retinafm.data.sources import DataSourceError
from retinafm.files import OutputExistsError
from retinafm.settings import PredictSettings
from retinafm.workflows.predict import collect_images, predict

CLASSES = ["diabetic_retinopathy", "glaucoma", "normal"]


def test_predicts_a_folder_recursively_and_lists_unreadable_files(trained_run, demo_data, tmp_path):
    images = tmp_path / "new"
    shutil.copytree(demo_data / "test" / "glaucoma", images / "clinic_a")
    (images / "clinic_b").mkdir()
    from skimage import data

    Image.fromarray(data.retina()).save(images / "clinic_b" / "real_fundus.jpg")  # a real photograph
    (images / "clinic_b" / "corrupt.png").write_bytes(b"not an image")
    (images / "readme.txt").write_text("not an image either; ignored")
    out = tmp_path / "out" / "predictions.csv"
    res = predict(PredictSettings(checkpoint=trained_run / "checkpoint-best.pth", images=images, out=out, num_workers=0,
                                  device="cpu"))
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["path", "prediction"] + [f"prob_{c}" for c in CLASSES]
    assert len(frame) == 9 and frame["path"].is_monotonic_increasing
    assert str(images / "clinic_b" / "real_fundus.jpg") in set(frame["path"])
    assert set(frame["prediction"]) <= set(CLASSES)
    probs = frame[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (frame["prediction"] == [CLASSES[i] for i in probs.argmax(1)]).all()
    skipped = pd.read_csv(out.with_name(out.stem + "_skipped.csv"))
    assert skipped.to_dict("records") == [{"path": str(images / "clinic_b" / "corrupt.png"),
                                           "reason": "not a recognised image format"}]
    assert res.skipped_path == out.with_name(out.stem + "_skipped.csv")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        predict(PredictSettings(checkpoint=trained_run / "checkpoint-best.pth", images=images, out=out, num_workers=0))


def test_single_file_and_bad_inputs(trained_run, demo_data, tmp_path):
    one = sorted((demo_data / "test" / "normal").iterdir())[0]
    res = predict(PredictSettings(checkpoint=trained_run / "checkpoint-best.pth", images=one, out=tmp_path / "one.csv",
                                  num_workers=0))
    assert len(res.predictions) == 1 and res.skipped_path is None
    with pytest.raises(DataSourceError, match="no such file or folder"):
        collect_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="contains no image files"):
        collect_images(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.raises(DataSourceError, match="could be read"):
        predict(PredictSettings(checkpoint=trained_run / "checkpoint-best.pth", images=tmp_path / "bad",
                                out=tmp_path / "bad.csv", num_workers=0))


def test_predictions_match_the_test_evaluation(trained_run, demo_data, tmp_path):
    """Same decode + transform path: predict on the test images gives the run's test probabilities."""
    out = tmp_path / "p.csv"
    predict(PredictSettings(checkpoint=trained_run / "checkpoint-best.pth", images=demo_data / "test", out=out,
                            num_workers=0))
    ours = pd.read_csv(out).set_index("path").sort_index()
    run = pd.read_csv(trained_run / "predictions_test.csv").set_index("path").sort_index()
    cols = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(ours[cols].to_numpy(), run[cols].to_numpy(), atol=1e-5)


def test_volumes_get_one_row_each_with_mean_and_max(oct_run, oct_volume_data, tmp_path):
    result = predict(PredictSettings(checkpoint=oct_run / "checkpoint-best.pth", images=oct_volume_data / "test",
                                     out=tmp_path / "p.csv", num_workers=0, device="cpu"),
                     progress=False)  # the run's own --oct-frames: all
    frames = pd.read_csv(tmp_path / "p.csv")
    assert len(frames) == 27 and frames["path"].str.contains("#frame=").all()
    volumes = pd.read_csv(tmp_path / "p_volumes.csv")
    assert result.volumes_path == tmp_path / "p_volumes.csv"
    assert list(volumes.columns) == ["path", "frames", "prediction", "mean_prob_amd", "mean_prob_normal",
                                     "max_prob_amd", "max_prob_normal"]
    assert len(volumes) == 6 and sorted(volumes["frames"].unique().tolist()) == [3, 4, 5]
    vol = str(oct_volume_data / "test" / "amd" / "heyex.vol")
    mine = frames[frames["path"].str.startswith(vol + "#")]
    row = volumes.set_index("path").loc[vol]
    assert row["frames"] == 4
    np.testing.assert_allclose(row["mean_prob_amd"], mine["prob_amd"].mean(), rtol=1e-6)
    np.testing.assert_allclose(row["max_prob_normal"], mine["prob_normal"].max(), rtol=1e-6)
    assert row["prediction"] == ("amd" if row["mean_prob_amd"] >= row["mean_prob_normal"] else "normal")

    middle = predict(PredictSettings(checkpoint=oct_run / "checkpoint-best.pth", images=oct_volume_data / "test",
                                     out=tmp_path / "m.csv", num_workers=0, device="cpu", oct_frames="middle"),
                                     progress=False)
    assert len(middle.predictions) == 6 and middle.volumes is None and not (tmp_path / "m_volumes.csv").exists()


def test_fundus_crop_is_saved_in_the_checkpoint_and_reapplied(demo_data, tmp_path):
    """A run trained with --fundus-crop predicts through the same crop, from the checkpoint alone."""
    import torch
    from helpers import tiny_finetune_config

    from retinafm.data.io import read_image
    from retinafm.data.preprocess import fundus_crop
    from retinafm.data.transforms import eval_transform
    from retinafm.engine.checkpoint import load_checkpoint
    from retinafm.engine.inference import model_from_checkpoint
    from retinafm.workflows.finetune import finetune

    run = tmp_path / "run"
    finetune(tiny_finetune_config(demo_data, run, epochs=1, warmup_epochs=0, fundus_crop=True))
    model, meta = model_from_checkpoint(load_checkpoint(run / "checkpoint-best.pth"))
    assert meta.preprocess == {"fundus_crop": True, "oct_crop": None}
    images = sorted((demo_data / "test" / "glaucoma").glob("*.png"))[:3]
    got = predict(PredictSettings(checkpoint=run / "checkpoint-best.pth", images=images[0].parent,
                                  out=tmp_path / "p.csv", num_workers=0, device="cpu"),
                  progress=False).predictions.set_index("path")
    recipe = eval_transform(meta.input_size, meta.mean, meta.std, meta.eval_crop_pct)
    with torch.no_grad():
        for path in images:
            probs = torch.softmax(model(recipe(fundus_crop(read_image(path)))[None]), dim=1)[0].numpy()
            np.testing.assert_allclose(got.loc[str(path)].filter(like="prob_").to_numpy(float), probs, atol=1e-5)


def test_cpu_int8_predictions_stay_close_to_fp32(trained_run, demo_data, tmp_path):
    fp32 = predict(PredictSettings(checkpoint=trained_run / "checkpoint-best.pth", images=demo_data / "test",
                                   out=tmp_path / "a.csv", num_workers=0, device="cpu"), progress=False).predictions
    int8 = predict(PredictSettings(checkpoint=trained_run / "checkpoint-best.pth", images=demo_data / "test",
                                   out=tmp_path / "b.csv", num_workers=0, device="cpu", cpu_int8=True),
                   progress=False).predictions
    assert int8["path"].tolist() == fp32["path"].tolist()
    diff = (int8.filter(like="prob_").to_numpy() - fp32.filter(like="prob_").to_numpy())
    assert 0 < abs(diff).max() < 0.05


def test_bf16_on_a_cpu_stays_close_to_fp32_and_int8_refuses_it(trained_run, demo_data, tmp_path):
    """--precision bf16 forces autocast on a CPU (auto picks it only with AMX / AVX-512-BF16)."""
    ckpt = trained_run / "checkpoint-best.pth"
    fp32 = predict(PredictSettings(checkpoint=ckpt, images=demo_data / "test", out=tmp_path / "a.csv", num_workers=0,
                                   device="cpu", precision="fp32"), progress=False).predictions
    with pytest.warns(UserWarning, match="without AMX or AVX-512-BF16"):
        bf16 = predict(PredictSettings(checkpoint=ckpt, images=demo_data / "test", out=tmp_path / "b.csv",
                                       num_workers=0, device="cpu", precision="bf16"), progress=False).predictions
    diff = bf16.filter(like="prob_").to_numpy() - fp32.filter(like="prob_").to_numpy()
    assert 0 < abs(diff).max() < 0.05
    with pytest.raises(ValueError, match="--cpu-int8 runs in fp32 around its int8 Linear layers"):
        predict(PredictSettings(checkpoint=ckpt, images=demo_data / "test", out=tmp_path / "c.csv", device="cpu",
                                cpu_int8=True, precision="bf16"))
    with pytest.raises(ValueError, match="--precision fp16 is for GPUs"):
        predict(PredictSettings(checkpoint=ckpt, images=demo_data / "test", out=tmp_path / "d.csv", device="cpu",
                                precision="fp16"))
    assert not (tmp_path / "c.csv").exists() and not (tmp_path / "d.csv").exists()


@pytest.mark.slow
def test_predict_does_not_load_matplotlib(trained_run, demo_data, tmp_path):
    """Start-up counts for every predict call: the plotting stack (~0.7 s to import), scikit-learn
    and scipy (seconds together) are not needed to predict."""
    import subprocess
    import sys

    script = ("import sys; from retinafm.settings import PredictSettings; "
              "from retinafm.workflows.predict import predict; "
              f"predict(PredictSettings(checkpoint={str(trained_run / 'checkpoint-best.pth')!r}, "
              f"images={str(demo_data / 'val')!r}, out={str(tmp_path / 'p.csv')!r}, num_workers=0, device='cpu'), "
              "progress=False); "
              "print([m for m in ('matplotlib', 'sklearn', 'scipy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
