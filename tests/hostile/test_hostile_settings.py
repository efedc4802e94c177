"""Hostile settings through the CLI (issue 19): values of the wrong type from --config, values out of
bounds (unbounded allocations, overflows), devices this machine lacks, a diverging run, a full disk and
class names matplotlib would read as TeX. Each ends in one `error:` line with exit 2 (no traceback,
bounded memory, under a timeout), or, for the class names, in a finished run with its figures.

The in-process tests at the end pin the mechanisms themselves: settings.base.check_value /
check_bounds / check_ratios, ModelSpec.input_size_for, files.outputs.disk_full_error."""
from __future__ import annotations

import errno
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import Outcome, assert_one_line_error, fingerprint, run_bounded

from retinafm.cli import main

TINY = ["--model", "vit_micro_patch8", "--weights", "none", "--input-size", "32", "--epochs", "1",
        "--warmup-epochs", "0", "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--bootstrap", "0"]


def _finetune(data: Path, out: Path, *extra) -> list:
    return ["finetune", *TINY, "--data-path", data, "--out", out, *extra]


def cli(*args) -> Outcome:
    """The CLI in this process, for refusals made before any work (a child costs ~4 s to import
    torch); what could allocate, hang or crash runs under run_bounded instead."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return Outcome(result.exit_code, result.output)


# --------------------------------------------------------------------------- wrong types from --config
@pytest.mark.parametrize("values,words", [
    ({"epochs": 2.9}, ["--epochs must be a whole number", "2.9"]),
    ({"epochs": True}, ["--epochs must be a whole number", "true"]),
    ({"batch_size": [8, 16]}, ["--batch-size must be a whole number", "list"]),
    ({"lr": "fast"}, ["--lr must be a number", "'fast'"]),
    ({"fundus_crop": "maybe"}, ["--fundus-crop", "true or false"]),
    ({"weights": False}, ["--weights", "quote it"]),  # YAML's `weights: no`
])
def test_config_values_of_the_wrong_type_are_refused(values, words, demo_data, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "run"
    # One case in a bounded child (the whole path, process exit included); the rest in-process.
    run = run_bounded if values == {"epochs": 2.9} else cli
    outcome = run(*_finetune(demo_data, out, "--config", config))
    assert_one_line_error(outcome, *words, f"--config {config}")
    assert not out.exists()  # refused before anything was created


def test_resumed_config_is_type_checked_too(demo_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"epochs": 2.5, "data_path": str(demo_data)}))
    before = fingerprint(run)
    outcome = cli("finetune", "--resume", run)
    assert_one_line_error(outcome, "--epochs must be a whole number", "2.5", "the run --resume continues")
    assert fingerprint(run) == before


# --------------------------------------------------------------------------- bounds before work
@pytest.mark.parametrize("flags,words", [
    (["--input-size", "0"], ["--input-size must be at least 1", "omit it for the model's default"]),
    (["--input-size", "-1"], ["--input-size must be at least 1"]),
    (["--input-size", "100000"], ["--input-size 100000", "patch tokens", "PiB", "limit is 16,384 tokens"]),
    (["--input-size", "4096"], ["--input-size 4096", "262,144 patch tokens", "GiB"]),
    (["--num-workers", "100000"], ["--num-workers must be between 0 and 256"]),
    (["--seed", str(2**70)], ["--seed must be between 0 and 4,294,967,295", "NumPy"]),
    (["--split", "nan,0.5,0.5"], ["--split 'nan,0.5,0.5'", "summing to 1"]),
    (["--bootstrap", "10000000000"], ["--bootstrap must be between 0 and 100,000"]),
    (["--batch-size", "1000000"], ["--batch-size must be between 1 and 4,096"]),
    (["--epochs", "2.9"], ["--epochs must be a whole number", "2.9"]),
    (["--lr", "nan"], ["--lr must be a finite number"]),
])
def test_out_of_bounds_values_are_refused_before_work(flags, words, demo_data, tmp_path):
    out = tmp_path / "run"
    args = _finetune(demo_data, out, *flags)
    if "--split" in flags:  # --split goes with a folder without train/val/test
        args[args.index("--data-path") + 1] = demo_data / "train"
    # The input sizes reach model code: a missing guard there would allocate, so they run bounded.
    outcome = run_bounded(*args, timeout=90) if "--input-size" in flags and int(flags[1]) > 0 else cli(*args)
    assert_one_line_error(outcome, *words)
    assert not any(out.rglob("*.pth")) if out.exists() else True


def test_checkpoint_metadata_input_size_is_bounded_too(trained_run, demo_data, tmp_path):
    """A checkpoint whose metadata says input_size 100000 is refused before a model is built."""
    state = torch.load(trained_run / "checkpoint-best.pth", weights_only=True)
    state["retinafm"]["input_size"] = 100000
    checkpoint = tmp_path / "huge.pth"
    torch.save(state, checkpoint)
    outcome = run_bounded("predict", "--checkpoint", checkpoint, "--images", demo_data / "test",
                          "--out", tmp_path / "p.csv", "--device", "cpu", "--num-workers", "0", timeout=90)
    assert_one_line_error(outcome, str(checkpoint), "input size 100000", "patch tokens")
    assert not (tmp_path / "p.csv").exists()


# --------------------------------------------------------------------------- tracebacks -> one line
@pytest.mark.parametrize("verb,device", [("finetune", "cuda"), ("predict", "mps"), ("embed", "mps"),
                                         ("evaluate", "cuda:0")])
def test_devices_this_machine_lacks_are_one_line(verb, device, trained_run, demo_data, tmp_path):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "out"
    common = ["--device", device, "--num-workers", "0"]
    args = {
        "finetune": [*_finetune(demo_data, out)[:-2], "--out", out, *common],
        "predict": ["predict", "--checkpoint", trained_run / "checkpoint-best.pth", "--images", demo_data / "test",
                    "--out", tmp_path / "p.csv", *common],
        "embed": ["embed", "--checkpoint", trained_run / "checkpoint-best.pth", "--images", demo_data / "test",
                  "--out", tmp_path / "e.npy", *common],
        "evaluate": ["evaluate", "--checkpoint", trained_run / "checkpoint-best.pth", "--data-path", demo_data,
                     "--out", out, *common],
    }[verb]
    if verb == "finetune":
        args[args.index("--device") + 1] = device  # TINY's --device cpu is replaced, not repeated
    outcome = run_bounded(*args, timeout=90) if verb == "finetune" else cli(*args)
    assert_one_line_error(outcome, f"--device {device}" if device.startswith("cuda") else "--device must be")


def test_a_diverging_run_is_one_line_with_advice(demo_data, tmp_path):
    """--lr 1e30: the first AdamW step moves every weight by ~1e30, and the next loss is not finite."""
    outcome = run_bounded(*_finetune(demo_data, tmp_path / "run", "--lr", "1e30", "--precision", "fp32"),
                          timeout=90)
    assert_one_line_error(outcome, "training diverged", "Lower the learning rate", "--clip-grad")


@pytest.fixture
def small_disk(tmp_path):
    """A 384 KiB tmpfs: room for a run's small files, not for its checkpoint (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(mount)], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here ({exc})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(demo_data, small_disk):
    out = small_disk / "run"
    outcome = run_bounded(*_finetune(demo_data, out), timeout=90)
    assert_one_line_error(outcome, "no space left on device writing", str(out / "checkpoint-"), "free on that disk")
    assert "PytorchStreamWriter" not in outcome.output
    assert not [p for p in out.rglob(".*.tmp*")], "the partial file is removed"


