"""Turn a labelled folder or a CSV manifest into a list of samples with their output names.

Folder layout (RETFound's): DATA/{train,val,test}/<class>/<image>. Without split folders,
DATA/<class>/<image> plus split ratios gives an automatic stratified split. A manifest carries a
class `label` (multiclass), one 0/1 column per label (multilabel) or numeric target columns
(regression); an empty cell in a label/target column is a missing value, masked at training.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from retinafm.data.io import IMAGE_SUFFIXES, is_image_file
from retinafm.data.splits import parse_ratios, stratified_split
from retinafm.files.inputs import read_table, regular_file_problem

SPLITS = ("train", "val", "test")
# Manifest columns that are never labels or targets.
RESERVED_COLUMNS = ("path", "split", "patient_id", "label")


class DataSourceError(ValueError):
    """The data source is unusable as given; the message names the file or folder."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: int | None = None  # multiclass: index into class_names
    split: str | None = None
    patient_id: str | None = None
    targets: tuple[float, ...] | None = None  # multilabel (0/1) or regression values; NaN = missing


class TargetReader(Protocol):
    """How a task type's targets are read from a manifest (each task type names its reader; the
    data layer knows only the two ways there are: one class label, or one value per column)."""

    task: str
    from_folders: bool  # a folder of class folders holds these targets too
    required_columns: tuple[str, ...]

    def clean(self, frame: pd.DataFrame) -> None: ...

    def map_labels(self, frame: pd.DataFrame, label_map: dict[str, str], csv_path: Path) -> pd.DataFrame: ...

    def read(self, frame: pd.DataFrame, csv_path: Path, split_ratios: str | None,
             names: Sequence[str] | None, absent_unknown: bool) -> tuple[pd.DataFrame, list[str], list, list, list]:
        ...

    def table_columns(self, samples: Sequence[Sample], names: Sequence[str]) -> dict[str, Any]: ...

    def counts(self, table: pd.DataFrame, names: list[str]) -> pd.DataFrame: ...


