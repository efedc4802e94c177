"""files.inputs, in process: regular files only (FIFOs never block), size limits, CSV class names
that pandas would read as missing, YAML alias bombs, zip checkpoints that inflate, and the readers
built on them (images, folders, checkpoints, weights). The CLI guarantees are in
tests/hostile/test_hostile_inputs.py."""
from __future__ import annotations

import io
import re
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import billion_laughs, make_device, make_fifo, make_sparse, zip_bomb
from PIL import Image

from retinafm.data.io import ImageReadError, read_image
from retinafm.data.sources import list_images
from retinafm.engine.checkpoint import CheckpointError, meta_of, open_checkpoint
from retinafm.files import (
    CONFIG_MAX_BYTES,
    InputFileError,
    check_torch_zip,
    describe_size,
    load_yaml,
    open_regular,
    read_table,
)
from retinafm.files.inputs import expanded_size
from retinafm.models.weights import WeightsError, read_checkpoint

GiB = 2**30


@pytest.fixture(autouse=True)
def _no_hang():
    """A read that blocks (a FIFO opened without O_NONBLOCK) fails the test instead of hanging it."""
    def expired(*_):
        raise TimeoutError("blocked on a read")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)








def _png(path: Path) -> Path:
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


# --------------------------------------------------------------------------- open_regular
@pytest.mark.parametrize("make,kind", [(make_fifo, "a FIFO"), (make_device, "a character device"),
                                       (lambda p: (p.mkdir(), p)[1], "a folder")])
def test_open_regular_refuses_what_is_not_a_regular_file_without_blocking(make, kind, tmp_path):
    path = make(tmp_path / "settings.yaml")
    with pytest.raises(InputFileError) as info, open_regular(path, what="--config", max_bytes=100):
        pass
    assert str(info.value).startswith(f"--config {path}: not a regular file ({kind}")
    assert info.value.reason.startswith(f"not a regular file ({kind}")


def test_open_regular_refuses_files_over_the_limit_before_reading_and_reads_the_rest(tmp_path):
    big = make_sparse(tmp_path / "big.csv")
    with pytest.raises(InputFileError, match=r"file is 12 GiB, over the 1 GiB limit for CSV tables"), \
            open_regular(big, what="--manifest", max_bytes=GiB, kind="CSV tables"):
        pass
    small = tmp_path / "small.csv"
    small.write_text("a\n1\n")
    with open_regular(small, what="--manifest", max_bytes=4) as fh:
        assert fh.read() == b"a\n1\n"
    with pytest.raises(FileNotFoundError), open_regular(tmp_path / "gone", what="x", max_bytes=1):
        pass


def test_sizes_read_as_people_write_them():
    assert describe_size(12 * GiB) == "12 GiB"
    assert describe_size(1536) == "1.5 KiB"
    assert describe_size(CONFIG_MAX_BYTES) == "1 MiB"
    assert describe_size(300) == "300 bytes"


# --------------------------------------------------------------------------- tables
def test_class_names_pandas_calls_missing_stay_text_while_empty_cells_and_numbers_keep_their_meaning(tmp_path):
    table = tmp_path / "m.csv"
    table.write_text("path,label,patient_id,score,split\n"
                     "a.png,None,NA,1.5,train\nb.png,NA,007,NA,train\nc.png,null,,2,val\n"
                     "d.png,N/A,p4,,test\ne.png,nan,p5,3,train\nf.png,,p6,4,train\n")
    frame = read_table(table, what="--manifest")
    assert frame["label"].tolist()[:5] == ["None", "NA", "null", "N/A", "nan"]
    assert pd.isna(frame["label"].iloc[5])  # an empty cell is still missing
    assert frame["patient_id"].tolist()[:2] == ["NA", "007"] and pd.isna(frame["patient_id"].iloc[2])
    assert frame["score"].dtype == float and frame["score"].isna().tolist() == [False, True, False, True, False, False]
    everything = read_table(table, what="--manifest", text=True)
    assert everything["score"].tolist()[:2] == ["1.5", "NA"]


def test_tables_on_fifos_and_devices_are_refused(tmp_path):
    for path in (make_fifo(tmp_path / "fifo.csv"), make_device(tmp_path / "zero.csv")):
        with pytest.raises(InputFileError, match="not a regular file"):
            read_table(path, what="--manifest")


# --------------------------------------------------------------------------- YAML


def test_yaml_alias_bomb_is_measured_without_expanding_and_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    with pytest.raises(InputFileError, match=r"aliases expand to more than 100,000 values"):
        load_yaml(bomb, what="--config")
    node = yaml.compose(bomb.read_text())
    assert expanded_size(node, stop_above=10**12) > 10**9  # 10**9 lols, counted on ~100 nodes


def test_yaml_with_modest_aliases_loads_and_counts_exactly(tmp_path):
    text = "a: &x [1, 2]\nb: *x\n"
    # mapping + key a + [1, 2] (3 nodes) + key b + the same list expanded again (3 nodes)
    assert expanded_size(yaml.compose(text), stop_above=100) == 9
    path = tmp_path / "ok.yaml"
    path.write_text(text)
    assert load_yaml(path, what="--config") == {"a": [1, 2], "b": [1, 2]}


