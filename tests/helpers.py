"""Helpers shared by test modules (fixtures live in conftest.py; tests import helpers only from here).

- Tiny run settings: a micro ViT at 32 px on the CPU, short enough for the suite.
- Clinical test files written by the libraries that read them: DICOM with pydicom, Heidelberg
  .vol with eyepy's own format definition, multi-page TIFF with Pillow.
- The hostile-input harness: the CLI in a child process under a timeout and an address-space limit
  (`run_bounded`), the one-line-error check (`assert_one_line_error`) and file fingerprints that
  prove nothing the user gave was changed (`fingerprint`).
"""
from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retinafm.settings import FinetuneSettings, PretrainSettings, RefineSettings


def tiny_finetune_config(data: Path | None, out: Path, **overrides) -> FinetuneSettings:
    settings = dict(
        out=str(out), data_path=str(data) if data else None, model="vit_micro_patch8", weights="none", input_size=32,
        epochs=2, warmup_epochs=1, batch_size=16, lr=1e-3, layer_decay=1.0, drop_path=0.0,
        randaug_magnitude=0, reprob=0.0, crop_min_scale=0.5, num_workers=0, device="cpu",
        bootstrap=0,  # tests that check confidence intervals ask for them
    )
    settings.update(overrides)
    return FinetuneSettings(**settings)


def tiny_manifest_config(manifest: Path, out: Path, **overrides) -> FinetuneSettings:
    """A short run on a manifest at 64 px, where the synthetic findings are visible."""
    settings = dict(data_path=None, manifest=str(manifest), input_size=64, epochs=20, warmup_epochs=1,
                    batch_size=16, lr=1e-3, crop_min_scale=0.8, smoothing=0.0)
    settings.update(overrides)
    return tiny_finetune_config(None, out, **settings)


def tiny_pretrain_config(images, out, **overrides) -> PretrainSettings:
    settings = dict(out=str(out), images=str(images), model="vit_micro_patch8", input_size=32, epochs=2,
                    warmup_epochs=1, batch_size=16, lr=1e-3, decoder_dim=32, decoder_depth=1, decoder_heads=4,
                    reconstructions=2, num_workers=0, device="cpu", out_dim=32, local_crops=2)
    settings.update(overrides)
    return PretrainSettings(**settings)


def tiny_refine_config(pairs, text_model, out, **overrides) -> RefineSettings:
    settings = dict(out=str(out), pairs=str(pairs), model="vit_micro_patch8", weights="none", input_size=32,
                    text_model=str(text_model), epochs=2, warmup_epochs=1, batch_size=8, lr=1e-3, embed_dim=16,
                    max_length=32, num_workers=0, device="cpu", probe_bootstrap=0)
    settings.update(overrides)
    return RefineSettings(**settings)


def tiny_checkpoint(path: Path, names: list[str], task: str = "multiclass", size: int = 32, **meta) -> Path:
    """A vit_micro_patch8 checkpoint of `task` with outputs `names`, written in a second: its linear head is
    scaled up so the outputs get distinct values. `meta` overrides CheckpointMeta fields."""
    import torch

    from retinafm.engine.checkpoint import CheckpointMeta, save_checkpoint
    from retinafm.models.registry import create_model, get_spec

    spec = get_spec("vit_micro_patch8")
    torch.manual_seed(0)
    model = create_model(spec, len(names), input_size=size, global_pool="avg")
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    fields = dict(model_name=spec.name, arch=spec.arch, arch_kwargs=dict(spec.arch_kwargs), task=task,
                  class_names=list(names), input_size=size, mean=list(spec.mean), std=list(spec.std),
                  global_pool="avg", modality="any", patch_size=spec.patch_size, settings={"epochs": 1}, head={})
    fields.update(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, model, CheckpointMeta(**fields))


