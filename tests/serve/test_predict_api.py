"""POST /api/predict: uploads → the CLI's predictions with heatmap overlays; every bad input a JSON refusal
with its status; the uploads kept in a private folder that is gone after the request."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import helpers
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from helpers import oct_bscans, write_dicom
from PIL import Image

from retinafm.serve import predict_api
from retinafm.serve.app import create_app
from retinafm.serve.config import ServeConfig
from retinafm.settings import ExportSettings, PredictSettings
from retinafm.workflows.predict import predict

CLASSES = ["normal", "glaucoma", "amd"]
SIZE = 32
SECRET = "TOP-SECRET-CONTENT-7f3a"


def tiny_checkpoint(path: Path, task: str = "multiclass", names: list[str] = CLASSES, **meta) -> Path:
    """A vit_micro_patch8 checkpoint written in a second (tests/helpers.py)."""
    return helpers.tiny_checkpoint(path, names, task, SIZE, **meta)


def png_bytes(height: int, width: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    image[height // 4: height // 2, width // 4: width // 2] = 250
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("predict_api")
    root = base / "runs"
    tiny_checkpoint(root / "fundus" / "checkpoint-best.pth")
    tiny_checkpoint(root / "oct" / "checkpoint-best.pth", settings={"epochs": 1, "oct_frames": "all"})
    tiny_checkpoint(root / "labels" / "checkpoint-best.pth", task="multilabel", names=["dr", "amd", "rvo"],
                    task_state={"thresholds": [0.3, 0.5, 0.7]})
    tiny_checkpoint(root / "scores" / "checkpoint-best.pth", task="regression", names=["cdr", "count"],
                    task_state={"mean": [0.4, 2.0], "std": [0.1, 1.5]})
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    tiny_checkpoint(outside / "secret.pth", names=[SECRET, "b", "c"])
    (root / "link-out.pth").symlink_to(outside / "secret.pth")
    return root


@pytest.fixture(scope="module")
def onnx_model(runs) -> str:
    """The fundus checkpoint exported to ONNX into its run folder (skipped without onnx)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from retinafm.workflows.export import export

    export(ExportSettings(checkpoint=str(runs / "fundus" / "checkpoint-best.pth"),
                          out=str(runs / "fundus" / "model.onnx")))
    return "fundus/model.onnx"


@pytest.fixture(scope="module")
def http(runs):
    with TestClient(create_app(ServeConfig(runs=runs)), base_url="http://127.0.0.1:8000") as client:
        yield client


def post(client: TestClient, files: list[tuple[str, bytes]], checkpoint: str | None = "fundus/checkpoint-best.pth",
         params: dict | None = None, **fields: str):
    data = {**({"checkpoint": checkpoint} if checkpoint is not None else {}), **fields}
    return client.post("/api/predict", files=[("file", (name, content)) for name, content in files], data=data,
                       params=params or {})


def decode_png(uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    raw = base64.b64decode(uri[len(prefix):], validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(raw))


def test_two_images_give_the_cli_predictions_and_overlays(http, runs, tmp_path):
    images = {"left eye.png": png_bytes(300, 500, 0), "right.png": png_bytes(96, 80, 1)}
    answer = post(http, list(images.items()))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["model"], body["task"], body["outputs"], body["skipped"]) == \
        ("fundus/checkpoint-best.pth", "multiclass", CLASSES, [])
    results = {r["filename"]: r for r in body["results"]}
    assert list(results) == list(images)
    # The same numbers as `retinafm predict` on the same files.
    folder = tmp_path / "images"
    folder.mkdir()
    for name, content in images.items():
        (folder / name).write_bytes(content)
    cli = predict(PredictSettings(checkpoint=str(runs / "fundus" / "checkpoint-best.pth"), images=str(folder),
                                  out=str(tmp_path / "predictions.csv"), device="cpu", num_workers=0),
                  progress=False).predictions
    for _, row in cli.iterrows():
        result = results[Path(row["path"]).name]
        assert result["prediction"] == row["prediction"]
        assert set(result["probabilities"]) == set(CLASSES)
        for name in CLASSES:
            assert abs(result["probabilities"][name] - row[f"prob_{name}"]) < 1e-5
    # Overlays: PNGs at most 384 px on the longer side, the image's proportions kept; of the predicted class.
    big, small = (decode_png(results[n]["overlay"]) for n in images)
    assert big.size == (384, 230) and small.size == (80, 96)
    assert results["left eye.png"]["overlay_target"] == results["left eye.png"]["prediction"]