@dataclass(frozen=True)
class ClassLabels:
    """One class name per image: a manifest's `label` column, or the image's class folder."""

    task: str = ""
    from_folders: bool = True
    required_columns: tuple[str, ...] = ("path", "label")

    def clean(self, frame: pd.DataFrame) -> None:
        frame["label"] = frame["label"].str.strip()

    def map_labels(self, frame: pd.DataFrame, label_map: dict[str, str], csv_path: Path) -> pd.DataFrame:
        _check_label_map(label_map, set(frame["label"]), f"--manifest {csv_path}", "labels")
        frame["label"] = frame["label"].replace(label_map)
        return frame

    def read(self, frame: pd.DataFrame, csv_path: Path, split_ratios: str | None,
             names: Sequence[str] | None, absent_unknown: bool) -> tuple[pd.DataFrame, list[str], list, list, list]:
        """(frame, class names, label index per row, targets per row (None), split strata)."""
        class_names, labels = _class_labels(frame, csv_path, split_ratios, names)
        return frame, class_names, labels, [None] * len(frame), labels

    def table_columns(self, samples: Sequence[Sample], names: Sequence[str]) -> dict[str, Any]:
        return {"label": [names[s.label] if s.label is not None else None for s in samples]}

    def counts(self, table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
        return table.groupby(["split", "label"]).size().unstack(fill_value=0)


@dataclass(frozen=True)
class TargetColumns:
    """One float per output, each from its own manifest column; an empty cell is unknown (NaN)."""

    task: str
    flag: str  # the setting that names the columns, for messages (--labels, --targets)
    kind: str  # what a column holds, for messages ("0/1 label")
    want: str  # what a cell must hold, for messages ("0 or 1 (or empty for unknown)")
    strata: Callable[[np.ndarray], list]  # what an automatic split stratifies on, from the (rows, columns) values
    summarise: Callable[[Any], pd.DataFrame]  # the data summary per split, from the table grouped by split
    allowed: tuple[float, ...] | None = None  # the only values a cell may hold (None: any number)
    from_folders: bool = False
    required_columns: tuple[str, ...] = ("path",)

    def clean(self, frame: pd.DataFrame) -> None:
        pass

    def map_labels(self, frame: pd.DataFrame, label_map: dict[str, str], csv_path: Path) -> pd.DataFrame:
        _check_label_map(label_map, set(frame.columns) - set(RESERVED_COLUMNS), f"--manifest {csv_path}", "columns")
        return frame.rename(columns=label_map)

    def read(self, frame: pd.DataFrame, csv_path: Path, split_ratios: str | None,
             names: Sequence[str] | None, absent_unknown: bool) -> tuple[pd.DataFrame, list[str], list, list, list]:
        """(frame, column names, labels (None), targets per row, split strata)."""
        columns = _target_columns(frame, csv_path, names, self, absent_unknown)
        absent = [c for c in columns if c not in frame.columns]
        frame = frame.assign(**{c: np.nan for c in absent})  # unknown for every row
        values = _target_values(frame, csv_path, columns, self, may_be_empty=absent)
        return frame, columns, [None] * len(frame), [tuple(row) for row in values], self.strata(values)

    def table_columns(self, samples: Sequence[Sample], names: Sequence[str]) -> dict[str, Any]:
        values = np.array([s.targets for s in samples], dtype=float).reshape(len(samples), -1)
        return {name: values[:, i] for i, name in enumerate(names)}

    def counts(self, table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
        summary = self.summarise(table.groupby("split")[names])
        summary.insert(0, "images", table.groupby("split").size())
        return summary


CLASS_LABELS = ClassLabels()


@dataclass
class LabelledData:
    """Samples with their output names: class names (index i is label i) or the names of the
    target columns, in the order of each sample's targets; `targets` says which."""

    samples: list[Sample]
    class_names: list[str]
    auto_split: bool = False
    source: str = ""
    targets: TargetReader = CLASS_LABELS

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def table(self) -> pd.DataFrame:
        """One row per sample (label name, or one column per label/target), for saving the split used."""
        frame = pd.DataFrame({"path": [s.path for s in self.samples], "split": [s.split for s in self.samples]})
        for column, values in self.targets.table_columns(self.samples, self.class_names).items():
            frame[column] = values
        frame["patient_id"] = [s.patient_id for s in self.samples]
        return frame

    def counts(self) -> pd.DataFrame:
        """A data summary per split: images per class, or what the task's reader counts per column
        (positives per label, known values and mean per target)."""
        return self.targets.counts(self.table(), self.class_names)


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order.

    A file whose name is not valid UTF-8 (old scanners, network shares) is left out with a warning
    naming it: the CSVs every command writes (pandas' Arrow strings) cannot hold such a name. So is
    a FIFO, socket or device (or a symlink to one) named like an image: it is never opened."""
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            problem = regular_file_problem(path) if path.suffix.lower() in IMAGE_SUFFIXES else None
            if problem and not path.is_dir():
                warnings.warn(f"skipping {_shown(path)}: {problem}", stacklevel=2)
            continue
        if not is_image_file(path):
            continue
        if not _utf8_name(path):
            warnings.warn(f"skipping {_shown(path)}: its file name is not valid UTF-8; rename the file to use it",
                          stacklevel=2)
            continue
        found.append(path)
    return found


def _shown(path: Path) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _utf8_name(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_folder(
    root: str | Path,
    split_ratios: str | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    flat_split: str = "test",
    label_map: dict[str, str] | None = None,
) -> LabelledData:
    """Read DATA/{train,val,test}/<class>/ (or DATA/<class>/ with `split_ratios`).

    With `class_names` (a checkpoint's, for evaluation) no train split is needed, and a folder of
    class folders without splits is read as the split `flat_split`. `label_map` renames the
    folder's classes to the model's (several may map to one, merging them).
    """
    root = Path(root)
    if label_map:
        folders = {
            d.name for split in [root, *(root / s for s in SPLITS)] if split.is_dir() for d in _class_dirs(split)
        }
        _check_label_map(label_map, folders, f"--data-path {root}", "class folders")
    if not root.is_dir():
        raise DataSourceError(f"--data-path {root} is not a folder")
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    if split_dirs:
        if split_ratios:
            raise DataSourceError(
                f"{root} already has split folders ({', '.join(d.name for d in split_dirs)}); "
                "drop --split or point --data-path at a folder of class folders."
            )
        return _load_split_folders(root, class_names, label_map or {})
    if class_names is not None:
        return _load_class_folders(root, list(class_names), flat_split, label_map or {})
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
    samples = [Sample(p, y, s) for p, y, s in zip(paths, labels, splits, strict=True)]
    return LabelledData(samples, class_names, auto_split=True, source=str(root))


def _load_split_folders(root: Path, fixed_classes: Sequence[str] | None = None,
                        label_map: dict[str, str] | None = None) -> LabelledData:
    label_map = label_map or {}
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
        if fixed_classes is not None:
            _check_known(_class_dirs(split_dir), split_dir, class_names, label_map)
        for d in _class_dirs(split_dir):
            name = label_map.get(d.name, d.name)
            if name not in index:
                raise DataSourceError(
                    f"class {d.name!r} is in {split_dir} but not in {root / 'train'}; "
                    "every class must have training images (or remove that folder)."
                )
            images = list_images(d)
            if not images and split == "train":
                raise DataSourceError(f"class folder {d} has no image files")
            samples += [Sample(str(p), index[name], split) for p in images]
    if fixed_classes is None and not any(s.split == "train" for s in samples):
        raise DataSourceError(f"{root / 'train'} holds no image files")
    return LabelledData(samples, class_names, source=str(root))


def _load_class_folders(root: Path, class_names: list[str], split: str, label_map: dict[str, str]) -> LabelledData:
    index = {name: i for i, name in enumerate(class_names)}
    samples: list[Sample] = []
    _check_known(_class_dirs(root), root, class_names, label_map)
    for d in _class_dirs(root):
        samples += [Sample(str(p), index[label_map.get(d.name, d.name)], split) for p in list_images(d)]
    if not samples:
        raise DataSourceError(f"{root} has no class folders with images (expected {root}/<class>/<image>)")
    return LabelledData(samples, class_names, source=str(root))


def load_manifest(
    csv_path: str | Path,
    split_ratios: str | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    targets: TargetReader = CLASS_LABELS,
    label_map: dict[str, str] | None = None,
    absent_unknown: bool = False,
) -> LabelledData:
    """Read a manifest CSV: path, (split | automatic --split) [, patient_id] and the task's columns.

    Class labels: a `label` column; class names are the sorted labels of the train split unless
    `class_names` fixes them (as a checkpoint does at evaluation). Target columns: `class_names`
    names the columns (None: every column that is not path, split, patient_id or label); the
    task's reader (`targets`) says what their cells may hold. Paths are relative to the CSV's
    folder unless absolute.

    External evaluation: `label_map` renames the manifest's labels (class labels) or columns to the
    model's; with `absent_unknown`, a model column the manifest lacks is unknown for every row.
    """
    csv_path = Path(csv_path)
    frame = _read_manifest(csv_path, split_ratios, targets)
    if label_map:
        frame = targets.map_labels(frame, label_map, csv_path)
    frame, names, labels, values, strata = targets.read(frame, csv_path, split_ratios, class_names, absent_unknown)
    patient = frame["patient_id"] if "patient_id" in frame.columns else None
    if split_ratios:
        groups = list(patient) if patient is not None else None
        splits = stratified_split(strata, parse_ratios(split_ratios), seed=seed, groups=groups)
    else:
        splits = list(frame["split"])
    patients = list(patient) if patient is not None else [None] * len(frame)
    samples = [
        Sample(p, y, s, g, t)
        for p, y, s, g, t in zip(frame["path"], labels, splits, patients, values, strict=True)
    ]
    data = LabelledData(samples, names, auto_split=bool(split_ratios), source=str(csv_path), targets=targets)
    if class_names is None and not data.split("train"):
        raise DataSourceError(f"--manifest {csv_path} has no training rows")
    return data


def _read_manifest(csv_path: Path, split_ratios: str | None, targets: TargetReader) -> pd.DataFrame:
    try:
        frame = read_table(csv_path, what="--manifest")  # class names such as "NA" or "None" stay text
    except FileNotFoundError:
        raise DataSourceError(f"--manifest {csv_path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"--manifest {csv_path} is not a readable CSV: {exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in targets.required_columns if c not in frame.columns]
    if "split" not in frame.columns and not split_ratios:
        missing.append("split (or pass --split ratios)")
    if missing:
        raise DataSourceError(
            f"--manifest {csv_path} lacks column(s): {', '.join(missing)}; it has {', '.join(frame.columns)}"
        )
    _check_cells(frame, csv_path, targets)
    base = csv_path.parent
    frame["path"] = [str(p if Path(p).is_absolute() else base / p) for p in frame["path"]]
    if "split" in frame.columns and not split_ratios:
        frame["split"] = frame["split"].str.strip().str.lower()
        bad = sorted(set(frame["split"].fillna("(empty)")) - set(SPLITS))
        if bad:
            raise DataSourceError(f"--manifest {csv_path}: unknown split value(s) {bad}; use train, val, test")
    return frame


def _class_labels(frame: pd.DataFrame, csv_path: Path, split_ratios: str | None,
                  class_names: Sequence[str] | None) -> tuple[list[str], list[int]]:
    names = list(class_names) if class_names else sorted(
        set(frame.loc[frame["split"] == "train", "label"] if "split" in frame.columns and not split_ratios
            else frame["label"])
    )
    if not names:
        raise DataSourceError(f"--manifest {csv_path} has no training rows")
    unknown = sorted(set(frame["label"]) - set(names))
    if unknown and class_names:
        raise DataSourceError(f"--manifest {csv_path}: label(s) {unknown} are not among the model's classes {names}; "
                              f"map them with --label-map {unknown[0]}=<model class>,...")
    if unknown:
        raise DataSourceError(
            f"--manifest {csv_path}: label(s) {unknown} do not appear in the train split; "
            "every class needs training images."
        )
    index = {n: i for i, n in enumerate(names)}
    return names, [index[x] for x in frame["label"]]


def _target_columns(frame: pd.DataFrame, csv_path: Path, columns: Sequence[str] | None, reader: TargetColumns,
                    absent_unknown: bool = False) -> list[str]:
    flag = reader.flag
    if columns:
        names = list(columns)
        absent = [c for c in names if c not in frame.columns]
        if absent and not absent_unknown:
            raise DataSourceError(f"--manifest {csv_path} has no column(s) {absent} ({flag}); "
                                  f"it has {', '.join(frame.columns)}")
        reserved = [c for c in names if c in RESERVED_COLUMNS]
        if reserved:
            raise DataSourceError(f"{flag}: {reserved} are reserved manifest columns, not {reader.task} columns")
        return names
    names = [c for c in frame.columns if c not in RESERVED_COLUMNS]
    if not names:
        raise DataSourceError(f"--manifest {csv_path} has no {reader.kind} columns besides {', '.join(frame.columns)}")
    return names


def _target_values(frame: pd.DataFrame, csv_path: Path, names: list[str], reader: TargetColumns,
                   may_be_empty: Sequence[str] = ()) -> np.ndarray:
    """(rows, columns) float array; empty cells are NaN (missing), anything else unusable is an error."""
    flag = reader.flag
    out = np.empty((len(frame), len(names)), dtype=np.float64)
    for i, name in enumerate(names):
        raw = frame[name]
        values = pd.to_numeric(raw, errors="coerce")
        bad = raw.notna() & values.isna()
        bad |= values.notna() & ~np.isfinite(values.to_numpy(dtype=np.float64))  # "inf", 1e999: no target
        if reader.allowed is not None:
            bad |= values.notna() & ~values.isin(list(reader.allowed))
        if bad.any():
            lines = ", ".join(str(j + 2) for j in np.flatnonzero(bad.to_numpy())[:10])  # +2: header, 1-based
            raise DataSourceError(
                f"--manifest {csv_path}: column {name!r} must hold {reader.want}; see line(s) {lines} "
                f"(value {_cell(raw[bad].iloc[0])}). Choose the columns with {flag}."
            )
        if values.isna().all() and name not in may_be_empty:
            raise DataSourceError(f"--manifest {csv_path}: column {name!r} has no values")
        out[:, i] = values.to_numpy(dtype=np.float64)
    return out


def _cell(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)  # inf, not np.float64(inf)


def parse_label_map(text: str | None) -> dict[str, str]:
    """--label-map "old=new,old2=new": data class (or column) name -> the model's."""
    mapping: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        old, sep, new = (part.strip() for part in item.partition("="))
        if not sep or not old or not new:
            raise DataSourceError(
                f"--label-map: {item.strip()!r} is not old=new (e.g. --label-map no_dr=normal,dr=referable)"
            )
        if old in mapping:
            raise DataSourceError(f"--label-map: {old!r} is mapped twice")
        mapping[old] = new
    return mapping


def _check_label_map(label_map: dict[str, str], present: set, where: str, what: str) -> None:
    unused = sorted(set(label_map) - {str(p) for p in present})
    if unused:
        raise DataSourceError(f"--label-map names {unused}, which {where} does not have; its {what}: "
                              f"{', '.join(sorted(str(p) for p in present))}")


def _check_known(dirs: list[Path], folder: Path, class_names: Sequence[str], label_map: dict[str, str]) -> None:
    """All of a folder's classes the model does not know, in one message with the --label-map to write."""
    unknown = [d.name for d in dirs if label_map.get(d.name, d.name) not in class_names]
    if unknown:
        raise DataSourceError(
            f"class folder(s) {unknown} in {folder} are not among the model's classes {list(class_names)}; "
            f"map them with --label-map {','.join(f'{u}=<model class>' for u in unknown)}")


def _check_cells(frame: pd.DataFrame, csv_path: Path, targets: TargetReader = CLASS_LABELS) -> None:
    for column in targets.required_columns:
        empty = frame.index[frame[column].isna()].tolist()
        if empty:
            rows = ", ".join(str(i + 2) for i in empty[:10])  # +2: header line, 1-based
            raise DataSourceError(f"--manifest {csv_path}: empty {column!r} on line(s) {rows}")
    dupes = frame["path"][frame["path"].duplicated()].unique().tolist()
    if dupes:
        raise DataSourceError(f"--manifest {csv_path}: duplicate path(s) {dupes[:5]}")
    targets.clean(frame)


def expand_volumes(data: LabelledData, oct_frames: str | int = "middle") -> LabelledData:
    """Each multi-frame file (DICOM, .vol/.e2e, multi-page TIFF) becomes the B-scans `oct_frames`
    picks, addressed `file#frame=N`, with the file's label, split and patient. Splits were made
    per file, so one volume's B-scans never straddle two splits."""
    from retinafm.data.volumes import expand_frames

    samples = [replace(s, path=address) for s in data.samples for address, _ in expand_frames([s.path], oct_frames)]
    return replace(data, samples=samples)


def load_labelled(
    data_path: str | None = None,
    manifest: str | None = None,
    split_ratios: str | None = None,
    seed: int = 0,
    targets: TargetReader = CLASS_LABELS,
    columns: Sequence[str] | None = None,
    oct_frames: str | int = "middle",
) -> LabelledData:
    """Entry point for workflows: exactly one of a folder or a manifest. `targets` is the task's
    reader, `columns` picks its manifest columns (--labels / --targets); `oct_frames` the B-scans
    of volumes."""
    if manifest:
        data = load_manifest(manifest, split_ratios=split_ratios, seed=seed, class_names=columns, targets=targets)
    elif not targets.from_folders:
        raise DataSourceError(f"--task {targets.task} needs a --manifest CSV with its label/target columns")
    elif data_path:
        data = load_folder(data_path, split_ratios=split_ratios, seed=seed)
    else:
        raise DataSourceError("give --data-path DIR or --manifest FILE.csv")
    return expand_volumes(data, oct_frames)
