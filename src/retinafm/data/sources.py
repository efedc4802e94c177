"""Turn a labelled folder or a CSV manifest into a list of samples with class names.

Folder layout (RETFound's): DATA/{train,val,test}/<class>/<image>. Without split folders,
DATA/<class>/<image> plus split ratios gives an automatic stratified split.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from .io import is_image_file
from .splits import parse_ratios, stratified_split

SPLITS = ("train", "val", "test")
REQUIRED_MANIFEST_COLUMNS = ("path", "label")


class DataSourceError(ValueError):
    """The data source is unusable as given; the message names the file or folder."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: Optional[int] = None
    split: Optional[str] = None
    patient_id: Optional[str] = None


@dataclass
class LabelledData:
    """Samples with their class names (index i of class_names is label i)."""

    samples: list[Sample]
    class_names: list[str]
    auto_split: bool = False
    source: str = ""

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def table(self) -> pd.DataFrame:
        """One row per sample with the label's name, for saving the split used."""
        rows = [
            {
                "path": s.path,
                "split": s.split,
                "label": self.class_names[s.label] if s.label is not None else None,
                "patient_id": s.patient_id,
            }
            for s in self.samples
        ]
        return pd.DataFrame(rows, columns=["path", "split", "label", "patient_id"])

    def counts(self) -> pd.DataFrame:
        """Images per split and class, for printing a data summary."""
        table = self.table()
        return table.groupby(["split", "label"]).size().unstack(fill_value=0)


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_folder(
    root: str | Path,
    split_ratios: Optional[str] = None,
    seed: int = 0,
    class_names: Optional[Sequence[str]] = None,
    flat_split: str = "test",
) -> LabelledData:
    """Read DATA/{train,val,test}/<class>/ (or DATA/<class>/ with `split_ratios`).

    With `class_names` (a checkpoint's, for evaluation) no train split is needed, and a folder of
    class folders without splits is read as the split `flat_split`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataSourceError(f"--data-path {root} is not a folder")
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    if split_dirs:
        if split_ratios:
            raise DataSourceError(
                f"{root} already has split folders ({', '.join(d.name for d in split_dirs)}); "
                "drop --split or point --data-path at a folder of class folders."
            )
        return _load_split_folders(root, class_names)
    if class_names is not None:
        return _load_class_folders(root, list(class_names), flat_split)
    if not split_ratios:
        raise DataSourceError(
            f"{root} has no train/val/test folders. Arrange it as {root}/train/<class>/..., "
            "or pass --split 0.7,0.15,0.15 to split its class folders automatically."
        )
    class_dirs = _class_dirs(root)
    if not class_dirs:
        raise DataSourceError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    class_names = [d.name for d in class_dirs]
    paths, labels = [], []
    for label, d in enumerate(class_dirs):
        images = list_images(d)
        if not images:
            raise DataSourceError(f"class folder {d} has no image files")
        paths += [str(p) for p in images]
        labels += [label] * len(images)
    splits = stratified_split(labels, parse_ratios(split_ratios), seed=seed)
    samples = [Sample(p, y, s) for p, y, s in zip(paths, labels, splits)]
    return LabelledData(samples, class_names, auto_split=True, source=str(root))


def _load_split_folders(root: Path, fixed_classes: Optional[Sequence[str]] = None) -> LabelledData:
    if fixed_classes is None:
        if not (root / "train").is_dir():
            raise DataSourceError(f"{root} has split folders but no train/ folder")
        class_names = [d.name for d in _class_dirs(root / "train")]
        if not class_names:
            raise DataSourceError(f"{root / 'train'} has no class folders")
    else:
        class_names = list(fixed_classes)
    index = {name: i for i, name in enumerate(class_names)}
    samples: list[Sample] = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for d in _class_dirs(split_dir):
            if d.name not in index:
                if fixed_classes is not None:
                    raise DataSourceError(
                        f"class {d.name!r} in {split_dir} is not among the model's classes {class_names}")
                raise DataSourceError(
                    f"class {d.name!r} is in {split_dir} but not in {root / 'train'}; "
                    "every class must have training images (or remove that folder)."
                )
            images = list_images(d)
            if not images and split == "train":
                raise DataSourceError(f"class folder {d} has no image files")
            samples += [Sample(str(p), index[d.name], split) for p in images]
    if fixed_classes is None and not any(s.split == "train" for s in samples):
        raise DataSourceError(f"{root / 'train'} holds no image files")
    return LabelledData(samples, class_names, source=str(root))


def _load_class_folders(root: Path, class_names: list[str], split: str) -> LabelledData:
    index = {name: i for i, name in enumerate(class_names)}
    samples: list[Sample] = []
    for d in _class_dirs(root):
        if d.name not in index:
            raise DataSourceError(f"class {d.name!r} in {root} is not among the model's classes {class_names}")
        samples += [Sample(str(p), index[d.name], split) for p in list_images(d)]
    if not samples:
        raise DataSourceError(f"{root} has no class folders with images (expected {root}/<class>/<image>)")
    return LabelledData(samples, class_names, source=str(root))


def load_manifest(
    csv_path: str | Path,
    split_ratios: Optional[str] = None,
    seed: int = 0,
    class_names: Optional[Sequence[str]] = None,
) -> LabelledData:
    """Read a CSV with columns path, label and (split | automatic --split) [, patient_id].

    Paths are relative to the CSV's folder unless absolute. Class names are the sorted labels of
    the train split unless `class_names` fixes them (as a checkpoint does at evaluation).
    """
    csv_path = Path(csv_path)
    try:
        frame = pd.read_csv(csv_path, dtype={"path": str, "split": str, "label": str, "patient_id": str})
    except FileNotFoundError:
        raise DataSourceError(f"--manifest {csv_path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"--manifest {csv_path} is not a readable CSV: {exc}") from None
    missing = [c for c in REQUIRED_MANIFEST_COLUMNS if c not in frame.columns]
    if "split" not in frame.columns and not split_ratios:
        missing.append("split (or pass --split ratios)")
    if missing:
        raise DataSourceError(
            f"--manifest {csv_path} lacks column(s): {', '.join(missing)}; it has {', '.join(frame.columns)}"
        )
    _check_cells(frame, csv_path)
    base = csv_path.parent
    frame["path"] = [str(p if Path(p).is_absolute() else base / p) for p in frame["path"]]
    patient = frame["patient_id"] if "patient_id" in frame.columns else None

    if "split" in frame.columns and not split_ratios:
        frame["split"] = frame["split"].str.strip().str.lower()
        bad = sorted(set(frame["split"]) - set(SPLITS))
        if bad:
            raise DataSourceError(f"--manifest {csv_path}: unknown split value(s) {bad}; use train, val, test")
    names = list(class_names) if class_names else sorted(
        set(frame.loc[frame["split"] == "train", "label"] if "split" in frame.columns and not split_ratios
            else frame["label"])
    )
    if not names:
        raise DataSourceError(f"--manifest {csv_path} has no training rows")
    unknown = sorted(set(frame["label"]) - set(names))
    if unknown and class_names:
        raise DataSourceError(f"--manifest {csv_path}: label(s) {unknown} are not among the model's classes {names}")
    if unknown:
        raise DataSourceError(
            f"--manifest {csv_path}: label(s) {unknown} do not appear in the train split; "
            "every class needs training images."
        )
    index = {n: i for i, n in enumerate(names)}
    labels = [index[x] for x in frame["label"]]
    if split_ratios:
        groups = list(patient) if patient is not None else None
        splits = stratified_split(labels, parse_ratios(split_ratios), seed=seed, groups=groups)
    else:
        splits = list(frame["split"])
    patients = list(patient) if patient is not None else [None] * len(frame)
    samples = [Sample(p, y, s, g) for p, y, s, g in zip(frame["path"], labels, splits, patients)]
    return LabelledData(samples, names, auto_split=bool(split_ratios), source=str(csv_path))


def _check_cells(frame: pd.DataFrame, csv_path: Path) -> None:
    for column in ("path", "label"):
        empty = frame.index[frame[column].isna()].tolist()
        if empty:
            rows = ", ".join(str(i + 2) for i in empty[:10])  # +2: header line, 1-based
            raise DataSourceError(f"--manifest {csv_path}: empty {column!r} on line(s) {rows}")
    dupes = frame["path"][frame["path"].duplicated()].unique().tolist()
    if dupes:
        raise DataSourceError(f"--manifest {csv_path}: duplicate path(s) {dupes[:5]}")
    frame["label"] = frame["label"].str.strip()


def load_labelled(
    data_path: Optional[str] = None,
    manifest: Optional[str] = None,
    split_ratios: Optional[str] = None,
    seed: int = 0,
) -> LabelledData:
    """Entry point for workflows: exactly one of a folder or a manifest."""
    if manifest:
        return load_manifest(manifest, split_ratios=split_ratios, seed=seed)
    if data_path:
        return load_folder(data_path, split_ratios=split_ratios, seed=seed)
    raise DataSourceError("give --data-path DIR or --manifest FILE.csv")

