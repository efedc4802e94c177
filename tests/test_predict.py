"""`predict` needs only the checkpoint and images; the CSV layout is a contract."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retinafm.data.sources import DataSourceError
from retinafm.files import OutputExistsError
from retinafm.predict import collect_images, predict

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
    res = predict(trained_run / "checkpoint-best.pth", images, out, num_workers=0, device="cpu")
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["path", "prediction"] + [f"prob_{c}" for c in CLASSES]
    assert len(frame) == 9 and frame["path"].is_monotonic_increasing
    assert str(images / "clinic_b" / "real_fundus.jpg") in set(frame["path"])
    assert set(frame["prediction"]) <= set(CLASSES)
    probs = frame[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (frame["prediction"] == [CLASSES[i] for i in probs.argmax(1)]).all()
    skipped = pd.read_csv(out.with_name("skipped.csv"))
    assert skipped.to_dict("records") == [{"path": str(images / "clinic_b" / "corrupt.png"),
                                           "reason": "not a recognised image format"}]
    assert res.skipped_path == out.with_name("skipped.csv")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        predict(trained_run / "checkpoint-best.pth", images, out, num_workers=0)


def test_single_file_and_bad_inputs(trained_run, demo_data, tmp_path):
    one = sorted((demo_data / "test" / "normal").iterdir())[0]
    res = predict(trained_run / "checkpoint-best.pth", one, tmp_path / "one.csv", num_workers=0)
    assert len(res.predictions) == 1 and res.skipped_path is None
    with pytest.raises(DataSourceError, match="no such file or folder"):
        collect_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="contains no image files"):
        collect_images(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.raises(DataSourceError, match="could be read"):
        predict(trained_run / "checkpoint-best.pth", tmp_path / "bad", tmp_path / "bad.csv", num_workers=0)


def test_predictions_match_the_test_evaluation(trained_run, demo_data, tmp_path):
    """Same decode + transform path: predict on the test images gives the run's test probabilities."""
    out = tmp_path / "p.csv"
    predict(trained_run / "checkpoint-best.pth", demo_data / "test", out, num_workers=0)
    ours = pd.read_csv(out).set_index("path").sort_index()
    run = pd.read_csv(trained_run / "predictions_test.csv").set_index("path").sort_index()
    cols = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(ours[cols].to_numpy(), run[cols].to_numpy(), atol=1e-5)
