"""The issue's "done when": the real `retinafm serve` on a free loopback port, driven by headless Chromium
(Debian's, through Playwright): two images predicted on the Predict page with their overlays, a run's report
opened from the Runs page (and two runs compared), a short fine-tune started on the Jobs page and seen to
finish. A screenshot of every step is kept in test-artifacts/serve/ (or $RETINAFM_TEST_ARTIFACTS) for a person
to look at.
A second test serves the pages with a fake API (contract-shaped answers) to see what the real one rarely
gives: multi-label and regression results, hostile file names, and refusals shown in words."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

REPO = Path(__file__).resolve().parents[2]
JOB_NAME = "browser-finetune"  # the job's run folder under --runs
FINETUNE = {  # the Jobs page's form as the test fills it: a tiny model, seconds on a CPU
    "data_path": "fundus", "model": "vit_micro_patch8", "weights": "none",
    "input_size": 32, "epochs": 2, "warmup_epochs": 1, "batch_size": 16, "lr": 0.001, "layer_decay": 1.0,
    "drop_path": 0.0, "randaug_magnitude": 0, "reprob": 0.0, "crop_min_scale": 0.5, "num_workers": 0,
    "device": "cpu", "bootstrap": 0, "report_heatmaps": 0,
}
ESSENTIAL = ("data_path", "model", "weights", "input_size", "epochs", "num_workers", "device")


def _chromium() -> str:
    # The policy of tests/workflows/test_report.py: skip without a browser, except under CI.
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: install Debian's chromium (apt-get install chromium) "
                    "for the web app's browser test")
    pytest.skip("chromium is not installed (Debian: apt-get install chromium); browser test skipped")


def _artifacts(name: str) -> Path:
    folder = Path(os.environ.get("RETINAFM_TEST_ARTIFACTS", REPO / "test-artifacts")) / "serve" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"\nscreenshots of the browser test: {folder}")
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM first (uvicorn's lifespan stops the job queue and its job), then the whole group by force."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the server's own group: any job process it left behind
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture
def server(trained_run: Path, demo_data: Path, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """(base URL, runs folder, server log) of a real server with two copies of a finished run under --runs and
    the demo data under --data-root, stopped after the test whatever happens."""
    runs, data = tmp_path / "runs", tmp_path / "data"
    shutil.copytree(trained_run, runs / "demo-run")
    shutil.copytree(trained_run, runs / "demo-run-copy")
    shutil.copytree(demo_data, data / "fundus")
    port = _free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "retinafm", "serve", "--runs", str(runs), "--data-root", str(data),
             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True)  # its own process group, so _stop can end the jobs it started too
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(base + "/predict", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer within 90 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield base, runs, log
    finally:
        _stop(process)


@pytest.mark.slow
def test_predict_report_and_finetune_in_headless_chromium(server: tuple[str, Path, Path], demo_data: Path,
                                                          tmp_path: Path) -> None:
    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency")
    base, runs, log = server
    shots = _artifacts("real-server")
    problems: list[str] = []  # script errors and CSP refusals: the pages must run clean

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            context.set_default_timeout(60_000)
            page = context.new_page()
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: problems.append(f"console: {msg.text}")
                    if msg.type == "error" and "Content Security Policy" in msg.text else None)
            expect = sync_api.expect

            # --- Models: the two runs' checkpoints are listed -----------------------------------------------
            page.goto(base + "/models")
            expect(page.locator("#models-table tbody tr").first).to_be_visible()
            expect(page.locator("#models-table")).to_contain_text("demo-run")
            page.screenshot(path=shots / "1-models.png", full_page=True)

            # --- Predict: two images (and a file that is not one) → the table, the overlays, the CSV ----------
            page.goto(base + "/")
            assert page.url.endswith("/predict")
            select = page.locator("#model")
            expect(select.locator("option").first).not_to_have_attribute("value", "")
            model_id = select.locator("option").first.get_attribute("value")
            assert model_id and model_id.startswith("demo-run")
            images = sorted((demo_data / "test").rglob("*.png"))[:2]
            junk = tmp_path / "notes.txt"
            junk.write_text("not an image")
            page.set_input_files("#files", [str(images[0]), str(images[1]), str(junk)])
            expect(page.locator("#chosen li")).to_have_count(3)
            page.screenshot(path=shots / "2-predict-chosen.png", full_page=True)
            page.click("#predict-button")
            rows = page.locator("#results-table tbody tr")
            expect(rows).to_have_count(2, timeout=120_000)
            for image in images:
                expect(page.locator("#results-table")).to_contain_text(image.name)
            overlays = page.locator("#results-table img.overlay")
            expect(overlays).to_have_count(2)
            page.wait_for_function("() => [...document.querySelectorAll('#results-table img.overlay')]"
                                   ".every(img => img.complete && img.naturalWidth > 0)")
            assert all(src and src.startswith("data:image/") for src in
                       overlays.evaluate_all("imgs => imgs.map(img => img.getAttribute('src'))"))
            expect(page.locator("#results-table .probs li.best")).to_have_count(2)  # the top class, per image
            expect(page.locator("#skipped-list")).to_contain_text("notes.txt")
            expect(page.locator("#message")).to_be_hidden()
            page.screenshot(path=shots / "3-predict-results.png", full_page=True)
            with page.expect_download() as download_info:
                page.click("#download-csv")
            csv = Path(download_info.value.path()).read_text().splitlines()
            assert csv[0].startswith("filename,prediction,p_") and len(csv) == 3
            overlays.first.click()  # a click enlarges an overlay
            expect(overlays.first).to_have_class("overlay large")
            page.screenshot(path=shots / "4-predict-enlarged.png", full_page=True)

            # --- Runs: a run's report opens; two runs compared ------------------------------------------------
            page.click("nav >> text=Runs")
            run_row = page.locator("#runs-table tbody tr", has=page.locator("code", has_text="demo-run-copy"))
            expect(run_row).to_have_count(1)
            page.screenshot(path=shots / "5-runs.png", full_page=True)
            with context.expect_page() as opened:
                page.locator("#runs-table tbody tr", has=page.locator("code", has_text="demo-run")).first \
                    .locator("a.report").click()
            report = opened.value
            report.wait_for_load_state()
            assert report.url.startswith(base + "/runs/") and report.url.endswith("/report.html")
            expect(report.locator("table#metrics")).to_be_visible()
            report.screenshot(path=shots / "6-report.png", full_page=True)
            report.close()
            boxes = page.locator("#runs-table tbody input[type=checkbox]")
            boxes.nth(0).check()
            expect(page.locator("#compare-button")).to_be_disabled()
            boxes.nth(1).check()
            page.click("#compare-button")
            expect(page.locator("#compare-table tbody tr").first).to_be_visible(timeout=120_000)
            expect(page.locator("#forest-plot")).to_be_visible()
            page.screenshot(path=shots / "7-compare.png", full_page=True)

            # --- Jobs: a two-epoch fine-tune from the form, followed to the end -------------------------------
            page.click("nav >> text=Jobs")
            expect(page.locator("#verb option[value=finetune]")).to_have_count(1)
            page.select_option("#verb", "finetune")
            for name in ESSENTIAL:
                expect(page.locator(f"#field-{name}")).to_have_count(1)
            page.fill("#job-name", JOB_NAME)
            for name, value in FINETUNE.items():
                field = page.locator(f"#field-{name}")
                if not field.count():
                    continue  # a setting the form does not offer keeps its default
                tag, kind = field.evaluate("f => [f.tagName, f.type]")
                if kind == "checkbox":
                    field.set_checked(bool(value))
                elif tag == "SELECT":
                    field.select_option(str(value))
                else:
                    field.fill(str(value))
            page.screenshot(path=shots / "8-jobs-form.png", full_page=True)
            page.click("#start-button")
            status = page.locator("#detail-status")
            expect(status).to_have_text(re.compile("running|done"), timeout=60_000)
            page.screenshot(path=shots / "9-job-running.png", full_page=True)
            expect(status).to_have_text("done", timeout=300_000)
            expect(page.locator("#jobs-table tbody tr .badge.done")).to_have_count(1)
            expect(page.locator("#detail-log")).not_to_be_empty()
            page.screenshot(path=shots / "10-job-done.png", full_page=True)
            expect(page.locator("#detail-out")).to_contain_text(JOB_NAME)
            assert (runs / JOB_NAME).is_dir()

            # The finished run is a run like the others: on the Runs page.
            page.click("nav >> text=Runs")
            expect(page.locator("#runs-table")).to_contain_text(JOB_NAME)
            page.screenshot(path=shots / "11-runs-after-job.png", full_page=True)
        except Exception:
            print(f"server log:\n{log.read_text()}")
            raise
        finally:
            browser.close()
    assert not problems, problems


# --- the pages against a fake API: other tasks, hostile names, refusals --------------------------------------

PNG_1PX = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmM"
           "IQAAAABJRU5ErkJggg==")
HOSTILE = '<img src=x onerror=alert(1)>.png'


def _fake_api(posted: list[dict]) -> APIRouter:
    """Answers shaped like the contracts in ISSUE21.md; what the pages POST as JSON is kept in `posted`."""
    router = APIRouter()
    outputs = {"ml/checkpoint-best.pth": ("multilabel", ["drusen", "haemorrhage", "exudate"]),
               "reg/checkpoint-best.pth": ("regression", ["cdr", "count"])}

    @router.get("/api/models")
    def models() -> dict:
        return {"models": [{"id": k, "path": k, "kind": "classifier", "task": task, "outputs": names,
                            "model": "vit_micro_patch8", "arch": "vit_micro_patch8", "input_size": 32,
                            "run": k.split("/")[0], "metrics": {"val": {}, "test": {}}}
                           for k, (task, names) in outputs.items()]}

    @router.post("/api/predict")
    async def predict(request: Request) -> dict:
        form = await request.form()
        task, names = outputs[str(form["checkpoint"])]
        results = []
        for upload in form.getlist("file"):
            if task == "multilabel":
                results.append({"filename": upload.filename, "prediction": ["drusen", "haemorrhage"],
                                "probabilities": {"drusen": 0.9, "haemorrhage": 0.7, "exudate": 0.1},
                                "overlay": PNG_1PX})
            else:
                results.append({"filename": upload.filename, "prediction": None, "values": {"cdr": 0.412, "count": 3.5},
                                "overlay": None})
        return {"model": form["checkpoint"], "task": task, "outputs": names, "results": results,
                "skipped": [{"filename": "=cmd|' /C calc'!A0.dcm", "reason": "not a DICOM file"}]}

    @router.get("/api/runs")
    def runs() -> dict:
        return {"runs": [{"id": name, "task": task, "model": "vit_micro_patch8", "split": "test",
                          "metrics": {"auroc_macro": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95}},
                          "report": None, "checkpoint": None, "modified": "2026-11-29T12:00:00+00:00"}
                         for name, task in (("run-a", "multiclass"), ("run-b", "regression"))]}

    @router.post("/api/compare")
    async def compare(request: Request) -> JSONResponse:
        posted.append(await request.json())
        return JSONResponse({"detail": "run-a is a multiclass run but run-b is regression; compare like with like"},
                            status_code=400)

    @router.get("/api/forms")
    def forms() -> dict:
        return {"finetune": [
            {"name": "out", "flag": "--out", "type": "path", "default": "", "help": "Run directory to create.",
             "choices": None, "required": True},
            {"name": "epochs", "flag": "--epochs", "type": "int", "default": 50, "help": "Training epochs.",
             "choices": None, "required": False},
            {"name": "lr", "flag": "--lr", "type": "float", "default": None, "help": "Absolute lr.",
             "choices": None, "required": False},
            {"name": "fundus_crop", "flag": "--fundus-crop", "type": "bool", "default": False, "help": "Crop.",
             "choices": None, "required": False},
            {"name": "head", "flag": "--head", "type": "choice", "default": "linear", "help": "Task head.",
             "choices": ["linear", "mlp", "transformer"], "required": False},
            {"name": "model", "flag": "--model", "type": "str", "default": "RETFound_mae_natureCFP",
             "help": "Zoo name.", "choices": None, "required": False},
        ]}

    @router.post("/api/jobs")
    async def start(request: Request) -> JSONResponse:
        posted.append(await request.json())
        return JSONResponse({"detail": "--epochs must be at least 1, got 0", "setting": "epochs"}, status_code=422)

    @router.get("/api/jobs")
    def jobs() -> dict:
        return {"jobs": []}

    return router


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[tuple[str, list[dict]]]:
    """The real app (pages, guard, static files) in this process with the fake API in front of its routes."""
    import threading

    import uvicorn

    from retinafm.serve.app import create_app
    from retinafm.serve.config import ServeConfig

    posted: list[dict] = []
    (tmp_path / "runs").mkdir()
    app = create_app(ServeConfig(runs=tmp_path / "runs"))
    app.router.routes[:0] = _fake_api(posted).routes  # first match wins: the fake answers, not the real API
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", posted
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.slow
def test_pages_show_every_task_and_every_refusal(fake_server: tuple[str, list[dict]], tmp_path: Path) -> None:
    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency")
    from PIL import Image

    base, posted = fake_server
    shots = _artifacts("fake-api")
    image = tmp_path / HOSTILE
    Image.new("RGB", (8, 8), "red").save(image, format="PNG")
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(20_000)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("dialog", lambda dialog: problems.append(f"a dialog opened: {dialog.message}"))
            expect = sync_api.expect

            # Predict with nothing chosen: said, not silently ignored.
            page.goto(base + "/predict")
            expect(page.locator("#model option")).to_have_count(2)
            page.click("#predict-button")
            expect(page.locator("#message")).to_have_text("Choose or drop one or more images first.")

            # Multi-label: the predicted labels, each highlighted; a hostile file name stays text.
            page.select_option("#model", "ml/checkpoint-best.pth")
            page.set_input_files("#files", str(image))
            page.click("#predict-button")
            expect(page.locator("#results-table tbody tr")).to_have_count(1)
            expect(page.locator("#results-table td.filename")).to_have_text(HOSTILE)
            expect(page.locator("#results-table td").nth(2)).to_have_text("drusen, haemorrhage")
            expect(page.locator("#results-table .probs li.best")).to_have_count(2)
            expect(page.locator("#results-table img")).to_have_count(1)  # the overlay; the name made no <img>
            expect(page.locator("#skipped-list")).to_contain_text("not a DICOM file")
            page.screenshot(path=shots / "1-multilabel.png", full_page=True)
            with page.expect_download() as download_info:
                page.click("#download-csv")
            csv = Path(download_info.value.path()).read_text().splitlines()
            assert csv == ["filename,prediction,p_drusen,p_haemorrhage,p_exudate",
                           f"{HOSTILE},drusen;haemorrhage,0.9,0.7,0.1"]

            # Regression: the values, no probabilities.
            page.select_option("#model", "reg/checkpoint-best.pth")
            page.click("#predict-button")
            expect(page.locator("#results-table thead th").last).to_have_text("Values")
            expect(page.locator("#results-table td").nth(2)).to_have_text("cdr 0.412, count 3.500")
            expect(page.locator("#results-table td").first).to_have_text("no overlay")
            page.screenshot(path=shots / "2-regression.png", full_page=True)

            # Runs: compare's refusal is shown in its words; the first ticked is the reference.
            page.goto(base + "/runs")
            page.locator("#runs-table tbody input[type=checkbox]").nth(1).check()
            page.locator("#runs-table tbody input[type=checkbox]").nth(0).check()
            page.click("#compare-button")
            expect(page.locator("#message")).to_have_text(
                "Could not compare: run-a is a multiclass run but run-b is regression; compare like with like")
            assert posted[-1] == {"runs": ["run-b", "run-a"]}
            page.screenshot(path=shots / "3-compare-refused.png", full_page=True)

            # Jobs: one input per type; the values typed; a refused setting shown in the API's words.
            page.goto(base + "/jobs")
            expect(page.locator("#field-epochs")).to_have_attribute("type", "number")
            expect(page.locator("#field-fundus_crop")).to_have_attribute("type", "checkbox")
            expect(page.locator("#field-head option")).to_have_count(3)
            expect(page.locator("#field-head")).to_have_value("linear")
            expect(page.locator("#field-model")).to_have_value("RETFound_mae_natureCFP")
            expect(page.locator("#job-fields")).to_contain_text("(default: 50)")
            expect(page.locator("#field-out")).to_have_count(0)  # the run folder is the job's Name
            expect(page.locator("#job-name")).to_have_value(re.compile(r"^finetune-\d{8}-\d{6}$"))
            page.fill("#job-name", "../escape")
            page.click("#start-button")
            expect(page.locator("#message")).to_contain_text("Name: 1 to 80 letters, digits")
            assert posted == [{"runs": ["run-b", "run-a"]}]  # nothing was sent
            page.fill("#job-name", "my-run")
            page.fill("#field-epochs", "0")
            page.fill("#field-lr", "0.001")
            page.check("#field-fundus_crop")
            page.select_option("#field-head", "mlp")
            page.click("#start-button")
            expect(page.locator("#message")).to_have_text("Could not start the job: --epochs must be at least 1, got 0")
            expect(page.locator(".field.invalid #field-epochs")).to_have_count(1)  # the refused setting marked
            # Only what differs from the defaults is sent, typed as the form says; a form asking for out
            # gets the name there too.
            assert posted[-1] == {"verb": "finetune", "name": "my-run", "settings": {
                "out": "my-run", "epochs": 0, "lr": 0.001, "fundus_crop": True, "head": "mlp"}}
            page.screenshot(path=shots / "4-job-refused.png", full_page=True)
        finally:
            browser.close()
    assert not problems, problems
