"""The Python API for notebooks: `retinafm.load(checkpoint | zoo name)` → a model with `predict`, `embed`
and `explain`.

Inputs go through the same preprocessing as the CLI: files are read as `retinafm predict` reads
them (volumes as `file#frame=N` addresses, the checkpoint's B-scan choice for a folder or volume
file), and every image, file or in-memory, gets the checkpoint's evaluation transform (its
fundus / OCT crop included).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from retinafm.data.geometry import traced_transform
from retinafm.data.images import collect_images
from retinafm.data.loader import ImageDataset
from retinafm.data.sources import DataSourceError
from retinafm.data.volumes import expand_frames
from retinafm.engine.checkpoint import CheckpointError
from retinafm.engine.explain import TracedImages, TracedItem
from retinafm.engine.features import PooledFeatures, embedding_model
from retinafm.engine.infer import infer
from retinafm.engine.inference import load_for_inference, prepare_for_inference
from retinafm.settings import EmbedSettings

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".onnx")
Inputs = str | Path | Any | np.ndarray | Sequence[Any]  # Any: a PIL image


class RetinaModel:
    """A loaded checkpoint or backbone: `predict` (a checkpoint with a task) and `embed` (any)."""

    def __init__(self, model: nn.Module, transform: Callable, device: torch.device,
                 autocast_dtype: torch.dtype | None, *, name: str, task: Any = None,
                 oct_frames: str = "middle", tta_flip: bool = False, num_workers: int = 0,
                 not_explainable: str | None = None):
        self.model, self.transform, self.device, self.autocast_dtype = model, transform, device, autocast_dtype
        self.not_explainable = not_explainable  # why `explain` cannot run (an ONNX export, int8 layers), if so
        self.name, self.task, self.oct_frames, self.tta_flip = name, task, oct_frames, tta_flip
        self.num_workers = num_workers  # DataLoader workers decoding files; 0 is safest in a notebook

    def __repr__(self) -> str:
        task = f"{self.task.name}: {', '.join(self.task.output_names)}" if self.task is not None else "no task"
        return f"RetinaModel({self.name}, {task}, {self.device})"

    def predict(self, inputs: Inputs, *, batch_size: int = 32):
        """A pandas DataFrame with the columns of `retinafm predict`'s CSV, one row per readable
        image (unreadable files are left out with a warning). In-memory images are named
        `<input N>` in the path column."""
        if self.task is None:
            raise CheckpointError(f"{self.name} is a backbone without a task, so it has nothing to predict; load "
                                  "a fine-tuned checkpoint (.pth or .onnx) for predictions, or call .embed() for "
                                  "features")
        names, result = self._run(self.model, inputs, batch_size, "predict")
        outputs = self.task.activate(torch.from_numpy(result.logits))
        return self.task.prediction_frame([names[i] for i in result.indices], outputs)

    def embed(self, inputs: Inputs, *, batch_size: int = 64) -> np.ndarray:
        """Pooled features, float32 (n, dim), one row per readable image in input order: the
        vectors `retinafm embed` writes for the same images and settings (there float16 by default)."""
        extractor = PooledFeatures(self.model, self.tta_flip)
        _, result = self._run(extractor, inputs, batch_size, "embed")
        return result.logits.astype(np.float32)

    def explain(self, inputs: Inputs, *, target: str = "predicted", method: str = "grad-rollout",
                batch_size: int = 8):
        """Where the model looked, as `retinafm explain` computes it: a DataFrame with path, target,
        probability (a regression's `value`), method and `heatmap`, a float32 array in 0..1 at each
        image's own resolution (the model's crops and resize undone). `target`: predicted, all, or an
        output's name. `retinafm.overlays.render_overlay(image, heatmap)` draws one."""
        import pandas as pd

        from retinafm.data.loader import SkipLog
        from retinafm.engine.explain import explain_dataset, resolve_target

        if self.task is None:
            raise CheckpointError(f"{self.name} is a backbone without a task: there is no output to explain; load a "
                                  "fine-tuned checkpoint")
        if self.not_explainable:
            raise CheckpointError(f"{self.name}: {self.not_explainable}")
        chosen = resolve_target(target, self.task.output_names)
        names, images = self._items(inputs)
        skipped = SkipLog()
        rows = [{"path": names[e.index], "target": e.target, self.task.value_name: e.value, "method": method,
                 "heatmap": e.heatmap}
                for e in explain_dataset(self.model, self.task, _InputTracedImages(names, images, self.transform),
                                         self.device, method=method, target=chosen, batch_size=batch_size,
                                         skip_log=skipped, num_workers=self.num_workers,
                                         amp_dtype=self.autocast_dtype, progress=False)]
        if len(skipped):
            first = skipped.frame().iloc[0]
            warnings.warn(f"{len(skipped)} image(s) could not be read and are left out, e.g. {first['path']}: "
                          f"{first['reason']}", UserWarning, stacklevel=2)
        return pd.DataFrame(rows, columns=["path", "target", self.task.value_name, "method", "heatmap"])

    def _run(self, model: nn.Module, inputs: Inputs, batch_size: int, desc: str):
        names, images = self._items(inputs)
        dataset = _InputDataset(names, images, self.transform)
        result = infer(model, dataset, self.device, batch_size=batch_size, num_workers=self.num_workers,
                       amp_dtype=self.autocast_dtype, desc=desc, progress=False)
        if result.skipped:
            warnings.warn(f"{len(result.skipped)} image(s) could not be read and are left out, e.g. "
                          f"{result.skipped[0][0]}: {result.skipped[0][1]}", UserWarning, stacklevel=3)
        if len(result.indices) == 0:
            raise DataSourceError(f"none of the {len(names)} images could be read: {result.skipped[:3]}")
        return names, result

    def _items(self, inputs: Inputs) -> tuple[list[str], dict[int, torch.Tensor]]:
        """Names (file addresses or `<input N>`) and the in-memory images by position."""
        if isinstance(inputs, (str, Path)):
            return collect_images(inputs, self.oct_frames), {}
        if isinstance(inputs, np.ndarray) and inputs.ndim == 4:  # a stack of HxWx3 images
            inputs = list(inputs)
        elif not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        if not inputs:
            raise DataSourceError("no images given: pass a path, a folder, PIL images or HxWx3 uint8 arrays")
        names, images = [], {}
        for i, item in enumerate(inputs):
            if isinstance(item, (str, Path)):
                names += [address for address, _ in expand_frames([str(item)], self.oct_frames)]
            else:
                images[len(names)] = _as_tensor(item, i)
                names.append(f"<input {i}>")
        return names, images


