from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import write_dicom
from PIL import Image

from retinafm.data.preprocess import fundus_crop, fundus_placement
from retinafm.data.segmentation import (
    JointPreprocess,
    MaskError,
    SegmentationDataset,
    SegmentationPair,
    collate_segmentation,
    read_mask,
    segmentation_eval_transform,
    segmentation_pairs,
    segmentation_train_transform,
)
from retinafm.data.sources import DataSourceError
from retinafm.data.synthetic import write_lesion_dataset
from retinafm.data.transforms import Preprocessing

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _indices(h: int = 12, w: int = 17, classes: int = 3) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % classes).astype(np.uint8)


# --- read_mask -----------------------------------------------------------------------------------
def test_png_l_mask_is_read_as_its_indices(tmp_path):
    values = _indices()
    Image.fromarray(values, mode="L").save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png", 3)
    assert mask.dtype == torch.int64 and mask.shape == (12, 17)
    np.testing.assert_array_equal(mask.numpy(), values)


def test_16bit_png_is_not_stretched(tmp_path):
    values = _indices().astype(np.uint16)  # 0..2: any min/max stretch would turn 2 into 255 or 65535
    Image.fromarray(values).save(tmp_path / "m16.png")
    with Image.open(tmp_path / "m16.png") as img:
        assert img.mode.startswith("I")
    np.testing.assert_array_equal(read_mask(tmp_path / "m16.png", 3).numpy(), values)


def test_palette_png_gives_the_indices_not_the_colours(tmp_path):
    img = Image.fromarray(_indices(), mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png", 3).numpy(), _indices())


def test_tiff_and_a_frame_of_a_multipage_tiff(tmp_path):
    pages = [_indices(classes=2 + k) for k in range(3)]
    Image.fromarray(pages[0]).save(tmp_path / "one.tif")
    np.testing.assert_array_equal(read_mask(tmp_path / "one.tif", 2).numpy(), pages[0])
    Image.fromarray(pages[0]).save(tmp_path / "stack.tif", save_all=True,
                                   append_images=[Image.fromarray(p) for p in pages[1:]])
    np.testing.assert_array_equal(read_mask(f"{tmp_path / 'stack.tif'}#frame=2", 4).numpy(), pages[2])
    with pytest.raises(MaskError, match=r"has 3 page\(s\); frame 5 does not exist"):
        read_mask(f"{tmp_path / 'stack.tif'}#frame=5", 4)


def test_a_frame_of_a_multiframe_dicom_mask_keeps_raw_values(tmp_path):
    frames = np.stack([_indices(classes=3) for _ in range(4)]).astype(np.uint8)
    frames[2] = 1  # a constant frame: a stretch of any kind would change it
    path = write_dicom(tmp_path / "mask.dcm", frames)
    np.testing.assert_array_equal(read_mask(f"{path}#frame=2", 3).numpy(), np.ones((12, 17)))
    np.testing.assert_array_equal(read_mask(f"{path}#frame=0", 3).numpy(), frames[0])


def test_rgb_mask_with_equal_channels_is_accepted_and_unequal_refused(tmp_path):
    values = _indices()
    Image.fromarray(np.repeat(values[..., None], 3, axis=2), mode="RGB").save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "grey.png", 3).numpy(), values)
    colour = np.repeat(values[..., None], 3, axis=2)
    colour[0, 0] = (1, 0, 0)
    Image.fromarray(colour, mode="RGB").save(tmp_path / "colour.png")
    with pytest.raises(MaskError, match="colour.png.*unequal channels"):
        read_mask(tmp_path / "colour.png", 3)


def test_unknown_index_names_file_value_and_option(tmp_path):
    values = _indices()
    values[3, 4] = 7
    Image.fromarray(values, mode="L").save(tmp_path / "bad.png")
    with pytest.raises(DataSourceError) as info:
        read_mask(tmp_path / "bad.png", 3)
    text = str(info.value)
    assert str(tmp_path / "bad.png") in text and "[7]" in text and "--mask-classes" in text


def test_ignore_index_is_kept_and_only_it_is_allowed(tmp_path):
    values = _indices()
    values[0, :5] = 255
    Image.fromarray(values, mode="L").save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", 3, ignore_index=255).numpy(), values)
    with pytest.raises(MaskError, match=r"\[255\]"):
        read_mask(tmp_path / "m.png", 3)
    with pytest.raises(MaskError, match=r"\[255\].*ignore index 254"):
        read_mask(tmp_path / "m.png", 3, ignore_index=254)


