"""The corpus of bad inputs a user can plausibly give (40 of them, generated here). Each ends in a
skip recorded in skipped.csv with its reason, is read correctly when it is merely unusual, or
stops the command with one line naming the file or option and exit code 2, never a traceback."""
from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import oct_bscans, write_dicom, write_dicom_without_pixels
from PIL import Image

from retinafm.cli import main

TINY = ["--model", "vit_micro_patch8", "--weights", "none", "--input-size", "32", "--epochs", "1",
        "--warmup-epochs", "0", "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--bootstrap", "0"]


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def _fundus(seed: int = 0, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def _bad_image_folder(root: Path) -> dict[str, str]:
    """Files that cannot be images, each with the words its skip reason must contain."""
    root.mkdir(parents=True)
    good = io.BytesIO()
    _fundus().save(good, format="JPEG")
    png = io.BytesIO()
    _fundus().save(png, format="PNG")
    (root / "zero.png").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "notes.png").write_text("Patient notes, not a picture.\n")
    (root / "bomb.png").write_bytes(_png_claiming(60000, 60000))
    Image.new("RGB", (1, 1)).save(root / "dot.png")
    (root / "fake.dcm").write_bytes(b"not dicom" * 30)
    write_dicom_without_pixels(root / "report.dcm")
    write_dicom(root / "oct.dcm", oct_bscans(3))
    (root / "broken.vol").write_bytes(b"HSF-OCT-103" + b"\0" * 64)
    return {
        "zero.png": "empty file", "truncated.jpg": "corrupt or truncated", "truncated.png": "corrupt or truncated",
        "notes.png": "not a recognised image format", "bomb.png": "too large to decode safely",
        "dot.png": "only 1x1 pixels", "fake.dcm": "not a valid DICOM file", "report.dcm": "without pixel data",
        "broken.vol": "not a readable Heidelberg",
    }


