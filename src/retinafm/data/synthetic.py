"""A small synthetic but learnable colour-fundus data set for the embedded demo and tests.

Each image has a circular field of view, an orange-red retina with vignetting, an optic disc
with a cup and a vessel tree. The classes carry the signs a grader looks for:
- normal: small cup (cup-to-disc ratio ~0.3), no lesions;
- diabetic_retinopathy: dark-red microaneurysms / blot haemorrhages and yellow hard exudates;
- glaucoma: a large pale cup (cup-to-disc ratio 0.7-0.85) in a slightly larger, paler disc.

The generator knows where it drew each lesion, so it can also give their masks (`render_findings(...,
with_mask=True)`), and `write_lesion_dataset` writes a healthy-vs-lesions set with a mask per image:
ground truth for how well a heatmap points at the lesions.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = ("normal", "diabetic_retinopathy", "glaucoma")
SPLIT_SEED_OFFSETS = {"train": 0, "val": 1, "test": 2}


def _vessels(draw: ImageDraw.ImageDraw, rng: np.random.Generator, start: tuple[float, float], size: int,
             colour: tuple[int, int, int]) -> None:
    """Arcades leaving the disc up and down, branching a few times, thinning as they go."""
    stack = []
    for base in (-math.pi / 2, math.pi / 2, -math.pi / 2 + 0.35, math.pi / 2 - 0.35):
        toward_centre = 0.0 if start[0] < size / 2 else math.pi
        angle = base * 0.8 + toward_centre * 0.2 + rng.normal(0, 0.15)
        stack.append((start, angle, max(2.0, size * 0.022), 0))
    while stack:
        (x, y), angle, width, depth = stack.pop()
        length = size * rng.uniform(0.12, 0.2)
        points = [(x, y)]
        for _ in range(6):
            angle += rng.normal(0, 0.18)
            # Vessels curve around the macula, toward the fovea side.
            x += math.cos(angle) * length / 6 + (size / 2 - x) * 0.02
            y += math.sin(angle) * length / 6
            points.append((x, y))
        draw.line(points, fill=colour, width=max(1, int(round(width))), joint="curve")
        if depth < 3:
            for turn in (-0.5, 0.45):
                stack.append((points[-1], angle + turn + rng.normal(0, 0.15), width * 0.72, depth + 1))


# The findings of each demo class (large pale cup, haemorrhages, exudates).
CLASS_FINDINGS = {
    "normal": (False, False, False),
    "diabetic_retinopathy": (False, True, True),
    "glaucoma": (True, False, False),
}
MULTILABEL_LABELS: tuple[str, ...] = ("large_cup", "haemorrhages", "exudates")
REGRESSION_TARGETS: tuple[str, ...] = ("cup_to_disc", "exudate_count")


def render_fundus(rng: np.random.Generator, label: str, size: int = 128) -> np.ndarray:
    """One (size, size, 3) uint8 RGB fundus-like image of class `label`."""
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    large_cup, haemorrhages, exudates = CLASS_FINDINGS[label]
    return render_findings(rng, size, large_cup=large_cup, haemorrhages=haemorrhages, exudates=exudates)


@overload
def render_findings(rng: np.random.Generator, size: int = ..., *, large_cup: bool = ..., haemorrhages: bool = ...,
                    exudates: bool = ..., cup_to_disc: float | None = ..., exudate_count: int | None = ...,
                    with_mask: Literal[False] = ...) -> np.ndarray: ...


@overload
def render_findings(rng: np.random.Generator, size: int = ..., *, large_cup: bool = ..., haemorrhages: bool = ...,
                    exudates: bool = ..., cup_to_disc: float | None = ..., exudate_count: int | None = ...,
                    with_mask: Literal[True]) -> tuple[np.ndarray, np.ndarray]: ...


def render_findings(rng: np.random.Generator, size: int = 128, *, large_cup: bool = False,
                    haemorrhages: bool = False, exudates: bool = False, cup_to_disc: float | None = None,
                    exudate_count: int | None = None,
                    with_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A fundus-like image with the given findings; `cup_to_disc` / `exudate_count` fix those
    quantities (regression data), otherwise they are drawn to suit the findings. With `with_mask`,
    also the lesion mask: bool (size, size), True where a haemorrhage or exudate was drawn. The
    mask costs no random draws, so the image is the same either way."""
    image, mask = _render(rng, size, large_cup=large_cup, haemorrhages=haemorrhages, exudates=exudates,
                          cup_to_disc=cup_to_disc, exudate_count=exudate_count)
    return (image, mask) if with_mask else image


