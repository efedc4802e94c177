from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from retinafm.files import (
    OutputExistsError,
    OutputPathError,
    atomic_path,
    prepare_output_dir,
    refuse_existing_file,
    write_csv,
    write_json,
    write_text,
)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"auroc": 0.9})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"auroc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_write_csv(tmp_path):
    write_csv(tmp_path / "a" / "b.csv", pd.DataFrame({"x": [1, 2]}))
    assert pd.read_csv(tmp_path / "a" / "b.csv")["x"].tolist() == [1, 2]


def test_existing_run_is_never_silently_overwritten(tmp_path):
    run = tmp_path / "run"
    prepare_output_dir(run)
    (run / "log.csv").write_text("x")
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite"):
        prepare_output_dir(run)
    assert prepare_output_dir(run, resume=True) == run
    assert prepare_output_dir(run, overwrite=True) == run
    with pytest.raises(OutputExistsError, match="is a file"):
        prepare_output_dir(run / "log.csv")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        refuse_existing_file(run / "log.csv", overwrite=False)


def test_unusable_output_folders(tmp_path):
    import os

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="cannot create output folder"):
        prepare_output_dir(tmp_path / "file" / "run")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root can write anywhere; others get the permission message
            with pytest.raises(PermissionError, match="not writable|cannot create"):
                prepare_output_dir(ro / "run")
    finally:
        ro.chmod(0o700)


def test_outputs_follow_the_umask_like_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
