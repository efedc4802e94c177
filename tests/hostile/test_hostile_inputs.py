"""Hostile inputs through the CLI (issue 19: unbounded reads, bombs, silent garbage, wrong reading).

A generated corpus: devices (symlinks to /dev/zero), FIFOs (os.mkfifo), sparse 12 GiB files, a YAML
alias bomb, a zip-bomb checkpoint, NaN weights, repeated class names, and class names pandas reads as
missing. Every case runs in a child process under a timeout and an address-space limit
(helpers.run_bounded) and must end in one line and exit 2, or in a skip with its reason; never a
hang, a traceback or a MemoryError; and the files the user gave are unchanged. The mechanism
(retinafm.files.inputs) is tested in process in tests/test_inputs.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import (
    Outcome,
    assert_one_line_error,
    billion_laughs,
    fingerprint,
    make_device,
    make_fifo,
    make_sparse,
    run_bounded,
    zip_bomb,
)

TIMEOUT = 90  # a child that blocks on a FIFO fails here instead of hanging the suite
TINY = ["--model", "vit_micro_patch8", "--weights", "none", "--input-size", "32", "--epochs", "1",
        "--warmup-epochs", "0", "--batch-size", "16", "--num-workers", "0", "--device", "cpu", "--bootstrap", "0"]








def folder(path: Path) -> Path:
    path.mkdir()
    return path




def one_line_usage_error(outcome: Outcome, *words: str) -> None:
    """Like assert_one_line_error, for errors click reports while parsing options ('Error: ...')."""
    assert outcome.code == 2, outcome
    assert "Traceback" not in outcome.output and "MemoryError" not in outcome.output, outcome
    errors = [line for line in outcome.output.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1, outcome
    for word in words:
        assert word in errors[0], (word, outcome)


def demo_manifest(demo_data: Path, out: Path, labels: list[str] | None = None) -> Path:
    """The demo images as a manifest; with `labels`, row i of each split gets labels[i % len(labels)]."""
    rows = [(str(p), split, labels[i % len(labels)] if labels else p.parent.name)
            for split in ("train", "val", "test") for i, p in enumerate(sorted((demo_data / split).rglob("*.png")))]
    pd.DataFrame(rows, columns=["path", "split", "label"]).to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def bad_checkpoints(trained_run, tmp_path_factory) -> dict[str, Path]:
    """The trained run's checkpoint made hostile: NaN weights, a class name twice, a zip bomb."""
    root = tmp_path_factory.mktemp("bad_checkpoints")
    best = trained_run / "checkpoint-best.pth"
    state = torch.load(best, map_location="cpu", weights_only=True)
    weights = dict(state["model"])
    names = [k for k, v in weights.items() if v.is_floating_point()][:2]
    for name in names:
        weights[name] = weights[name].clone()
        weights[name].view(-1)[0] = float("nan")
    torch.save({**state, "model": weights}, root / "nan.pth")
    classes = list(state["retinafm"]["class_names"])
    torch.save({**state, "retinafm": {**state["retinafm"], "class_names": [classes[0], *classes[:-1]]}},
               root / "twice.pth")
    return {"nan": root / "nan.pth", "twice": root / "twice.pth", "bomb": zip_bomb(best, root / "bomb.pth"),
            "nan_names": names, "classes": classes}


# --------------------------------------------------------------------------- images: a skip with its reason
def test_manifest_rows_that_are_devices_fifos_or_huge_files_are_skipped_with_their_reason(
        trained_run, demo_data, tmp_path):
    odd = {make_fifo(tmp_path / "pipe.png"): "not a regular file (a FIFO",
           make_device(tmp_path / "zero.png"): "not a regular file (a character device)",
           make_device(tmp_path / "zero.dcm"): "not a regular file (a character device)",
           make_sparse(tmp_path / "huge.jpg"): "file is 12 GiB, over the 1 GiB limit for images",
           make_sparse(tmp_path / "huge.dcm"): "not a valid DICOM file"}
    manifest = demo_manifest(demo_data, tmp_path / "m.csv")
    frame = pd.read_csv(manifest)
    rows = pd.DataFrame([(str(p), "test", "normal") for p in odd], columns=frame.columns)
    pd.concat([frame, rows]).to_csv(manifest, index=False)
    before = fingerprint(manifest, demo_data)
    outcome = run_bounded("evaluate", "--checkpoint", trained_run / "checkpoint-best.pth", "--manifest", manifest,
                          "--out", tmp_path / "ev", "--num-workers", "0", "--device", "cpu", "--bootstrap", "0",
                          timeout=TIMEOUT)
    assert outcome.code == 0 and "Traceback" not in outcome.output, outcome
    skipped = pd.read_csv(tmp_path / "ev" / "skipped.csv")
    reasons = dict(zip(skipped["path"], skipped["reason"], strict=True))
    assert set(reasons) == {str(p) for p in odd}
    for path, reason in odd.items():
        assert reasons[str(path)].startswith(reason), (path, reasons[str(path)])
    assert fingerprint(manifest, demo_data) == before


