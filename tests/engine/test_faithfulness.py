"""engine.faithfulness against known answers: a model that reads one patch only, curves and areas worked
out by hand, pointing-game and energy cases drawn on a grid, and bootstrap summaries whose signs and
intervals are fixed by construction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from retinafm.engine.faithfulness import (
    blurred_baseline,
    centre_bias,
    deletion_insertion,
    energy_in_mask,
    patch_ranking,
    pointing_game,
    random_heatmaps,
    summarise,
)
from retinafm.stats.bootstrap import bootstrap_samples

PATCH, SIDE = 8, 32  # a 4 x 4 grid of patches
GRID = SIDE // PATCH


def _patch_map(values: list[float], patch: int = PATCH) -> torch.Tensor:
    """(1, H, W) map constant over each patch, `values` in row-major patch order over a square grid."""
    side = int(math.isqrt(len(values)))
    grid = torch.tensor(values, dtype=torch.float32).reshape(1, side, side)
    return grid.repeat_interleave(patch, 1).repeat_interleave(patch, 2)


def _one_hot_map(index: int, *, last: bool = False) -> torch.Tensor:
    """A heatmap ranking patch `index` first (or last), the others in between."""
    values = [0.5] * (GRID * GRID)
    values[index] = 0.0 if last else 1.0
    return _patch_map(values)


# ---------- blur baseline


def test_blur_removes_patch_sized_detail_and_keeps_constants():
    side, patch = 224, 16  # a ViT-B/16 input
    checker = ((torch.arange(side) // patch)[:, None] + (torch.arange(side) // patch)[None, :]) % 2
    images = torch.stack([checker.float() * 4 - 2] * 3).unsqueeze(0)  # (1, 3, S, S), like normalised pixels
    blurred = blurred_baseline(images)
    assert blurred.shape == images.shape
    assert blurred.std() < images.std() / 10  # the patches are gone
    assert torch.equal(blurred, blurred_baseline(images, sigma=side / 10))  # default: a tenth of the side
    assert not torch.allclose(blurred, blurred_baseline(images, sigma=side / 20))
    constant = torch.full((2, 3, SIDE, SIDE), -1.7)
    assert torch.allclose(blurred_baseline(constant), constant)  # normalisation commutes with the blur
    with pytest.raises(ValueError, match="sigma"):
        blurred_baseline(images, sigma=0)


# ---------- deletion / insertion


def _single_patch_model(index: int):
    """score = mean of the image over patch `index` only (row-major on the 4 x 4 grid)."""
    row, col = divmod(index, GRID)

    def score(images: torch.Tensor) -> torch.Tensor:
        return images[:, :, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH].mean(dim=(1, 2, 3))

    return score


def test_ranking_the_patch_the_model_reads_first_gives_low_deletion_and_high_insertion():
    index = 6
    images = torch.zeros(2, 3, SIDE, SIDE)
    images[:, :, 8:16, 16:24] = 5.0  # patch 6 bright, the rest dark
    baseline = torch.zeros_like(images)
    score = _single_patch_model(index)
    heatmaps = {"first": _one_hot_map(index).expand(2, -1, -1),
                "last": _one_hot_map(index, last=True).expand(2, -1, -1)}
    runs = {name: deletion_insertion(score, images, h, patch=PATCH, steps=16, baseline=baseline)
            for name, h in heatmaps.items()}
    # By hand: 16 patches, 16 steps, one patch per step, score 5 while patch 6 is there, 0 after.
    assert runs["first"].deletion == pytest.approx([5 / 32] * 2)  # falls at the first step
    assert runs["last"].deletion == pytest.approx([5 * 15 / 16 + 5 / 32] * 2)  # falls at the last
    assert runs["first"].insertion == pytest.approx([5 * 15 / 16 + 5 / 32] * 2)
    assert runs["last"].insertion == pytest.approx([5 / 32] * 2)
    # With the blurred baseline (which keeps about half of a patch a quarter of the image wide) the order holds.
    blurred = {name: deletion_insertion(score, images, h, patch=PATCH) for name, h in heatmaps.items()}
    assert (blurred["first"].deletion < blurred["last"].deletion / 1.5).all()
    assert (blurred["first"].insertion > 1.5 * blurred["last"].insertion).all()


def test_areas_are_the_trapezoids_worked_out_by_hand_and_ties_go_to_the_lower_patch():
    # 2 x 2 patches of 2 x 2 pixels with values 1, 2, 3, 4; score = sum of the patch values.
    images = _patch_map([1.0, 2.0, 3.0, 4.0], patch=2).unsqueeze(1)  # (1, 1, 4, 4)
    heatmaps = _patch_map([0.1, 0.9, 0.5, 0.5], patch=2)  # order 1, 2 (tie with 3, lower index), 3, 0
    assert patch_ranking(heatmaps, 2).tolist() == [[1, 2, 3, 0]]

    def score(x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(1, 2, 3)) / 4

    result = deletion_insertion(score, images, heatmaps, patch=2, steps=4, baseline=torch.zeros_like(images))
    assert result.fractions.tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert result.deletion_curve.tolist() == [[10, 8, 5, 1, 0]]
    assert result.insertion_curve.tolist() == [[0, 2, 5, 9, 10]]
    assert result.deletion == pytest.approx([0.25 * (9 + 6.5 + 3 + 0.5)])  # 4.75; the other tie order gives 4.5
    assert result.insertion == pytest.approx([0.25 * (1 + 3.5 + 7 + 9.5)])  # 5.25


def test_steps_remove_rounded_equal_shares_of_patches():
    images = torch.zeros(1, 1, 4, 4)
    flat = torch.zeros(1, 4, 4)

    def score(x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(1, 2, 3))

    # 4 patches in 3 steps: round(4/3) = 1, round(8/3) = 3.
    assert deletion_insertion(score, images, flat, patch=2, steps=3).fractions.tolist() == [0, 0.25, 0.75, 1]
    # 2 patches in 4 steps: halves round up (0.5 -> 1, 1.5 -> 2), never to even.
    assert deletion_insertion(score, images, flat, patch=(2, 4), steps=4).fractions.tolist() == [0, .5, .5, 1, 1]


def test_curves_run_from_the_image_to_the_baseline_in_one_batched_forward_per_step():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIDE, patch_size=PATCH, depth=2,
                              num_classes=3).eval()
    images = torch.randn(3, 3, SIDE, SIDE)
    targets = torch.tensor([0, 2, 1])
    calls = []

    def score(x: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], torch.is_grad_enabled()))
        return model(x).softmax(1).gather(1, targets[:, None])[:, 0]

    heatmaps = random_heatmaps(3, (SIDE, SIDE), PATCH, torch.Generator().manual_seed(1))
    steps = 5
    result = deletion_insertion(score, images, heatmaps, patch=PATCH, steps=steps)
    assert calls == [(3, False)] * (2 * (steps + 1))  # whole batch, no gradients, deletion + insertion per step
    for curve in (result.deletion_curve, result.insertion_curve):
        assert curve.shape == (3, steps + 1)
    assert result.deletion.shape == result.insertion.shape == (3,)
    with torch.no_grad():
        on_image = score(images).numpy()
        on_baseline = score(blurred_baseline(images)).numpy()
    for start_end, expected in (((result.deletion_curve[:, 0], result.insertion_curve[:, -1]), on_image),
                                ((result.deletion_curve[:, -1], result.insertion_curve[:, 0]), on_baseline)):
        for got in start_end:
            assert got == pytest.approx(expected, abs=1e-5)


def test_deletion_insertion_refuses_what_it_cannot_measure():
    images = torch.zeros(2, 3, SIDE, SIDE)
    heatmaps = torch.zeros(2, SIDE, SIDE)

    def score(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))

    with pytest.raises(ValueError, match="whole number"):
        deletion_insertion(score, images, heatmaps, patch=7)
    with pytest.raises(ValueError, match="heatmaps of shape"):
        deletion_insertion(score, images, heatmaps[:1], patch=PATCH)
    with pytest.raises(ValueError, match="NaN"):
        deletion_insertion(score, images, torch.full_like(heatmaps, math.nan), patch=PATCH)
    with pytest.raises(ValueError, match="one value per image"):
        deletion_insertion(lambda x: x.mean(dim=(2, 3)), images, heatmaps, patch=PATCH)


# ---------- baselines


def test_random_heatmaps_are_patch_constant_seeded_and_in_unit_range():
    maps = random_heatmaps(4, (SIDE, 2 * SIDE), (PATCH, 2 * PATCH), torch.Generator().manual_seed(3))
    assert maps.shape == (4, SIDE, 2 * SIDE) and maps.dtype == torch.float32
    blocks = maps.reshape(4, GRID, PATCH, GRID, 2 * PATCH)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # constant over each patch
    assert maps.min() >= 0 and maps.max() <= 1
    assert len(blocks[:, :, 0, :, 0].unique()) == 4 * GRID * GRID  # the patches differ
    again = random_heatmaps(4, (SIDE, 2 * SIDE), (PATCH, 2 * PATCH), torch.Generator().manual_seed(3))
    assert torch.equal(maps, again)
    other = random_heatmaps(4, (SIDE, 2 * SIDE), (PATCH, 2 * PATCH), torch.Generator().manual_seed(4))
    assert not torch.equal(maps, other)


def test_centre_bias_peaks_at_the_centre_with_a_quarter_side_sigma():
    bias = centre_bias((9, 13))
    assert bias.shape == (9, 13) and bias.dtype == np.float32
    assert np.unravel_index(bias.argmax(), bias.shape) == (4, 6)
    assert bias.max() == pytest.approx(1) and bias.min() == pytest.approx(0)
    # By hand for a 9 x 9 image: sigma 2.25, corners 4 rows and 4 columns from the centre.
    square = centre_bias((9, 9))
    corner = math.exp(-32 / (2 * 2.25**2))
    assert square[4, 6] == pytest.approx((math.exp(-4 / (2 * 2.25**2)) - corner) / (1 - corner), rel=1e-5)
    even = centre_bias((10, 16))
    assert np.allclose(even, even[::-1]) and np.allclose(even, even[:, ::-1])  # centred between pixels


# ---------- localisation


def test_pointing_game_hits_misses_tolerance_and_no_lesion():
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    heatmap = np.zeros((20, 20), np.float32)
    heatmap[7, 7] = 1.0
    assert pointing_game(heatmap, mask) is True
    heatmap[7, 7], heatmap[7, 12] = 0.0, 1.0  # 3 pixels right of the lesion's last column (9)
    assert pointing_game(heatmap, mask) is False
    assert pointing_game(heatmap, mask, tolerance=2) is False
    assert pointing_game(heatmap, mask, tolerance=3) is True
    heatmap[12, 12] = 1.0  # diagonal: (3, 3) from the corner (9, 9), distance 4.24
    heatmap[7, 12] = 0.0
    assert pointing_game(heatmap, mask, tolerance=4) is False
    assert pointing_game(heatmap, mask, tolerance=5) is True
    assert pointing_game(heatmap, np.zeros_like(mask)) is None


def test_pointing_game_takes_the_first_maximum_so_flat_maps_earn_nothing():
    mask = np.zeros((6, 6), bool)
    mask[3:, 3:] = True
    heatmap = np.zeros((6, 6))
    heatmap[0, 0] = heatmap[4, 4] = 1.0  # tie: the first in row-major order is outside
    assert pointing_game(heatmap, mask) is False
    heatmap[0, 0] = 0.0
    assert pointing_game(heatmap, mask) is True
    assert pointing_game(np.ones((6, 6)), mask) is False
    with pytest.raises(ValueError, match="shape"):
        pointing_game(np.ones((6, 5)), mask)


def test_energy_in_mask_against_a_hand_count():
    heatmap = np.ones((4, 4))
    heatmap[0, 0] = 3.0  # total 18
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True  # 3 + 1 inside, 2 of 16 pixels
    assert energy_in_mask(heatmap, mask) == pytest.approx((4 / 18, 2 / 16))
    assert energy_in_mask(heatmap, np.zeros_like(mask)) is None
    assert energy_in_mask(np.zeros((4, 4)), mask) is None
    with pytest.raises(ValueError, match="negative"):
        energy_in_mask(-heatmap, mask)


# ---------- summaries


def _measures(n: int = 200) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shared = rng.normal(0.5, 0.1, n)  # image difficulty, shared by all methods
    return {"random": shared,
            "good": shared + 0.05 + rng.normal(0, 0.01, n),
            "bad": shared - 0.03 + rng.normal(0, 0.01, n)}


def test_summaries_bracket_the_means_and_the_paired_gain_has_the_right_sign():
    values = _measures()
    rows = {r.method: r for r in summarise(values, replicates=300, seed=1)}
    assert list(rows) == ["random", "good", "bad"]
    for method, row in rows.items():
        assert row.mean == pytest.approx(values[method].mean())
        assert row.ci_low < row.mean < row.ci_high and row.n == 200
    assert math.isnan(rows["random"].gain) and math.isnan(rows["random"].p_value)
    good, bad = rows["good"], rows["bad"]
    assert good.gain == pytest.approx(values["good"].mean() - values["random"].mean())
    assert 0 < good.gain_ci_low < good.gain < good.gain_ci_high
    assert bad.gain_ci_low < bad.gain < bad.gain_ci_high < 0
    assert good.p_value < 0.01 and bad.p_value < 0.01
    # Paired: the shared difficulty cancels, so the gain is far surer than either mean.
    assert good.gain_ci_high - good.gain_ci_low < (good.ci_high - good.ci_low) / 4
    # The mean's interval is the percentile interval of the same replicates' means.
    means = [values["good"][rows_].mean() for rows_ in bootstrap_samples(200, 300, seed=1)]
    assert (good.ci_low, good.ci_high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))

    lower = {r.method: r for r in summarise(values, replicates=300, seed=1, lower_is_better=True)}
    assert lower["good"].gain == pytest.approx(-good.gain)
    assert lower["good"].gain_ci_high < 0 < lower["bad"].gain_ci_low  # for deletion, lower is better


def test_summaries_leave_out_undefined_values_and_refuse_unpaired_inputs():
    values = _measures(50)
    values["good"][:10] = np.nan  # e.g. energy_in_mask gave None on these images
    rows = {r.method: r for r in summarise(values, replicates=100)}
    assert rows["good"].n == 40 and rows["good"].mean == pytest.approx(np.nanmean(values["good"]))
    assert rows["good"].ci_low < rows["good"].mean < rows["good"].ci_high
    with pytest.raises(ValueError, match="reference"):
        summarise({"good": values["good"]})
    with pytest.raises(ValueError, match="same images"):
        summarise({"random": values["random"], "good": values["good"][:-1]})
