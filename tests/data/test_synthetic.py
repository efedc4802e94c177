"""The demo data set: deterministic, laid out as RETFound expects, and genuinely learnable."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from retinafm.data.synthetic import (
    CLASSES,
    render_findings,
    render_fundus,
    render_scattered_lesions,
    write_demo_dataset,
    write_lesion_dataset,
)


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


def test_renders_are_the_images_the_demo_always_had_and_the_mask_changes_nothing():
    # Computed on main before lesion masks existed (Pillow 13.0, numpy 2.4): the demo's figures and
    # every seeded data set depend on these pixels and on how many random draws a render takes. A
    # Pillow whose resampling differs would change it too: check the images, then update it.
    import hashlib

    rng = np.random.default_rng(123)
    digest = hashlib.sha256()
    for label in CLASSES:
        digest.update(render_fundus(rng, label, 48).tobytes())
    digest.update(render_findings(rng, 48, large_cup=True, cup_to_disc=0.5, exudate_count=7).tobytes())
    digest.update(rng.random(2).tobytes())
    assert digest.hexdigest() == "d2752eca9861612a1761a9f8690cfc70c4d72a51877f36c0985b23df25c9fb71"

    plain_rng, masked_rng = np.random.default_rng(9), np.random.default_rng(9)
    plain = render_findings(plain_rng, 64, haemorrhages=True, exudates=True)
    image, mask = render_findings(masked_rng, 64, haemorrhages=True, exudates=True, with_mask=True)
    assert np.array_equal(plain, image) and plain_rng.random() == masked_rng.random()
    assert mask.shape == (64, 64) and mask.dtype == bool and mask.sum() > 20
    yellow_or_dark = (image[..., 1] > 180) | (image[..., 0] < 130)  # exudates / haemorrhages (or the border)
    field = ndimage.binary_erosion(image.sum(-1) > 30, iterations=2)
    assert (yellow_or_dark & field)[ndimage.binary_erosion(mask)].mean() > 0.8
    _, healthy = render_findings(np.random.default_rng(9), 64, large_cup=True, with_mask=True)
    assert not healthy.any()


def test_scattered_lesion_masks_are_exactly_where_the_lesions_were_drawn():
    contrast = []
    for seed in range(30):
        image, mask = render_scattered_lesions(np.random.default_rng(seed), 64, count=3)
        # The same fundus without the lesions (only the sensor noise, drawn after them, differs).
        bare, none = render_scattered_lesions(np.random.default_rng(seed), 64, count=0)
        assert not none.any() and mask.any()
        diff = np.abs(image.astype(int) - bare.astype(int)).max(-1)
        assert diff[~ndimage.binary_dilation(mask, iterations=2)].max() <= 20  # nothing drawn off the mask
        core = ndimage.binary_erosion(mask)
        assert diff[core].mean() > 25  # and every lesion pixel changed
        ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask)
        contrast.append(np.linalg.norm(image[core].mean(0) - np.median(image[ring], 0)))
    # Against the retina around it a lesion stands out (a haemorrhage on a vessel less so).
    assert np.median(contrast) > 50 and np.mean(np.array(contrast) > 15) > 0.9


def test_scattered_lesions_spread_over_the_field_not_the_centre():
    size, outside_third, peripheral, centre_hits = 64, [], [], 0
    for seed in range(60):
        _, mask = render_scattered_lesions(np.random.default_rng([seed, 1]), size, count=2)
        yy, xx = np.nonzero(mask)
        third = size / 3
        outside_third.append(((xx < third) | (xx >= 2 * third) | (yy < third) | (yy >= 2 * third)).mean())
        peripheral.append((np.hypot(xx + 0.5 - size / 2, yy + 0.5 - size / 2) > 0.6 * 0.46 * size).mean())
        centre_hits += bool(mask[size // 2 - 1:size // 2 + 1, size // 2 - 1:size // 2 + 1].any())
    # Uniform over the disc: about 0.8 of lesion area outside the central third, 0.6 beyond 0.6 radii.
    assert np.mean(outside_third) > 0.65 and np.mean(peripheral) > 0.45
    assert centre_hits <= 10  # a heatmap peaking at the centre rarely points at a lesion


def test_lesion_dataset_layout_masks_and_reproducibility(tmp_path):
    import pandas as pd

    from retinafm.data.sources import load_manifest

    manifest = write_lesion_dataset(tmp_path / "a", n_train=6, n_val=2, n_test=2, size=48, seed=3)
    frame = pd.read_csv(manifest)
    assert list(frame.columns) == ["path", "split", "label", "mask"]
    assert list(frame["split"]) == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    assert list(frame["label"]) == ["healthy", "lesions"] * 5
    for path, label, mask_path in zip(frame["path"], frame["label"], frame["mask"], strict=True):
        assert mask_path == f"masks/{path.removeprefix('images/')}"
        with Image.open(manifest.parent / path) as img, Image.open(manifest.parent / mask_path) as mask_file:
            assert img.size == mask_file.size == (48, 48) and img.mode == "RGB" and mask_file.mode == "L"
            mask = np.asarray(mask_file)
        assert set(np.unique(mask)) <= {0, 255}
        assert mask.any() == (label == "lesions")
    data = load_manifest(manifest)  # the set fine-tunes as an ordinary two-class manifest
    assert data.class_names == ["healthy", "lesions"] and len(data.split("train")) == 6

    again = write_lesion_dataset(tmp_path / "b", n_train=6, n_val=2, n_test=2, size=48, seed=3)
    other = write_lesion_dataset(tmp_path / "c", n_train=6, n_val=2, n_test=2, size=48, seed=4)
    for name in ("images/train_0001.png", "masks/train_0001.png", "masks/test_0001.png"):
        assert (again.parent / name).read_bytes() == (manifest.parent / name).read_bytes()
    changed = other.parent / "masks/train_0001.png"
    assert changed.read_bytes() != (manifest.parent / "masks/train_0001.png").read_bytes()
    with pytest.raises(ValueError, match="not empty"):
        write_lesion_dataset(tmp_path / "a")