# Lesions of the localisation set (write_lesion_dataset): radius as a fraction of the 2x working
# size, i.e. about 4.5-7 px across at a 64 px model input, so that one lesion alone is visible.
SCATTERED_RADIUS = (0.035, 0.055)
HAEMORRHAGE_COLOUR = (95, 10, 10)
EXUDATE_COLOUR = (250, 225, 90)


def _render(rng: np.random.Generator, size: int, *, large_cup: bool = False, haemorrhages: bool = False,
            exudates: bool = False, cup_to_disc: float | None = None, exudate_count: int | None = None,
            scattered: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """render_findings' image and lesion mask; `scattered` adds that many single haemorrhages or
    exudates placed uniformly over the field of view (off the optic disc), after the other findings.
    The random draws of everything else come first and in the same order, so `scattered=0`
    reproduces the images render_findings has always made."""
    work = size * 2  # draw at 2x and downsample for smooth edges
    cx, cy = work / 2 + rng.normal(0, work * 0.01), work / 2 + rng.normal(0, work * 0.01)
    radius = work * 0.46
    yy, xx = np.mgrid[0:work, 0:work]
    r = np.hypot(xx - cx, yy - cy) / radius
    brightness = rng.uniform(0.8, 1.1)
    base = np.array([200, 85, 40]) * brightness + rng.normal(0, 8, 3)
    vignette = np.clip(1.0 - 0.45 * r**2, 0, 1)[..., None]
    img = np.clip(base * vignette, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(img)
    draw = ImageDraw.Draw(canvas)
    # Every lesion is drawn here too, at the same working size, so the mask is where the image has it.
    mask_canvas = Image.new("L", (work, work), 0)
    mask_draw = ImageDraw.Draw(mask_canvas)

    def lesion(px: float, py: float, pr: float, fill: tuple[int, int, int]) -> None:
        draw.ellipse([px - pr, py - pr, px + pr, py + pr], fill=fill)
        mask_draw.ellipse([px - pr, py - pr, px + pr, py + pr], fill=255)

    side = rng.choice([-1, 1])
    dx, dy = cx + side * radius * rng.uniform(0.42, 0.52), cy + rng.normal(0, radius * 0.05)
    disc_r = radius * rng.uniform(0.13, 0.16) * (1.15 if large_cup else 1.0)
    if cup_to_disc is not None:
        cdr = cup_to_disc
    else:
        cdr = rng.uniform(0.7, 0.85) if large_cup else rng.uniform(0.25, 0.4)
    vessel = tuple(int(v) for v in np.array([120, 25, 20]) * rng.uniform(0.85, 1.1))
    _vessels(draw, rng, (dx, dy), work, vessel)
    disc = (245, 200, 120) if large_cup else (235, 170, 90)
    draw.ellipse([dx - disc_r * 0.9, dy - disc_r, dx + disc_r * 0.9, dy + disc_r], fill=disc)
    cup_r = disc_r * cdr
    draw.ellipse([dx - cup_r * 0.9, dy - cup_r, dx + cup_r * 0.9, dy + cup_r], fill=(252, 238, 200))
    # Fovea: a darker spot on the other side of the centre.
    fx = cx - side * radius * 0.1
    draw.ellipse([fx - radius * 0.09, cy - radius * 0.09, fx + radius * 0.09, cy + radius * 0.09],
                 fill=tuple(int(v) for v in base * 0.7))

    # Moderate-to-severe disease, sized to stay 3-6 px across at the demo's 64 px input.
    if haemorrhages:
        for _ in range(rng.integers(10, 26)):  # blot haemorrhages
            a, d = rng.uniform(0, 2 * math.pi), radius * math.sqrt(rng.uniform(0.02, 0.55))
            px, py, pr = cx + d * math.cos(a), cy + d * math.sin(a), work * rng.uniform(0.025, 0.045)
            lesion(px, py, pr, HAEMORRHAGE_COLOUR)
    if exudates or exudate_count:
        centre = (cx + rng.normal(0, radius * 0.2), cy + rng.normal(0, radius * 0.2))
        for _ in range(exudate_count if exudate_count is not None else rng.integers(6, 16)):  # hard exudates
            px, py = centre[0] + rng.normal(0, radius * 0.15), centre[1] + rng.normal(0, radius * 0.15)
            pr = work * rng.uniform(0.022, 0.04)
            lesion(px, py, pr, EXUDATE_COLOUR)
    for _ in range(scattered):
        pr = work * rng.uniform(*SCATTERED_RADIUS)
        colour = HAEMORRHAGE_COLOUR if rng.random() < 0.5 else EXUDATE_COLOUR
        while True:
            # Uniform over the area of the field of view (sqrt of a uniform radius), periphery
            # included, so that a heatmap biased to the centre gains nothing; kept wholly inside the
            # field and off the disc, where a yellow exudate on the pale disc would hardly show.
            a, d = rng.uniform(0, 2 * math.pi), (radius * 0.97 - pr) * math.sqrt(rng.uniform())
            px, py = cx + d * math.cos(a), cy + d * math.sin(a)
            if math.hypot(px - dx, py - dy) > disc_r + pr:
                break
        lesion(px, py, pr, colour)

    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=work * 0.004))
    arr = np.asarray(canvas, dtype=np.float64) + rng.normal(0, 4, (work, work, 3))
    arr[r > 1.0] = 0  # the unlit border outside the field of view
    small = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)
    lesions = np.asarray(mask_canvas).copy()
    lesions[r > 1.0] = 0  # an exudate cluster can reach past the field, where the image is black
    # The same resize as the image, then half-coverage: a pixel is lesion if most of it was.
    mask = np.asarray(Image.fromarray(lesions).resize((size, size), Image.Resampling.LANCZOS)) >= 128
    return np.asarray(small), mask


