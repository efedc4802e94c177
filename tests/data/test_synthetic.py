"""The demo data set: deterministic, laid out as RETFound expects, and genuinely learnable."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from retinafm.data.synthetic import CLASSES, render_fundus, write_demo_dataset


def test_render_is_deterministic_rgb_with_a_circular_field():
    a = render_fundus(np.random.default_rng(5), "glaucoma", size=96)
    b = render_fundus(np.random.default_rng(5), "glaucoma", size=96)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert a[:4, :4].max() == 0 and a[-4:, -4:].max() == 0  # black corners outside the field
    assert a[48, 48].mean() > 40
    with pytest.raises(ValueError, match="unknown class"):
        render_fundus(np.random.default_rng(0), "cataract")


def test_layout_counts_and_refusal(tmp_path):
    root = write_demo_dataset(tmp_path / "d", n_train=3, n_val=2, n_test=1, size=32, seed=1)
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for label in CLASSES:
            files = sorted((root / split / label).iterdir())
            assert [f.name for f in files] == [f"{label}_{split}_{i:04d}.png" for i in range(n)]
    with Image.open(root / "train" / "normal" / "normal_train_0000.png") as img:
        assert img.size == (32, 32) and img.mode == "RGB"
    with pytest.raises(ValueError, match="not empty"):
        write_demo_dataset(root)


def _features(img: np.ndarray) -> np.ndarray:
    small = np.asarray(Image.fromarray(img).resize((64, 64)), dtype=np.float64) / 255
    hist = [np.histogram(small[..., c], bins=16, range=(0, 1))[0] for c in range(3)]
    return np.concatenate(hist + [small.mean((0, 1))])


def test_classes_are_learnable_at_64_px_and_labels_matter():
    def sample(seed, n):
        rng = np.random.default_rng(seed)
        xs, ys = [], []
        for y, label in enumerate(CLASSES):
            for _ in range(n):
                xs.append(_features(render_fundus(rng, label, size=96)))
                ys.append(y)
        return np.array(xs), np.array(ys)

    x_train, y_train = sample(0, 40)
    x_test, y_test = sample(1, 20)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    auroc = roc_auc_score(y_test, clf.predict_proba(x_test), multi_class="ovr")
    assert auroc >= 0.9
    shuffled = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(
        x_train, np.random.default_rng(0).permutation(y_train))
    assert roc_auc_score(y_test, shuffled.predict_proba(x_test), multi_class="ovr") < 0.75