def test_unreadable_masks_give_reasons(tmp_path):
    with pytest.raises(MaskError, match="file not found"):
        read_mask(tmp_path / "none.png", 2)
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(MaskError, match="not a recognised image format"):
        read_mask(tmp_path / "junk.png", 2)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(MaskError, match="dir.png"):
        read_mask(tmp_path / "dir.png", 2)


# --- pairs ---------------------------------------------------------------------------------------
def _save_pair(root: Path, split: str, stem: str, image: bool = True, mask: bool = True) -> None:
    if image:
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(root / split / "images" / f"{stem}.jpg")
    if mask:
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / split / "masks" / f"{stem}.png")


def test_folder_pairs_are_matched_by_stem(tmp_path):
    for split, stems in (("train", ["a", "b", "c"]), ("val", ["d"]), ("test", ["e", "f"])):
        for stem in stems:
            _save_pair(tmp_path, split, stem)
    pairs = segmentation_pairs(tmp_path)
    assert {k: [Path(p.image).stem for p in v] for k, v in pairs.items()} == {
        "train": ["a", "b", "c"], "val": ["d"], "test": ["e", "f"]}
    for split, rows in pairs.items():
        for p in rows:
            assert p.split == split and Path(p.image).stem == Path(p.mask).stem
            assert Path(p.image).parent.name == "images" and Path(p.mask).parent.name == "masks"


def test_folder_missing_pairs_are_named(tmp_path):
    _save_pair(tmp_path, "train", "ok")
    _save_pair(tmp_path, "train", "lonely_image", mask=False)
    _save_pair(tmp_path, "val", "lonely_mask", image=False)
    with pytest.raises(DataSourceError) as info:
        segmentation_pairs(tmp_path)
    text = str(info.value)
    assert "lonely_image.jpg" in text and "without a mask" in text
    assert "lonely_mask.png" in text and "without an image" in text


def test_manifest_pairs_from_the_synthetic_lesion_set(tmp_path):
    manifest = write_lesion_dataset(tmp_path / "lesions", n_train=4, n_val=2, n_test=3, size=32)
    pairs = segmentation_pairs(manifest)
    assert {k: len(v) for k, v in pairs.items()} == {"train": 4, "val": 2, "test": 3}
    frame = pd.read_csv(manifest)
    first = pairs["train"][0]
    assert first.image == str(manifest.parent / frame["path"][0])
    assert first.mask == str(manifest.parent / frame["mask"][0])
    assert all(Path(p.image).is_file() and Path(p.mask).is_file() for rows in pairs.values() for p in rows)
    # Its masks are 0/255: as two classes 255 is an unknown index, and read as ignore it is kept.
    lesion = next(p for p in pairs["train"] if (read_mask(p.mask, 256) == 255).any())
    with pytest.raises(MaskError, match="--mask-classes"):
        read_mask(lesion.mask, 2)
    assert set(read_mask(lesion.mask, 2, ignore_index=255).unique().tolist()) == {0, 255}


def test_manifest_patient_id_without_split_and_missing_columns(tmp_path):
    pd.DataFrame({"path": ["a.png", "/abs/b.png"], "mask": ["m/a.png", "/abs/mb.png"],
                  "patient_id": ["p1", "p2"]}).to_csv(tmp_path / "m.csv", index=False)
    pairs = segmentation_pairs(tmp_path / "m.csv")
    assert pairs["all"] == [SegmentationPair(str(tmp_path / "a.png"), str(tmp_path / "m" / "a.png"), None, "p1"),
                            SegmentationPair("/abs/b.png", "/abs/mb.png", None, "p2")]
    pd.DataFrame({"path": ["a.png"]}).to_csv(tmp_path / "n.csv", index=False)
    with pytest.raises(DataSourceError, match="lacks column.*mask"):
        segmentation_pairs(tmp_path / "n.csv")