def test_heatmaps_off_gives_no_overlays(http):
    body = post(http, [("a.png", png_bytes(40, 40, 2))], heatmaps="false").json()
    assert body["results"][0]["overlay"] is None and "note" not in body


def test_a_dicom_volume_gives_one_result_per_b_scan(http, tmp_path):
    scan = write_dicom(tmp_path / "scan.dcm", oct_bscans(4, 48, 64))
    content = scan.read_bytes()
    # The checkpoint was trained on every B-scan (its oct_frames): each one is predicted; a DICOM without a
    # suffix is recognised by its content.
    body = post(http, [("scan.dcm", content), ("IM0001", content)], checkpoint="oct/checkpoint-best.pth").json()
    names = [r["filename"] for r in body["results"]]
    assert names == [f"scan.dcm#frame={k}" for k in range(4)] + [f"IM0001#frame={k}" for k in range(4)]
    assert all(r["overlay"] for r in body["results"]) and body["skipped"] == []
    # The request may choose the frames, as `predict --oct-frames` does.
    body = post(http, [("scan.dcm", content)], checkpoint="oct/checkpoint-best.pth", oct_frames="middle",
                heatmaps="false").json()
    assert [r["filename"] for r in body["results"]] == ["scan.dcm#frame=2"]
    answer = post(http, [("scan.dcm", content)], checkpoint="oct/checkpoint-best.pth", oct_frames="sideways")
    assert answer.status_code == 422 and "oct_frames" in answer.json()["detail"]


