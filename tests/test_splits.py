from __future__ import annotations

from collections import Counter

import pytest

from retinafm.data.splits import parse_ratios, stratified_split


def test_parse_ratios():
    assert parse_ratios("0.7,0.15,0.15") == (0.7, 0.15, 0.15)
    for bad in ["0.7,0.3", "a,b,c", "0.5,0.5,0.5", "1,0,0"]:
        with pytest.raises(ValueError, match="--split"):
            parse_ratios(bad)


def test_stratified_and_seeded():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    a = stratified_split(labels, (0.7, 0.15, 0.15), seed=1)
    assert a == stratified_split(labels, (0.7, 0.15, 0.15), seed=1)
    assert a != stratified_split(labels, (0.7, 0.15, 0.15), seed=2)
    train = Counter(y for y, s in zip(labels, a) if s == "train")
    assert train == {0: 35, 1: 21, 2: 14}
    assert Counter(a) == {"train": 70, "val": 15, "test": 15}


def test_groups_never_straddle_splits():
    labels = [i % 2 for i in range(60)]
    groups = [f"p{i // 3}" for i in range(60)]
    a = stratified_split(labels, (0.6, 0.2, 0.2), seed=0, groups=groups)
    by_group: dict[str, set] = {}
    for g, s in zip(groups, a):
        by_group.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in by_group.values())


def test_too_small_to_split():
    with pytest.raises(ValueError, match="cannot split"):
        stratified_split([0], (0.6, 0.2, 0.2))