def test_yaml_that_contains_itself_or_nests_without_end_is_refused(tmp_path):
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("epochs: &a [1, *a]\n")
    with pytest.raises(InputFileError, match="refers to itself"):
        load_yaml(cycle, what="--config")
    deep = tmp_path / "deep.yaml"
    deep.write_text("epochs: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(InputFileError, match="nested too deeply"):
        load_yaml(deep, what="--config")


# --------------------------------------------------------------------------- checkpoints
def _torch_bytes(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def test_zip_checkpoint_that_inflates_is_refused_from_its_directory_before_decompressing(tmp_path):
    source = _torch_bytes({"model": {"w": torch.ones(64)}, "retinafm": {}})
    plain = tmp_path / "plain.pth"
    plain.write_bytes(source)
    with open(plain, "rb") as fh:
        check_torch_zip(fh, what="--checkpoint", path=plain)  # torch.save's own files pass
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(_torch_bytes({"w": torch.ones(3)}, _use_new_zipfile_serialization=False))
    with open(legacy, "rb") as fh:
        check_torch_zip(fh, what="--weights", path=legacy)  # not a zip: torch.load decides
    bomb = zip_bomb(source, tmp_path / "bomb.pth", inflated=256 * 2**20)
    with open(bomb, "rb") as fh, pytest.raises(InputFileError) as info:
        check_torch_zip(fh, what="--checkpoint", path=bomb)
    message = str(info.value)
    assert "not a checkpoint torch.save wrote" in message and "inflates from" in message and "to 256 MiB" in message
    assert "archive/data/0" in message
    with pytest.raises(CheckpointError, match="inflates from"):
        open_checkpoint(bomb)
    with pytest.raises(WeightsError, match="inflates from") as weights:
        read_checkpoint(bomb)
    assert "Python objects" not in str(weights.value)




def _checkpoint(tmp_path: Path, weights: dict, class_names: list[str]) -> Path:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": weights, "retinafm": {"format": 2, "kind": "classifier", "class_names": class_names}}, path)
    return path


def test_checkpoints_with_non_finite_weights_are_refused_naming_the_tensors(tmp_path):
    weights = {f"blocks.{i}.w": torch.ones(4) for i in range(8)}
    for i in range(7):
        weights[f"blocks.{i}.w"][0] = float("nan") if i % 2 else float("inf")
    weights["steps"] = torch.tensor([5])  # integers cannot be NaN
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(_checkpoint(tmp_path, weights, ["a", "b"]))
    message = str(info.value)
    assert "7 weight tensor(s) hold NaN or infinite values" in message
    assert "blocks.0.w, blocks.1.w, blocks.2.w, blocks.3.w, blocks.4.w … (+2 more)" in message
    assert "blocks.7.w" not in message


def test_finite_weights_whose_sum_overflows_are_not_taken_for_non_finite_ones():
    from retinafm.models.weights import non_finite_tensors

    weights = {"half": torch.full((100,), 60000.0, dtype=torch.float16),  # sums to inf in fp16, each value finite
               "nan": torch.tensor([1.0, float("nan")]), "infs": torch.tensor([float("inf"), -float("inf")]),
               "fine": torch.ones(3), "ints": torch.tensor([1, 2])}
    assert non_finite_tensors(weights) == ["nan", "infs"]


def test_weights_files_with_non_finite_backbone_tensors_are_refused(tmp_path):
    import timm

    from retinafm.models.weights import load_backbone_weights

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=1)
    state = model.state_dict()
    state["pos_embed"][0, 0, 0] = float("nan")
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"1 weight tensor\(s\) hold NaN or infinite values \(pos_embed\)"):
        load_backbone_weights(model, str(path))


def test_repeated_class_names_are_refused_naming_them(tmp_path):
    path = _checkpoint(tmp_path, {"w": torch.ones(2)}, ["normal", "NA", "normal"])
    with pytest.raises(CheckpointError, match=r"names class\(es\) \['normal'\] more than once"):
        open_checkpoint(path)
    with pytest.raises(CheckpointError, match="more than once"):
        meta_of({"retinafm": {"class_names": ["a", "a"]}})  # exported models' metadata too


def test_a_task_state_with_nan_statistics_is_refused():
    """A regression checkpoint whose target mean is NaN would predict NaN for every image."""
    state = {"class_names": ["age"], "task": "regression", "task_state": {"mean": [float("nan")], "std": [2.0]}}
    with pytest.raises(CheckpointError, match=r"task state holds NaN or infinite values \(task_state.mean\[0\]\)"):
        meta_of({"retinafm": state})
    state["task_state"]["mean"] = [50.0]
    with pytest.raises(TypeError, match="missing 9 required"):  # past the check: the fields left out here
        meta_of({"retinafm": state})


@pytest.mark.parametrize("make", [make_fifo, make_device])
def test_checkpoints_and_weights_that_are_not_regular_files_are_refused(make, tmp_path):
    path = make(tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="not a regular file"):
        open_checkpoint(path)
    with pytest.raises(WeightsError, match="not a regular file"):
        read_checkpoint(path)


