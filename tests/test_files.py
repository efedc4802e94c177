from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from retinafm.files import (
    OutputExistsError,
    OutputPathError,
    atomic_path,
    claim_file,
    prepare_output_dir,
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
    with pytest.raises(OutputExistsError, match="--overwrite"), claim_file(run / "log.csv"):
        pass


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


# --------------------------------------------------------------------------- claims
def test_a_file_claim_refuses_its_inputs_and_existing_side_files(tmp_path):
    from retinafm.files import claim_file

    manifest = tmp_path / "labels.csv"
    manifest.write_text("path\n")
    with pytest.raises(OutputPathError, match=r"--out would overwrite --images .*labels.csv \(it would write"):
        with claim_file(tmp_path / "labels.npy", side_files=[manifest], inputs=[("--images", manifest)]):
            pass
    (tmp_path / "p_skipped.csv").write_text("old")
    with pytest.raises(OutputExistsError, match=r"its p_skipped.csv, from an earlier run\) already exists"):
        with claim_file(tmp_path / "p.csv", side_files=[tmp_path / "p_skipped.csv"]):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv", "p_skipped.csv"]  # no lock file left


def test_overwrite_removes_only_the_side_files_this_run_did_not_write_again(tmp_path):
    from retinafm.files import claim_file

    out, skipped, volumes = tmp_path / "p.csv", tmp_path / "p_skipped.csv", tmp_path / "p_volumes.csv"
    for path in (out, skipped, volumes):
        path.write_text("earlier run")
    with claim_file(out, side_files=[skipped, volumes], overwrite=True) as claim:
        write_text(out, "new")
        write_text(volumes, "new")
        assert claim.remove_stale([out, volumes]) == [skipped]
    assert out.read_text() == volumes.read_text() == "new" and not skipped.exists()


def test_a_folder_claim_refuses_a_folder_inside_an_input_folder(tmp_path):
    from retinafm.files import claim_dir

    data = tmp_path / "data"
    (data / "train" / "amd").mkdir(parents=True)
    with pytest.raises(OutputPathError, match=r"--out .*run is inside --data-path .*data; a run folder there"):
        with claim_dir(data / "train" / "amd" / "run", inputs=[("--data-path", data)]):
            pass
    assert not (data / "train" / "amd" / "run").exists()


def test_a_failed_fresh_run_removes_its_folder_but_one_with_a_checkpoint_stays(tmp_path):
    from retinafm.files import claim_dir

    for with_checkpoint in (False, True):
        run = tmp_path / f"run{with_checkpoint}"
        with pytest.raises(ValueError, match="bad data"):
            with claim_dir(run):
                write_text(run / "config.yaml", "x")
                if with_checkpoint:
                    write_text(run / "checkpoint-last.pth", "x")
                raise ValueError("bad data")
        assert run.exists() == with_checkpoint


def test_an_overwritten_run_folder_loses_the_earlier_runs_files_and_keeps_the_users(tmp_path):
    from retinafm.files import claim_dir

    run = tmp_path / "run"
    for name in ("skipped.csv", "plots/roc.png", "checkpoint-best.pth", "notes.txt", "mine/data.csv"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    with claim_dir(run, overwrite=True):
        left = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and "lock" not in p.name)
    assert left == ["mine/data.csv", "notes.txt"]


# --------------------------------------------------------------------------- spreadsheet cells
def test_every_text_cell_round_trips_and_none_starts_a_formula(tmp_path):
    """Property-style: random strings made of the characters that matter, through write_csv and back."""
    from retinafm.files.cells import restore_frame

    rng = __import__("random").Random(0)
    alphabet = "=+-@'\t ab1.;()\"/"
    labels = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))).strip() or "x" for _ in range(400)]
    labels = [v for v in labels if not v.startswith(("'", "\t"))]  # a user's leading apostrophe is the one loss
    frame = pd.DataFrame({"path": [f"{v}.png" for v in labels], "label": labels, "score": range(len(labels))})
    write_csv(tmp_path / "t.csv", frame)
    raw = pd.read_csv(tmp_path / "t.csv", dtype=str, keep_default_na=False)
    for column in ("path", "label"):
        for cell in raw[column]:
            risky = cell[:1] in ("=", "+", "-", "@")
            assert not risky or _is_number(cell), cell
    back = restore_frame(pd.read_csv(tmp_path / "t.csv", dtype={"path": str, "label": str}, keep_default_na=False))
    assert back["label"].tolist() == labels
    assert [os.path.normpath(p) for p in back["path"]] == [os.path.normpath(p) for p in frame["path"]]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_an_output_that_is_a_device_or_fifo_is_refused_even_with_overwrite(tmp_path):
    from retinafm.files import claim_file

    os.mkfifo(tmp_path / "pipe.csv")
    for out in (tmp_path / "pipe.csv", "/dev/null"):
        with pytest.raises(OutputPathError, match="is not a regular file; give the path of a file to write"):
            with claim_file(out, overwrite=True):
                pass
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
