"""Hostile corpus, outputs: what a command writes never destroys what the user gave or an earlier run
wrote, unless --overwrite says so. Every case runs the CLI in a child process (timeout, address-space
limit: tests/helpers.run_bounded) and ends in exit 0 with the promised files, or exit 2 with one line."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_line_error, fingerprint, run_bounded
from PIL import Image

TINY = ["--model", "vit_micro_patch8", "--weights", "none", "--input-size", "32", "--epochs", "1",
        "--warmup-epochs", "0", "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--bootstrap", "0"]
RUN = ["--num-workers", "0", "--device", "cpu"]


@pytest.fixture()
def images(demo_data, tmp_path) -> Path:
    """Six test images and one file that is not an image (so a skip list is written)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((demo_data / "test").rglob("*.png"))[:6]:
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    (folder / "notes.png").write_text("not a picture")
    return folder


def _manifest(demo_data: Path, path: Path) -> Path:
    rows = [(str(p), split, p.parent.name) for split in ("train", "val", "test")
            for p in sorted((demo_data / split).rglob("*.png"))]
    pd.DataFrame(rows, columns=["path", "split", "label"]).to_csv(path, index=False)
    return path


def test_embed_never_writes_over_the_manifest_it_reads(demo_data, trained_run, tmp_path):
    manifest = _manifest(demo_data, tmp_path / "labels.csv")
    before = fingerprint(manifest)
    outcome = run_bounded("embed", "--images", manifest, "--out", tmp_path / "labels.npy",
                          "--checkpoint", trained_run / "checkpoint-best.pth", *RUN)
    assert_one_line_error(outcome, "would overwrite --images", "labels.csv")
    assert fingerprint(manifest) == before and not (tmp_path / "labels.npy").exists()


def test_predict_side_files_are_named_after_the_output_and_never_replaced(trained_run, images, tmp_path):
    checkpoint = trained_run / "checkpoint-best.pth"
    first = run_bounded("predict", "--checkpoint", checkpoint, "--images", images, "--out", tmp_path / "a.csv", *RUN)
    assert first.code == 0, first
    assert pd.read_csv(tmp_path / "a_skipped.csv")["path"].tolist() == [str(images / "notes.png")]
    # A second predict into the same folder keeps its own skip list; the first run's is untouched.
    earlier = fingerprint(tmp_path / "a.csv", tmp_path / "a_skipped.csv")
    second = run_bounded("predict", "--checkpoint", checkpoint, "--images", images, "--out", tmp_path / "b.csv", *RUN)
    assert second.code == 0, second
    assert (tmp_path / "b_skipped.csv").is_file()
    assert fingerprint(tmp_path / "a.csv", tmp_path / "a_skipped.csv") == earlier
    # An output named like a side file of the earlier run is that file: refused.
    third = run_bounded("predict", "--checkpoint", checkpoint, "--images", images, "--out",
                        tmp_path / "a_skipped.csv", *RUN)
    assert_one_line_error(third, "a_skipped.csv", "already exists", "--overwrite")
    # A side file that exists on its own (here, somebody's volumes table) blocks the run too, named.
    (tmp_path / "c_volumes.csv").write_text("mine\n")
    fourth = run_bounded("predict", "--checkpoint", checkpoint, "--images", images, "--out", tmp_path / "c.csv", *RUN)
    assert_one_line_error(fourth, "c_volumes.csv", "from an earlier run", "--overwrite")
    assert (tmp_path / "c_volumes.csv").read_text() == "mine\n" and not (tmp_path / "c.csv").exists()
    assert fingerprint(tmp_path / "a.csv", tmp_path / "a_skipped.csv") == earlier


def test_overwrite_removes_the_earlier_runs_stale_skip_list(trained_run, images, tmp_path):
    checkpoint = trained_run / "checkpoint-best.pth"
    assert run_bounded("predict", "--checkpoint", checkpoint, "--images", images, "--out", tmp_path / "p.csv",
                       *RUN).code == 0
    assert (tmp_path / "p_skipped.csv").is_file()
    (images / "notes.png").unlink()
    again = run_bounded("predict", "--checkpoint", checkpoint, "--images", images, "--out", tmp_path / "p.csv",
                        "--overwrite", *RUN)
    assert again.code == 0, again
    assert len(pd.read_csv(tmp_path / "p.csv")) == 6 and not (tmp_path / "p_skipped.csv").exists()