def test_safetensors_header_claiming_more_than_the_file_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(WeightsError, match="header claims 1 TiB"):
        read_checkpoint(path)


# --------------------------------------------------------------------------- images
@pytest.mark.parametrize("name,make,reason", [
    ("pipe.png", make_fifo, "not a regular file (a FIFO)"),
    ("zero.png", make_device, "not a regular file (a character device)"),
    ("zero.dcm", make_device, "not a regular file (a character device)"),
    ("huge.png", make_sparse, "file is 12 GiB, over the 1 GiB limit for images"),
    ("huge.jpg", make_sparse, "file is 12 GiB, over the 1 GiB limit for images"),
    ("huge.vol", make_sparse, "file is 12 GiB, over the 4 GiB limit for Heidelberg volumes"),
    ("huge.dcm", make_sparse, "not a valid DICOM file"),  # within the DICOM limit: pydicom reads its header only
])
def test_images_that_cannot_be_read_whole_are_skipped_with_their_reason(name, make, reason, tmp_path):
    path = make(tmp_path / name)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.reason.startswith(reason), info.value.reason


def test_ordinary_images_still_read(tmp_path):
    image = read_image(_png(tmp_path / "a.png"))
    assert tuple(image.shape) == (3, 8, 8) and image[:, 0, 0].tolist() == [10, 20, 30]
    Image.new("RGB", (64, 64), (200, 100, 50)).save(tmp_path / "b.jpg", quality=95)
    assert tuple(read_image(tmp_path / "b.jpg", decode_size=16).shape) == (3, 16, 16)  # the 1/4-scale draft


def test_folder_listing_leaves_out_fifos_and_devices_with_a_warning(tmp_path):
    _png(tmp_path / "good.png")
    make_fifo(tmp_path / "pipe.png")
    make_device(tmp_path / "zero.jpg")
    make_fifo(tmp_path / "notes")  # not named like an image: left out silently, as before
    with pytest.warns(UserWarning) as caught:
        found = list_images(tmp_path)
    assert found == [tmp_path / "good.png"]
    messages = sorted(str(w.message) for w in caught)
    assert messages == [f"skipping {tmp_path / 'pipe.png'}: not a regular file (a FIFO)",
                        f"skipping {tmp_path / 'zero.jpg'}: not a regular file (a character device)"]


@pytest.mark.parametrize("elements,reason", [
    ({"Rows": 60000, "Columns": 60000}, "too large to decode safely (its header claims 60000 x 60000 pixels"),
    ({"NumberOfFrames": 10**9}, "its header claims 1,000,000,000 frames, more than its"),
])
def test_dicom_headers_that_claim_more_than_the_file_holds_are_skipped_before_any_allocation(elements, reason,
                                                                                            tmp_path):
    """A few hundred bytes whose header claims a 3.6 GB frame, or a billion frames (a billion paths
    when every B-scan is listed): a skip with the reason, not a MemoryError."""
    from helpers import write_dicom

    from retinafm.data.dicom import DicomError, dicom_frame_count

    path = write_dicom(tmp_path / "claims.dcm", np.zeros((3, 8, 8), np.uint8), **elements)
    with pytest.raises(DicomError, match=re.escape(reason)):
        dicom_frame_count(path)
    with pytest.raises(ImageReadError, match=re.escape(reason)):
        read_image(path)


def test_an_npy_whose_header_claims_more_rows_than_the_file_holds_is_refused_unallocated(tmp_path):
    from numpy.lib import format as npy

    from retinafm.data.embeddings import read_embeddings
    from retinafm.data.sources import DataSourceError

    with open(tmp_path / "e.npy", "wb") as fh:  # 4 TB claimed, 64 bytes held
        npy.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 1024)})
        fh.write(bytes(64))
    (tmp_path / "e.csv").write_text("path\na.png\n")
    with pytest.raises(DataSourceError, match="is not a readable .npy file"):
        read_embeddings(tmp_path / "e.npy")


@pytest.mark.parametrize("offset", [12, 16, 20], ids=["size_x", "n_bscans", "size_y"])
def test_heidelberg_headers_that_claim_huge_sizes_are_skipped_with_their_reason(offset, tmp_path):
    """A .vol whose header claims 2**31 - 1 A-scans, B-scans or rows (eyepy's format reads them from
    the header): a skip naming the format, not an allocation of that size."""
    import struct

    from helpers import oct_bscans, write_heidelberg_vol

    data = bytearray(write_heidelberg_vol(tmp_path / "good.vol", oct_bscans(3)).read_bytes())
    data[offset:offset + 4] = struct.pack("<I", 2**31 - 1)
    (tmp_path / "claims.vol").write_bytes(bytes(data))
    for address in (tmp_path / "claims.vol", f"{tmp_path / 'claims.vol'}#frame=1"):
        with pytest.raises(ImageReadError, match="not a readable Heidelberg .vol file"):
            read_image(address)