def test_unreadable_files_are_skipped_with_their_reason(http):
    good = png_bytes(40, 40, 3)
    answer = post(http, [("notes.txt", b"hello, not an image\n"), ("cut.png", good[: len(good) // 2]),
                         ("empty.jpg", b""), ("ok.png", good), ("../../etc/passwd", b"root:x:0:0")])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [r["filename"] for r in body["results"]] == ["ok.png"]
    skipped = {s["filename"]: s["reason"] for s in body["skipped"]}
    assert set(skipped) == {"notes.txt", "cut.png", "empty.jpg", "passwd"}  # the client's names, no folders
    assert "truncated" in skipped["cut.png"] and "empty" in skipped["empty.jpg"]
    assert "upload" not in answer.text and tempfile.gettempdir() not in answer.text  # no temporary paths


def test_nothing_readable_gives_empty_results(http):
    body = post(http, [("a.txt", b"text")]).json()
    assert body["results"] == [] and [s["filename"] for s in body["skipped"]] == ["a.txt"]


def test_multilabel_and_regression_answer_in_their_own_fields(http):
    body = post(http, [("a.png", png_bytes(40, 40, 4))], checkpoint="labels/checkpoint-best.pth").json()
    result = body["results"][0]
    thresholds = {"dr": 0.3, "amd": 0.5, "rvo": 0.7}
    assert result["prediction"] == [n for n, p in result["probabilities"].items() if p >= thresholds[n]]
    assert result["overlay"].startswith("data:image/png;base64,")
    body = post(http, [("a.png", png_bytes(40, 40, 4))], checkpoint="scores/checkpoint-best.pth").json()
    result = body["results"][0]
    assert body["task"] == "regression" and set(result["values"]) == {"cdr", "count"}
    assert "probabilities" not in result and result["overlay_target"] == "cdr"


def test_csv_format_is_the_predict_table(http):
    answer = post(http, [("=HYPERLINK(1).png", png_bytes(40, 40, 5)), ("b.png", png_bytes(40, 40, 6))],
                  params={"format": "csv"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    assert answer.headers["content-disposition"] == 'attachment; filename="predictions.csv"'
    frame = pd.read_csv(io.StringIO(answer.text))
    assert list(frame.columns) == ["filename", "prediction", *(f"prob_{c}" for c in CLASSES)]
    assert frame["filename"].tolist() == ["'=HYPERLINK(1).png", "b.png"]  # no live formula in a spreadsheet
    assert np.allclose(frame[[f"prob_{c}" for c in CLASSES]].sum(axis=1), 1, atol=1e-5)


def test_onnx_models_predict_without_overlays(http, onnx_model):
    image = png_bytes(64, 64, 7)
    onnx = post(http, [("a.png", image)], checkpoint=onnx_model).json()
    torch_answer = post(http, [("a.png", image)], heatmaps="false").json()
    assert onnx["results"][0]["overlay"] is None and "ONNX" in onnx["note"]
    for name, p in torch_answer["results"][0]["probabilities"].items():
        assert abs(onnx["results"][0]["probabilities"][name] - p) < 1e-4
    listed = {m["id"]: m for m in http.get("/api/models").json()["models"]}
    assert listed[onnx_model]["kind"] == "onnx" and listed[onnx_model]["run"] == "fundus"


@pytest.mark.parametrize("limits,files,limit_name", [
    ({"max_file_bytes": 4000}, [("a.png", png_bytes(10, 10, 0)), ("big.png", b"\0" * 5000)], "max_file_bytes"),
    ({"max_files": 2}, [(f"{i}.png", png_bytes(10, 10, i)) for i in range(3)], "max_files"),
    ({"max_request_bytes": 3000}, [("a.png", b"\0" * 2000), ("b.png", b"\0" * 2000)], "max_request_bytes"),
])
def test_limits_answer_413_naming_the_limit(runs, limits, files, limit_name):
    with TestClient(create_app(ServeConfig(runs=runs, **limits)), base_url="http://127.0.0.1:8000") as client:
        answer = post(client, files)
    assert answer.status_code == 413 and limit_name in answer.json()["detail"]


def test_the_request_size_is_counted_without_content_length(runs):
    def body():
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(10):
            yield b"\0" * 1000
        yield b"\r\n--b--\r\n"

    with TestClient(create_app(ServeConfig(runs=runs, max_request_bytes=5000)),
                    base_url="http://127.0.0.1:8000") as client:
        answer = client.post("/api/predict", content=body(),
                             headers={"content-type": "multipart/form-data; boundary=b"})
    assert answer.status_code == 413 and "max_request_bytes" in answer.json()["detail"]


@pytest.mark.parametrize("checkpoint,statuses", [
    ("nope/checkpoint-best.pth", {404}), ("../outside/secret.pth", {403}), ("/etc/passwd", {403}),
    ("%2e%2e/outside/secret.pth", {404}), ("link-out.pth", {403}), ("fundus/../../outside/secret.txt", {403}),
    ("....//outside/secret.pth", {404}), ("fundus/checkpoint-best.pth/..", {403}),
])
def test_bad_model_ids_are_refused_without_content(http, checkpoint, statuses):
    answer = post(http, [("a.png", png_bytes(20, 20, 0))], checkpoint=checkpoint)
    assert answer.status_code in statuses
    assert set(answer.json()) == {"detail"} and SECRET not in answer.text


@pytest.mark.parametrize("case,status,words", [
    ("no files", 422, "no files"), ("no checkpoint", 422, "checkpoint"), ("not multipart", 415, "multipart"),
    ("bad flag", 422, "heatmaps"), ("bad format", 422, "format"), ("garbage", 422, "multipart"),
    ("unfinished", 422, "closing boundary"), ("bad length", 400, "Content-Length"),
])
def test_bad_requests_get_json_errors(http, case, status, words):
    image = [("a.png", png_bytes(20, 20, 0))]
    if case == "no files":  # a form whose file input was left empty
        answer = http.post("/api/predict", files=[("file", ("", b"")),
                                                  ("checkpoint", (None, b"fundus/checkpoint-best.pth"))])
    elif case == "no checkpoint":
        answer = post(http, image, checkpoint=None)
    elif case == "not multipart":
        answer = http.post("/api/predict", json={"checkpoint": "fundus/checkpoint-best.pth"})
    elif case == "bad flag":
        answer = post(http, image, heatmaps="maybe")
    elif case == "bad format":
        answer = post(http, image, params={"format": "xml"})
    else:
        content = {"garbage": b"--b\r\nthis is not a part header at all\r\n\r\n\r\n--b--",
                   "unfinished": b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc",
                   "bad length": b"--b--\r\n"}[case]
        headers = {"content-type": "multipart/form-data; boundary=b"}
        if case == "bad length":
            headers["content-length"] = "12abc"
        answer = http.post("/api/predict", content=content, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json" and words in answer.json()["detail"]


def test_the_upload_folder_is_private_and_removed(http, monkeypatch):
    made: list[Path] = []
    modes: list[int] = []
    real = tempfile.mkdtemp

    def spy(*args, **kwargs):
        path = real(*args, **kwargs)
        made.append(Path(path))
        modes.append(Path(path).stat().st_mode & 0o777)
        return path

    original_run = predict_api.run_prediction

    def run_and_look(cache, info, uploads, folder, **kw):
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["upload0001.png", "upload0002"]  # our names: a known suffix kept, others dropped
        assert all((folder / n).stat().st_mode & 0o777 == 0o600 for n in names)
        return original_run(cache, info, uploads, folder, **kw)

    monkeypatch.setattr(predict_api.tempfile, "mkdtemp", spy)
    monkeypatch.setattr(predict_api, "run_prediction", run_and_look)
    assert post(http, [("../a.png", png_bytes(20, 20, 0)), ("b.exe;rm -rf", b"MZ")]).status_code == 200
    assert post(http, [("a.png", png_bytes(20, 20, 0))], checkpoint="nope.pth").status_code == 404
    assert post(http, [("a.png", png_bytes(20, 20, 0))], heatmaps="maybe").status_code == 422
    monkeypatch.setattr(predict_api, "run_prediction", lambda *a, **k: (_ for _ in ()).throw(MemoryError("boom")))
    answer = post(http, [("a.png", png_bytes(20, 20, 0))])
    assert answer.status_code == 500 and answer.json()["detail"].startswith("prediction failed (MemoryError)")
    assert len(made) == 4 and modes == [0o700] * 4
    assert not any(p.exists() for p in made)  # removed after success and after every kind of failure


def test_concurrent_requests_on_one_model_all_succeed(runs):
    app = create_app(ServeConfig(runs=runs))
    answers: list[tuple[int, dict]] = []
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        def send(seed: int) -> None:
            answer = post(client, [(f"{seed}.png", png_bytes(48, 48, seed))], heatmaps=str(seed % 2 == 0).lower())
            answers.append((answer.status_code, answer.json()))

        threads = [threading.Thread(target=send, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert app.state.models.loads == 1
    assert sorted(status for status, _ in answers) == [200] * 8
    assert sorted(body["results"][0]["filename"] for _, body in answers) == [f"{s}.png" for s in range(8)]
    with_overlay = [b for _, b in answers if b["results"][0]["overlay"]]
    assert len(with_overlay) == 4


def test_a_token_protected_server_refuses_predict_without_it(runs):
    config = ServeConfig(runs=runs, host="0.0.0.0", token="a-long-enough-token-123")
    with TestClient(create_app(config), base_url="http://127.0.0.1:8000") as client:
        refused = post(client, [("a.png", png_bytes(20, 20, 0))])
        assert refused.status_code == 401 and "results" not in refused.text
        assert client.get("/api/models").status_code == 401
        allowed = client.post("/api/predict", files=[("file", ("a.png", png_bytes(20, 20, 0)))],
                              data={"checkpoint": "fundus/checkpoint-best.pth", "heatmaps": "false"},
                              headers={"Authorization": "Bearer a-long-enough-token-123"})
        assert allowed.status_code == 200 and json.loads(allowed.text)["results"]


@pytest.mark.slow
def test_the_load_benchmark_drives_the_real_server():
    """benchmarks/serve_load.py (uvicorn in a subprocess, real HTTP uploads) on a handful of requests."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/serve_load.py", "--requests", "6", "--clients", "3"], cwd=root,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "All 6 requests from 3 clients succeeded: **yes**" in proc.stdout