class _InputDataset(ImageDataset):
    """File addresses read as the CLI reads them, and in-memory images, in one list."""

    def __init__(self, names: list[str], images: dict[int, torch.Tensor], transform: Callable):
        super().__init__(names, [None] * len(names), transform)
        self.images = images

    def __getitem__(self, index: int):
        if index in self.images:
            return self.transform(self.images[index]), self.targets[index], index
        return super().__getitem__(index)


class _InputTracedImages(TracedImages):
    """TracedImages over file addresses and in-memory images, as _InputDataset."""

    def __init__(self, names: list[str], images: dict[int, torch.Tensor], transform: Callable):
        super().__init__(names, transform)
        self.images = images

    def __getitem__(self, index: int):
        if index in self.images:
            tensor, trace = traced_transform(self.transform, self.images[index])
            return TracedItem(index, tensor, trace, self.images[index])
        return super().__getitem__(index)


def _as_tensor(item: Any, position: int) -> torch.Tensor:
    """A PIL image (any mode) or an HxWx3 / HxW uint8 array as the (3, H, W) uint8 tensor a file decodes to."""
    from PIL import Image

    from retinafm.data.pixels import to_rgb_array

    if isinstance(item, Image.Image):
        return torch.from_numpy(to_rgb_array(item)).permute(2, 0, 1).contiguous()
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] == 3)):
            raise DataSourceError(f"input {position}: an array must be HxWx3 (RGB) or HxW (grey) uint8, got "
                                  f"{item.dtype} of shape {item.shape}")
        rgb = np.repeat(item[:, :, None], 3, axis=2) if item.ndim == 2 else item
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()  # a copy: the caller keeps theirs
    raise DataSourceError(f"input {position}: {type(item).__name__} is not an image; pass a path, a PIL image or an "
                          "HxWx3 uint8 array")


def load(source: str | Path, *, device: str = "auto", precision: str = "auto", cpu_int8: bool = False,
         weights: str | None = None, pool: str | None = None, input_size: int | None = None,
         fundus_crop: bool = False, oct_crop: float | None = None, tta_flip: bool = False,
         oct_frames: str | None = None, num_workers: int = 0) -> RetinaModel:
    """A checkpoint (.pth, or its .onnx export) or a model zoo name, ready to `predict` / `embed`.

    A checkpoint brings its task, classes and image recipe; `weights`, `pool`, `input_size`,
    `fundus_crop` and `oct_crop` go with a zoo name (as `retinafm embed --model` takes them), which
    gives a backbone for `embed` only. `tta_flip` averages embeddings with the mirrored image's.
    `oct_frames` picks B-scans of volumes (None: as the checkpoint was trained, else middle)."""
    text = str(source)
    checkpoint = Path(text).suffix.lower() in CHECKPOINT_SUFFIXES or Path(text).is_file()
    settings = EmbedSettings(model=None if checkpoint else text, checkpoint=text if checkpoint else None,
                             weights=weights, pool=pool, input_size=input_size, fundus_crop=fundus_crop,
                             oct_crop=oct_crop, tta_flip=tta_flip, device=device, precision=precision,
                             cpu_int8=cpu_int8, oct_frames=oct_frames or "middle")
    settings.validate()  # the CLI's refusals, in the same words
    if checkpoint:
        if pool is not None or input_size is not None:
            raise DataSourceError("pool / input_size go with a zoo name; a checkpoint keeps the ones it was "
                                  "trained with")
        loaded = load_for_inference(text, device=device, precision=precision, cpu_int8=cpu_int8)
        frames = oct_frames or loaded.meta.settings.get("oct_frames") or "middle"
        why = ("an ONNX export has neither gradients nor attention to explain; load the .pth it was exported from"
               if loaded.onnx else "int8 layers have no gradients; load it without cpu_int8 to explain"
               if cpu_int8 else None)
        return RetinaModel(loaded.model, loaded.transform, loaded.device, loaded.autocast_dtype, name=text,
                           task=loaded.task, oct_frames=frames, tta_flip=tta_flip, num_workers=num_workers,
                           not_explainable=why)
    model, info = embedding_model(settings)
    model, dev, dtype, _ = prepare_for_inference(model, onnx=False, device=device, precision=precision,
                                                 cpu_int8=cpu_int8)
    from retinafm.data.transforms import Preprocessing, eval_transform

    transform = eval_transform(info["input_size"], info["mean"], info["std"], info["crop_pct"],
                               Preprocessing.from_state(info["preprocess"]))
    return RetinaModel(model, transform, dev, dtype, name=info["model"], oct_frames=oct_frames or "middle",
                       tta_flip=tta_flip, num_workers=num_workers)