def write_demo_dataset(root: Path, n_train: int = 120, n_val: int = 30, n_test: int = 40, size: int = 128,
                       seed: int = 0) -> Path:
    """Write root/{train,val,test}/<class>/<class>_<split>_<i>.png; each split from its own stream."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} already exists and is not empty; choose an empty folder for the demo data")
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        rng = np.random.default_rng([seed, SPLIT_SEED_OFFSETS[split]])
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                target = folder / f"{label}_{split}_{i:04d}.png"
                fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
                os.close(fd)
                Image.fromarray(render_fundus(rng, label, size)).save(tmp)
                os.replace(tmp, target)
    return root


def _save_png(array: np.ndarray, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=target.parent)
    os.close(fd)
    Image.fromarray(array).save(tmp)
    os.replace(tmp, target)


# A row of a manifest data set: from the split's random stream and the row's index within the split,
# the image, its manifest cells and (for a localisation set) its bool lesion mask.
RowFn = Callable[[np.random.Generator, int], tuple[np.ndarray, dict[str, Any], np.ndarray | None]]


def _write_manifest_dataset(root: Path, counts: dict[str, int], seed: int, row_fn: RowFn) -> Path:
    """images/<split>_<i>.png plus manifest.csv (path, split, then row_fn's columns); where row_fn
    gives a mask, also masks/<split>_<i>.png (L, 0/255) and a `mask` column with its path."""
    import pandas as pd

    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} already exists and is not empty; choose an empty folder")
    (root / "images").mkdir(parents=True)
    rows = []
    for split, count in counts.items():
        rng = np.random.default_rng([seed, SPLIT_SEED_OFFSETS[split]])
        for i in range(count):
            image, values, mask = row_fn(rng, i)
            name = f"images/{split}_{i:04d}.png"
            _save_png(image, root / name)
            row = {"path": name, "split": split, **values}
            if mask is not None:
                row["mask"] = f"masks/{Path(name).stem}.png"
                (root / "masks").mkdir(exist_ok=True)
                _save_png(mask.astype(np.uint8) * 255, root / row["mask"])
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame.to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def write_multilabel_dataset(root: Path, n_train: int = 120, n_val: int = 40, n_test: int = 40, size: int = 128,
                             seed: int = 0, missing: float = 0.05) -> Path:
    """Fundus images with independent findings (large_cup, haemorrhages, exudates; each present
    with probability 0.4) and manifest.csv with one 0/1 column per finding; a `missing` fraction
    of cells is left empty (unknown). Returns the manifest's path."""
    def row(rng: np.random.Generator, _index: int) -> tuple[np.ndarray, dict[str, Any], None]:
        present = rng.random(len(MULTILABEL_LABELS)) < 0.4
        image = render_findings(rng, size, **dict(zip(MULTILABEL_LABELS, map(bool, present), strict=True)))
        unknown = rng.random(len(MULTILABEL_LABELS)) < missing
        return image, {n: (None if u else int(p)) for n, p, u in zip(MULTILABEL_LABELS, present, unknown,
                                                                      strict=True)}, None

    counts = {"train": n_train, "val": n_val, "test": n_test}
    return _write_manifest_dataset(root, counts, seed, row)


def write_regression_dataset(root: Path, n_train: int = 120, n_val: int = 40, n_test: int = 40, size: int = 128,
                             seed: int = 0, missing: float = 0.05) -> Path:
    """Fundus images with a continuous cup-to-disc ratio (0.2-0.85) and a hard-exudate count
    (0-20), the two targets of manifest.csv; a `missing` fraction of cells is empty. Returns the
    manifest's path."""
    def row(rng: np.random.Generator, _index: int) -> tuple[np.ndarray, dict[str, Any], None]:
        cdr, count = float(rng.uniform(0.2, 0.85)), int(rng.integers(0, 21))
        image = render_findings(rng, size, large_cup=cdr > 0.6, cup_to_disc=cdr, exudate_count=count)
        values = {"cup_to_disc": round(cdr, 4), "exudate_count": count}
        return image, {k: (None if rng.random() < missing else v) for k, v in values.items()}, None

    counts = {"train": n_train, "val": n_val, "test": n_test}
    return _write_manifest_dataset(root, counts, seed, row)


LESION_CLASSES: tuple[str, ...] = ("healthy", "lesions")


def render_scattered_lesions(rng: np.random.Generator, size: int = 128,
                             count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A fundus with a normal disc and `count` single haemorrhages or exudates (each colour with
    probability 1/2), each at a position uniform over the field of view (off the disc), and its
    lesion mask: bool (size, size), True where a lesion was drawn (all False for count 0)."""
    return _render(rng, size, scattered=count)


def write_lesion_dataset(root: Path, n_train: int = 200, n_val: int = 50, n_test: int = 50, size: int = 128,
                         seed: int = 0) -> Path:
    """A localisation set for measuring heatmaps: binary classes `healthy` and `lesions`, alternating
    within each split (odd indices have lesions, so every split is balanced). A `lesions` image has
    1-4 haemorrhages or exudates, each alone at a position uniform over the field of view (periphery
    included, off the optic disc) and 4.5-7 px across at 64 px; a healthy image has none, and both
    have normal discs. Writes images/<split>_<i>.png, masks/<split>_<i>.png (L mode, 255 where a
    lesion was drawn, all zero for healthy images) and manifest.csv (path, split, label, mask: paths
    relative to root). Returns the manifest's path."""
    def row(rng: np.random.Generator, index: int) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
        label = LESION_CLASSES[index % 2]
        image, mask = render_scattered_lesions(rng, size, int(rng.integers(1, 5)) if label == "lesions" else 0)
        return image, {"label": label}, mask

    counts = {"train": n_train, "val": n_val, "test": n_test}
    return _write_manifest_dataset(root, counts, seed, row)


def findings_report(rng: np.random.Generator, large_cup: bool, haemorrhages: bool, exudates: bool,
                    cup_to_disc: float) -> str:
    """A short clinical-style report naming exactly the findings drawn, in varied wording."""
    sentences = []
    if large_cup:
        sentences.append(rng.choice([
            f"Large pale optic cup, cup-to-disc ratio about {cup_to_disc:.1f}; glaucoma suspected.",
            "Enlarged cup with thin neuroretinal rim, suspicious for glaucoma.",
            f"Glaucomatous cupping of the optic disc (CDR {cup_to_disc:.1f}).",
        ]))
    if haemorrhages:
        sentences.append(rng.choice(["Scattered blot haemorrhages in the posterior pole.",
                                     "Multiple dot and blot haemorrhages.",
                                     "Intraretinal haemorrhages in several quadrants."]))
    if exudates:
        sentences.append(rng.choice(["Hard exudates clustered near the macula.",
                                     "A group of yellow hard exudates.",
                                     "Hard exudates present."]))
    if haemorrhages or exudates:
        sentences.append(rng.choice(["Features of diabetic retinopathy.", "Consistent with diabetic retinopathy.",
                                     "Diabetic retinopathy, refer."]))
    if not sentences:
        sentences.append(rng.choice(["Normal fundus, no abnormality seen.", "Healthy optic disc and macula.",
                                     "No signs of retinopathy or glaucoma."]))
    return " ".join(sentences)


def write_report_pairs(root: Path, n_train: int = 200, n_val: int = 40, size: int = 128, seed: int = 0) -> Path:
    """Image-report pairs for vision-language refinement: fundus images whose findings (large cup,
    haemorrhages, exudates, each present with probability 0.4) the report describes. Writes
    images/<split>_<i>.png and pairs.csv (path, report, split); returns the CSV's path."""
    import pandas as pd

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in (("train", n_train), ("val", n_val)):
        rng = np.random.default_rng([seed, SPLIT_SEED_OFFSETS[split], 7])
        for i in range(count):
            large_cup, haemorrhages, exudates = (bool(v) for v in rng.random(3) < 0.4)
            cdr = float(rng.uniform(0.7, 0.85) if large_cup else rng.uniform(0.25, 0.4))
            image = render_findings(rng, size, large_cup=large_cup, haemorrhages=haemorrhages, exudates=exudates,
                                    cup_to_disc=cdr)
            name = f"images/{split}_{i:04d}.png"
            _save_png(image, root / name)
            rows.append((name, findings_report(rng, large_cup, haemorrhages, exudates, cdr), split))
    path = root / "pairs.csv"
    pd.DataFrame(rows, columns=["path", "report", "split"]).to_csv(path, index=False)
    return path
