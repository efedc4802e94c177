"""The issue's "done when": the real `retinafm serve` on a free loopback port, driven by headless Chromium
(Debian's, through Playwright): two images predicted on the Predict page with their overlays, a run's report
opened from the Runs page (and two runs compared), a short fine-tune started on the Jobs page and seen to
finish. A screenshot of every step is kept in test-artifacts/serve/ (or $RETINAFM_TEST_ARTIFACTS) for a person
to look at."""
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

REPO = Path(__file__).resolve().parents[2]
FINETUNE = {  # the Jobs page's form as the test fills it: a tiny model, seconds on a CPU
    "out": "browser-finetune", "data_path": "fundus", "model": "vit_micro_patch8", "weights": "none",
    "input_size": 32, "epochs": 2, "warmup_epochs": 1, "batch_size": 16, "lr": 0.001, "layer_decay": 1.0,
    "drop_path": 0.0, "randaug_magnitude": 0, "reprob": 0.0, "crop_min_scale": 0.5, "num_workers": 0,
    "device": "cpu", "bootstrap": 0, "report_heatmaps": 0,
}
ESSENTIAL = ("out", "data_path", "model", "weights", "input_size", "epochs", "num_workers", "device")


def _chromium() -> str:
    # The policy of tests/workflows/test_report.py: skip without a browser, except under CI.
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: install Debian's chromium (apt-get install chromium) "
                    "for the web app's browser test")
    pytest.skip("chromium is not installed (Debian: apt-get install chromium); browser test skipped")


def _artifacts() -> Path:
    folder = Path(os.environ.get("RETINAFM_TEST_ARTIFACTS", REPO / "test-artifacts")) / "serve"
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
    shots = _artifacts()
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
            assert (runs / FINETUNE["out"]).is_dir()

            # The finished run is a run like the others: on the Runs page.
            page.click("nav >> text=Runs")
            expect(page.locator("#runs-table")).to_contain_text(FINETUNE["out"])
            page.screenshot(path=shots / "11-runs-after-job.png", full_page=True)
        except Exception:
            print(f"server log:\n{log.read_text()}")
            raise
        finally:
            browser.close()
    assert not problems, problems
