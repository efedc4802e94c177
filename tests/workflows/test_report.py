"""report.html from hand-built run directories (multi-class, multi-label, regression): the HTML
text, escaping, self-containment, and the page as headless Chromium renders it."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from retinafm import plots
from retinafm.workflows.report import write_report

NAN = float("nan")
CLASSES = ["normal", "<b>x</b>", "glaucoma"]  # a user's class name with markup must stay text


def _image(path: Path, colour: tuple[int, int, int], size: int = 48) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return str(path)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))  # NaN written as NaN, as files.write_json does


def _common_files(run: Path, log_metric: str) -> None:
    """config.yaml, log.csv (best epoch: the third), data_summary.csv, skipped.csv (25 files)."""
    config = {"out": str(run), "data_path": "DATA", "model": "vit_micro_patch8", "weights": "none",
              "task": "multiclass", "epochs": 4, "batch_size": 16, "lr": 0.001, "seed": 7, "threshold": "0.5",
              "class_names": CLASSES}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log = pd.DataFrame({"epoch": range(4), "lr": [1e-4, 1e-3, 5e-4, 1e-5], "train_loss": [1.0, 0.8, 0.6, 0.5],
                        "val_loss": [1.1, 0.9, 0.6, 0.65], log_metric: [0.6, 0.8, 0.93, 0.93], "seconds": 1.0})
    log.to_csv(run / "log.csv", index=False)
    plots.plot_training_curves(log, run / "plots" / "curves.png")
    pd.DataFrame({"split": ["train", "val", "test"], "images": [30, 10, 10]}).to_csv(run / "data_summary.csv",
                                                                                     index=False)
    pd.DataFrame({"path": [f"/data/bad_{i:02d}.png" for i in range(25)], "reason": "empty file (0 bytes)"}).to_csv(
        run / "skipped.csv", index=False)


def _multiclass_run(root: Path) -> Path:
    run = root / "run_mc"
    run.mkdir(parents=True)
    _common_files(run, "val_auroc_macro")
    (root / "imgs").mkdir()
    (root / "imgs" / "corrupt.png").write_bytes(b"not an image")
    rows = [  # path, label, prediction, probabilities (normal, <b>x</b>, glaucoma)
        (_image(root / "imgs" / "a.png", (200, 40, 40)), "normal", "normal", (0.8, 0.1, 0.1)),
        (_image(root / "imgs" / "b.png", (40, 200, 40)), "glaucoma", "<b>x</b>", (0.1, 0.7, 0.2)),
        (_image(root / "imgs" / "c.png", (40, 40, 200)), "normal", "glaucoma", (0.05, 0.05, 0.9)),
        (str(root / "imgs" / "corrupt.png"), "<b>x</b>", "normal", (0.6, 0.3, 0.1)),
        (str(root / "imgs" / "missing.png"), "glaucoma", "glaucoma", (0.1, 0.1, 0.8)),
    ]
    frame = pd.DataFrame({"path": [r[0] for r in rows], "prediction": [r[2] for r in rows],
                          "label": [r[1] for r in rows], "patient_id": ["p1", "p1", "p2", "p3", "p4"]})
    for i, name in enumerate(CLASSES):
        frame[f"prob_{name}"] = [r[3][i] for r in rows]
    frame.to_csv(run / "predictions_test.csv", index=False)
    metrics = {"split": "test", "loss": 0.4321, "n": 5.0, "accuracy": 0.4, "balanced_accuracy": 0.5,
               "auroc_macro": 0.912, "auprc_macro": 0.8, "f1_macro": 0.45, "sensitivity_macro": 0.5,
               "specificity_macro": 0.7, "kappa": 0.2, "mcc": 0.25, "ece": 0.1234,
               "auroc_normal": 0.95, "auroc_<b>x</b>": NAN, "auroc_glaucoma": 0.874,
               "auprc_normal": 0.9, "auprc_<b>x</b>": NAN, "auprc_glaucoma": 0.7,
               "sensitivity_normal": 0.5, "sensitivity_<b>x</b>": 0.0, "sensitivity_glaucoma": 0.5,
               "specificity_normal": 1.0, "specificity_<b>x</b>": 0.75, "specificity_glaucoma": 0.667,
               "ci": {"auroc_macro": [0.871, 0.948], "accuracy": [0.1, 0.8], "auroc_glaucoma": [0.801, 0.933],
                      "auroc_<b>x</b>": [NAN, NAN]},
               "bootstrap": {"replicates": 1000, "seed": 0, "level": 0.95, "method": "percentile", "unit": "patient",
                             "stratified": True},
               "task": {"name": "multiclass", "outputs": CLASSES, "state": {"grade_order": None}},
               "absent_classes": ["<b>x</b>"], "label_map": {"DR": "<b>x</b>"}}
    _write_json(run / "metrics_test.json", metrics)
    y = np.array([0, 2, 0, 1, 2] * 4)
    p = np.tile(np.array([r[3] for r in rows]), (4, 1))
    plots.plot_confusion_matrix(np.eye(3) * 3 + 1, CLASSES, run / "plots" / "confusion_matrix.png")
    plots.plot_roc(y, p, CLASSES, run / "plots" / "roc.png")
    plots.plot_calibration([("top label", (p.argmax(1) == y).astype(float), p.max(1))],
                           run / "plots" / "calibration.png")
    shutil.copy(run / "plots" / "roc.png", run / "plots" / "extra_plot.png")  # unknown name: stem as caption
    return run


def _no_external_urls(html: str) -> None:
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower()


def test_multiclass_report(tmp_path):
    run = _multiclass_run(tmp_path)
    path = write_report(run, "test", max_errors=12)
    assert path == run / "report.html"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # written atomically
    html = path.read_text(encoding="utf-8")
    _no_external_urls(html)

    # header
    assert "<title>run_mc</title>" in html and "vit_micro_patch8" in html and "multiclass" in html
    # metrics: the headline table with CIs, n/a, and the per-class table
    table = html[html.index('<table id="metrics">'):]
    table = table[:table.index("</table>")]
    assert "auroc_macro" in table and "0.912 (0.871–0.948)" in table and "0.400 (0.100–0.800)" in table
    assert ">0.123<" in table and "quadratic_kappa" not in table  # ECE; absent keys are left out
    assert "0.874 (0.801–0.933)" in html and "n/a" in html
    assert "1000 replicates resampling patients" in html
    assert "Absent from this set" in html and "DR → &lt;b&gt;x&lt;/b&gt;" in html
    # escaping: the class name shows as text, never as markup
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html
    # data, settings, training
    assert "Skipped files: 25 unreadable" in html and "bad_19.png" in html and "bad_20.png" not in html
    assert html.index(">model<") < html.index(">weights<") < html.index(">seed<") < html.index(">out<")
    assert "Best epoch 3 of 4" in html  # tie at 0.93 with epoch 4 goes to the lower validation loss
    # figures: curves once, the rest in caption order, every one embedded
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", html)
    assert captions[1:] == ["Confusion matrix (counts)", "ROC curves with their macro average",
                            "Calibration (reliability diagram)", "extra_plot"]
    assert html.count("data:image/png;base64,") == 5
    # errors: most confident first, thumbnails embedded, unreadable ones a placeholder
    errors = html[html.index('id="errors-table"'):]
    assert errors.index("c.png") < errors.index("b.png") < errors.index("corrupt.png")
    assert "a.png" not in errors and "missing.png" not in errors  # correct predictions
    assert errors.count("data:image/jpeg;base64,") == 2 and errors.count("(image unavailable)") == 1
    assert "3 of 5 images misclassified" in html


def test_report_limits_errors_and_keeps_going_without_optional_files(tmp_path):
    run = _multiclass_run(tmp_path)
    for name in ("config.yaml", "log.csv", "data_summary.csv", "skipped.csv"):
        (run / name).unlink()
    shutil.rmtree(run / "plots")
    html = write_report(run, max_errors=1, title="ckpt.pth on <external>").read_text(encoding="utf-8")
    assert "<title>ckpt.pth on &lt;external&gt;</title>" in html
    assert "No config.yaml in this folder" in html and "No log.csv" in html and "No data_summary.csv" in html
    assert "No figures in plots/" in html
    errors = html[html.index('id="errors-table"'):]
    assert "c.png" in errors and "b.png" not in errors  # max_errors=1

    empty = tmp_path / "empty"
    empty.mkdir()
    html = write_report(empty, "val").read_text(encoding="utf-8")
    assert "No metrics_val.json here." in html and "No predictions_val.csv here." in html
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope")


def _multilabel_run(root: Path) -> Path:
    run = root / "run_ml"
    run.mkdir(parents=True)
    _common_files(run, "val_auroc_macro")
    labels = ["irf", "srf", "drusen"]
    paths = [_image(root / "imgs" / f"{i}.png", (20 * i, 100, 120)) for i in range(4)]
    frame = pd.DataFrame({"path": paths, "prediction": ["irf", "", "srf;drusen", "drusen"],
                          "true_irf": pd.array([1, 0, None, 0], dtype="Int64"),
                          "true_srf": pd.array([0, 1, 1, 0], dtype="Int64"),
                          "true_drusen": pd.array([1, 0, 1, None], dtype="Int64"),
                          "prob_irf": [0.9, 0.2, 0.99, 0.55],  # row 2 unknown: never an error
                          "prob_srf": [0.1, 0.4, 0.7, 0.05],  # row 1: 0.4 < its threshold 0.6
                          "prob_drusen": [0.05, 0.3, 0.8, 0.97]})  # row 0: missed, 0.95 from the truth
    frame.to_csv(run / "predictions_test.csv", index=False)
    metrics = {"split": "test", "loss": 0.3, "n": 4.0, "auroc_macro": 0.81, "auprc_macro": 0.7,
               "accuracy_macro": 0.75, "sensitivity_macro": 0.6, "specificity_macro": 0.9, "f1_macro": 0.65,
               "kappa_macro": 0.4, "ece_macro": 0.2,
               **{f"{m}_{name}": v for m, v in (("auroc", 0.8), ("threshold", 0.5), ("n", 3.0)) for name in labels},
               "ci": {"auroc_macro": [0.7, 0.9]},
               "bootstrap": {"replicates": 200, "seed": 1, "level": 0.95, "unit": "image"},
               "task": {"name": "multilabel", "outputs": labels,
                        "state": {"threshold": None, "thresholds": [0.5, 0.6, 0.5], "pos_weight": None}}}
    _write_json(run / "metrics_test.json", metrics)
    y = frame[[f"true_{n}" for n in labels]].to_numpy(dtype=float, na_value=np.nan)
    p = frame[[f"prob_{n}" for n in labels]].to_numpy()
    plots.plot_multilabel_roc(np.tile(y, (3, 1)), np.tile(p, (3, 1)), labels, run / "plots" / "roc.png")
    return run


def test_multilabel_report(tmp_path):
    run = _multilabel_run(tmp_path)
    html = write_report(run).read_text(encoding="utf-8")
    _no_external_urls(html)
    table = html[html.index('<table id="metrics">'):html.index("</table>", html.index('<table id="metrics">'))]
    assert "kappa_macro" in table and "0.810 (0.700–0.900)" in table and "accuracy_macro" in table
    assert "Per label" in html and "200 replicates resampling images" in html
    errors = html[html.index('id="errors-table"'):]
    rows = re.findall(r"<tr>(.*?)</tr>", errors[errors.index("<tbody>"):], re.S)
    found = [tuple(re.findall(r"<td[^>]*>([^<]*)</td>", r)[1:5]) for r in rows]
    assert found == [("drusen", "present", "0.050", "0.500"),  # furthest from the truth first
                     ("srf", "present", "0.400", "0.600"),  # an error only at its own threshold
                     ("irf", "absent", "0.550", "0.500")]  # row 2's irf (0.99) and row 3's drusen are unknown
    assert "3 wrong (image, label) decisions" in html


def test_regression_report_ranks_errors_in_standard_deviations(tmp_path):
    run = tmp_path / "eval_reg"  # an evaluate output folder: no config, log or data summary
    run.mkdir()
    paths = [_image(tmp_path / "imgs" / f"{i}.png", (100, 30 * i, 60)) for i in range(4)]
    frame = pd.DataFrame({"path": paths, "true_age": [40.0, 50.0, 60.0, 70.0], "true_sbp": [100, 130, 160, NAN],
                          "age": [41.0, 62.0, 60.0, 69.0], "sbp": [150.0, 131.0, 160.0, 120.0]})
    frame.to_csv(run / "predictions_test.csv", index=False)
    metrics = {"split": "test", "loss": 0.9, "n": 4.0, "r2_macro": 0.5, "mae_macro": 6.25, "rmse_macro": 17.0,
               "pearson_macro": NAN, "r2_age": 0.6, "r2_sbp": 0.4, "mae_age": 3.5, "mae_sbp": 17.0,
               "n_age": 4.0, "n_sbp": 3.0,
               "task": {"name": "regression", "outputs": ["age", "sbp"], "state": {}}}
    _write_json(run / "metrics_test.json", metrics)
    plots.plot_regression_scatter(frame[["true_age", "true_sbp"]].to_numpy(), frame[["age", "sbp"]].to_numpy(),
                                  ["age", "sbp"], run / "plots" / "scatter.png")
    html = write_report(run).read_text(encoding="utf-8")
    _no_external_urls(html)
    table = html[html.index('<table id="metrics">'):html.index("</table>", html.index('<table id="metrics">'))]
    assert "r2_macro" in table and ">6.25<" in table and ">n/a<" in table  # MAE in units; undefined r
    assert "No confidence intervals" in html and "Predicted against true values" in html
    errors = html[html.index('id="errors-table"'):]
    order = re.findall(r"<td>(age|sbp)</td>", errors)
    # sbp off by 50 = 2.04 SD of sbp (24.5); age off by 12 = 1.07 SD of age (11.2); then the small ones
    assert order[:2] == ["sbp", "age"] and len(order) == 7  # 4 age + 3 known sbp
    assert "+50" in errors and "error / SD" in errors


# --- the page in a real browser -------------------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: install Debian's chromium (apt-get install chromium) "
                    "for the report's browser test")
    pytest.skip("chromium is not installed (Debian: apt-get install chromium); browser test skipped")


def _browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # Own profile per call: parallel xdist workers must not share a Chromium user-data-dir.
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


class _Tables(HTMLParser):
    """Cell texts per row of the table with a given id."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.inside, self.rows = table_id, False, []

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id") == self.table_id:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False

    def handle_data(self, data):
        if self.inside and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data.strip() + " " if data.strip() else ""