# --- joint transforms ----------------------------------------------------------------------------
def _square_scene(h: int = 60, w: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """A dark image with one bright off-centre square, and the mask with that square as class 1
    (plus an ignore stripe inside the dark area), so a flip or crop that missed the mask shows."""
    image = torch.full((3, h, w), 20, dtype=torch.uint8)
    mask = torch.zeros((h, w), dtype=torch.int64)
    image[:, 10:34, 8:30] = 240
    mask[10:34, 8:30] = 1
    mask[50:54, 60:70] = 255
    return image, mask


def _agreement(image: torch.Tensor, mask: torch.Tensor) -> float:
    """IoU of the bright pixels (above the midpoint of 20 and 240, normalised) and class 1."""
    bright = image[0] * STD[0] + MEAN[0] > 130 / 255
    square = mask == 1
    union = (bright | square).sum().item()
    return 1.0 if union == 0 else (bright & square).sum().item() / union


def test_train_transform_moves_image_and_mask_together():
    transform = segmentation_train_transform(32, MEAN, STD, crop_min_scale=0.3)
    image, mask = _square_scene()
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32
        assert out_mask.shape == (32, 32) and out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= {0, 1, 255}
        if (out_mask == 1).any():
            assert _agreement(out_image, out_mask) > 0.95, seed  # torchvision's legacy nearest: ~0.78
            cols = torch.nonzero(out_mask == 1)[:, 1].float().mean().item()
            flips.add(cols > 16)  # the square sits left in the source: right of centre means flipped (or cropped)
    assert len(flips) == 2  # both orientations were exercised


def test_eval_transform_is_aligned_and_deterministic():
    transform = segmentation_eval_transform(32, MEAN, STD)
    image, mask = _square_scene()
    out_image, out_mask = transform(image, mask)
    again = transform(image, mask)
    assert torch.equal(out_image, again[0]) and torch.equal(out_mask, again[1])
    assert _agreement(out_image, out_mask) > 0.95  # torchvision's legacy nearest for masks: ~0.85
    assert set(out_mask.unique().tolist()) == {0, 1, 255}
    # Known answer: resize 60x80 by 37/60 to 37x49 (nearest at pixel centres), centre-crop 32.
    np.testing.assert_array_equal(out_mask.numpy(), _numpy_eval(mask.numpy(), 37, (37, 49), 32))


def _numpy_eval(mask: np.ndarray, short: int, shape: tuple[int, int], size: int) -> np.ndarray:
    """The eval recipe on a mask, written independently: nearest at pixel centres, then centre crop."""
    h, w = mask.shape
    rows = np.floor((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(int)
    cols = np.floor((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(int)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return mask[rows][:, cols][top:top + size, left:left + size]


def _fundus_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """A bright disc off-centre in a wide black frame, a class-2 blob inside it and class 1 elsewhere
    on the disc; an ignore stripe in the black border the crop removes."""
    h, w = 70, 110
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 35) ** 2 + (xx - 45) ** 2 < 30 ** 2
    image = np.zeros((3, h, w), np.uint8)
    image[:, disc] = 160
    image[0, disc] = 220
    mask = np.where(disc, 1, 0).astype(np.int64)
    blob = (yy - 30) ** 2 + (xx - 40) ** 2 < 6 ** 2
    image[:, blob] = 255
    mask[blob] = 2
    mask[:, 100:] = 255
    return torch.from_numpy(image), torch.from_numpy(mask)


def test_fundus_crop_is_applied_to_image_and_mask():
    image, mask = _fundus_scene()
    place = fundus_placement(image)
    assert place is not None and place.side < 110
    out_image, out_mask = JointPreprocess(Preprocessing(fundus_crop=True))(image, mask)
    assert torch.equal(out_image.as_subclass(torch.Tensor), fundus_crop(image))
    expected = np.zeros((place.side, place.side), np.int64)  # padding is background
    height, width = place.bottom - place.top, place.right - place.left
    expected[place.pad_top:place.pad_top + height, place.pad_left:place.pad_left + width] = \
        mask.numpy()[place.top:place.bottom, place.left:place.right]
    np.testing.assert_array_equal(out_mask.numpy(), expected)
    # The disc (bright) and class>0 coincide after the crop, as before it.
    assert torch.equal(out_image[1] > 0, out_mask > 0)


def test_fundus_and_oct_crops_in_the_recipes_keep_alignment():
    image, mask = _fundus_scene()
    out_image, out_mask = segmentation_eval_transform(32, MEAN, STD, Preprocessing(fundus_crop=True))(image, mask)
    assert 255 not in out_mask.tolist()  # the ignore stripe lay in the black border the crop cut away
    inside = out_image[1] * STD[1] + MEAN[1] > 80 / 255
    assert ((inside == (out_mask > 0)).float().mean() > 0.95)
    image, mask = _square_scene()
    out_image, out_mask = segmentation_eval_transform(32, MEAN, STD, Preprocessing(oct_crop=0.5))(image, mask)
    assert _agreement(out_image, out_mask) > 0.95
    # The central half of 60x80 is rows 15-45, cols 20-60 (30x40), resized to 37x49 and centre-cropped.
    np.testing.assert_array_equal(out_mask.numpy(), _numpy_eval(mask.numpy()[15:45, 20:60], 37, (37, 49), 32))


# --- dataset -------------------------------------------------------------------------------------
def test_dataset_skips_unreadable_images_and_raises_for_bad_masks(tmp_path):
    image, mask = _square_scene()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "good.png")
    Image.fromarray(mask.numpy().astype(np.uint8)).save(tmp_path / "good_mask.png")
    (tmp_path / "broken.png").write_bytes(b"garbage")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small_mask.png")
    bad = mask.numpy().astype(np.uint8)
    bad[0, 0] = 9
    Image.fromarray(bad).save(tmp_path / "bad_mask.png")
    pairs = [SegmentationPair(str(tmp_path / "good.png"), str(tmp_path / "good_mask.png")),
             SegmentationPair(str(tmp_path / "broken.png"), str(tmp_path / "good_mask.png")),
             SegmentationPair(str(tmp_path / "good.png"), str(tmp_path / "small_mask.png")),
             SegmentationPair(str(tmp_path / "good.png"), str(tmp_path / "bad_mask.png"))]
    ds = SegmentationDataset(pairs, segmentation_eval_transform(16, MEAN, STD), num_classes=2, ignore_index=255)
    assert len(ds) == 4
    out_image, out_mask, index = ds[0]
    assert out_image.shape == (3, 16, 16) and out_mask.shape == (16, 16) and index == 0
    assert ds[1] == (None, (str(tmp_path / "broken.png"), "not a recognised image format"), 1)
    with pytest.raises(MaskError) as info:
        ds[2]
    assert "small_mask.png is 10x10" in str(info.value) and "good.png is 80x60" in str(info.value)
    with pytest.raises(MaskError, match=r"bad_mask.png.*\[9\].*--mask-classes"):
        ds[3]
    batch = collate_segmentation([ds[0], ds[1], ds[0]])
    assert batch.images.shape == (2, 3, 16, 16) and batch.targets.shape == (2, 16, 16)
    assert batch.targets.dtype == torch.int64 and batch.indices.tolist() == [0, 0]
    assert batch.skipped == [(str(tmp_path / "broken.png"), "not a recognised image format")]
    assert len(collate_segmentation([ds[1]])) == 0


def test_pairs_with_mask_classes_check_every_mask_up_front(tmp_path):
    manifest = write_lesion_dataset(tmp_path / "lesions", n_train=4, n_val=2, n_test=2, size=32)
    with pytest.raises(DataSourceError) as info:
        segmentation_pairs(manifest, ["background", "lesion"])
    text = str(info.value)
    assert "--mask-classes" in text and "[255]" in text and "train_0001.png" in text  # odd indices have lesions
    pairs = segmentation_pairs(manifest, ["background", "lesion"], ignore_index=255)
    assert sum(len(v) for v in pairs.values()) == 8
    with pytest.raises(DataSourceError, match="two or more distinct"):
        segmentation_pairs(manifest, ["background"])
    with pytest.raises(DataSourceError, match="--ignore-index 1 is the index of class 'lesion'"):
        segmentation_pairs(manifest, ["background", "lesion"], ignore_index=1)


def test_transforms_pickle_for_dataloader_workers():
    import pickle

    for transform in (segmentation_train_transform(16, MEAN, STD, Preprocessing(fundus_crop=True)),
                      segmentation_eval_transform(16, MEAN, STD, Preprocessing(oct_crop=0.8))):
        copy = pickle.loads(pickle.dumps(transform))
        image, mask = _square_scene()
        torch.manual_seed(0)
        first = transform(image, mask)
        torch.manual_seed(0)
        second = copy(image, mask)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