def _unusual_image_folder(root: Path) -> list[str]:
    """Files that are odd but fine: each must be read and predicted."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(200, 3000, (40, 40), dtype=np.uint16)).save(root / "deep16.tif")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("CMYK").save(root / "cmyk.jpg")
    _fundus().convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    _fundus().convert("RGBA").save(root / "alpha.png")
    frames = [_fundus(seed) for seed in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return ["deep16.tif", "cmyk.jpg", "palette.png", "alpha.png", "animated.gif"]


def test_unreadable_files_are_skipped_with_reasons_and_odd_ones_are_read(trained_run, tmp_path):
    folder = tmp_path / "mixed"
    expected_skips = _bad_image_folder(folder / "bad")
    readable = _unusual_image_folder(folder / "odd")
    _fundus(5).save(os.fsencode(folder / "odd") + b"/scan_\xff\xfe.png")  # a file name that is not UTF-8
    with pytest.warns(UserWarning, match=r"skipping .*scan_\\xff\\xfe\.png: its file name is not valid UTF-8"):
        code, output = cli("predict", "--checkpoint", trained_run / "checkpoint-best.pth", "--images", folder,
                           "--out", tmp_path / "p.csv", "--num-workers", "0", "--device", "cpu")
    assert code == 0, output
    assert f"{len(expected_skips)} unreadable file(s) listed" in output
    skipped = pd.read_csv(tmp_path / "p_skipped.csv")
    reasons = {Path(p).name: r for p, r in zip(skipped["path"], skipped["reason"], strict=True)}
    assert set(reasons) == set(expected_skips)
    for name, words in expected_skips.items():
        assert words in reasons[name], (name, reasons[name])
    predictions = pd.read_csv(tmp_path / "p.csv")
    names = {Path(p).name for p in predictions["path"]}
    assert set(readable) <= names and not any("scan_" in n for n in names)
    assert "oct.dcm#frame=1" in names  # the middle B-scan of the multi-frame DICOM


@pytest.fixture()
def data_copy(demo_data, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(demo_data, root)
    return root


def _manifest(demo_data: Path, path: Path, edit=None) -> Path:
    rows = [(str(p), split, p.parent.name) for split in ("train", "val", "test")
            for p in sorted((demo_data / split).rglob("*.png"))]
    frame = pd.DataFrame(rows, columns=["path", "split", "label"])
    if edit is not None:
        frame = edit(frame)
    frame.to_csv(path, index=False)
    return path


def _malicious_pickle(path: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(path.parent / "PWNED"),))

    path.write_bytes(pickle.dumps({"model": Payload()}))
    return path


@pytest.mark.parametrize("case,message", [
    ("empty_class_folder", "has no image files"),
    ("class_only_in_val", "is in"),
    ("manifest_missing_columns", "lacks column(s): label"),
    ("manifest_nan_labels", "empty 'label' on line(s)"),
    ("manifest_duplicate_paths", "duplicate path(s)"),
    ("manifest_unknown_split", "unknown split value(s)"),
    ("manifest_not_csv", "is not a readable CSV"),
    ("manifest_empty", "is not a readable CSV"),
    ("weights_other_architecture", "Pick the --model this checkpoint was trained with"),
    ("weights_malicious_pickle", "weights_only"),
    ("weights_missing", "no such file"),
    ("out_is_a_file", "exists and is a file"),
    ("out_under_a_file", "cannot create output folder"),
    ("out_exists", "already exists"),
    ("bad_oct_frames", "--oct-frames must be middle, all or a number"),
])
def test_finetune_refuses_bad_data_and_settings_with_one_line(case, message, data_copy, demo_data, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", *TINY, "--data-path", data_copy, "--out", out]
    if case == "empty_class_folder":
        shutil.rmtree(data_copy / "train" / "glaucoma")
        (data_copy / "train" / "glaucoma").mkdir()
    elif case == "class_only_in_val":
        (data_copy / "val" / "amd").mkdir()
        _fundus().save(data_copy / "val" / "amd" / "a.png")
    elif case.startswith("manifest"):
        manifest = tmp_path / "m.csv"
        edits = {
            "manifest_missing_columns": lambda f: f.drop(columns="label"),
            "manifest_nan_labels": lambda f: f.assign(label=f["label"].where(f.index != 3)),
            "manifest_duplicate_paths": lambda f: pd.concat([f, f.iloc[:2]]),
            "manifest_unknown_split": lambda f: f.assign(split=f["split"].replace("val", "validation")),
        }
        if case == "manifest_not_csv":
            manifest.write_bytes(bytes(range(256)) * 4)
        elif case == "manifest_empty":
            manifest.write_bytes(b"")
        else:
            _manifest(demo_data, manifest, edits[case])
        args = ["finetune", *TINY, "--manifest", manifest, "--out", out]
    elif case == "weights_other_architecture":
        import timm

        other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
        torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
        args[args.index("none")] = tmp_path / "other.pth"
    elif case == "weights_malicious_pickle":
        args[args.index("none")] = _malicious_pickle(tmp_path / "evil.pth")
    elif case == "weights_missing":
        args[args.index("none")] = tmp_path / "missing.pth"
    elif case == "out_is_a_file":
        out.write_text("x")
    elif case == "out_under_a_file":
        (tmp_path / "plain").write_text("x")
        args[args.index(out)] = tmp_path / "plain" / "run"
    elif case == "out_exists":
        out.mkdir()
        (out / "log.csv").write_text("epoch\n0\n")
    elif case == "bad_oct_frames":
        args += ["--oct-frames", "some"]
    code, output = cli(*args)
    assert code == 2, output
    assert message in output and "Traceback" not in output
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("case,message", [
    ("checkpoint_not_retinafm", "is not a retinafm checkpoint"),
    ("checkpoint_truncated", "cannot be opened as a retinafm checkpoint"),
    ("checkpoint_malicious_pickle", "cannot be opened as a retinafm checkpoint"),
    ("images_missing", "no such file or folder"),
    ("images_empty_folder", "contains no image files"),
    ("out_exists", "already exists; pass --overwrite"),
    ("out_in_missing_folder", "cannot use"),
    ("fp16_on_cpu", "--precision fp16 is for GPUs without bf16; on a CPU use fp32 or bf16"),
    ("int8_with_bf16", "--cpu-int8 runs in fp32 around its int8 Linear layers; drop --precision bf16"),
])
def test_predict_refuses_bad_checkpoints_and_paths_with_one_line(case, message, trained_run, demo_data, tmp_path):
    checkpoint, images, out = trained_run / "checkpoint-best.pth", demo_data / "test", tmp_path / "p.csv"
    if case == "checkpoint_not_retinafm":
        checkpoint = tmp_path / "plain.pth"
        torch.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint)
    elif case == "checkpoint_truncated":
        checkpoint = tmp_path / "half.pth"
        data = (trained_run / "checkpoint-best.pth").read_bytes()
        checkpoint.write_bytes(data[: len(data) // 3])
    elif case == "checkpoint_malicious_pickle":
        checkpoint = _malicious_pickle(tmp_path / "evil.pth")
    elif case == "images_missing":
        images = tmp_path / "nowhere"
    elif case == "images_empty_folder":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "out_exists":
        out.write_text("old results")
    elif case == "out_in_missing_folder":
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "p.csv"
    options = {"fp16_on_cpu": ["--precision", "fp16"], "int8_with_bf16": ["--cpu-int8", "--precision", "bf16"]}
    code, output = cli("predict", "--checkpoint", checkpoint, "--images", images, "--out", out,
                       "--num-workers", "0", "--device", "cpu", *options.get(case, []))
    assert code == 2, output
    assert message in output and "Traceback" not in output
    assert not (tmp_path / "PWNED").exists()
    if case == "out_exists":
        assert out.read_text() == "old results"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see the out_under_a_file cases")
def test_read_only_output_folder(trained_run, demo_data, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, output = cli("predict", "--checkpoint", trained_run / "checkpoint-best.pth", "--images",
                           demo_data / "test", "--out", folder / "p.csv", "--num-workers", "0", "--device", "cpu")
    finally:
        folder.chmod(0o700)
    assert code == 2 and "choose a folder you can write to" in output and "Traceback" not in output


def test_manifest_rows_naming_missing_files_or_frames_are_skipped(trained_run, demo_data, tmp_path):
    volume = write_dicom(tmp_path / "oct.dcm", oct_bscans(3))
    manifest = _manifest(demo_data, tmp_path / "m.csv", lambda f: pd.concat([f, pd.DataFrame(
        [[str(tmp_path / "gone.png"), "test", "normal"], [f"{volume}#frame=7", "test", "normal"]],
        columns=f.columns)]))
    code, output = cli("evaluate", "--checkpoint", trained_run / "checkpoint-best.pth", "--manifest", manifest,
                       "--out", tmp_path / "ev", "--num-workers", "0", "--device", "cpu", "--bootstrap", "0")
    assert code == 0, output
    skipped = pd.read_csv(tmp_path / "ev" / "skipped.csv")
    reasons = dict(zip(skipped["path"], skipped["reason"], strict=True))
    assert reasons[str(tmp_path / "gone.png")] == "file not found"
    assert "frame 7 does not exist" in reasons[f"{volume}#frame=7"]
