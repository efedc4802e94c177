"""The Jobs API: forms generated from the settings classes, every refusal before a job is queued, and real
jobs (the CLI in a subprocess) run, fail, get cancelled and are listed again by a restarted server.

Real jobs use a micro ViT at 32 px on 12 training images, one epoch (a few seconds each, mostly Python
starting). Cancellation's SIGKILL escalation and the server's shutdown use a stand-in interpreter (a
shell script), which shows the process-group handling without the cost of a training run.
"""
from __future__ import annotations

import dataclasses
import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from retinafm.serve import forms
from retinafm.serve.app import create_app
from retinafm.serve.config import ServeConfig
from retinafm.serve.jobs_api import JobQueue, log_tail, read_progress
from retinafm.settings import (
    EmbedSettings,
    EvaluateSettings,
    FinetuneSettings,
    PredictSettings,
    field_types,
    list_item_type,
    option_flag,
)

BASE = "http://127.0.0.1:8000"
ENDED = ("done", "failed", "cancelled")
# tests/helpers.py tiny_finetune_config's fast values, as a form sends them (report heatmaps off: seconds each)
TINY = {"model": "vit_micro_patch8", "weights": "none", "input_size": 32, "epochs": 1, "warmup_epochs": 1,
        "batch_size": 16, "lr": 1e-3, "layer_decay": 1.0, "drop_path": 0.0, "randaug_magnitude": 0, "reprob": 0.0,
        "crop_min_scale": 0.5, "num_workers": 0, "device": "cpu", "precision": "fp32", "bootstrap": 0,
        "report_heatmaps": 0}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """--data-root: a labelled folder (3 classes, 4/2/2 images each) and a manifest without a label column."""
    from retinafm.data.synthetic import write_demo_dataset

    root = tmp_path_factory.mktemp("jobs_data")
    write_demo_dataset(root / "folder", n_train=4, n_val=2, n_test=2, size=32, seed=0)
    rows = [f"{p.relative_to(root).as_posix()},{p.parts[-3]}" for p in sorted((root / "folder").rglob("*.png"))]
    (root / "no_label.csv").write_text("path,split\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture
def runs(tmp_path) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir()
    return folder


def _app(runs: Path, data_root: Path | None, **queue: object):
    config = ServeConfig(runs=runs, data_root=data_root)
    app = create_app(config)
    if queue:
        app.state.jobs = JobQueue(config, **queue)  # type: ignore[arg-type]
    return app


@pytest.fixture
def client(runs, data_root) -> Iterator[TestClient]:
    with TestClient(_app(runs, data_root), base_url=BASE) as test_client:
        yield test_client


def _submit(client: TestClient, verb: str, name: str, **settings: object):
    return client.post("/api/jobs", json={"verb": verb, "name": name, "settings": settings})


def _wait(client: TestClient, job_id: str, until: tuple[str, ...] = ENDED, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s:\n{job.get('log_tail')}")


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies a container's init never reaps count as gone)."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _gone(pgid: int, timeout: float = 5) -> bool:
    """The job's process group has ended (SIGKILL takes a moment to be delivered to all of it)."""
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------- forms
def _expected_default(cls: type, field: dataclasses.Field):
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]
    if field.metadata.get("required"):
        return None
    if list_item_type(field_types(cls)[field.name]) is not None and default is not None:
        return ",".join(map(str, default))
    return None if default == "" and "path" in field.metadata else default


@pytest.mark.parametrize(("verb", "cls"), [("finetune", FinetuneSettings), ("evaluate", EvaluateSettings),
                                           ("predict", PredictSettings), ("embed-probe", EmbedSettings)])
def test_forms_mirror_the_settings_classes(client, verb, cls):
    """Every setting the CLI takes from the class is in the form with the CLI's flag, default, help and bounds;
    only what the server chooses (where the job writes, overwrite, resume) is left out."""
    fields = {f["name"]: f for f in client.get("/api/forms").json()[verb]}
    for field in dataclasses.fields(cls):
        if not field.metadata.get("cli", True) or field.name in ("out", "overwrite") \
                or (verb == "predict" and field.name == "heatmaps"):
            assert field.name not in fields or field.name == "heatmaps"
            continue
        shown = fields[field.name]
        assert shown["flag"] == option_flag(field)
        assert shown["default"] == _expected_default(cls, field), field.name
        assert shown["help"] == (field.metadata.get("help") or ""), field.name
        assert shown["bounds"] == (list(field.metadata["bounds"]) if "bounds" in field.metadata else None)
        assert shown["required"] == bool(field.metadata.get("required"))
        if field.name in forms.DATA_FIELDS or field.name in forms.MODEL_FIELDS:
            assert shown["type"] == "path" and shown["root"] == ("data" if field.name in forms.DATA_FIELDS else "runs")


def test_form_types_and_choices_come_from_the_annotations(client):
    fields = {f["name"]: f for f in client.get("/api/forms").json()["finetune"]}
    assert fields["epochs"]["type"] == "int" and fields["blr"]["type"] == "float"
    assert fields["fundus_crop"]["type"] == "bool" and fields["fundus_crop"]["default"] is False
    assert fields["precision"]["type"] == "choice"
    assert fields["precision"]["choices"] == ["auto", "fp32", "bf16", "fp16"]
    assert fields["task"]["choices"] == ["multiclass", "multilabel", "regression"]
    assert fields["labels"]["list"] is True and fields["labels"]["type"] == "str"

def test_the_probe_fields_are_probe_settings_that_the_probe_command_takes(client):
    from retinafm.workflows.probe import ProbeSettings

    probe = {f["name"]: f for f in client.get("/api/forms").json()["embed-probe"] if f["step"] == "probe"}
    assert set(probe) == {f.name for f in dataclasses.fields(ProbeSettings)} - forms.PROBE_EXCLUDED
    for field in dataclasses.fields(ProbeSettings):
        if field.name in probe and field.name != "threshold":
            assert probe[field.name]["default"] == field.default, field.name
            assert probe[field.name]["help"], field.name
    assert probe["threshold"]["default"] == str(ProbeSettings.threshold) and probe["task"]["type"] == "choice"


def test_only_changed_settings_are_passed_and_defaults_adapt_as_on_the_command_line(data_root, runs):
    """epochs 2 without a warmup: FinetuneSettings' default warmup (10) shrinks to the run, as the CLI does it
    for the same flags; a value equal to its default is not passed at all."""
    plan = forms.plan("finetune", {"data_path": "folder", "epochs": 2, "seed": 0, "fundus_crop": "true"},
                      data_root=data_root, runs=runs, out=runs / "x", work=runs / "w")
    assert plan.commands == [["finetune", "--out", str(runs / "x"), "--data-path", str(data_root / "folder"),
                              "--fundus-crop", "--epochs", "2"]]
    assert plan.epochs == 2 and plan.settings["data_path"] == "folder"
    (runs / "m.pth").write_bytes(b"x")
    plan = forms.plan("predict", {"checkpoint": "m.pth", "images": "folder", "heatmaps": True,
                                  "heatmap_method": "rollout"}, data_root=data_root, runs=runs, out=runs / "p",
                      work=runs / "w")
    assert plan.commands[0][:6] == ["predict", "--out", str(runs / "p" / forms.PREDICTIONS), "--heatmaps",
                                    str(runs / "p" / forms.HEATMAPS), "--checkpoint"]
    assert plan.commands[0][-2:] == ["--heatmap-method", "rollout"] and plan.epochs is None
    plan = forms.plan("embed-probe", {"images": "folder", "model": "vit_micro_patch8", "task": "regression",
                                      "columns": "a,b", "threshold": "youden"},
                      data_root=data_root, runs=runs, out=runs / "e", work=runs / "w")
    assert plan.commands[1][-4:] == ["--targets", "a,b", "--threshold", "youden"]


def test_a_changed_default_in_the_dataclass_shows_in_the_form(client, monkeypatch):
    monkeypatch.setattr(FinetuneSettings.__dataclass_fields__["epochs"], "default", 7)
    fields = {f["name"]: f for f in client.get("/api/forms").json()["finetune"]}
    assert fields["epochs"]["default"] == 7


# --------------------------------------------------------------------------- refusals, before anything is queued
@pytest.mark.parametrize(("settings", "named"), [
    ({"epochs": 0}, "epochs"),
    ({"batch_size": "many"}, "batch_size"),
    ({"epochs": 2.5}, "epochs"),
    ({"precision": "fp8"}, "precision"),
    ({"head_dropout": 1.5}, "head_dropout"),
    ({"warmup_epochs": 5, "epochs": 2}, "warmup_epochs"),
    ({"labels": "a,b"}, "labels"),  # a multilabel setting on a multiclass task (the task type's own check)
    ({"out": "elsewhere"}, None),  # the server chooses where a job writes
    ({"model": "vit\x00"}, "model"),
])
def test_a_bad_setting_is_422_naming_it(client, runs, settings, named):
    answer = _submit(client, "finetune", "bad", data_path="folder", **settings)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert isinstance(body["detail"], str)
    if named:
        assert body["setting"] == named and f"--{named.replace('_', '-')}" in body["detail"]
    assert client.get("/api/jobs").json()["jobs"] == [] and not (runs / "bad").exists()


def test_one_of_data_path_or_manifest_and_required_settings(client):
    answer = _submit(client, "finetune", "x")
    assert answer.status_code == 422 and answer.json()["setting"] == "data_path"
    answer = _submit(client, "predict", "x", images="folder")
    assert answer.status_code == 422 and "--checkpoint" in answer.json()["detail"]
    answer = _submit(client, "nonsense", "x")
    assert answer.status_code == 422 and "finetune" in answer.json()["detail"]
    answer = client.post("/api/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 422 and isinstance(answer.json()["detail"], str)


@pytest.mark.parametrize(("settings", "status"), [
    ({"data_path": "../"}, 403),
    ({"data_path": "folder/../../x"}, 403),
    ({"data_path": "/etc"}, 403),
    ({"manifest": "/etc/passwd"}, 403),
    ({"data_path": "escape"}, 403),  # a symlink pointing out of --data-root
    ({"data_path": "missing"}, 404),
    ({"data_path": "folder", "weights": "/etc/passwd"}, 403),
    ({"data_path": "folder", "weights": "../x.pth"}, 403),
])
def test_paths_outside_their_folder_are_refused(client, data_root, tmp_path, settings, status):
    if not (data_root / "escape").exists():
        (data_root / "escape").symlink_to(tmp_path)
    answer = _submit(client, "finetune", "paths", **settings)
    assert answer.status_code == status, answer.text
    assert isinstance(answer.json()["detail"], str)


def test_a_checkpoint_is_a_model_id_under_runs(client, data_root):
    answer = _submit(client, "evaluate", "ev", checkpoint="../../etc/passwd", data_path="folder")
    assert answer.status_code == 403
    answer = _submit(client, "evaluate", "ev", checkpoint="no/such/checkpoint-best.pth", data_path="folder")
    assert answer.status_code == 404


def test_names_are_safe_and_unique(client, runs):
    (runs / "taken").mkdir()
    assert _submit(client, "finetune", "taken", data_path="folder", **TINY).status_code == 409
    for name in ("../up", ".hidden", "a/b", "", "x" * 81, 3):
        answer = _submit(client, "finetune", name, data_path="folder", **TINY)
        assert answer.status_code == 422 and answer.json()["setting"] == "name", name


def test_without_a_data_root_jobs_cannot_start(runs):
    with TestClient(_app(runs, None), base_url=BASE) as client:
        answer = _submit(client, "finetune", "x", data_path="folder")
        assert answer.status_code == 409 and "--data-root" in answer.json()["detail"]


# --------------------------------------------------------------------------- real jobs
def test_a_failing_job_then_a_finetune_that_runs_to_done(client, runs, data_root):
    """The failure is the job's (failed, its return code and log tail), the queue goes on to the next job,
    whose run folder holds the checkpoint and whose progress shows its epochs; a restarted queue lists both."""
    failing = _submit(client, "finetune", "no-label", manifest="no_label.csv", **TINY)
    assert failing.status_code == 200, failing.text
    good = _submit(client, "finetune", "tiny", data_path="folder", **TINY)
    assert good.status_code == 200, good.text
    assert _submit(client, "finetune", "tiny", data_path="folder", **TINY).status_code == 409  # queued: name taken

    failed = _wait(client, failing.json()["id"])
    assert failed["status"] == "failed" and failed["returncode"] == 2, failed
    assert "error:" in failed["log_tail"] and "exited with code 2" in failed["reason"]
    done = _wait(client, good.json()["id"])
    assert done["status"] == "done", done["log_tail"]
    assert (runs / "tiny" / "checkpoint-best.pth").is_file() and done["out"] == "tiny"
    assert done["progress"]["epoch"] == 1 and done["progress"]["epochs"] == 1
    assert done["progress"]["train_loss"] is not None and "val_auroc_macro" in done["progress"]
    assert done["commands"][0].startswith("retinafm finetune --out ")
    assert "--epochs 1" in done["commands"][0] and "\r" not in done["log_tail"]
    assert "run directory:" in done["log_tail"]
    listed = [job["id"] for job in client.get("/api/jobs").json()["jobs"]]
    assert listed == [good.json()["id"], failing.json()["id"]]  # newest first
    record = json.loads((runs / ".jobs" / good.json()["id"] / "job.json").read_text())
    assert record["status"] == "done" and record["argv"][0][1:4] == ["-m", "retinafm", "finetune"]

    another = JobQueue(ServeConfig(runs=runs, data_root=data_root))  # reads the same records
    try:
        another.start()
        assert [(job.id, job.status) for job in another.jobs()] == [(listed[0], "done"), (listed[1], "failed")]
    finally:
        another.stop()


def test_embed_then_probe_in_one_job(client, runs):
    answer = _submit(client, "embed-probe", "probe-run", images="folder", model="vit_micro_patch8", weights="none",
                     input_size=32, batch_size=16, num_workers=0, device="cpu", precision="fp32", bootstrap=0,
                     dtype="float32")
    assert answer.status_code == 200, answer.text
    done = _wait(client, answer.json()["id"])
    assert done["status"] == "done", done["log_tail"]
    assert [c.split()[1] for c in done["commands"]] == ["embed", "probe"]
    assert (runs / "probe-run" / "checkpoint-best.pth").is_file()
    assert (runs / ".jobs" / done["id"] / forms.EMBEDDINGS).is_file()
    assert done["progress"] is None


def test_cancel_a_queued_and_a_running_finetune(client, runs):
    running = _submit(client, "finetune", "long", data_path="folder", **{**TINY, "epochs": 500})
    waiting = _submit(client, "finetune", "next", data_path="folder", **TINY)
    assert running.status_code == waiting.status_code == 200

    cancelled = client.post(f"/api/jobs/{waiting.json()['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and not (runs / "next").exists()  # its name is free again

    job = _wait(client, running.json()["id"], until=("running",))
    deadline = time.monotonic() + 90
    while (live := client.get(f"/api/jobs/{job['id']}").json())["progress"]["epoch"] < 1:
        assert time.monotonic() < deadline, f"no epoch finished:\n{live['log_tail']}"
        time.sleep(0.2)
    assert live["status"] == "running" and live["step"] == "finetune" and live["progress"]["epochs"] == 500
    assert live["progress"]["train_loss"] is not None and len(live["progress"]["history"]) >= 1
    pid = client.app.state.jobs.get(job["id"]).pid
    answer = client.post(f"/api/jobs/{job['id']}/cancel")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    assert pid is not None and _gone(pid)
    assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 409
    assert client.post("/api/jobs/20990101-000000-abcdef/cancel").status_code == 404
    assert client.get("/api/jobs/../../etc").status_code == 404


# --------------------------------------------------------------------------- the queue with a stand-in interpreter
def _fake_python(tmp_path: Path, body: str) -> str:
    """A script called like `python -m retinafm <verb> ...`: what it does stands in for a command."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_sigkill_follows_when_sigterm_is_ignored(runs, data_root, tmp_path):
    python = _fake_python(tmp_path, "trap '' TERM\necho started\nsleep 60 & wait; sleep 60")
    with TestClient(_app(runs, data_root, grace=1.0, python=python), base_url=BASE) as client:
        (runs / "model.pth").write_bytes(b"x")
        answer = _submit(client, "predict", "stubborn", checkpoint="model.pth", images="folder")
        assert answer.status_code == 200, answer.text
        job = _wait(client, answer.json()["id"], until=("running",))
        while "started" not in client.get(f"/api/jobs/{job['id']}").json()["log_tail"]:
            time.sleep(0.1)
        pid = client.app.state.jobs.get(job["id"]).pid
        started = time.monotonic()
        assert client.post(f"/api/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        assert 0.9 < time.monotonic() - started < 8 and _gone(pid)


def test_a_crashing_command_fails_the_job_and_the_server_stays_up(runs, data_root, tmp_path):
    python = _fake_python(tmp_path, "echo 'half a line\\rprogress 50%\\rprogress 100%'\necho boom >&2\nexit 3")
    (runs / "model.pth").write_bytes(b"x")
    with TestClient(_app(runs, data_root, python=python), base_url=BASE) as client:
        first = _submit(client, "predict", "one", checkpoint="model.pth", images="folder").json()
        second = _submit(client, "predict", "two", checkpoint="model.pth", images="folder").json()
        for job_id in (first["id"], second["id"]):
            job = _wait(client, job_id)
            assert job["status"] == "failed" and job["returncode"] == 3
            assert job["log_tail"].splitlines()[-2:] == ["progress 100%", "boom"]
        assert client.get("/api/forms").status_code == 200


def test_stopping_the_server_cancels_the_running_job_and_a_restart_lists_it(runs, data_root, tmp_path):
    python = _fake_python(tmp_path, "echo started\nexec sleep 60")
    (runs / "model.pth").write_bytes(b"x")
    with TestClient(_app(runs, data_root, python=python), base_url=BASE) as client:
        running = _submit(client, "predict", "one", checkpoint="model.pth", images="folder").json()
        queued = _submit(client, "predict", "two", checkpoint="model.pth", images="folder").json()
        _wait(client, running["id"], until=("running",))
        pid = client.app.state.jobs.get(running["id"]).pid
    assert _gone(pid)
    with TestClient(_app(runs, data_root), base_url=BASE) as client:
        jobs = {job["id"]: job for job in client.get("/api/jobs").json()["jobs"]}
        assert jobs[running["id"]]["status"] == "cancelled" and jobs[running["id"]]["reason"] == "the server stopped"
        assert jobs[queued["id"]]["status"] == "failed" and "before it started" in jobs[queued["id"]]["reason"]
        assert not (runs / "two").exists()  # the job never ran: its name is free


def test_a_restart_after_a_crash_ends_the_jobs_it_left(runs, data_root, tmp_path):
    """Records a killed server left "running" and "queued": failed, the process it left stopped."""
    import subprocess

    # A job's command the dead server left running (it names retinafm), and a process that reused a recorded pid.
    job_process = subprocess.Popen(["sh", "-c", "sleep 60", "retinafm"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    records = (("20250101-000000-aaaaaa", "running", "was-running", job_process.pid),
               ("20250101-000001-bbbbbb", "running", "pid-reused", stranger.pid),
               ("20250101-000002-cccccc", "queued", "was-queued", None))
    for job_id, status, name, pid in records:
        (runs / name).mkdir()
        (runs / ".jobs" / job_id).mkdir(parents=True)
        (runs / ".jobs" / job_id / "job.json").write_text(json.dumps(
            {"id": job_id, "verb": "finetune", "name": name, "out": name, "argv": [["python"]], "settings": {},
             "status": status, "created": "2025-01-01T00:00:00+00:00", "pid": pid}))
    (runs / ".jobs" / "junk").mkdir()
    (runs / ".jobs" / "20250101-000003-dddddd").mkdir()
    (runs / ".jobs" / "20250101-000003-dddddd" / "job.json").write_text("{not json")
    try:
        with TestClient(_app(runs, data_root, grace=2.0), base_url=BASE) as client:
            jobs = {job["name"]: job for job in client.get("/api/jobs").json()["jobs"]}
            assert set(jobs) == {"was-running", "pid-reused", "was-queued"}
            assert jobs["was-running"]["status"] == "failed" and "while it ran" in jobs["was-running"]["reason"]
            assert jobs["was-queued"]["status"] == "failed"
            assert (runs / "was-running").is_dir() and not (runs / "was-queued").exists()
            assert job_process.wait(timeout=5) == -15  # SIGTERM
            assert stranger.poll() is None
    finally:
        for process in (job_process, stranger):
            process.kill()
            process.wait()


def test_a_second_server_on_the_same_runs_lists_but_does_not_run(runs, data_root, tmp_path):
    python = _fake_python(tmp_path, "exec sleep 60")
    (runs / "model.pth").write_bytes(b"x")
    with TestClient(_app(runs, data_root, python=python), base_url=BASE) as first:
        job = _submit(first, "predict", "one", checkpoint="model.pth", images="folder").json()
        _wait(first, job["id"], until=("running",))
        with TestClient(_app(runs, data_root), base_url=BASE) as second:
            assert [j["status"] for j in second.get("/api/jobs").json()["jobs"]] == ["running"]
            answer = _submit(second, "predict", "two", checkpoint="model.pth", images="folder")
            assert answer.status_code == 409 and "another retinafm server" in answer.json()["detail"]
        assert first.get(f"/api/jobs/{job['id']}").json()["status"] == "running"


# --------------------------------------------------------------------------- progress and log
def test_log_tail_keeps_each_lines_last_state(tmp_path):
    path = tmp_path / "log.txt"
    bars = "".join(f"\repoch 0: {p:3d}%|" for p in range(0, 101, 10))
    path.write_text("".join(f"line {i}\n" for i in range(50)) + bars + "\r" + " " * 30 + "\r\nrun directory: x\n")
    tail = log_tail(path).splitlines()
    assert len(tail) == 40 and tail[-2:] == ["epoch 0: 100%|", "run directory: x"]
    assert log_tail(tmp_path / "missing.txt") == ""


def test_progress_tolerates_a_partial_last_line(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,lr,train_loss,val_loss,val_auroc_macro,seconds\n0,0.001,1.1,1.2,0.6,3\n1,0.001,0.9,1.0,0.7,3"
                    "\n2,0.00")
    progress = read_progress(path, 5)
    assert progress["epoch"] in (2, 3) and progress["epochs"] == 5
    assert progress["history"][0] == {"epoch": 1, "train_loss": 1.1, "val_loss": 1.2}
    path.write_text("epoch,train_loss,val_loss\n0,nan,1.0\n")
    assert read_progress(path, 3)["train_loss"] is None  # NaN is not JSON
    assert read_progress(tmp_path / "none.csv", 3) == {"epoch": 0, "epochs": 3, "train_loss": None,
                                                        "val_loss": None, "history": []}
    assert read_progress(path, None) is None


def test_with_a_token_no_jobs_endpoint_answers_without_it(runs, data_root):
    token = "t" * 24
    app = create_app(ServeConfig(runs=runs, data_root=data_root, token=token))
    with TestClient(app, base_url=BASE) as client:
        for method, path in (("get", "/api/forms"), ("get", "/api/jobs"), ("post", "/api/jobs"),
                             ("get", "/api/jobs/20250101-000000-aaaaaa"),
                             ("post", "/api/jobs/20250101-000000-aaaaaa/cancel")):
            answer = getattr(client, method)(path)
            assert answer.status_code == 401 and "token" in answer.json()["detail"], path
        assert client.get("/api/forms", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_a_cross_site_page_cannot_start_a_job(client, runs):
    answer = client.post("/api/jobs", json={"verb": "finetune", "name": "x", "settings": {"data_path": "folder"}},
                         headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert answer.status_code == 403 and not (runs / "x").exists()
