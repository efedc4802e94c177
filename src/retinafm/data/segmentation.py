"""The data side of segmentation: masks of class indices, image/mask pairs, joint transforms.

A mask is a single-channel PNG/TIFF (or a frame of a multi-frame DICOM / TIFF addressed like the
images, `mask.dcm#frame=12`) whose pixel values are class indices, 0 = background; `--mask-classes`
names them and `--ignore-index` marks unlabelled pixels. Masks are opened through the same safety
checks as images (regular files only, size limits by kind) and are never stretched or colour-
converted: a stretch would turn indices into other indices.

The joint transforms apply one random geometry to an image and its mask (torchvision v2 with
`tv_tensors.Mask`, which always resizes masks by nearest neighbour, so indices never blend). The
fundus crop pads the mask with background (0), not the ignore index: the padding is black outside
the field of view, like the camera's own black surround which masks label as background, and the
model should learn to predict background there rather than be left free.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from retinafm.data.dicom import DicomError, dicom_frame_count, looks_like_dicom
from retinafm.data.io import ImageReadError, image_size_limit, is_image_file, read_image
from retinafm.data.loader import Batch
from retinafm.data.preprocess import FundusPlacement, central_box, fundus_placement
from retinafm.data.sources import SPLITS, DataSourceError
from retinafm.data.transforms import EVAL_CROP_PCT, Preprocessing
from retinafm.data.volumes import TIFF_SUFFIXES, split_address
from retinafm.files.inputs import InputFileError, open_regular, read_table, too_large_reason

_LIMIT_ANY = max(image_size_limit(Path("x.png"), False)[0], image_size_limit(Path("x.tif"), False)[0],
                 image_size_limit(Path("x.dcm"), True)[0])
_SHOWN = 5  # examples listed in an error about missing pairs
_NO_PREPROCESSING = Preprocessing()


class MaskError(DataSourceError):
    """A mask that cannot be used; the message names the file and why."""


def _mask_error(address: str, reason: str) -> MaskError:
    return MaskError(f"mask {address}: {reason}")


def read_mask(path: str | Path, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """The mask at `path` (or `file#frame=N`) as an (H, W) int64 tensor of class indices.

    Refuses (MaskError, a DataSourceError naming the file): an unreadable file, an RGB mask whose
    channels differ (a colour-coded mask must be converted to indices first), and a value that is
    neither a class index (< num_classes) nor `ignore_index`.
    """
    address = str(path)
    file, frame, slo = split_address(address)
    if slo:
        raise _mask_error(address, "#slo addresses an image, not a mask")
    fpath = Path(file)
    try:
        with open_regular(fpath, what="mask", max_bytes=_LIMIT_ANY, kind="masks") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(132)
            if not head:
                raise _mask_error(address, "empty file (0 bytes)")
            dicom = looks_like_dicom(fpath, head)
            limit, kind = image_size_limit(fpath, dicom)
            if size > limit:
                raise _mask_error(address, too_large_reason(size, limit, kind))
            fh.seek(0)
            values = _dicom_mask(fpath, frame) if dicom else _pil_mask(address, fh, frame)
    except FileNotFoundError:
        raise _mask_error(address, "file not found") from None
    except InputFileError as exc:
        raise _mask_error(address, exc.reason) from None
    except OSError as exc:
        raise _mask_error(address, f"cannot read file ({exc.strerror or exc})") from None
    return _check_indices(address, values, num_classes, ignore_index)


def _pil_mask(address: str, fh, frame: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fh) as img:
                if frame is not None:
                    if Path(split_address(address)[0]).suffix.lower() not in TIFF_SUFFIXES:
                        raise _mask_error(address, f"#frame={frame} given, but this file type holds a single image")
                    pages = int(getattr(img, "n_frames", 1))
                    if frame >= pages:
                        raise _mask_error(address, f"has {pages} page(s); frame {frame} does not exist")
                    img.seek(frame)
                img.load()
                if img.mode == "P":
                    # A palette PNG stores indices; its colours are only for viewing.
                    return np.asarray(img, dtype=np.uint8).copy()
                return _single_channel(address, np.asarray(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _mask_error(address, f"image too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise _mask_error(address, "not a recognised image format") from None
    except (SyntaxError, ValueError) as exc:
        raise _mask_error(address, f"corrupt or truncated image ({exc})") from None


def _dicom_mask(path: Path, frame: int | None) -> np.ndarray:
    from pydicom.pixels import pixel_array

    index = frame or 0
    try:
        frames = dicom_frame_count(path)
        if index >= frames:
            raise _mask_error(f"{path}#frame={index}", f"has {frames} frame(s); frame {index} does not exist")
        raw = pixel_array(str(path), index=index)  # raw stored values: no windowing, no stretch
    except DicomError as exc:
        raise _mask_error(str(path), str(exc)) from None
    except (AttributeError, IndexError, ValueError, EOFError, RuntimeError, NotImplementedError, KeyError) as exc:
        raise _mask_error(str(path), f"cannot decode its pixel data ({exc})") from None
    return _single_channel(str(path), np.asarray(raw))


def _single_channel(address: str, values: np.ndarray) -> np.ndarray:
    if values.ndim == 2:
        return values
    if values.ndim == 3 and values.shape[-1] in (2, 3, 4):
        colour = values[..., :3] if values.shape[-1] >= 3 else values[..., :1]
        if not (colour == colour[..., :1]).all():
            raise _mask_error(address, "is a colour image with unequal channels; a mask must be a single-channel "
                                       "image of class indices (0 = background)")
        return colour[..., 0]
    raise _mask_error(address, f"has pixel data of shape {values.shape}; expected a single-channel image")


def _check_indices(address: str, values: np.ndarray, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise _mask_error(address, "holds non-integer values; a mask holds class indices")
    out = values.astype(np.int64)
    present = np.unique(out)
    bad = [int(v) for v in present if (v < 0 or v >= num_classes) and v != ignore_index]
    if bad:
        ignore = f" nor the ignore index {ignore_index}" if ignore_index is not None else ""
        raise _mask_error(address, f"holds value(s) {bad[:10]} that are not class indices 0..{num_classes - 1}{ignore} "
                                   f"(--mask-classes names {num_classes} class(es); pass --ignore-index for "
                                   "unlabelled pixels)")
    if out.shape[0] < 2 or out.shape[1] < 2:
        raise _mask_error(address, f"mask is only {out.shape[1]}x{out.shape[0]} pixels")
    return torch.from_numpy(np.ascontiguousarray(out))


def check_mask_size(image: torch.Tensor, mask: torch.Tensor, image_path: str, mask_path: str) -> None:
    """A mask must cover its image pixel for pixel."""
    if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
        (ih, iw), (mh, mw) = image.shape[-2:], mask.shape[-2:]
        raise MaskError(f"mask {mask_path} is {mw}x{mh} pixels but its image {image_path} is {iw}x{ih}; "
                        "a mask must have its image's size")


# --- pairs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentationPair:
    image: str
    mask: str
    split: str | None = None
    patient_id: str | None = None


def segmentation_pairs(source: str | Path, mask_classes: Sequence[str] | None = None,
                       ignore_index: int | None = None) -> dict[str, list[SegmentationPair]]:
    """Image/mask pairs per split from a manifest CSV (`path`, `mask`, optional `split` and
    `patient_id`; relative paths are relative to the manifest) or a folder
    DATA/{train,val,test}/{images,masks}/* matched by file stem. A manifest without `split` puts
    every row under "all" (the caller splits). Every split found is a key; unknown ones are refused.

    With `mask_classes` (--mask-classes, index 0 first) every mask is read once here, so that a bad
    mask stops the run before training with all the bad masks listed, not one at a time mid-epoch."""
    source = Path(source)
    pairs = _folder_pairs(source) if source.is_dir() else _manifest_pairs(source)
    if mask_classes is not None:
        check_masks([p for rows in pairs.values() for p in rows], mask_classes, ignore_index)
    return pairs


def check_mask_classes(mask_classes: Sequence[str], ignore_index: int | None = None) -> None:
    """--mask-classes: at least two distinct non-empty names (index 0 is the background); the
    ignore index must not be one of the class indices."""
    names = [str(n).strip() for n in mask_classes]
    if len(names) < 2 or any(not n for n in names) or len(set(names)) != len(names):
        raise DataSourceError("--mask-classes needs two or more distinct names, background first; "
                              f"got {list(mask_classes)}")
    if ignore_index is not None and 0 <= ignore_index < len(names):
        raise DataSourceError(f"--ignore-index {ignore_index} is the index of class {names[ignore_index]!r}; "
                              f"use a value of {len(names)} or more (255 is usual)")


def check_masks(pairs: Sequence[SegmentationPair], mask_classes: Sequence[str],
                ignore_index: int | None = None) -> None:
    """Read every mask; DataSourceError listing the first few bad ones (and how many there are)."""
    check_mask_classes(mask_classes, ignore_index)
    problems = []
    for pair in pairs:
        try:
            read_mask(pair.mask, len(mask_classes), ignore_index)
        except MaskError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise DataSourceError(f"{len(problems)} of {len(pairs)} mask(s) are unusable{more}: "
                              + "; ".join(problems[:_SHOWN]))


def _manifest_pairs(csv_path: Path) -> dict[str, list[SegmentationPair]]:
    try:
        frame = read_table(csv_path, what="--manifest")
    except FileNotFoundError:
        raise DataSourceError(f"--manifest {csv_path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"--manifest {csv_path} is not a readable CSV: {exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("path", "mask") if c not in frame.columns]
    if missing:
        raise DataSourceError(f"--manifest {csv_path} lacks column(s): {', '.join(missing)}; "
                              f"it has {', '.join(frame.columns)}")
    for column in ("path", "mask"):
        empty = [i + 2 for i, v in enumerate(frame[column]) if pd.isna(v) or not str(v).strip()]
        if empty:
            raise DataSourceError(f"--manifest {csv_path}: empty {column!r} on line(s) {empty[:_SHOWN]}")
    base = csv_path.parent

    def where(p: str) -> str:
        p = str(p).strip()
        return p if Path(split_address(p)[0]).is_absolute() else str(base / p)

    out: dict[str, list[SegmentationPair]] = {}
    for _, row in frame.iterrows():
        split = str(row["split"]).strip().lower() if "split" in frame.columns and not pd.isna(row["split"]) else None
        if "split" in frame.columns and split not in SPLITS:
            raise DataSourceError(f"--manifest {csv_path}: unknown split value {row.get('split')!r}; "
                                  "use train, val, test")
        patient = row.get("patient_id") if "patient_id" in frame.columns else None
        patient = None if patient is None or pd.isna(patient) else str(patient)
        out.setdefault(split or "all", []).append(
            SegmentationPair(where(row["path"]), where(row["mask"]), split, patient))
    return out


def _folder_pairs(root: Path) -> dict[str, list[SegmentationPair]]:
    splits = [s for s in SPLITS if (root / s / "images").is_dir() or (root / s / "masks").is_dir()]
    if not splits:
        raise DataSourceError(f"{root}: expected {root}/{{train,val,test}}/images/ and .../masks/ folders")
    out: dict[str, list[SegmentationPair]] = {}
    problems: list[str] = []
    for split in splits:
        images = _by_stem(root / split / "images", problems)
        masks = _by_stem(root / split / "masks", problems)
        lonely_images = sorted(set(images) - set(masks))
        lonely_masks = sorted(set(masks) - set(images))
        if lonely_images:
            problems.append(f"{len(lonely_images)} image(s) in {split}/images without a mask in {split}/masks "
                            f"(e.g. {', '.join(images[s].name for s in lonely_images[:_SHOWN])})")
        if lonely_masks:
            problems.append(f"{len(lonely_masks)} mask(s) in {split}/masks without an image in {split}/images "
                            f"(e.g. {', '.join(masks[s].name for s in lonely_masks[:_SHOWN])})")
        out[split] = [SegmentationPair(str(images[s]), str(masks[s]), split) for s in sorted(set(images) & set(masks))]
    if problems:
        raise DataSourceError(f"{root}: images and masks are matched by file stem; " + "; ".join(problems))
    return out


def _by_stem(folder: Path, problems: list[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p)):
        if path.stem in found:
            problems.append(f"{folder.name} of {folder.parent.name} holds two files with stem {path.stem!r} "
                            f"({found[path.stem].name}, {path.name})")
            continue
        found[path.stem] = path
    return found


# --- joint transforms ----------------------------------------------------------------------------
class JointPreprocess:
    """The fundus crop / OCT central crop of `Preprocessing`, computed on the image and applied
    with the same box (and padding) to the mask. Mask padding is background (see module doc)."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image_t, mask_t = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        if self.preprocessing.fundus_crop:
            place = fundus_placement(image_t)
            if place is not None:
                image_t, mask_t = (_place(t, place) for t in (image_t, mask_t))
        if self.preprocessing.oct_crop:
            top, left, h, w = central_box(*image_t.shape[-2:], self.preprocessing.oct_crop)
            image_t = image_t[..., top:top + h, left:left + w].contiguous()
            mask_t = mask_t[..., top:top + h, left:left + w].contiguous()
        return tv_tensors.Image(image_t), tv_tensors.Mask(mask_t)


def _place(t: torch.Tensor, place: FundusPlacement) -> torch.Tensor:
    height, width = place.bottom - place.top, place.right - place.left
    out = t.new_zeros((*t.shape[:-2], place.side, place.side))
    out[..., place.pad_top:place.pad_top + height, place.pad_left:place.pad_left + width] = \
        t[..., place.top:place.bottom, place.left:place.right]
    return out


def _resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour at pixel centres ("nearest-exact"), the sampling grid the image's bicubic
    resize uses. torchvision's mask kernels use legacy "nearest" (source = floor(dst * scale)),
    which shifts a mask by about half an output pixel toward the top left of its image."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    # Through float32: exact for indices below 2**24, and interpolate has no integer nearest-exact.
    out = torch.nn.functional.interpolate(mask[None, None].float(), size=list(size), mode="nearest-exact")
    return out[0, 0].round().long()


class JointRandomResizedCrop:
    """v2.RandomResizedCrop's box (same parameter draw), cut from image and mask alike."""

    def __init__(self, size: int, scale: tuple[float, float]) -> None:
        self.crop = v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)
        self.size = [size, size]

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        params = self.crop.make_params([image])
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        out = v2.functional.resized_crop(image, top, left, height, width, self.size,
                                         interpolation=InterpolationMode.BICUBIC, antialias=True)
        cut = mask.as_subclass(torch.Tensor)[..., top:top + height, left:left + width]
        return tv_tensors.Image(out), tv_tensors.Mask(_resize_mask(cut, self.size))


class JointResize:
    """v2.Resize of the image's shorter side to `size` (bicubic); the mask to the image's new shape."""

    def __init__(self, size: int) -> None:
        self.resize = v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        out = self.resize(image)
        return tv_tensors.Image(out), tv_tensors.Mask(_resize_mask(mask.as_subclass(torch.Tensor), out.shape[-2:]))


class JointTransform:
    """(uint8 image (3, H, W), int64 mask (H, W)) -> (normalised float (3, S, S), long mask (S, S))."""

    # A mask is read at full size, so its image must be too: a reduced-scale JPEG decode (see
    # read_image) would no longer match the mask pixel for pixel.
    decode_size = None

    def __init__(self, ops: list) -> None:
        self.compose = v2.Compose(ops)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_image, out_mask = self.compose(tv_tensors.Image(image), tv_tensors.Mask(mask.long()))
        return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor).long()


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    # ToDtype with one dtype converts images only: the mask keeps its integer indices.
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def _pre(preprocessing: Preprocessing) -> list:
    if not (preprocessing.fundus_crop or preprocessing.oct_crop):
        return []
    if preprocessing.oct_crop:
        preprocessing.ops()  # refuses a bad fraction when the recipe is built, as the classification recipe does
    return [JointPreprocess(preprocessing)]


def segmentation_train_transform(input_size: int, mean: Sequence[float], std: Sequence[float],
                                 preprocessing: Preprocessing = _NO_PREPROCESSING, crop_min_scale: float = 0.25,
                                 hflip: bool = True) -> JointTransform:
    """RandomResizedCrop (area `crop_min_scale`-1; larger than classification's 0.08, which would
    often crop away a small lesion entirely) and a horizontal flip, the same for image and mask.
    No RandAugment or random erasing: their geometric ops would need the mask too, and erasing
    would hide lesions the mask still labels."""
    ops = [*_pre(preprocessing), JointRandomResizedCrop(input_size, (crop_min_scale, 1.0))]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())  # flips an Image and a Mask alike (no resampling)
    return JointTransform(ops + _finish(mean, std))


def segmentation_eval_transform(input_size: int, mean: Sequence[float], std: Sequence[float],
                                preprocessing: Preprocessing = _NO_PREPROCESSING,
                                crop_pct: float = EVAL_CROP_PCT) -> JointTransform:
    """Resize the short side to input/crop_pct and centre-crop, as the classification recipe does."""
    resize = int(round(input_size / crop_pct))
    ops = [*_pre(preprocessing), JointResize(resize), v2.CenterCrop(input_size)]
    return JointTransform(ops + _finish(mean, std))


# --- dataset -------------------------------------------------------------------------------------
class SegmentationDataset(Dataset):
    """Items are (image (3,S,S) float, mask (S,S) long, index), or for an unreadable image
    (None, (path, reason), index) like data.loader.ImageDataset. A bad mask (unreadable, unknown
    index, wrong size) raises MaskError: it is a labelling error to fix, not a file to skip.
    A JPEG image with an EXIF rotation is decoded rotated (as everywhere else) and its mask is not:
    the size check catches a rotated non-square image; store such images as PNG."""

    def __init__(self, pairs: Sequence[SegmentationPair], transform: JointTransform, num_classes: int,
                 ignore_index: int | None = None) -> None:
        self.pairs = list(pairs)
        self.transform = transform
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        pair = self.pairs[index]
        try:
            image = read_image(pair.image)
        except ImageReadError as exc:
            return None, (exc.path, exc.reason), index
        mask = read_mask(pair.mask, self.num_classes, self.ignore_index)
        check_mask_size(image, mask, pair.image, pair.mask)
        out_image, out_mask = self.transform(image, mask)
        return out_image, out_mask, index


def collate_segmentation(items: list) -> Batch:
    """data.loader's Batch for segmentation: `targets` is the (B, S, S) long mask stack; skipped
    images are handed on in `skipped`, as collate_skipping does for classification."""
    good = [it for it in items if it[0] is not None]
    skipped = [it[1] for it in items if it[0] is None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack([it[0] for it in good]), torch.stack([it[1] for it in good]),
                 torch.tensor([it[2] for it in good], dtype=torch.long), skipped)