@pytest.mark.xdist_group("chromium")
def test_report_in_headless_chromium(tmp_path):
    _chromium()  # skip (or fail under CI) before building anything
    report = write_report(_multiclass_run(tmp_path))
    dom = _browser(tmp_path, "--dump-dom", report.as_uri()).stdout
    parser = _Tables("metrics")
    parser.feed(dom)
    rows = {cells[0].split()[-1]: cells[1].strip() for cells in parser.rows[1:]}  # key (small print) -> value
    assert parser.rows[0][0].strip() == "metric" and parser.rows[0][1].strip() == "value (95% CI)"
    assert rows["auroc_macro"] == "0.912 (0.871–0.948)" and rows["kappa"] == "0.200" and rows["ece"] == "0.123"
    assert list(rows)[:3] == ["auroc_macro", "auprc_macro", "accuracy"]

    shot = tmp_path / "report.png"
    _browser(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri())
    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        colours = img.convert("RGB").resize((320, 500)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 200  # a rendered page, not a blank or error screen


# --- where the model looked (heatmap overlays) ----------------------------------------------------


def _explanations(run: Path, rows: list[tuple[str, str, str, object, str]], *, split: str = "test",
                  method: str = "grad-rollout", value: str = "probability") -> None:
    """explanations_<split>.csv as evaluate writes it: (case, path, target, probability or value, overlay) rows."""
    frame = pd.DataFrame({"path": [r[1] for r in rows], "target": [r[2] for r in rows],
                          value: [r[3] for r in rows], "method": method,
                          "heatmap": [r[4].replace("overlays", "heatmaps").replace(".png", ".npy") for r in rows],
                          "overlay": [r[4] for r in rows], "case": [r[0] for r in rows]})
    frame.to_csv(run / f"explanations_{split}.csv", index=False)


def _overlay_png(path: Path, seed: int) -> None:
    from retinafm.data.synthetic import render_fundus
    from retinafm.overlays import write_overlay

    fundus = render_fundus(np.random.default_rng(seed), "diabetic_retinopathy", size=320)
    yy, xx = np.mgrid[0:320, 0:320]
    heatmap = np.exp(-(((xx - 100 - 40 * seed) / 30.0) ** 2 + ((yy - 180) / 25.0) ** 2))
    write_overlay(path, fundus, heatmap)


def _section(html: str, section_id: str) -> str:
    start = html.index(f'<section id="{section_id}">')
    return html[start:html.index("</section>", start)]


def test_report_shows_where_the_model_looked(tmp_path):
    run = _multiclass_run(tmp_path)
    overlays = run / "explanations_test" / "overlays"
    for seed, name in enumerate(("c__glaucoma.png", "b__x.png", "a__normal.png")):
        _overlay_png(overlays / name, seed)
    (overlays / "corrupt.png").write_bytes(b"\x89PNG not really")
    _image(tmp_path / "secret.png", (1, 2, 3))  # outside the run folder: never embedded
    (overlays / "link.png").symlink_to(tmp_path / "secret.png")
    hostile = '<script>alert("x")</script>'
    _explanations(run, [
        ("error", str(tmp_path / "imgs" / "c.png"), "glaucoma", 0.9, "explanations_test/overlays/c__glaucoma.png"),
        ("error", "imgs/b.png", hostile, 0.7, "explanations_test/overlays/b__x.png"),
        ("error", "corrupt.png", "normal", 0.6, "explanations_test/overlays/corrupt.png"),
        ("error", "up.png", "normal", 0.55, "../secret.png"),
        ("error", "sneaky.png", "normal", 0.55, "explanations_test/../../secret.png"),
        ("error", "absolute.png", "normal", 0.5, str(tmp_path / "secret.png")),
        ("error", "linked.png", "normal", 0.5, "explanations_test/overlays/link.png"),
        ("correct", "/data/a.png", "normal", 0.8, "explanations_test/overlays/a__normal.png"),
        ("correct", "gone.png", "glaucoma", "", "explanations_test/overlays/gone.png"),
        ("correct", "nul.png", "glaucoma", 0.5, "explanations_test/overlays/a\x00b.png"),
        ("unknown", "other.png", "normal", 0.5, "explanations_test/overlays/a__normal.png"),  # no gallery
    ])
    html = write_report(run).read_text(encoding="utf-8")
    _no_external_urls(html)  # the hostile target stays text
    assert 'href="#explanations"' in html
    section = _section(html, "explanations")
    assert "gradient-weighted attention rollout" in section and "top 10 %" in section
    errors, correct = section.split("Correct cases (a sample)")
    assert "Most confident errors" in errors
    # Cards in the CSV's order; the three readable overlays embedded, the rest a note each.
    assert errors.index("c.png") < errors.index("b.png") < errors.index("corrupt.png") < errors.index("linked.png")
    assert errors.count("data:image/jpeg;base64,") == 2 and correct.count("data:image/jpeg;base64,") == 1
    assert errors.count("(overlay not read: its path leads outside the run folder)") == 4
    assert errors.count("(overlay unreadable)") == 1 and "(overlay file missing)" in correct
    assert "nul.png" in correct
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in errors and "<script" not in section
    assert "probability 0.900" in errors and "probability n/a" in correct
    assert 'title="/data/a.png"' in correct and ">a.png</span>" in correct  # the name, the full path on hover
    assert "other.png" not in section
    # The overlay is downsized for the page: a 320 px PNG becomes a 256 px JPEG.
    uri = re.search(r'src="data:image/jpeg;base64,([^"]+)"', correct).group(1)
    with Image.open(io.BytesIO(base64.b64decode(uri))) as embedded:
        assert embedded.size == (256, 256)


def test_report_says_when_there_are_no_heatmaps(tmp_path):
    run = _multiclass_run(tmp_path)
    section = _section(write_report(run).read_text(encoding="utf-8"), "explanations")
    assert "No explanations_test.csv here" in section and "<figure" not in section

    pd.DataFrame({"path": ["a.png"], "target": ["normal"]}).to_csv(run / "explanations_test.csv", index=False)
    section = _section(write_report(run).read_text(encoding="utf-8"), "explanations")
    assert "lacks column(s) method, overlay, case, probability" in section

    _explanations(run, [("correct", "a.png", "normal", 0.8, "explanations_test/overlays/a.png")])
    section = _section(write_report(run).read_text(encoding="utf-8"), "explanations")
    assert "No errors were explained." in section and "(overlay file missing)" in section


def test_report_heatmap_cards_of_a_regression_show_the_predicted_value(tmp_path):
    run = tmp_path / "eval_reg"
    run.mkdir()
    _write_json(run / "metrics_test.json", {"split": "test", "task": {"name": "regression", "outputs": ["age"]}})
    _overlay_png(run / "explanations_test" / "overlays" / "a__age.png", 0)
    _explanations(run, [("error", "a.png", "age", 63.25, "explanations_test/overlays/a__age.png")],
                  method="integrated-gradients", value="value")
    section = _section(write_report(run).read_text(encoding="utf-8"), "explanations")
    assert "predicted value 63.25" in section and "integrated gradients" in section
    assert "of the target named on each card" in section
