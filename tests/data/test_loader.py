from __future__ import annotations

import numpy as np
from PIL import Image

from retinafm.data.loader import ImageDataset, SkipLog, collate_skipping, make_loader
from retinafm.data.transforms import eval_transform


def test_unreadable_files_are_skipped_with_reasons(tmp_path):
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((16, 16, 3), i * 40, np.uint8)).save(p)
        paths.append(str(p))
    (tmp_path / "2.png").write_bytes(b"garbage")
    paths.append(str(tmp_path / "missing.png"))
    ds = ImageDataset(paths, [0, 1, 0, 1, 0, 1], eval_transform(8, (0, 0, 0), (1, 1, 1)))
    log = SkipLog()
    seen = []
    for batch in make_loader(ds, batch_size=4, num_workers=2):
        log.add(batch.skipped)
        seen += batch.indices.tolist()
        assert batch.images.shape[1:] == (3, 8, 8) and len(batch.targets) == len(batch.indices)
    assert sorted(seen) == [0, 1, 3, 4]
    frame = log.frame()
    assert list(frame.columns) == ["path", "reason"]
    assert dict(zip(frame["path"], frame["reason"], strict=True)) == {
        str(tmp_path / "2.png"): "not a recognised image format", str(tmp_path / "missing.png"): "file not found"}
    log.add([(str(tmp_path / "2.png"), "again")])
    assert len(log) == 2  # each file once


def test_all_skipped_batch_is_empty():
    batch = collate_skipping([(None, ("a", "bad"), 0)])
    assert batch.images.numel() == 0 and batch.skipped == [("a", "bad")]
