"""Hostile corpus, races: two commands started together into one output. One of them claims it (an
exclusive lock taken before any work); the other stops with one line, and what is left is one run's
files, never a mix. Plus the lock's own guarantees, in-process: a stale lock file left by a killed run
does not block, and the lock is gone when a run ends."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import BOUNDED_MEMORY, Outcome

from retinafm.files import OutputInUseError, claim_dir, claim_file

TINY = ["--model", "vit_micro_patch8", "--weights", "none", "--input-size", "32", "--epochs", "1",
        "--warmup-epochs", "0", "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--bootstrap", "0"]


def _start(*args) -> subprocess.Popen:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (BOUNDED_MEMORY, BOUNDED_MEMORY))

    return subprocess.Popen([sys.executable, "-m", "retinafm", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=limit,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "RETINAFM_DEBUG": ""})


def _together(*commands: list) -> list[Outcome]:
    procs = [_start(*command) for command in commands]
    outcomes = []
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        outcomes.append(Outcome(proc.returncode, output))
    return outcomes


def _one_won(outcomes: list[Outcome]) -> int:
    """The index of the one run that succeeded; the other ended in one line: in use, or already there."""
    codes = [o.code for o in outcomes]
    assert sorted(codes) == [0, 2], [str(o) for o in outcomes]
    loser = outcomes[codes.index(2)]
    assert "Traceback" not in loser.output
    assert "is in use by another retinafm run" in loser.output or "already exists" in loser.output, loser
    return codes.index(0)


def test_two_finetunes_into_one_folder(demo_data, tmp_path):
    out = tmp_path / "run"
    outcomes = _together(["finetune", *TINY, "--data-path", demo_data, "--out", out, "--seed", "1"],
                         ["finetune", *TINY, "--data-path", demo_data, "--out", out, "--seed", "2"])
    winner = _one_won(outcomes)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["seed"] == winner + 1  # the folder holds the winner's run, settings and checkpoints alike
    assert not (out / ".retinafm.lock").exists()


def test_two_predicts_into_one_file(trained_run, demo_data, tmp_path):
    out = tmp_path / "p.csv"
    checkpoint = trained_run / "checkpoint-best.pth"
    folders = [demo_data / "test" / "glaucoma", demo_data / "test"]
    outcomes = _together(*[["predict", "--checkpoint", checkpoint, "--images", folder, "--out", out,
                            "--num-workers", "0", "--device", "cpu"] for folder in folders])
    winner = _one_won(outcomes)
    expected = len(list(folders[winner].rglob("*.png")))
    assert len(pd.read_csv(out)) == expected
    assert not (tmp_path / ".p.csv.lock").exists()


def test_a_held_output_is_refused_and_released_after(tmp_path):
    out = tmp_path / "p.csv"
    with claim_file(out):
        with pytest.raises(OutputInUseError, match=rf"--out {out} is in use by another retinafm run \(process "
                                                   rf"{os.getpid()}"):
            with claim_file(out):
                pass
    with claim_file(out):  # released: claimable again
        out.write_text("x")
    assert not out.with_name(".p.csv.lock").exists()


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".retinafm.lock").write_text("12345 2026-01-01 00:00:00\n")  # its process is gone: no flock on it
    with claim_dir(run) as claim:
        assert claim.fresh  # the lock file is not a run's output
        (run / "log.csv").write_text("epoch\n")
    assert not (run / ".retinafm.lock").exists()


def test_a_claimed_folder_is_held_against_another_process(tmp_path):
    run = tmp_path / "run"
    with claim_dir(run):
        code = ("import sys\nfrom retinafm.files import claim_dir\n"
                f"try:\n    claim_dir({str(run)!r}).__enter__()\n"
                "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert child.stdout.startswith("OutputInUseError") and "is in use by another retinafm run" in child.stdout
    assert not Path(run / ".retinafm.lock").exists()
