"""How faithful a heatmap is to the model, and how well it finds the lesion: the measures of issue 20.

Faithfulness (Petsiuk et al., RISE, 2018): if a heatmap ranks the patches that drive the output first,
blurring those patches away first makes the output fall fast (a low *deletion* AUC), and putting them back
first into a blurred image makes it rise fast (a high *insertion* AUC). Patches are the model's own patch
grid, so a ViT sees whole tokens removed rather than edges cut through them. The baseline is a heavy blur
of the image, not black: black patches are far outside the training distribution, and a model reacting
to that shift would reward any heatmap.

Localisation against lesion masks: the pointing game (is the heatmap's peak on the lesion?) and the
share of the heatmap's energy inside the lesion, next to the lesion's share of the image, which is what
a map spread evenly would score. Both get a baseline that knows nothing about the model: random
patch-constant maps (`random_heatmaps`) and a centre bias (`centre_bias`): lesions are often central,
and a method is only worth its colours if it beats the centre.

`summarise` turns per-image values into each method's mean with a bootstrap CI and its paired gain over
a reference method (the random maps), all on the same replicates.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from retinafm.stats.bootstrap import bootstrap_ci, bootstrap_samples, paired_bootstrap

BLUR_SIGMA_SHARE = 0.1  # default blur sigma as a share of the shorter image side: objects the size of a patch vanish


def _pair(patch: int | tuple[int, int]) -> tuple[int, int]:
    return (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))


def _grid(size: tuple[int, int], patch: int | tuple[int, int]) -> tuple[int, int]:
    ph, pw = _pair(patch)
    if ph < 1 or pw < 1:
        raise ValueError(f"patch size must be positive, got {patch}")
    if size[0] % ph or size[1] % pw:
        raise ValueError(f"image size {size[0]}x{size[1]} is not a whole number of {ph}x{pw} patches")
    return size[0] // ph, size[1] // pw


def _to_pixels(per_patch: torch.Tensor, patch: int | tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) -> (B, gh * ph, gw * pw), each patch's value repeated over its pixels."""
    ph, pw = _pair(patch)
    return per_patch.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)