def test_class_names_matplotlib_would_read_as_tex(demo_data, tmp_path):
    """Class folders named like mathtext: training finishes with every figure and the report."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    old = sorted(p.name for p in (data / "train").iterdir())
    names = {old[0]: "$\\alpha$", old[1]: "a_b$"}
    for split in ("train", "val", "test"):
        for before, after in names.items():
            (data / split / before).rename(data / split / after)
    out = tmp_path / "run"
    outcome = run_bounded(*_finetune(data, out), timeout=120)
    assert outcome.code == 0, outcome
    assert "Traceback" not in outcome.output and "error" not in outcome.output.lower(), outcome
    assert (out / "report.html").is_file()
    plots = {p.name for p in (out / "plots").glob("*.png")} if (out / "plots").is_dir() else \
        {p.name for p in out.rglob("*.png")}
    assert any("confusion" in p for p in plots) and any("roc" in p for p in plots), plots


# --------------------------------------------------------------------------- the mechanisms, in-process
def test_check_value_is_strict_per_annotation():
    from retinafm.settings import ConfigError, check_value

    assert check_value("--epochs", int, 3.0) == 3 and type(check_value("--epochs", int, 3.0)) is int
    assert check_value("--epochs", int, "7", text=True) == 7
    assert check_value("--lr", float, 1) == 1.0 and check_value("--lr", float | None, None) is None
    for bad in (2.9, True, [1], "3", {"a": 1}, float("inf")):
        with pytest.raises(ConfigError, match="--epochs must be a whole number"):
            check_value("--epochs", int, bad)
    for bad in (True, "0.1", [0.1]):
        with pytest.raises(ConfigError, match="--lr must be a number"):
            check_value("--lr", float, bad)
    with pytest.raises(ConfigError, match=r"--lr must be a finite number, got nan \(from --config c.yaml\)"):
        check_value("--lr", float, float("nan"), "--config c.yaml")
    with pytest.raises(ConfigError, match="--epochs needs a value"):
        check_value("--epochs", int, None)
    assert check_value("--threshold", str, 0.5) == 0.5  # a YAML number where text goes: kept, parsed later


def test_python_callers_get_the_same_strictness():
    from retinafm.settings import ConfigError, EmbedSettings, FinetuneSettings, PredictSettings

    with pytest.raises(ConfigError, match="--epochs must be a whole number, got 2.9"):
        FinetuneSettings(epochs=2.9)
    with pytest.raises(ConfigError, match="--batch-size must be a whole number, got true"):
        PredictSettings(batch_size=True)
    assert FinetuneSettings(epochs=4.0).epochs == 4
    cfg = EmbedSettings(model="vit_micro_patch8", device="mps")
    with pytest.raises(ConfigError, match="--device must be"):
        cfg.validate()


def test_every_numeric_setting_is_type_checked_and_the_big_ones_bounded():
    """Generated: every int field of every settings class refuses 2.9 and true; the fields whose
    size is an allocation or an overflow have an upper bound."""
    import dataclasses

    from retinafm.settings import (
        ConfigError,
        EmbedSettings,
        EvaluateSettings,
        FinetuneSettings,
        PredictSettings,
        PretrainSettings,
        RefineSettings,
        field_types,
        unwrap_optional,
    )

    allocating = {"epochs", "batch_size", "bootstrap", "probe_bootstrap", "num_workers", "seed", "shard_size",
                  "out_dim", "decoder_dim", "embed_dim", "max_length", "accum_iter", "local_crops"}
    for cls in (FinetuneSettings, PretrainSettings, RefineSettings, PredictSettings, EvaluateSettings,
                EmbedSettings):
        for field in dataclasses.fields(cls):
            kind, _ = unwrap_optional(field_types(cls)[field.name])
            if kind is int:
                for bad in (2.9, True):
                    with pytest.raises(ConfigError, match="must be a whole number"):
                        cls(**{field.name: bad})
            if field.name in allocating:
                assert field.metadata.get("bounds", (None, None))[1] is not None, (cls.__name__, field.name)


def test_bounds_messages_and_workers_cap(monkeypatch):
    from retinafm.settings import ConfigError, FinetuneSettings, base, check_ratios, fit_workers

    cfg = FinetuneSettings(out="r", data_path="d", seed=-1)
    with pytest.raises(ConfigError, match="--seed must be between 0 and 4,294,967,295, got -1"):
        cfg.validate()
    for text in ("nan,0.5,0.5", "inf,0,0", "0.5,0.5", "-0.2,0.6,0.6", "0.7,0.2,0.2", "a,b,c"):
        with pytest.raises(ConfigError, match="--split"):
            check_ratios(text)
    assert check_ratios("0.7,0.15,0.15") == (0.7, 0.15, 0.15) and check_ratios(None) is None
    monkeypatch.setattr(base, "available_cpus", lambda: 4)
    cfg = FinetuneSettings(num_workers=200)
    assert fit_workers(cfg) == ["note: --num-workers 200 is more than the 4 CPU(s) this process may use; using 4"]
    assert cfg.num_workers == 4 and fit_workers(cfg) == []


def test_input_size_is_checked_once_for_flags_and_checkpoints():
    from retinafm.models.registry import MAX_TOKENS, create_model, get_spec
    from retinafm.settings import ConfigError

    spec = get_spec("vit_micro_patch8")
    assert spec.input_size_for(None) == spec.input_size and spec.input_size_for(32) == 32
    for bad in (0, -8):
        with pytest.raises(ConfigError, match="at least 1; omit --input-size for the default"):
            spec.input_size_for(bad)
    with pytest.raises(ConfigError, match="multiple of the patch size 8"):
        spec.input_size_for(30)
    largest = int(MAX_TOKENS**0.5) * spec.patch_size
    with pytest.raises(ConfigError, match=f"limit is 16,384 tokens \\({largest} px"):
        spec.input_size_for(largest + spec.patch_size)
    with pytest.warns(UserWarning, match="patch tokens per image"):
        assert spec.input_size_for(largest) == largest
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec.input_size_for(512)  # 4,096 tokens: no warning
    with pytest.raises(ConfigError, match="input size 100000 means"):
        create_model(spec, 2, input_size=100000)  # what a checkpoint's metadata reaches


def test_unusable_devices_are_config_errors():
    from retinafm.runtime.device import resolve_device
    from retinafm.settings import ConfigError

    for name in ("mps", "tpu", "cuda:x"):
        with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda or cuda:N"):
            resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda:1 was asked for but no CUDA GPU is visible"):
            resolve_device("cuda:1")


def test_disk_full_error_recognises_torch_and_os_errors(tmp_path, monkeypatch):
    from retinafm.files import outputs

    tmp = tmp_path / ".x.tmp"
    tmp.write_bytes(b"partial")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda _: usage._replace(free=3 * 2**20))
    error = outputs.disk_full_error(tmp_path / "x.pth", tmp, RuntimeError("PytorchStreamWriter failed writing file"))
    assert error is not None and error.errno == errno.ENOSPC and not tmp.exists()
    assert error.strerror == f"no space left on device writing {tmp_path / 'x.pth'} (3.0 MB free on that disk)"
    assert outputs.disk_full_error(tmp_path / "y", tmp, OSError(errno.ENOSPC, "No space left on device")) is not None
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda _: usage._replace(free=50 * 2**30))
    assert outputs.disk_full_error(tmp_path / "x.pth", tmp, RuntimeError("some other torch failure")) is None
    assert outputs.disk_full_error(tmp_path / "x", tmp, PermissionError(errno.EACCES, "denied")) is None


def test_figures_draw_tex_like_names_as_text(tmp_path):
    import numpy as np

    from retinafm.plots import plot_confusion_matrix, plot_roc

    names = ["$\\alpha$", "a$b$", "\\frac", "a_b$"]
    rng = np.random.default_rng(0)
    y = np.arange(40) % 4
    probs = rng.dirichlet(np.ones(4), size=40)
    assert plot_confusion_matrix(np.eye(4, dtype=int) * 3, names, tmp_path / "cm.png").stat().st_size > 0
    assert plot_roc(y, probs, names, tmp_path / "roc.png").stat().st_size > 0
