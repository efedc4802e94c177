"""Volumes: frame addresses, --oct-frames, Heidelberg .vol (eyepy), multi-page TIFF, and
volumes in labelled folders (labels and splits inherited, one volume never in two splits)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    oct_bscans,
    write_dicom,
    write_heidelberg_vol,
    write_multipage_tiff,
)

from retinafm.data.io import ImageReadError, read_image
from retinafm.data.sources import load_labelled
from retinafm.data.volumes import (
    expand_frames,
    frame_count,
    select_frames,
    split_address,
)
from retinafm.settings import ConfigError, parse_oct_frames


def test_addresses_and_frame_selection(tmp_path):
    assert split_address("/a/b.dcm#frame=12") == ("/a/b.dcm", 12, False)
    assert split_address("/a/b.vol#slo") == ("/a/b.vol", None, True)
    assert split_address("/a/plain.png") == ("/a/plain.png", None, False)
    odd = tmp_path / "scan#frame=2"  # a real file named like an address is that file
    odd.write_bytes(b"x")
    assert split_address(str(odd)) == (str(odd), None, False)
    assert select_frames(49, "middle") == [24]
    assert select_frames(49, "all") == list(range(49))
    assert select_frames(49, 5) == [0, 12, 24, 36, 48]
    assert select_frames(3, "10") == [0, 1, 2]
    assert select_frames(1, "all") == [0]
    assert parse_oct_frames(" ALL ") == "all" and parse_oct_frames("7") == 7
    for bad in ("some", "0", -2):
        with pytest.raises(ConfigError, match="--oct-frames"):
            parse_oct_frames(bad)


def test_heidelberg_vol_bscans_and_slo(tmp_path):
    scans = oct_bscans(5, seed=1)
    slo = np.tile(np.linspace(0, 255, 96).astype(np.uint8), (96, 1))
    path = write_heidelberg_vol(tmp_path / "eye.vol", scans, slo)
    assert frame_count(path) == 5
    for k in (0, 4):
        got = read_image(f"{path}#frame={k}")[0].numpy().astype(int)
        assert got.shape == scans[k].shape
        assert np.corrcoef(got.ravel(), scans[k].ravel())[0, 1] > 0.99  # the .vol stores reflectivity, not gray
    np.testing.assert_array_equal(read_image(f"{path}#slo")[0].numpy(), slo)
    with pytest.raises(ImageReadError, match=r"has 5 B-scan\(s\); frame 5 does not exist"):
        read_image(f"{path}#frame=5")
    (tmp_path / "broken.vol").write_bytes(b"HSF-OCT-103" + b"\0" * 40)
    with pytest.raises(ImageReadError, match="not a readable Heidelberg .vol file"):
        read_image(tmp_path / "broken.vol")


def test_multipage_tiff_pages(tmp_path):
    scans = oct_bscans(4, seed=2)
    path = write_multipage_tiff(tmp_path / "stack.tif", scans)
    assert frame_count(path) == 4
    np.testing.assert_array_equal(read_image(f"{path}#frame=2")[0].numpy(), scans[2])
    with pytest.raises(ImageReadError, match=r"has 4 page\(s\)"):
        read_image(f"{path}#frame=4")
    png = tmp_path / "one.png"
    from PIL import Image

    Image.fromarray(scans[0]).save(png)
    with pytest.raises(ImageReadError, match="holds a single image"):
        read_image(f"{png}#frame=1")


def test_expand_keeps_order_and_explicit_frames(tmp_path):
    dcm = write_dicom(tmp_path / "a.dcm", oct_bscans(6))
    vol = write_heidelberg_vol(tmp_path / "b.vol", oct_bscans(3))
    photo = write_dicom(tmp_path / "c.dcm", oct_bscans(1)[0])
    paths = [str(dcm), str(vol), f"{dcm}#frame=1", str(photo)]
    assert [a for a, _ in expand_frames(paths, "middle")] == [f"{dcm}#frame=3", f"{vol}#frame=1", f"{dcm}#frame=1",
                                                              str(photo)]
    expanded = expand_frames(paths, "all")
    assert len(expanded) == 6 + 3 + 1 + 1 and expanded[0] == (f"{dcm}#frame=0", str(dcm))


def test_volumes_in_a_labelled_folder_inherit_label_and_split(tmp_path):
    root = tmp_path / "data"
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        for label, bright in (("amd", 1.0), ("normal", 0.4)):
            for i in range(count):
                write_dicom(root / split / label / f"{split}{i}.dcm", oct_bscans(5, seed=i, bright=bright))
    data = load_labelled(str(root), oct_frames="all")
    assert len(data.samples) == 2 * (4 + 2 + 2) * 5
    by_file: dict[str, set] = {}
    for s in data.samples:
        file, frame, _ = split_address(s.path)
        assert frame is not None
        by_file.setdefault(file, set()).add((s.split, data.class_names[s.label]))
    assert all(len(v) == 1 for v in by_file.values())  # every B-scan of a volume: one split, one label
    assert len(load_labelled(str(root)).samples) == 16  # default: the middle B-scan of each
