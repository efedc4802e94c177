"""Segmentation's foundation pieces together (issue 22, before the workflows take them): the linear and UNETR
heads on a tiny ViT, trained on the synthetic lesion masks, against an all-background and an intensity baseline.

    .venv/bin/python benchmarks/segmentation_heads.py [--train 400] [--epochs 30] [--out DIR]

Data: data.synthetic.write_lesion_dataset (half the images with 1-4 haemorrhages or exudates anywhere in the
field of view, a mask per image), read with data.segmentation (joint transforms: the same crop for image and
mask). Model: models.segmentation.build_segmentation_model(vit_micro_patch8, head=linear|unetr), trained from
scratch with cross-entropy + soft Dice (AdamW). Scores: stats.segmentation per test image at the model's input
size (64 px), mean foreground (lesion) Dice over the images that have lesions, with bootstrap 95% CIs.
Baselines: every pixel background, and "thresholded intensity": a pixel is a lesion where its colour departs
from the median-filtered retina around it by more than a threshold chosen on the validation images.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = 64
LESION = 1


def _loader(pairs, transform, batch_size: int, shuffle: bool, seed: int):
    from torch.utils.data import DataLoader

    from retinafm.data.segmentation import SegmentationDataset, collate_segmentation

    # The synthetic masks hold 0 / 255: read as indices below 256, then any lesion value is class 1.
    dataset = SegmentationDataset(pairs, transform, num_classes=256)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_segmentation,
                      generator=torch.Generator().manual_seed(seed))


def _binary(mask: torch.Tensor) -> torch.Tensor:
    return (mask > 0).long()


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice of the lesion class (over the batch: small lesions are not drowned)."""
    probs = logits.softmax(1)[:, LESION]
    truth = (target == LESION).float()
    dice = 1 - (2 * (probs * truth).sum() + 1) / (probs.sum() + truth.sum() + 1)
    return F.cross_entropy(logits, target) + dice


def train(head: str, pairs: dict, epochs: int, seed: int) -> torch.nn.Module:
    from retinafm.data.segmentation import segmentation_train_transform
    from retinafm.models.registry import get_spec
    from retinafm.models.segmentation import build_segmentation_model

    torch.manual_seed(seed)
    spec = get_spec("vit_micro_patch8")
    model = build_segmentation_model(spec, 2, head=head, input_size=SIZE)
    transform = segmentation_train_transform(SIZE, spec.mean, spec.std, crop_min_scale=0.5)
    loader = _loader(pairs["train"], transform, 32, True, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=epochs * len(loader), pct_start=0.1)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            loss = _loss(model(batch.images), _binary(batch.targets))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def _eval_batches(pairs):
    from retinafm.data.segmentation import segmentation_eval_transform
    from retinafm.models.registry import get_spec

    spec = get_spec("vit_micro_patch8")
    return _loader(pairs, segmentation_eval_transform(SIZE, spec.mean, spec.std), 32, False, 0), spec


def predictions(model: torch.nn.Module, pairs) -> tuple[list[np.ndarray], list[np.ndarray]]:
    loader, _ = _eval_batches(pairs)
    truths, preds = [], []
    with torch.no_grad():
        for batch in loader:
            preds += list(model(batch.images).argmax(1).numpy())
            truths += list(_binary(batch.targets).numpy())
    return truths, preds


def _deviation(pairs) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per image: how far each pixel's colour departs from the median-filtered retina around it."""
    from scipy import ndimage

    loader, spec = _eval_batches(pairs)
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    deviations, truths = [], []
    for batch in loader:
        for image, mask in zip(batch.images, batch.targets, strict=True):
            rgb = (image * std + mean).numpy()
            background = np.stack([ndimage.median_filter(c, size=9) for c in rgb])
            inside = rgb.max(0) > 0.1  # the field of view, not the black surround
            deviations.append(np.where(inside, np.abs(rgb - background).sum(0), 0.0))
            truths.append(_binary(mask).numpy())
    return deviations, truths


def _scores(truths, preds) -> list[dict[str, np.ndarray]]:
    from retinafm.stats.segmentation import image_scores

    return [image_scores(t, p, 2) for t, p in zip(truths, preds, strict=True)]


def _mean_dice(scores) -> float:
    values = [s["dice"][LESION] for s in scores if s["in_truth"][LESION]]
    return float(np.mean(values)) if values else float("nan")


def run(out: Path, n_train: int, epochs: int, seed: int, n_val: int = 60, n_test: int = 100) -> dict[str, dict]:
    from retinafm.data.segmentation import segmentation_pairs
    from retinafm.data.synthetic import write_lesion_dataset
    from retinafm.stats.segmentation import summarise_images

    manifest = write_lesion_dataset(out / "data", n_train=n_train, n_val=n_val, n_test=n_test, size=128,
                                    seed=seed)
    pairs = segmentation_pairs(manifest)
    results = {}

    def summary(truths, preds):
        lesion = [i for i, t in enumerate(truths) if t.any()]  # the Dice of images with lesions
        scores = _scores([truths[i] for i in lesion], [preds[i] for i in lesion])
        return summarise_images(scores, ["background", "lesion"], seed=seed)["lesion"]

    deviations, truths = _deviation(pairs["val"])
    cuts = np.quantile(np.concatenate([d.ravel() for d in deviations]), np.linspace(0.80, 0.999, 60))
    best = max(cuts, key=lambda c: _mean_dice(_scores(truths, [(d > c).astype(int) for d in deviations])))
    deviations, truths = _deviation(pairs["test"])
    results["all background"] = summary(truths, [np.zeros_like(t) for t in truths])
    results["thresholded intensity"] = summary(truths, [(d > best).astype(int) for d in deviations])
    for head in ("linear", "unetr"):
        start = time.time()
        model = train(head, pairs, epochs, seed)
        truths, preds = predictions(model, pairs["test"])
        results[f"vit_micro_patch8 + {head} head"] = summary(truths, preds)
        results[f"vit_micro_patch8 + {head} head"]["seconds"] = time.time() - start
        small = [i for i, t in enumerate(truths) if 0 < t.sum() <= np.quantile([t.sum() for t in truths if t.any()],
                                                                              0.5)]
        results[f"vit_micro_patch8 + {head} head"]["small"] = summary([truths[i] for i in small],
                                                                       [preds[i] for i in small])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=60, help="validation images (they choose the threshold)")
    parser.add_argument("--test", type=int, default=100, help="test images (half with lesions)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as scratch:
        results = run(args.out or Path(scratch), args.train, args.epochs, args.seed, args.val, args.test)
    print("| method | lesion Dice, images with lesions [95% CI] | images | lesion Dice, smaller half of the "
          "lesion areas [95% CI] |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        dice, small = r["dice"], r.get("small", {}).get("dice")
        small_text = f"{small['mean']:.3f} [{small['ci_low']:.3f}, {small['ci_high']:.3f}]" if small else ""
        print(f"| {name} | {dice['mean']:.3f} [{dice['ci_low']:.3f}, {dice['ci_high']:.3f}] | {dice['images']} | "
              f"{small_text} |")


if __name__ == "__main__":
    main()