OPHTHALMIC_PHOTO_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OPHTHALMIC_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str | None = None, bits_stored: int | None = None,
                sop_class: str | None = None, **elements) -> Path:
    """`pixels`: (H, W) / (H, W, 3) for one frame, (F, H, W) / (F, H, W, 3) for several;
    extra keyword elements (RescaleSlope=..., WindowCenter=...) are set on the dataset."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(pixels)
    colour = pixels.shape[-1] == 3 and pixels.ndim in (3, 4)
    frames = pixels.ndim == 4 or (pixels.ndim == 3 and not colour)
    photometric = photometric or ("RGB" if colour else "MONOCHROME2")
    bits_stored = bits_stored or (8 if pixels.dtype == np.uint8 else 16)
    sop_class = sop_class or (OPHTHALMIC_TOMOGRAPHY if frames else OPHTHALMIC_PHOTO_8BIT)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "P001", "OPT" if frames else "OP"
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits_stored)
    for name, value in elements.items():
        setattr(ds, name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_without_pixels(path: Path) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: a report, no image
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "P001", "SR"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def oct_bscans(frames: int, height: int = 48, width: int = 64, seed: int = 0, bright: float = 1.0) -> np.ndarray:
    """(F, H, W) uint8 speckled layered B-scans; `bright` scales the retina's reflectivity."""
    rng = np.random.default_rng(seed)
    y = np.arange(height)[:, None]
    scans = []
    for f in range(frames):
        top = height // 3 + int(3 * np.sin(f / 2))
        band = ((y > top) & (y < top + height // 4)).astype(float) * 170 * bright
        speckle = rng.gamma(2.0, 20.0, size=(height, width))
        scans.append(np.clip(band + speckle, 0, 255).astype(np.uint8))
    return np.stack(scans)


def write_heidelberg_vol(path: Path, bscans: np.ndarray, slo: np.ndarray | None = None) -> Path:
    """A Heidelberg .vol built with eyepy's own `vol_format` (eyepy 0.21's HeVolWriter cannot
    encode its dates, so the file is assembled here from the same format definition)."""
    from eyepy.core.utils import to_vol_intensity
    from eyepy.io.he.vol_reader import vol_format

    _integer_dates(vol_format)
    n, h, w = bscans.shape
    slo = slo if slo is not None else np.full((96, 96), 90, np.uint8)
    date = "2024-01-02T00:00:00"
    values = bscans.astype(np.float32) / 255.0
    scans = [dict(bscan_hdr_size=256 + 17 * 4 * w, start_x=0.0, start_y=i * 0.1, end_x=6.0, end_y=i * 0.1,
                  num_seg=17, quality=30.0, shift=0, iv_transformation=[0] * 6,
                  layer_segmentations=np.zeros((17, w), np.float32), data=to_vol_intensity(values[i]))
             for i in range(n)]
    payload = dict(size_x=w, size_y=h, n_bscans=n, scale_x=0.01, scale_y=0.004, distance=0.1,
                   size_x_slo=slo.shape[1], size_y_slo=slo.shape[0], scale_x_slo=0.01, scale_y_slo=0.01,
                   field_size_slo=30, scan_focus=0.0, scan_position="OD", exam_time=date, scan_pattern=0,
                   id="unknown", reference_id="unknown", pid=1, patient_id="P001", dob=date, vid=0,
                   visit_id="unknown", visit_date=date, grid_type=0, grid_offset=0, grid_type1=0, grid_offset1=0,
                   prog_id="unknown", localizer=slo, bscans=scans)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(vol_format.build(payload))
    return path


def _integer_dates(con) -> None:
    """eyepy 0.21's date adapters build floats where the file holds integers: round them (once)."""
    import construct as cs

    seen: set[int] = set()

    def visit(c) -> None:
        if id(c) in seen:
            return
        seen.add(id(c))
        if isinstance(c, cs.Adapter) and type(c).__name__ == "DateAdapter" and not getattr(c, "_rounded", False):
            original = c._encode
            c._encode = lambda obj, ctx, path, _o=original: int(round(_o(obj, ctx, path)))
            c._rounded = True
        for child in list(getattr(c, "subcons", None) or []) + [getattr(c, "subcon", None)]:
            if child is not None:
                visit(child)

    visit(con)


def write_multipage_tiff(path: Path, pages: np.ndarray) -> Path:
    from PIL import Image

    images = [Image.fromarray(p) for p in pages]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:])
    return path


# --------------------------------------------------------------------------- hostile-input harness
# The address space a CLI run may take: torch, timm and a tiny model need about 3 GiB of it; a guard
# that is missing (a 12 GB read, a 40 GB tensor) then ends in a MemoryError instead of taking the host down.
BOUNDED_MEMORY = 6 * 2**30


@dataclass
class Outcome:
    code: int
    output: str  # stdout and stderr together

    def __str__(self) -> str:
        return f"exit {self.code}:\n{self.output}"


def run_bounded(*args, timeout: float = 120, memory: int = BOUNDED_MEMORY, cwd: Path | None = None,
                env: dict[str, str] | None = None, stdin: int | None = subprocess.DEVNULL) -> Outcome:
    """`retinafm ARGS` in a child process that must finish within `timeout` seconds and `memory` bytes
    of address space (a hang fails the test through subprocess.TimeoutExpired, after killing the child)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "RETINAFM_DEBUG": "", "PYTHONWARNINGS": "default", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "retinafm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, cwd=cwd, env=full_env, stdin=stdin)
    return Outcome(proc.returncode, proc.stdout + proc.stderr)


def assert_one_line_error(outcome: Outcome, *words: str) -> None:
    """Exit 2 with an `error:` line holding every one of `words`, and no traceback."""
    assert outcome.code == 2, outcome
    assert "Traceback" not in outcome.output and "MemoryError" not in outcome.output, outcome
    errors = [line for line in outcome.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, outcome
    for word in words:
        assert word in errors[0], (word, outcome)


def fingerprint(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every regular file under `roots` (or the file itself): size and sha256, to compare before and after."""
    prints = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        for path in files:
            prints[str(path)] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return prints


# The generated hostile files, made where the test needs them.
def make_fifo(path: Path) -> Path:
    """A named pipe: opening it for reading blocks until a writer comes, which none will."""
    os.mkfifo(path)
    return path


def make_device(path: Path) -> Path:
    """A symlink to /dev/zero: an endless file for anything that reads it whole."""
    path.symlink_to("/dev/zero")
    return path


def make_sparse(path: Path, size: int = 12 * 2**30) -> Path:
    """A file of `size` zero bytes that takes no disk (sparse)."""
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def billion_laughs(levels: int = 9) -> str:
    """A YAML document whose aliases expand to 10**levels strings under a valid key, in about 1 KB."""
    lines = ["epochs:", "  - &l0 [" + ", ".join(['"lol"'] * 10) + "]"]
    lines += [f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def zip_bomb(source: Path | bytes, out: Path, inflated: int = 2**30) -> Path:
    """A real torch.save file (a path or its bytes) whose largest member is replaced by `inflated` zero
    bytes, deflated (~1 MB per GiB), written 16 MiB at a time so that building it stays bounded."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as original, \
            zipfile.ZipFile(out, "w") as bomb:
        members = original.infolist()
        largest = max(members, key=lambda m: m.file_size)
        for member in members:
            if member is not largest:
                bomb.writestr(member, original.read(member))
                continue
            info = zipfile.ZipInfo(member.filename)
            info.compress_type = zipfile.ZIP_DEFLATED
            with bomb.open(info, "w", force_zip64=True) as fh:
                chunk = bytes(16 * 2**20)
                for _ in range(max(1, inflated // len(chunk))):
                    fh.write(chunk)
    return out
