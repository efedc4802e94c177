from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from retinafm.files.inputs import read_table
from retinafm.settings import check_ratios


def rarest_positive(values: np.ndarray) -> np.ndarray:
    """For 0/1/NaN label rows (N, L): the index of each row's rarest positive label (rarity counted
    over these rows), -1 for rows with none. Stratifying on it brings rare findings into every part."""
    positives = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0) > 0.5
    rarity = np.argsort(np.argsort(positives.sum(axis=0)))  # 0 = rarest label
    rows = [int(np.argmin(np.where(row, rarity, len(rarity)))) if row.any() else -1 for row in positives]
    return np.asarray(rows, dtype=np.int64)


"""Seeded, stratified train/val/test splits that keep each patient inside one split."""



SPLIT_NAMES = ("train", "val", "test")


def parse_ratios(text: str) -> tuple[float, float, float]:
    """Parse '--split 0.7,0.15,0.15' (train, val, test) by the settings' one rule (settings.check_ratios):
    three finite fractions above 0 summing to 1."""
    ratios = check_ratios(text, "--split")
    if ratios is None:
        raise ValueError("--split: expected three numbers like 0.7,0.15,0.15")
    return ratios


def stratified_split(
    labels: Sequence[int],
    ratios: tuple[float, float, float],
    seed: int = 0,
    groups: Sequence[str | None] | None = None,
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
    for name, chosen in zip(SPLIT_NAMES, (train_u, val_u, test_u), strict=True):
        for u in chosen:
            for i in members[u]:
                assignment[i] = name
    return assignment


def _split(units: list, unit_labels: list, test_size: float, seed: int):
    counts = Counter(unit_labels)
    # Stratify only when every class can appear on both sides; tiny classes fall back to random.
    can_stratify = min(counts.values()) >= 2 and len(units) * min(test_size, 1 - test_size) >= len(counts)
    stratify = unit_labels if can_stratify else None
    if len(units) < 2:
        raise ValueError(f"cannot split {len(units)} item(s) into train/val/test; add more images")
    from sklearn.model_selection import train_test_split  # here: predict and embed never split, nor pay for sklearn

    return train_test_split(units, unit_labels, test_size=test_size, random_state=seed, stratify=stratify)


# --- Manifest splits and leakage checks (`retinafm split`) -------------------------------------

# Manifest columns that are never 0/1 label columns (as in data.sources.RESERVED_COLUMNS).
_RESERVED = ("path", "split", "patient_id", "label")


class SplitError(ValueError):
    """A manifest cannot be split (or checked) as asked; the message names the column or option."""


class _Strata(NamedTuple):
    values: list            # one stratum per row
    description: str        # for the user: what the split was stratified on
    kind: str               # none | column | binned | positives (0/1 columns)
    columns: list[str]      # the column(s) behind the strata


def read_manifest_table(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV for splitting: every cell as text (ids such as 007 stay 007, numbers keep
    their spelling), only empty cells missing, so writing it back changes nothing but the split."""
    path = Path(path)
    try:
        frame = read_table(path, what="--manifest", text=True)
    except FileNotFoundError:
        raise SplitError(f"--manifest {path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SplitError(f"--manifest {path} is not a readable CSV: {exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def has_split(frame: pd.DataFrame) -> bool:
    """Whether the frame has a split column with at least one value."""
    return "split" in frame.columns and any(s is not None for s in _clean_values(frame["split"], lower=True))


def split_manifest(
    frame: pd.DataFrame,
    *,
    by: str | None = "patient_id",
    ratios: str | Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    stratify: str | None = None,
) -> pd.DataFrame:
    """A copy of `frame` with a `split` column (train/val/test), seeded and stratified, keeping all
    rows with the same `by` value (patient) in one split; rows with an empty id are their own group.
    `by=None` splits row by row. Ratios (train,val,test; a tuple or "0.7,0.15,0.15") apply to groups.

    Stratified on `stratify` (a column; 'none' for no stratification), by default on `label` when
    present, else on each row's rarest positive 0/1 label column, else not at all. A numeric column
    with more than 10 distinct values is stratified by quintile. A group takes its most common stratum.
    An existing split column is replaced in place; otherwise `split` goes after `path`.
    `result.attrs["split_info"]` records by, ratios, seed, groups and the stratification used.
    """
    if len(frame) == 0:
        raise SplitError("the manifest has no rows to split")
    ratios = _ratios(ratios)
    groups = _group_ids(frame, by) if by is not None else None
    strata = _strata(frame, stratify, by)
    units = _count_groups(groups) if groups is not None else len(frame)
    unit_name = f"{by} group(s)" if groups is not None else "row(s)"
    if units < 3:
        raise SplitError(f"{units} {unit_name} cannot fill train, val and test; the split needs at least 3")
    try:
        assignment = stratified_split(strata.values, ratios, seed=seed, groups=groups)
    except ValueError as exc:
        raise SplitError(f"cannot split {units} {unit_name} with ratios {','.join(map(str, ratios))}: {exc}") from None
    out = frame.copy()
    if "split" in out.columns:
        out["split"] = assignment
    else:
        out.insert(list(out.columns).index("path") + 1 if "path" in out.columns else len(out.columns),
                   "split", assignment)
    out.attrs["split_info"] = {"by": by, "ratios": tuple(ratios), "seed": seed, "groups": units,
                               "stratified_by": strata.description}
    return out


def leakage_report(frame: pd.DataFrame, by: str = "patient_id") -> pd.DataFrame:
    """One row per `by` value (patient) whose rows lie in more than one split: the id, `splits`
    ("train,test"), `images` in all and `images_<split>` per split. Empty (same columns) when clean.
    Rows with an empty id or an empty split are not counted."""
    if by not in frame.columns:
        raise SplitError(
            f"column {by!r} (--by) is not in the manifest; its columns: {', '.join(map(str, frame.columns))}"
        )
    if "split" not in frame.columns:
        raise SplitError("the manifest has no split column to check; make one with `retinafm split` (without --check)")
    table = pd.DataFrame({"id": _clean_values(frame[by]), "split": _clean_values(frame["split"], lower=True)})
    table = table.dropna()
    order = _split_order(table["split"].unique())
    counts = table.groupby(["id", "split"]).size().unstack(fill_value=0).reindex(columns=order, fill_value=0)
    leaking = counts[(counts > 0).sum(axis=1) > 1].sort_index()
    report = pd.DataFrame({
        by: leaking.index.astype(str),
        "splits": [",".join(s for s in order if row[s] > 0) for _, row in leaking.iterrows()],
        "images": leaking.sum(axis=1).astype(int).to_numpy(),
    })
    for s in order:
        report[f"images_{s}"] = leaking[s].astype(int).to_numpy()
    return report.reset_index(drop=True)


def split_summary(frame: pd.DataFrame, by: str | None = "patient_id", stratify: str | None = None) -> pd.DataFrame:
    """Per split (and a total row): images, groups (distinct `by` values; a row with an empty id is
    its own) and images per class of the stratification column (positives per 0/1 label column)."""
    if "split" not in frame.columns:
        raise SplitError("the manifest has no split column")
    splits = pd.Series([s if s is not None else "(none)" for s in _clean_values(frame["split"], lower=True)],
                       index=frame.index)
    order = _split_order(splits.unique())
    summary = pd.DataFrame(index=pd.Index(order + ["total"], name="split"))
    summary["images"] = [int((splits == s).sum()) for s in order] + [len(frame)]
    if by is not None:
        ids = _group_ids(frame, by)
        keys = pd.Series([g if g is not None else f"\0row{i}" for i, g in enumerate(ids)], index=frame.index)
        summary["groups"] = [keys[splits == s].nunique() for s in order] + [keys.nunique()]
    strata = _strata(frame, stratify, by)
    if strata.kind == "column":
        values = pd.Series(_clean_values(frame[strata.columns[0]]), index=frame.index).fillna("(missing)")
        for value in sorted(values.unique()):
            name = value if value not in summary.columns else f"{strata.columns[0]}={value}"
            is_value = values == value
            summary[name] = [int(((splits == s) & is_value).sum()) for s in order] + [int(is_value.sum())]
    elif strata.kind == "positives":
        for column in strata.columns:
            positive = _numeric(frame[column]) == 1
            name = column if column not in summary.columns else f"{column}=1"
            summary[name] = [int((positive & (splits == s)).sum()) for s in order] + [int(positive.sum())]
    return summary


def _ratios(ratios: str | Sequence[float]) -> tuple[float, float, float]:
    text = ratios if isinstance(ratios, str) else ",".join(str(float(r)) for r in ratios)
    try:
        return parse_ratios(text)
    except ValueError as exc:
        raise SplitError(str(exc).replace("--split", "--ratios", 1)) from None


def _clean_values(column: pd.Series, lower: bool = False) -> list[str | None]:
    """Text of each cell, stripped; None for an empty or missing cell."""
    out: list[str | None] = []
    for value in column:
        text = "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value).strip()
        out.append((text.lower() if lower else text) or None)
    return out


def _group_ids(frame: pd.DataFrame, by: str) -> list[str | None]:
    if by not in frame.columns:
        raise SplitError(f"column {by!r} (--by) is not in the manifest; its columns: "
                         f"{', '.join(map(str, frame.columns))}. "
                         "Name the patient id column with --by COLUMN, or split image by image with --by none")
    return _clean_values(frame[by])


def _count_groups(groups: list[str | None]) -> int:
    return len({g for g in groups if g is not None}) + sum(g is None for g in groups)


def _split_order(names) -> list[str]:
    names = list(names)
    return [s for s in SPLIT_NAMES if s in names] + sorted(s for s in names if s not in SPLIT_NAMES)


def _numeric(column: pd.Series) -> pd.Series:
    """Numbers of a column read as text; NaN for empty cells and for text that is not a number."""
    return pd.to_numeric(pd.Series(_clean_values(column), index=column.index, dtype=object), errors="coerce")


def _binary_columns(frame: pd.DataFrame, by: str | None) -> list[str]:
    """The 0/1 label columns: not reserved, at least one value, and every value 0 or 1."""
    found = []
    for column in frame.columns:
        if column in _RESERVED or column == by:
            continue
        present = pd.Series(_clean_values(frame[column]), dtype=object).notna()
        values = _numeric(frame[column]).reset_index(drop=True)
        if present.any() and values[present].isin([0, 1]).all():
            found.append(column)
    return found


def _strata(frame: pd.DataFrame, stratify: str | None, by: str | None) -> _Strata:
    if stratify is not None and stratify.strip().lower() == "none" and "none" not in frame.columns:
        return _Strata([0] * len(frame), "nothing (--stratify none)", "none", [])
    if stratify is None:
        if "label" in frame.columns and by != "label":
            stratify = "label"
        else:
            binary = _binary_columns(frame, by)
            if not binary:
                return _Strata([0] * len(frame), "nothing (no label or 0/1 label columns)", "none", [])
            from retinafm.data.splits import rarest_positive

            values = np.column_stack([_numeric(frame[c]).to_numpy(dtype=np.float64) for c in binary])
            return _Strata(rarest_positive(values).tolist(),
                           f"the rarest positive of the 0/1 column(s) {', '.join(binary)}", "positives", binary)
    if stratify not in frame.columns:
        raise SplitError(f"column {stratify!r} (--stratify) is not in the manifest; its columns: "
                         f"{', '.join(map(str, frame.columns))}. Use --stratify none for no stratification")
    text = _clean_values(frame[stratify])
    numbers = _numeric(frame[stratify])
    known = numbers.notna().to_numpy()
    present = np.array([t is not None for t in text])
    if present.any() and (known == present).all() and numbers[known].nunique() > 10:
        edges = np.unique(np.quantile(numbers[known], [0.2, 0.4, 0.6, 0.8]))
        bins = [int(np.searchsorted(edges, v)) if k else -1 for v, k in zip(numbers, known, strict=True)]
        return _Strata(bins, f"quintiles of {stratify}", "binned", [stratify])
    return _Strata([t if t is not None else "(missing)" for t in text], stratify, "column", [stratify])
