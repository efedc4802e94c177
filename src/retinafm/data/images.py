"""Which images a folder, a manifest CSV or a table names, volumes expanded into B-scans."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from retinafm.data.io import is_image_file
from retinafm.data.sources import SPLITS, DataSourceError, _class_dirs, list_images
from retinafm.data.volumes import expand_frames, is_volume_candidate
from retinafm.files.inputs import read_table, regular_file_problem


# --------------------------------------------------------------------------- which images
def collect_images(images: str | Path, oct_frames: str | int = "middle") -> list[str]:
    """A single image file, or every image under a folder (recursively, sorted); volumes become
    the B-scans `oct_frames` picks (`file#frame=N`)."""
    images = Path(images)
    if images.is_file():
        if not is_image_file(images) and not is_volume_candidate(images):
            raise DataSourceError(f"--images {images} is not an image file this tool reads")
        found = [str(images)]
    elif images.is_dir():
        found = [str(p) for p in list_images(images)]
        if not found:
            raise DataSourceError(f"--images {images} contains no image files (png, jpg, tif, bmp, gif, webp, "
                                  "dcm, vol, e2e)")
    else:
        raise DataSourceError(f"--images {images}: {regular_file_problem(images) or 'no such file or folder'}")
    return [address for address, _ in expand_frames(found, oct_frames)]


def image_table(images: str | Path | pd.DataFrame, oct_frames: str | int = "middle") -> pd.DataFrame:
    """The images to embed and the columns that travel with them.

    A manifest CSV (a `path` column, relative to the CSV, plus anything else); a labelled folder
    `<split>/<class>/<image>` (path, split, label); any folder of images (path only); or a
    table with a `path` column (from Python, e.g. `finetune --adaptation lp`). Volumes become
    the B-scans `oct_frames` picks (`file#frame=N`), each with its file's columns.
    """
    return expand_rows(_listed(images), oct_frames)


def expand_rows(frame: pd.DataFrame, oct_frames: str | int) -> pd.DataFrame:
    """Each row whose `path` is a volume becomes one row per B-scan `oct_frames` picks, with the
    file's other columns."""
    pairs = [(row, address) for row, path in enumerate(frame["path"])
             for address, _ in expand_frames([path], oct_frames)]
    if len(pairs) == len(frame):
        return frame
    out = frame.iloc[[row for row, _ in pairs]].reset_index(drop=True)
    out["path"] = [address for _, address in pairs]
    return out


def _listed(images: str | Path | pd.DataFrame) -> pd.DataFrame:
    if isinstance(images, pd.DataFrame):
        if "path" not in images.columns or images.empty:
            raise DataSourceError("the table of images to embed needs rows and a 'path' column")
        return images.reset_index(drop=True)
    images = Path(images)
    if images.is_file() and images.suffix.lower() == ".csv":
        frame = read_table(images, what="--images")  # class names such as "NA" or "None" stay text
        if "path" not in frame.columns:
            raise DataSourceError(f"--images {images}: a manifest needs a 'path' column (has {list(frame.columns)})")
        if frame["path"].isna().any():
            raise DataSourceError(f"--images {images}: empty 'path' on line(s) "
                                  f"{', '.join(str(i + 2) for i in frame.index[frame['path'].isna()][:10])}")
        frame["path"] = [str(p if Path(p).is_absolute() else images.parent / p) for p in frame["path"]]
        return frame.reset_index(drop=True)
    if images.is_dir():
        splits = [s for s in SPLITS if (images / s).is_dir()]
        if splits:
            rows = [(str(p), split, d.name) for split in splits for d in _class_dirs(images / split)
                    for p in list_images(d)]
            frame = pd.DataFrame(rows, columns=["path", "split", "label"])
        else:
            frame = pd.DataFrame({"path": [str(p) for p in list_images(images)]})
        if frame.empty:
            raise DataSourceError(f"--images {images} contains no image files")
        return frame
    if images.is_file():
        return pd.DataFrame({"path": [str(images)]})
    raise DataSourceError(f"--images {images}: {regular_file_problem(images) or 'no such file or folder'}")
