"""data.geometry: a map over the model's input laid back on the file, through the recipe's real steps.

The independent check: mark a region of the file, let the recipe carry the image to the model's input,
take the marked region there as the "heatmap", and carry it back: it must land on the marked pixels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from retinafm.data.geometry import to_original, traced_transform
from retinafm.data.preprocess import fundus_placement
from retinafm.data.synthetic import render_fundus
from retinafm.data.transforms import Preprocessing, eval_transform

SIZE = 32


def _recipe(preprocessing: Preprocessing | None = None, crop_pct: float = 0.875) -> v2.Compose:
    return eval_transform(SIZE, [0.0] * 3, [1.0] * 3, crop_pct, preprocessing or Preprocessing())


def _marked(height: int, width: int, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """A dark grey image with a white rectangle (top, left, bottom, right)."""
    image = torch.full((3, height, width), 60, dtype=torch.uint8)
    top, left, bottom, right = box
    image[:, top:bottom, left:right] = 255
    truth = np.zeros((height, width), bool)
    truth[top:bottom, left:right] = True
    return image, truth


def _carried_back(image: torch.Tensor, recipe: v2.Compose) -> np.ndarray:
    tensor, trace = traced_transform(recipe, image)
    torch.testing.assert_close(tensor, recipe(image), rtol=0, atol=0)  # the traced steps are the recipe's own
    heat = (tensor[0] - tensor[0].min()) / (tensor[0].max() - tensor[0].min())
    back = to_original(heat, trace)
    assert back.shape == tuple(image.shape[-2:]) and back.dtype == np.float32
    assert back.max() == pytest.approx(1.0) and back.min() >= 0
    return back


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("height, width, box", [
    (300, 200, (100, 60, 160, 130)),  # portrait
    (180, 420, (60, 170, 120, 250)),  # landscape
    (97, 61, (30, 20, 60, 45)),  # odd sizes
    (SIZE, SIZE, (8, 8, 20, 20)),  # already the input size (upsampled by 1/0.875)
])
def test_a_marked_region_comes_back_where_it_was(height, width, box):
    image, truth = _marked(height, width, box)
    back = _carried_back(image, _recipe())
    assert _iou(back > 0.5, truth) > 0.75


def test_what_the_centre_crop_cut_away_is_zero():
    image, _ = _marked(100, 400, (40, 180, 60, 220))
    back = _carried_back(image, _recipe(crop_pct=1.0))
    # the short side (100 px) becomes the input: the model saw the central 100 columns only
    assert back[:, :140].max() == 0 and back[:, 260:].max() == 0
    assert back[:, 160:240].max() > 0


def test_fundus_crop_is_undone():
    """A fundus disc placed off-centre in a wide black frame: cropped, padded square, resized, cropped."""
    fundus = torch.from_numpy(render_fundus(np.random.default_rng(1), "normal", 120).copy()).permute(2, 0, 1)
    image = torch.zeros(3, 180, 400, dtype=torch.uint8)
    image[:, 40:160, 230:350] = fundus
    image[:, 90:110, 280:300] = 255  # a marker inside the disc
    truth = np.zeros((180, 400), bool)
    truth[90:110, 280:300] = True
    recipe = _recipe(Preprocessing(fundus_crop=True), crop_pct=1.0)
    assert fundus_placement(image) is not None
    tensor, trace = traced_transform(recipe, image)
    heat = (tensor.min(0).values > 0.95).float()  # white in all channels: the marker only
    back = to_original(heat, trace)
    assert back.shape == (180, 400)
    assert _iou(back > 0.5, truth) > 0.5
    assert back[:, :200].max() == 0  # the black frame the crop removed


def test_oct_central_crop_is_undone():
    image, truth = _marked(150, 300, (60, 130, 90, 170))
    back = _carried_back(image, _recipe(Preprocessing(oct_crop=0.8), crop_pct=1.0))
    assert _iou(back > 0.5, truth) > 0.6
    assert back[:, :30].max() == 0  # outside the central 80 %


def test_a_map_of_the_wrong_size_and_an_unknown_step_are_refused():
    image, _ = _marked(64, 64, (0, 0, 8, 8))
    _, trace = traced_transform(_recipe(), image)
    with pytest.raises(ValueError, match="heatmap of shape"):
        to_original(torch.zeros(SIZE + 1, SIZE), trace)
    with pytest.raises(ValueError, match="RandomHorizontalFlip"):
        traced_transform(v2.Compose([v2.RandomHorizontalFlip()]), image)