def blurred_baseline(images: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """A heavily Gaussian-blurred copy of (B, C, H, W) images, the 'information removed' state of deletion /
    insertion. Blurred as they are (already normalised): blurring is linear, so normalising commutes with it.

    `sigma` in pixels defaults to a tenth of the shorter side; the kernel spans +-3 sigma, capped at what
    reflect padding allows (2 * side - 1).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    side = min(images.shape[-2:])
    sigma = BLUR_SIGMA_SHARE * side if sigma is None else float(sigma)
    if not sigma > 0:
        raise ValueError(f"blur sigma must be positive, got {sigma}")
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * side - 1)
    return TF.gaussian_blur(images, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


@dataclass(frozen=True)
class DeletionInsertion:
    """Deletion / insertion curves of a batch and their areas.

    `fractions` (steps + 1,) is the share of patches removed (deletion) or restored (insertion) at each step,
    0 to 1; `deletion_curve` / `insertion_curve` (B, steps + 1) the explained score at each; `deletion` /
    `insertion` (B,) the areas under them (trapezoid over `fractions`). Lower deletion and higher
    insertion mean a more faithful heatmap.
    """

    fractions: np.ndarray
    deletion_curve: np.ndarray
    insertion_curve: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray


def patch_ranking(heatmaps: torch.Tensor, patch: int | tuple[int, int]) -> torch.Tensor:
    """(B, patches) patch indices (row-major over the patch grid), most relevant first: by the mean of the
    heatmap within each patch, ties by the lower index (a stable sort), so equal maps give equal orders."""
    gh, gw = _grid(tuple(heatmaps.shape[-2:]), patch)
    ph, pw = _pair(patch)
    means = heatmaps.float().reshape(-1, gh, ph, gw, pw).mean(dim=(2, 4)).reshape(-1, gh * gw)
    return torch.argsort(-means, dim=1, stable=True)


def _area(fractions: np.ndarray, curves: np.ndarray) -> np.ndarray:
    return ((curves[:, 1:] + curves[:, :-1]) / 2 * np.diff(fractions)).sum(axis=1)


def deletion_insertion(
    score: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    *,
    patch: int | tuple[int, int],
    steps: int = 16,
    baseline: torch.Tensor | None = None,
) -> DeletionInsertion:
    """Deletion and insertion curves of (B, C, H, W) `images` under (B, H, W) `heatmaps`.

    `score(images) -> (B,)` is the explained output (e.g. the softmax probability of the explained target);
    it is called twice per step (deletion, insertion), each time on the whole batch, under `torch.no_grad()`.
    At step k = 0..steps the top round(k * n / steps) of the n patches (`patch_ranking`) are replaced by
    `baseline` (deletion, starting from the image) or taken from the image (insertion, starting from the
    baseline); `baseline` defaults to `blurred_baseline(images)`. Steps remove equal shares of patches, so
    the curves of different heatmaps are compared at the same x.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    batch, size = images.shape[0], tuple(images.shape[-2:])
    if tuple(heatmaps.shape) != (batch, *size):
        raise ValueError(f"heatmaps of shape {tuple(heatmaps.shape)} for images of shape {tuple(images.shape)}")
    if not torch.isfinite(heatmaps).all():
        raise ValueError("heatmaps contain NaN or infinite values; they cannot rank patches")
    if steps < 1:
        raise ValueError(f"deletion / insertion needs at least 1 step, got {steps}")
    gh, gw = _grid(size, patch)
    n = gh * gw
    with torch.no_grad():
        baseline = blurred_baseline(images) if baseline is None else baseline
        if baseline.shape != images.shape:
            raise ValueError(f"baseline of shape {tuple(baseline.shape)} for images of shape {tuple(images.shape)}")
        # rank[b, p]: position of patch p in image b's order (0 = most relevant).
        order = patch_ranking(heatmaps, patch).to(images.device)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=images.device).expand(batch, n))
        counts = [(2 * k * n + steps) // (2 * steps) for k in range(steps + 1)]  # round half up, exactly
        deletion, insertion = [], []
        for count in counts:
            top = _to_pixels((rank < count).reshape(batch, gh, gw), patch).unsqueeze(1)  # (B, 1, H, W)
            deletion.append(_checked(score(torch.where(top, baseline, images)), batch))
            insertion.append(_checked(score(torch.where(top, images, baseline)), batch))
    fractions = np.array(counts, dtype=float) / n
    deletion_curve, insertion_curve = np.stack(deletion, axis=1), np.stack(insertion, axis=1)
    return DeletionInsertion(fractions, deletion_curve, insertion_curve,
                             _area(fractions, deletion_curve), _area(fractions, insertion_curve))


def _checked(scores: torch.Tensor, batch: int) -> np.ndarray:
    if tuple(scores.shape) != (batch,):
        raise ValueError(f"score must return one value per image, shape ({batch},), got {tuple(scores.shape)}")
    return scores.detach().double().cpu().numpy()


def random_heatmaps(batch: int, size: tuple[int, int], patch: int | tuple[int, int],
                    generator: torch.Generator) -> torch.Tensor:
    """(B, H, W) float32 maps, uniform in 0..1 and constant over each patch: the baseline any method must
    beat. Drawn on the generator's device, so a seeded generator gives the same maps on every run."""
    gh, gw = _grid(size, patch)
    per_patch = torch.rand(batch, gh, gw, generator=generator, device=generator.device)
    return _to_pixels(per_patch, patch)


def centre_bias(shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 isotropic Gaussian centred on the image, sigma a quarter of the shorter side, scaled
    0..1 like the methods' maps (min to 0, max to 1): the localisation of a model that only knows lesions
    tend to be central."""
    height, width = shape
    if height < 1 or width < 1:
        raise ValueError(f"centre bias needs a positive shape, got {shape}")
    sigma = min(height, width) / 4
    y = (np.arange(height) - (height - 1) / 2) ** 2
    x = (np.arange(width) - (width - 1) / 2) ** 2
    bias = np.exp(-(y[:, None] + x[None, :]) / (2 * sigma**2))
    low, high = bias.min(), bias.max()
    return ((bias - low) / (high - low) if high > low else np.ones_like(bias)).astype(np.float32)


def _check_map(heatmap: np.ndarray, mask: np.ndarray) -> None:
    if heatmap.shape != mask.shape or heatmap.ndim != 2:
        raise ValueError(f"heatmap of shape {heatmap.shape} for a mask of shape {mask.shape}; both must be (H, W)")
    if not np.isfinite(heatmap).all():
        raise ValueError("heatmap contains NaN or infinite values")


def pointing_game(heatmap: np.ndarray, mask: np.ndarray, tolerance: int = 0) -> bool | None:
    """Whether the heatmap's peak lies on the lesion, or within `tolerance` pixels of it (Euclidean).

    The peak is the first maximum in row-major order (np.argmax): a deterministic rule, and one that gives
    no credit to flat maps (a constant map would otherwise 'hit' every lesion). None for an empty mask: an
    image without a lesion has nothing to point at and is not counted.
    """
    mask = np.asarray(mask, dtype=bool)
    heatmap = np.asarray(heatmap)
    _check_map(heatmap, mask)
    if tolerance < 0:
        raise ValueError(f"pointing-game tolerance must be at least 0 pixels, got {tolerance}")
    if not mask.any():
        return None
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    if mask[row, col]:
        return True
    if tolerance == 0:
        return False
    rows, cols = np.nonzero(mask)
    return bool(((rows - row) ** 2 + (cols - col) ** 2).min() <= tolerance**2)


def energy_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> tuple[float, float] | None:
    """(share of the heatmap's sum inside the lesion, the lesion's share of the image's pixels).

    The second is what a uniform map scores, so a method localises when the first exceeds it. None for an
    empty mask (no lesion) or an all-zero heatmap (no energy to share). Negative values are refused: a
    share of a sum with both signs means nothing.
    """
    mask = np.asarray(mask, dtype=bool)
    heatmap = np.asarray(heatmap, dtype=np.float64)
    _check_map(heatmap, mask)
    if (heatmap < 0).any():
        raise ValueError("heatmap has negative values; energy shares need maps in 0..1")
    total = heatmap.sum()
    if not mask.any() or total == 0:
        return None
    return float(heatmap[mask].sum() / total), float(mask.mean())


@dataclass(frozen=True)
class MeasureSummary:
    """One method's mean of a per-image measure, its bootstrap CI, and its paired gain over the reference.

    `gain` is how much better than the reference the method scores (method - reference, or reference -
    method when lower is better), so a positive gain is always better; its CI and two-sided p come from
    the same replicates as every other method's. The reference's own row has NaN gain and p. `n`: images
    where the measure is defined (NaN values are left out).
    """

    method: str
    mean: float
    ci_low: float
    ci_high: float
    n: int
    gain: float
    gain_ci_low: float
    gain_ci_high: float
    p_value: float


def summarise(
    values: Mapping[str, np.ndarray],
    *,
    reference: str = "random",
    lower_is_better: bool = False,
    replicates: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> list[MeasureSummary]:
    """Per-method means with percentile CIs, and paired gains over `reference`, in `values`' order.

    `values[method]` holds one value per image, the same images in the same order for every method (NaN
    where the measure is undefined for that image, e.g. a None from `energy_in_mask`). Every method is
    resampled with the same replicates (`stats.bootstrap`), so the gain's interval is that of the paired
    difference, narrower than two independent intervals suggest. `groups` (patient per image) resamples
    whole patients: images of one patient are not independent.
    """
    if reference not in values:
        raise ValueError(f"reference method {reference!r} is not among {sorted(values)}")
    arrays = {method: np.asarray(v, dtype=float).reshape(-1) for method, v in values.items()}
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"every method needs one value per image, the same images; got lengths {sorted(lengths)}")
    samples = bootstrap_samples(lengths.pop(), replicates, seed, groups=groups)

    def mean(x: np.ndarray) -> float:
        return float(np.mean(x[np.isfinite(x)])) if np.isfinite(x).any() else math.nan

    intervals = bootstrap_ci(lambda rows: {m: mean(v[rows]) for m, v in arrays.items()}, samples, level=level)
    base = arrays[reference]
    rows: list[MeasureSummary] = []
    for method, v in arrays.items():
        low, high = intervals[method]
        gain = gain_low = gain_high = p_value = math.nan
        if method != reference:
            # paired_bootstrap reports b - a: order the pair so that b - a > 0 means better than the reference.
            a, b = (v, base) if lower_is_better else (base, v)
            paired = paired_bootstrap(lambda rows, a=a, b=b: (mean(a[rows]), mean(b[rows])), samples,
                                      full=(mean(a), mean(b)), level=level)
            gain, gain_low, gain_high, p_value = paired.difference, paired.ci_low, paired.ci_high, paired.p_value
        rows.append(MeasureSummary(method, mean(v), low, high, int(np.isfinite(v).sum()),
                                   gain, gain_low, gain_high, p_value))
    return rows
