from __future__ import annotations

import numpy as np
import torch

from retinafm.data.transforms import AugmentSettings, eval_transform, train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_eval_is_resize_then_centre_crop_and_normalise():
    img = torch.full((3, 300, 200), 128, dtype=torch.uint8)
    out = eval_transform(224, MEAN, STD)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out[:, 100, 100], expected, atol=1e-3, rtol=0)
    # Deterministic: evaluation must not augment.
    x = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8)
    assert torch.equal(eval_transform(64, MEAN, STD)(x), eval_transform(64, MEAN, STD)(x))


def test_eval_crop_keeps_the_centre_fraction():
    # Short side resized to 64/0.875 ≈ 73, then a 64 crop: the border stripes must be cut off.
    img = torch.zeros((3, 100, 100), dtype=torch.uint8)
    img[:, :, :3] = 255
    out = eval_transform(64, (0, 0, 0), (1, 1, 1))(img)
    assert out[:, :, 0].max() < 0.05


def test_train_augments_randomly_with_right_shape():
    x = torch.randint(0, 256, (3, 128, 96), dtype=torch.uint8)
    tf = train_transform(64, MEAN, STD, AugmentSettings(crop_min_scale=0.08, randaug_magnitude=9, reprob=0.25))
    torch.manual_seed(0)
    a, b = tf(x), tf(x)
    assert a.shape == b.shape == (3, 64, 64) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    plain = train_transform(64, MEAN, STD, AugmentSettings(randaug_magnitude=0, reprob=0.0))
    names = [type(t).__name__ for t in plain.transforms]
    assert "RandAugment" not in names and "RandomErasing" not in names and "RandomResizedCrop" in names


def test_preprocessing_runs_before_the_recipe_and_round_trips_its_state():
    from skimage import data as skdata

    from retinafm.data.preprocess import center_crop_fraction, fundus_crop
    from retinafm.data.transforms import Preprocessing, eval_transform

    canvas = np.zeros((700, 1000, 3), np.uint8)
    canvas[: 700, 150:850] = skdata.retina()[::2, ::2][:700, :700]
    image = torch.from_numpy(canvas).permute(2, 0, 1).contiguous()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = eval_transform(32, mean, std)
    cropped = eval_transform(32, mean, std, preprocessing=Preprocessing(fundus_crop=True))
    torch.testing.assert_close(cropped(image), plain(fundus_crop(image)))
    central = eval_transform(32, mean, std, preprocessing=Preprocessing(oct_crop=0.5))
    torch.testing.assert_close(central(image), plain(center_crop_fraction(image, 0.5)))
    settings = Preprocessing(fundus_crop=True, oct_crop=0.8)
    assert Preprocessing.from_state(settings.state()) == settings and Preprocessing.from_state({}) == Preprocessing()
