"""The manual builds: `mkdocs build --strict` (a broken link or anchor, a page missing from the nav or
a missing included file fails it), offline; and the README stays a short front door."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# The checkout: the nearest folder above this file with a pyproject.toml (tests may sit in subfolders).
REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


def test_mkdocs_build_strict_has_no_warnings(tmp_path):
    site = tmp_path / "site"
    # NO_MKDOCS_2_WARNING: Material's end-of-life banner, printed on every build, is not about our pages.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # The working directory is the repository root: the snippet includes are resolved from there.
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNING" not in output, output
    pages = sorted(p.stem for p in (REPO / "docs").glob("*.md"))
    for page in pages:
        built = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), f"docs/{page}.md was not built"
    # Readable offline and in locked-down networks: no web fonts fetched by the pages.
    html = (site / "index.html").read_text(encoding="utf-8")
    assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html
    # The included files arrived (architecture.md and benchmarks.md are snippets of root files).
    assert "Where things go" in (site / "architecture" / "index.html").read_text(encoding="utf-8")
    assert "Benchmark results" in (site / "benchmarks" / "index.html").read_text(encoding="utf-8")


def test_readme_is_a_short_front_door_with_the_two_commands_first():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 12 * 1024
    head = "\n".join(text.splitlines()[:40])
    assert "make demo" in head and "make test" in head
    # Its links into the repository point at files that exist, the manual's pages among them.
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert {"docs/index.md", "docs/python.md", "ARCHITECTURE.md"} <= set(local), local
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_the_documented_prediction_columns_are_the_ones_written(trained_run):
    """README and docs/training.md give predictions_test.csv's column order; a run writes exactly that."""
    header = (trained_run / "predictions_test.csv").read_text().splitlines()[0].split(",")
    classes = [c for c in header if c.startswith("prob_")]
    written = ", ".join([*header[:-len(classes)], "prob_<class>…"])
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"`predictions_test.csv` (`{written}`)" in readme
    table = (REPO / "docs" / "training.md").read_text().replace("&lt;", "<").replace("&gt;", ">")
    assert f"| `predictions_test.csv` | {written.replace('path, ', 'path, [patient_id,] ')} |" in table
