"""GET /api/models and the model cache: what is listed from --runs (and what is not), the metrics shown,
discovery cached by mtime, the loaded models' LRU and their per-model lock."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import helpers
import pandas as pd
import pytest
import torch
from fastapi import HTTPException
from fastapi.testclient import TestClient

from retinafm.engine.checkpoint import write_checkpoint
from retinafm.models.registry import get_spec
from retinafm.serve import models_api
from retinafm.serve.app import create_app
from retinafm.serve.config import ServeConfig
from retinafm.serve.models_api import ModelCache

CLASSES = ["normal", "glaucoma", "amd"]
SIZE = 32


def tiny_checkpoint(path: Path, task: str = "multiclass", names: list[str] = CLASSES, **meta) -> Path:
    """A vit_micro_patch8 checkpoint written in a second (tests/helpers.py)."""
    return helpers.tiny_checkpoint(path, names, task, SIZE, **meta)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """--runs with: a finished run (checkpoint, test metrics, log), a run without metrics, a pretraining
    checkpoint, a damaged file, a hidden folder, and symlinks pointing out of it."""
    base = tmp_path_factory.mktemp("models_api")
    root = base / "runs"
    tiny_checkpoint(root / "fundus" / "checkpoint-best.pth", epoch=2,
                    metrics={"auroc_macro": 0.81, "accuracy": 0.7, "n": 8, "auroc_normal": float("nan")})
    (root / "fundus" / "metrics_test.json").write_text(json.dumps(
        {"split": "test", "loss": 0.5, "auroc_macro": 0.77, "accuracy": 0.6, "balanced_accuracy": float("nan"),
         "ci": {"auroc_macro": [0.6, 0.9]}, "task": {"name": "multiclass", "outputs": CLASSES}}))
    pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [1.0, 0.9, 0.8], "val_loss": [1.1, 1.0, 0.95],
                  "val_auroc_macro": [0.5, 0.6, 0.7]}).to_csv(root / "fundus" / "log.csv", index=False)
    tiny_checkpoint(root / "nested" / "deeper" / "run" / "checkpoint-best.pth", epoch=1)
    pd.DataFrame({"epoch": [0, 1], "val_loss": [1.0, 0.9], "val_auroc_macro": [0.55, 0.66]}).to_csv(
        root / "nested" / "deeper" / "run" / "log.csv", index=False)
    tiny_checkpoint(root / "scores" / "checkpoint-best.pth", task="regression", names=["cdr", "count"],
                    task_state={"mean": [0.4, 2.0], "std": [0.1, 1.5]})
    write_checkpoint(root / "pretrain" / "checkpoint-last.pth", {"w": torch.zeros(2)}, "pretrain",
                     {"model_name": "vit_micro_patch8"})
    (root / "broken").mkdir()
    (root / "broken" / "checkpoint-best.pth").write_bytes(b"PK\x03\x04 not really a zip")
    (root / "broken" / "notes.txt").write_text("not a model")
    tiny_checkpoint(root / ".jobs" / "job1" / "checkpoint-best.pth")
    outside = base / "outside"
    tiny_checkpoint(outside / "secret-run" / "checkpoint-best.pth")
    (root / "link-out.pth").symlink_to(outside / "secret-run" / "checkpoint-best.pth")
    (root / "linked-folder").symlink_to(outside / "secret-run", target_is_directory=True)
    (root / "link-in.pth").symlink_to(root / "fundus" / "checkpoint-best.pth")
    return root


def client(runs: Path, **limits) -> TestClient:
    return TestClient(create_app(ServeConfig(runs=runs, **limits)), base_url="http://127.0.0.1:8000")


def test_models_lists_classifiers_with_their_metrics(runs):
    with client(runs) as http:
        answer = http.get("/api/models")
    assert answer.status_code == 200
    body = answer.json()
    models = {m["id"]: m for m in body["models"]}
    assert set(models) == {"fundus/checkpoint-best.pth", "nested/deeper/run/checkpoint-best.pth",
                           "scores/checkpoint-best.pth", "link-in.pth"}
    fundus = models["fundus/checkpoint-best.pth"]
    assert fundus["path"] == fundus["id"]
    assert (fundus["kind"], fundus["task"], fundus["outputs"], fundus["model"], fundus["input_size"], fundus["run"]) \
        == ("classifier", "multiclass", CLASSES, "vit_micro_patch8", SIZE, "fundus")
    assert fundus["arch"] == get_spec("vit_micro_patch8").arch
    # The checkpoint's own validation metrics and the run's test metrics: the task's headline ones,
    # NaN as null (JSON has no NaN), no CIs / task blocks / counts.
    assert fundus["metrics"]["val"] == {"auroc_macro": 0.81, "accuracy": 0.7}
    assert fundus["metrics"]["test"] == {"auroc_macro": 0.77, "accuracy": 0.6, "balanced_accuracy": None}
    assert fundus["epoch"] == 2 and fundus["modified"].endswith("+00:00")
    # No metrics in the checkpoint: its epoch's row of log.csv.
    assert models["nested/deeper/run/checkpoint-best.pth"]["metrics"] == {"val": {"auroc_macro": 0.66}, "test": {}}
    assert models["nested/deeper/run/checkpoint-best.pth"]["run"] == "nested/deeper/run"
    assert models["scores/checkpoint-best.pth"]["task"] == "regression"
    assert models["link-in.pth"]["run"] == "."
    skipped = {s["path"]: s["reason"] for s in body["skipped"]}
    assert set(skipped) == {"pretrain/checkpoint-last.pth", "broken/checkpoint-best.pth"}
    assert "pretrain checkpoint" in skipped["pretrain/checkpoint-last.pth"]
    text = answer.text
    assert "secret-run" not in text and ".jobs" not in text and "link-out" not in text  # never listed
    assert str(runs) not in text  # ids are relative: the server's own folders are not shown


def test_an_empty_or_missing_runs_folder_lists_nothing(tmp_path):
    with client(tmp_path) as http:
        assert http.get("/api/models").json() == {"models": [], "skipped": []}
    cache = ModelCache(ServeConfig(runs=tmp_path / "gone"))
    assert cache.discover() == ([], [])


def test_discovery_reads_each_file_once_until_it_changes(runs, monkeypatch):
    reads: list[Path] = []
    original = models_api.read_pth_meta
    monkeypatch.setattr(models_api, "read_pth_meta", lambda path: reads.append(path) or original(path))
    cache = ModelCache(ServeConfig(runs=runs))
    first, _ = cache.discover()
    count = len(reads)
    assert count >= 4
    again, _ = cache.discover()
    assert len(reads) == count and [m.id for m in again] == [m.id for m in first]
    target = runs / "fundus" / "checkpoint-best.pth"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    cache.discover()
    assert reads[count:] == [target.resolve()]  # the changed file only (the link to it resolves to it)
    # New test metrics are picked up without reading the checkpoint again.
    metrics = runs / "nested" / "deeper" / "run" / "metrics_test.json"
    metrics.write_text(json.dumps({"auroc_macro": 0.5}))
    try:
        found = {m.id: m for m in cache.discover()[0]}
        assert found["nested/deeper/run/checkpoint-best.pth"].metrics["test"] == {"auroc_macro": 0.5}
        assert len(reads) == count + 1
    finally:
        metrics.unlink()


def test_discovery_of_many_runs_stays_cheap(tmp_path):
    source = tiny_checkpoint(tmp_path / "source.pth")
    root = tmp_path / "runs"
    for i in range(60):
        run = root / f"run{i:03d}"
        run.mkdir(parents=True)
        (run / "checkpoint-best.pth").write_bytes(source.read_bytes())
        for k in range(20):  # a run's plots and overlays are walked past
            (run / f"plot{k}.png").write_bytes(b"")
    cache = ModelCache(ServeConfig(runs=root))
    started = time.perf_counter()
    assert len(cache.discover()[0]) == 60
    first = time.perf_counter() - started
    started = time.perf_counter()
    assert len(cache.discover()[0]) == 60
    again = time.perf_counter() - started
    assert again < 0.5 and again < first  # cached: stat calls only


@pytest.mark.parametrize("model_id,status", [
    ("../outside/secret-run/checkpoint-best.pth", 403), ("/etc/passwd", 403), ("fundus/../../outside", 403),
    ("link-out.pth", 403), ("linked-folder/checkpoint-best.pth", 403), ("%2e%2e/x.pth", 404),
    ("fundus\\..\\..\\x.pth", 403), ("nope.pth", 404), ("fundus/log.csv", 404), ("fundus", 404),
    (".jobs/job1/checkpoint-best.pth", 404), ("pretrain/checkpoint-last.pth", 404), ("broken/checkpoint-best.pth", 404),
    ("fundus/checkpoint-best.pth\x00.png", 403),
])
def test_describe_refuses_what_is_not_a_listed_model(runs, model_id, status):
    cache = ModelCache(ServeConfig(runs=runs))
    with pytest.raises(HTTPException) as caught:
        cache.describe(model_id)
    assert caught.value.status_code == status


def test_loaded_models_are_cached_least_recently_used_first(runs, monkeypatch):
    loads: list[str] = []
    original = models_api.load_for_inference
    monkeypatch.setattr(models_api, "load_for_inference",
                        lambda path, device: loads.append(Path(path).parent.name) or original(path, device=device))
    cache = ModelCache(ServeConfig(runs=runs, cached_models=2))
    a, b, c = (cache.describe(i) for i in ("fundus/checkpoint-best.pth", "nested/deeper/run/checkpoint-best.pth",
                                           "scores/checkpoint-best.pth"))
    for info in (a, b, a, c, a, b):
        with cache.use(info) as loaded:
            assert loaded.meta.model_name == "vit_micro_patch8"
    assert loads == ["fundus", "run", "scores", "run"]  # b was the least recently used when c came
    assert cache.loaded_ids() == ["fundus/checkpoint-best.pth", "nested/deeper/run/checkpoint-best.pth"]
    target = runs / "fundus" / "checkpoint-best.pth"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    with cache.use(cache.describe("fundus/checkpoint-best.pth")):
        pass
    assert loads[-1] == "fundus"  # a rewritten checkpoint is loaded afresh


def test_one_model_is_used_by_one_thread_at_a_time(runs):
    cache = ModelCache(ServeConfig(runs=runs))
    info = cache.describe("fundus/checkpoint-best.pth")
    inside, most, errors = [0], [0], []
    guard = threading.Lock()

    def work() -> None:
        try:
            with cache.use(info):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.02)
                with guard:
                    inside[0] -= 1
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and most[0] == 1 and cache.loads == 1


def test_the_model_lock_is_granted_in_arrival_order():
    lock = models_api.FairLock()
    order: list[int] = []
    lock.__enter__()  # held while the others queue up, one after another
    threads = []
    for i in range(6):
        thread = threading.Thread(target=lambda i=i: (lock.__enter__(), order.append(i), lock.__exit__()))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 5
        while lock._next_ticket < i + 2 and time.monotonic() < deadline:  # it has taken its ticket
            time.sleep(0.001)
    lock.__exit__()
    for thread in threads:
        thread.join()
    assert order == list(range(6))


def test_a_finetune_run_is_listed_with_its_validation_and_test_metrics(trained_run):
    """A real run folder (finetune's checkpoint-best.pth / checkpoint-last.pth, log.csv, metrics_test.json)."""
    cache = ModelCache(ServeConfig(runs=trained_run.parent))
    models, skipped = cache.discover()
    assert skipped == []
    found = {m.id: m for m in models}
    assert set(found) == {"run/checkpoint-best.pth"}  # the last one (for --resume) is not listed beside it...
    assert cache.describe("run/checkpoint-last.pth").id == "run/checkpoint-last.pth"  # ...but can be asked for
    best = found["run/checkpoint-best.pth"]
    test = json.loads((trained_run / "metrics_test.json").read_text())
    assert best.run == "run" and best.outputs == test["task"]["outputs"]
    assert best.metrics["test"]["auroc_macro"] == pytest.approx(test["auroc_macro"])
    assert set(best.metrics["test"]) <= set(test) and "accuracy" in best.metrics["val"]