def test_a_folder_with_a_fifo_a_device_and_a_huge_image_predicts_the_rest(trained_run, demo_data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(demo_data / "test" / "normal", images)
    good = sorted(str(p) for p in images.iterdir())
    make_fifo(images / "pipe.png")
    make_device(images / "zero.jpg")
    make_sparse(images / "huge.png")
    outcome = run_bounded("predict", "--checkpoint", trained_run / "checkpoint-best.pth", "--images", images,
                          "--out", tmp_path / "p.csv", "--num-workers", "0", "--device", "cpu", timeout=TIMEOUT)
    assert outcome.code == 0 and "Traceback" not in outcome.output, outcome
    warnings = [line for line in outcome.output.splitlines() if line.startswith("warning: skipping")]
    assert warnings == [f"warning: skipping {images / 'pipe.png'}: not a regular file (a FIFO)",
                        f"warning: skipping {images / 'zero.jpg'}: not a regular file (a character device)"], outcome
    assert sorted(pd.read_csv(tmp_path / "p.csv")["path"]) == good
    assert pd.read_csv(tmp_path / "p_skipped.csv").to_dict("records") == [
        {"path": str(images / "huge.png"), "reason": "file is 12 GiB, over the 1 GiB limit for images"}]


# --------------------------------------------------------------------------- options: one line, exit 2
def test_manifest_that_is_a_fifo_is_one_line_not_a_hang(tmp_path):
    """(Size limits and devices for tables: tests/test_inputs.py, through the same reader.)"""
    manifest = make_fifo(tmp_path / "m.csv")
    outcome = run_bounded("finetune", *TINY, "--manifest", manifest, "--out", tmp_path / "run", timeout=TIMEOUT)
    assert_one_line_error(outcome, "--manifest", str(manifest), "not a regular file (a FIFO")




@pytest.mark.parametrize("case,words", [
    ("fifo", ["--config", "not a regular file (a FIFO"]),
    ("device", ["--config", "not a regular file (a character device)"]),
    ("folder", ["--config", "is a directory"]),
    ("bomb", ["--config", "aliases expand to more than 100,000 values"]),
])
def test_config_that_is_a_device_fifo_folder_or_alias_bomb_is_one_line(case, words, demo_data, tmp_path):
    config = tmp_path / "settings.yaml"
    if case == "bomb":
        config.write_text(billion_laughs())
    else:
        {"fifo": make_fifo, "device": make_device, "folder": folder}[case](config)
    outcome = run_bounded("finetune", *TINY, "--data-path", demo_data, "--config", config, "--out", tmp_path / "run",
                          timeout=TIMEOUT)
    one_line_usage_error(outcome, *words)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case,words", [
    ("device", ["--checkpoint", "not a regular file (a character device)"]),
    ("bomb", ["--checkpoint", "not a checkpoint torch.save wrote: member", "to 1 GiB"]),
    ("nan", ["2 weight tensor(s) hold NaN or infinite values"]),
    ("twice", ["more than once"]),
])
def test_checkpoints_that_are_devices_bombs_or_garbage_are_one_line(case, words, bad_checkpoints, demo_data,
                                                                     tmp_path):
    checkpoint = make_device(tmp_path / "model.pth") if case == "device" else bad_checkpoints[case]
    outcome = run_bounded("predict", "--checkpoint", checkpoint, "--images", demo_data / "test", "--out",
                          tmp_path / "p.csv", "--num-workers", "0", "--device", "cpu", timeout=TIMEOUT)
    assert_one_line_error(outcome, *words)
    if case == "nan":
        assert all(name in outcome.output for name in bad_checkpoints["nan_names"]), outcome
    if case == "twice":
        assert repr(bad_checkpoints["classes"][0]) in outcome.output, outcome
    if case == "bomb":
        assert "Python objects" not in outcome.output and "pickle" not in outcome.output, outcome
    assert not (tmp_path / "p.csv").exists()


def test_weights_that_are_a_fifo_are_one_line_not_a_hang(demo_data, tmp_path):
    """(The zip bomb as --weights goes through the same check as --checkpoint: tests/test_inputs.py.)"""
    weights = make_fifo(tmp_path / "backbone.pth")
    args = list(TINY)
    args[args.index("none")] = str(weights)
    outcome = run_bounded("finetune", *args, "--data-path", demo_data, "--out", tmp_path / "run", timeout=TIMEOUT)
    assert_one_line_error(outcome, "--weights", str(weights), "not a regular file (a FIFO")


# --------------------------------------------------------------------------- wrong reading
def test_class_names_pandas_reads_as_missing_round_trip_through_finetune_and_predict(demo_data, tmp_path):
    """Grades named None, NA, null and N/A are real names: they reach the checkpoint, and the test
    predictions' label and prediction values and probability columns, exactly as written (read
    back as text: a name pandas turned into a missing value would show as an empty cell)."""
    names = ["None", "NA", "null", "N/A"]
    manifest = demo_manifest(demo_data, tmp_path / "m.csv", names)
    run = tmp_path / "run"
    outcome = run_bounded("finetune", *TINY, "--manifest", manifest, "--out", run, timeout=TIMEOUT)
    assert outcome.code == 0, outcome
    meta = torch.load(run / "checkpoint-best.pth", map_location="cpu", weights_only=True)["retinafm"]
    assert meta["class_names"] == sorted(names)
    frame = pd.read_csv(run / "predictions_test.csv", keep_default_na=False)
    assert [f"prob_{n}" for n in sorted(names)] == [c for c in frame.columns if c.startswith("prob_")]
    test_rows = len(list((demo_data / "test").rglob("*.png")))
    assert sorted(frame["label"]) == sorted(names[i % 4] for i in range(test_rows))
    assert set(frame["prediction"]) <= set(names)
