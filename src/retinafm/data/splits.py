"""Seeded, stratified train/val/test splits that keep each patient inside one split."""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from sklearn.model_selection import train_test_split

SPLIT_NAMES = ("train", "val", "test")


def parse_ratios(text: str) -> tuple[float, float, float]:
    """Parse '--split 0.7,0.15,0.15' (train, val, test); they must be positive and sum to 1."""
    try:
        values = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"--split {text!r}: expected three numbers like 0.7,0.15,0.15") from None
    if len(values) != 3 or any(v <= 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"--split {text!r}: expected three positive ratios (train,val,test) summing to 1")
    return values  # type: ignore[return-value]


def stratified_split(
    labels: Sequence[int],
    ratios: tuple[float, float, float],
    seed: int = 0,
    groups: Optional[Sequence[Optional[str]]] = None,
) -> list[str]:
    """Assign 'train'/'val'/'test' to each item, stratified by label and seeded.

    With `groups` (patient ids), whole groups are split, stratified by each group's most
    common label, so one patient's images never straddle two splits.
    """
    n = len(labels)
    if groups is None or all(g is None for g in groups):
        units = list(range(n))
        unit_labels = list(labels)
        members = {i: [i] for i in range(n)}
    else:
        keys = [g if g is not None else f"__row{i}" for i, g in enumerate(groups)]
        members = {}
        for i, k in enumerate(keys):
            members.setdefault(k, []).append(i)
        units = list(members)
        unit_labels = [Counter(labels[i] for i in members[u]).most_common(1)[0][0] for u in units]
    train_r, val_r, test_r = ratios
    train_u, rest_u, _, rest_y = _split(units, unit_labels, test_size=val_r + test_r, seed=seed)
    val_u, test_u, _, _ = _split(rest_u, rest_y, test_size=test_r / (val_r + test_r), seed=seed)
    assignment = [""] * n
    for name, chosen in zip(SPLIT_NAMES, (train_u, val_u, test_u)):
        for u in chosen:
            for i in members[u]:
                assignment[i] = name
    return assignment


def _split(units: list, unit_labels: list, test_size: float, seed: int):
    counts = Counter(unit_labels)
    # Stratify only when every class can appear on both sides; tiny classes fall back to random.
    stratify = unit_labels if min(counts.values()) >= 2 and len(units) * min(test_size, 1 - test_size) >= len(counts) else None
    if len(units) < 2:
        raise ValueError(f"cannot split {len(units)} item(s) into train/val/test; add more images")
    return train_test_split(units, unit_labels, test_size=test_size, random_state=seed, stratify=stratify)