def test_evaluate_overwrite_leaves_no_stale_skip_list_for_its_report(trained_run, demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    (data / "test" / "glaucoma" / "broken.png").write_text("not a picture")
    args = ["evaluate", "--checkpoint", trained_run / "checkpoint-best.pth", "--data-path", data,
            "--out", tmp_path / "ev", "--bootstrap", "0", *RUN]
    assert run_bounded(*args).code == 0
    assert (tmp_path / "ev" / "skipped.csv").is_file()
    (tmp_path / "ev" / "my_notes.txt").write_text("kept")
    (data / "test" / "glaucoma" / "broken.png").unlink()
    again = run_bounded(*args, "--overwrite")
    assert again.code == 0, again
    assert not (tmp_path / "ev" / "skipped.csv").exists()
    assert "No unreadable files were skipped" in (tmp_path / "ev" / "report.html").read_text()
    assert (tmp_path / "ev" / "my_notes.txt").read_text() == "kept"  # not a file retinafm writes


@pytest.mark.parametrize("where", ["data_root", "class_folder"])
def test_a_run_folder_inside_the_data_is_refused_and_the_data_left_alone(demo_data, tmp_path, where):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    before = fingerprint(data)
    folders = sorted(str(p) for p in data.rglob("*") if p.is_dir())
    out = data / "run" if where == "data_root" else data / "train" / "glaucoma" / "run"
    outcome = run_bounded("finetune", *TINY, "--data-path", data, "--out", out)
    assert_one_line_error(outcome, "is inside --data-path", "Choose an --out outside it")
    assert fingerprint(data) == before and sorted(str(p) for p in data.rglob("*") if p.is_dir()) == folders


def test_pretrain_refuses_an_out_inside_its_images(demo_data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(demo_data / "train", images)
    outcome = run_bounded("pretrain", "--images", images, "--out", images / "mae", "--model", "vit_micro_patch8",
                          "--input-size", "32", "--epochs", "1", "--batch-size", "8", "--num-workers", "0",
                          "--device", "cpu")
    assert_one_line_error(outcome, "is inside --images")
    assert not (images / "mae").exists()


def test_a_run_that_fails_its_checks_leaves_no_folder_that_blocks_the_rerun(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    shutil.rmtree(data / "val")  # no validation split: refused after the run folder was claimed
    out = tmp_path / "run"
    outcome = run_bounded("finetune", *TINY, "--data-path", data, "--out", out)
    assert_one_line_error(outcome, "no validation images")
    assert not out.exists()
    # With a folder the user made beforehand (empty), the folder stays and is empty again.
    out.mkdir()
    outcome = run_bounded("finetune", *TINY, "--data-path", data, "--out", out)
    assert_one_line_error(outcome, "no validation images")
    assert out.is_dir() and not any(out.iterdir())


def test_a_failed_overwrite_of_a_finished_run_keeps_the_users_own_files(trained_run, demo_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "notes.txt").write_text("mine")
    outcome = run_bounded("finetune", *TINY, "--data-path", tmp_path / "missing", "--out", run, "--overwrite")
    assert outcome.code == 2, outcome
    assert (run / "notes.txt").read_text() == "mine"


def test_csv_cells_cannot_run_as_spreadsheet_formulas(trained_run, tmp_path):
    """File names a spreadsheet would execute are written so that it shows them as text, and pandas
    still reads each path as the same file."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = ["=HYPERLINK(\"x\";\"y\").png", "+cmd.png", "-2+3.png", "@SUM(A1).png", "plain.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / name)
    outcome = run_bounded("predict", "--checkpoint", trained_run / "checkpoint-best.pth", "--images", ".",
                          "--out", tmp_path / "p.csv", *RUN, cwd=folder)
    assert outcome.code == 0, outcome
    text = (tmp_path / "p.csv").read_text().splitlines()
    cells = [cell.strip('"') for line in text for cell in line.split(",")]
    assert not [c for c in cells if c[:1] in ("=", "+", "@") or (c[:1] == "-" and not _number(c))]
    frame = pd.read_csv(tmp_path / "p.csv")
    assert sorted(Path(p).name for p in frame["path"]) == sorted(names)
    assert all((folder / p).is_file() for p in frame["path"])  # the same files, relative to --images' folder


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("verb", ["predict", "embed", "export"])
def test_a_model_whose_outputs_overflow_writes_nothing(verb, trained_run, demo_data, tmp_path):
    """Finite weights (so the load check passes) that overflow to inf in the forward pass: nothing is
    written, rather than NaN probabilities, the first class as the prediction or NaN embeddings."""
    import torch

    state = torch.load(trained_run / "checkpoint-best.pth", weights_only=True)
    state["model"]["fc_norm.weight"].fill_(3e38)  # the largest fp32 values: the pooled features become inf
    torch.save(state, tmp_path / "overflow.pth")
    out = tmp_path / {"predict": "p.csv", "embed": "e.parquet", "export": "m.onnx"}[verb]
    args = {"predict": ["--images", demo_data / "test" / "glaucoma", *RUN],
            "embed": ["--images", demo_data / "test" / "glaucoma", *RUN], "export": []}[verb]
    outcome = run_bounded(verb, "--checkpoint", tmp_path / "overflow.pth", "--out", out, *args)
    assert_one_line_error(outcome, "NaN or infinite outputs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overflow.pth"]


def test_overwrite_never_deletes_what_the_command_reads(trained_run, demo_data, tmp_path):
    """evaluate into the folder of the training run whose checkpoint it evaluates, with --overwrite: the
    evaluation files are replaced; the checkpoint it reads, and the training run's other files (not
    evaluate's to remove), stay."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    kept = fingerprint(run / "checkpoint-best.pth", run / "checkpoint-last.pth", run / "log.csv",
                       run / "config.yaml")
    old_metrics = (run / "metrics_test.json").read_text()
    outcome = run_bounded("evaluate", "--checkpoint", run / "checkpoint-best.pth", "--data-path", demo_data,
                          "--out", run, "--overwrite", "--bootstrap", "0", *RUN)
    assert outcome.code == 0, outcome
    assert fingerprint(*(Path(p) for p in kept)) == kept
    assert (run / "metrics_test.json").read_text() != old_metrics  # this evaluation's (no bootstrap CIs now)
    assert (run / "report.html").is_file()


def test_predictions_are_never_written_under_an_images_name(trained_run, images, tmp_path):
    before = fingerprint(images)
    outcome = run_bounded("predict", "--checkpoint", trained_run / "checkpoint-best.pth", "--images", images,
                          "--out", sorted(images.glob("*.png"))[0], "--overwrite", *RUN)
    assert_one_line_error(outcome, "the predictions are a CSV table")
    assert fingerprint(images) == before
