"""The Runs API: run directories with metrics and CIs, reports with their own policy, compare, and
every way of naming a file outside --runs refused without its content."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from retinafm.serve.app import create_app
from retinafm.serve.config import ServeConfig

SECRET = "TOP-SECRET-OUTSIDE-THE-RUNS-FOLDER"


@pytest.fixture(scope="module")
def served(trained_run: Path, tmp_path_factory) -> Path:
    """--runs with two runs (a/, and nested/b/ whose test predictions differ), a hidden .jobs run, and beside
    it a folder `outside` with a report.html that must never be served. Symlinks: a run folder pointing
    outside, and a run whose report.html points outside."""
    base = tmp_path_factory.mktemp("served")
    runs = base / "runs"
    shutil.copytree(trained_run, runs / "a")
    shutil.copytree(trained_run, runs / "nested" / "b")
    predictions = runs / "nested" / "b" / "predictions_test.csv"
    lines = predictions.read_text().splitlines()
    # b's probabilities of the first class squared: a different model on the same images, same truth; and
    # b never predicted the last image (compare then says it compares on the images both predicted).
    header = lines[0].split(",")
    prob = next(i for i, c in enumerate(header) if c.startswith("prob_"))
    rows = []
    for line in lines[1:-1]:
        cells = line.split(",")
        cells[prob] = f"{float(cells[prob]) ** 2:.6f}"
        rows.append(",".join(cells))
    predictions.write_text("\n".join([lines[0], *rows]) + "\n")
    shutil.copytree(trained_run, runs / ".jobs" / "hidden")
    outside = base / "outside"
    outside.mkdir()
    (outside / "report.html").write_text(f"<html>{SECRET}</html>")
    (outside / "metrics_test.json").write_text(json.dumps({"secret": SECRET}))
    (runs / "linked").symlink_to(outside, target_is_directory=True)
    (runs / "pointing").mkdir()
    (runs / "pointing" / "report.html").symlink_to(outside / "report.html")
    (runs / "loop").symlink_to("loop")  # resolves to nothing: Path.resolve raises on it
    (runs / "nested" / "up").symlink_to("..", target_is_directory=True)  # a cycle that stays inside
    return runs


@pytest.fixture(scope="module")
def client(served: Path) -> TestClient:
    return TestClient(create_app(ServeConfig(runs=served)), base_url="http://127.0.0.1:8000")


def test_lists_runs_with_metrics_and_cis(client: TestClient, served: Path) -> None:
    response = client.get("/api/runs")
    assert response.status_code == 200
    runs = {r["id"]: r for r in response.json()["runs"]}
    assert set(runs) == {"a", "nested/b"}  # not .jobs/hidden, not the symlink out, not 'pointing' (no own file)
    run = runs["nested/b"]
    metrics = json.loads((served / "a" / "metrics_test.json").read_text())
    assert run["task"] == "multiclass" and run["model"] == "vit_micro_patch8" and run["split"] == "test"
    auroc = run["metrics"]["auroc_macro"]
    assert auroc == {"value": metrics["auroc_macro"], "ci_low": metrics["ci"]["auroc_macro"][0],
                     "ci_high": metrics["ci"]["auroc_macro"][1]}
    assert auroc["ci_low"] <= auroc["value"] <= auroc["ci_high"]
    assert run["report"] == "/runs/nested/b/report.html"
    assert run["checkpoint"] == "nested/b/checkpoint-best.pth"
    assert run["modified"].endswith("+00:00")
    assert SECRET not in response.text


def test_listing_follows_changes(served: Path, monkeypatch) -> None:
    """The cache is keyed by the files' times and sizes: an unchanged run is not read again, a rewritten
    metrics file is shown at once."""
    from retinafm.serve import runs_api

    built: list[str] = []
    original = runs_api._build_entry
    monkeypatch.setattr(runs_api, "_build_entry", lambda folder: built.append(folder.id) or original(folder))
    run = served.parent / "changing"
    shutil.copytree(served / "a", run)
    app = create_app(ServeConfig(runs=served.parent / "changing"))
    local = TestClient(app, base_url="http://127.0.0.1:8000")
    first = local.get("/api/runs").json()["runs"]
    assert [r["id"] for r in first] == ["."] and first[0]["report"] == "/runs/report.html"
    assert local.get("/api/runs").json()["runs"] == first and built == ["."]
    metrics_file = run / "metrics_test.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["auroc_macro"] = 0.875
    metrics_file.write_text(json.dumps(metrics))
    stat = metrics_file.stat()
    os.utime(metrics_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert local.get("/api/runs").json()["runs"][0]["metrics"]["auroc_macro"]["value"] == 0.875
    assert built == [".", "."]
    assert "<html" in local.get("/runs/report.html").text


def test_serves_a_report_with_its_own_policy(client: TestClient, served: Path) -> None:
    response = client.get("/runs/nested/b/report.html")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text == (served / "nested" / "b" / "report.html").read_text()
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy and "sandbox" in policy
    assert "img-src data:" in policy and "frame-ancestors 'self'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/runs/nested/report.html").status_code == 404  # a folder without a report


def test_compares_two_runs(client: TestClient) -> None:
    response = client.post("/api/compare", json={"runs": ["a", "nested/b"], "bootstrap": 100})
    assert response.status_code == 200, response.text
    body = response.json()
    headline = body["rows"][0]
    assert headline["reference"] == "a" and headline["model"] == "b" and headline["test"] == "paired bootstrap"
    assert headline["metric"] == "auroc_macro" and headline["n_images"] > 0
    assert {r["test"] for r in body["rows"]} == {"paired bootstrap", "DeLong"}
    assert body["forest"].startswith("data:image/png;base64,iVBORw0KGgo")  # a PNG's signature
    assert any("images both runs predicted" in note for note in body["notes"]), body["notes"]
    assert not any(str(client.app.state.config.runs) in note for note in body["notes"])  # ids, not server paths


@pytest.mark.parametrize("payload, words", [
    ({"runs": ["a"]}, "at least two"),
    ({"runs": []}, "at least two"),
    ({"runs": "a"}, "list"),
    ({}, "list"),
    ({"runs": ["a", "a"]}, "once"),
    ({"runs": ["a", "nested"]}, "'nested' has no predictions_test.csv"),
    ({"runs": ["a", "nested/b"], "bootstrap": 5}, "bootstrap"),
])
def test_compare_refuses_bad_requests(client: TestClient, payload: dict, words: str) -> None:
    response = client.post("/api/compare", json=payload)
    assert response.status_code == 422
    assert words in response.json()["detail"]


def test_compare_refuses_non_json(client: TestClient) -> None:
    response = client.post("/api/compare", content=b"runs=a", headers={"content-type": "text/plain"})
    assert response.status_code == 422 and "JSON" in response.json()["detail"]


@pytest.mark.parametrize("run", ["../outside", "/etc", "linked", "a/../../outside", "a\\..\\..", "a\x00", "loop"])
def test_compare_refuses_runs_outside(client: TestClient, run: str) -> None:
    response = client.post("/api/compare", json={"runs": ["a", run]})
    assert response.status_code in (403, 404), response.text
    assert SECRET not in response.text and "detail" in response.json()


# Every spelling of a path out of --runs, as the client sends it (httpx would normalise a literal '../').
TRAVERSALS = [
    "/runs/%2e%2e/outside/report.html",
    "/runs/%2e%2e%2foutside/report.html",
    "/runs/a/%2e%2e/%2e%2e/outside/report.html",
    "/runs/%252e%252e%252foutside/report.html",  # double-encoded: decoded once, it is a name, not a climb
    "/runs/..%5coutside/report.html",
    "/runs/%2e%2e%5coutside/report.html",
    "/runs/a%00/report.html",
    "/runs/a%00/../../outside/report.html",
    "/runs/linked/report.html",  # a folder symlinked outside
    "/runs/pointing/report.html",  # a report.html symlinked outside
    "/runs/C:/outside/report.html",
    "/runs/loop/report.html",
]


@pytest.mark.parametrize("url", TRAVERSALS)
def test_traversal_is_refused(client: TestClient, url: str) -> None:
    response = client.get(url)
    assert response.status_code in (403, 404), (url, response.status_code)
    assert SECRET not in response.text
    assert response.headers["content-type"].startswith("application/json") and "detail" in response.json()


def test_absolute_path_is_refused(client: TestClient, served: Path) -> None:
    outside = served.parent / "outside"
    response = client.get(f"/runs/{outside}/report.html")  # /runs//tmp/.../outside/report.html
    assert response.status_code == 403 and SECRET not in response.text


def _raw_get(app: FastAPI, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as a server passes it on after decoding (a literal '../', which HTTP clients
    normalise away before sending), straight through the ASGI interface."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode("utf-8"), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8000")], "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 8000)}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("path", [
    "/runs/../outside/report.html",
    "/runs/a/../../outside/report.html",
    "/runs/nested/../../outside/report.html",
    "/runs/./../outside/report.html",
    "/runs/..\\outside/report.html",
    "/runs/a\x00/report.html",
])
def test_literal_traversal_is_refused(client: TestClient, path: str) -> None:
    status, body = _raw_get(client.app, path)
    assert status in (403, 404), (path, status)
    assert SECRET.encode() not in body and b"detail" in body


def test_a_runs_folder_that_is_a_symlink_is_served(served: Path, tmp_path: Path) -> None:
    """--runs itself may be a symlink (a run folder on another disk): confinement is to where it resolves."""
    link = tmp_path / "runs-link"
    link.symlink_to(served, target_is_directory=True)
    local = TestClient(create_app(ServeConfig(runs=link)), base_url="http://127.0.0.1:8000")
    assert {r["id"] for r in local.get("/api/runs").json()["runs"]} == {"a", "nested/b"}
    assert local.get("/runs/a/report.html").status_code == 200
    assert local.get("/runs/linked/report.html").status_code == 403
