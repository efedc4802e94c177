"""The wheel users install where they cannot clone: it holds every subpackage, the report template
and the `retinafm` command, and works installed in a clean environment, run from outside the repo."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

# The checkout: the nearest folder above this file with a pyproject.toml (tests may sit in subfolders).
REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
SUBPACKAGES = ("settings", "data", "models", "tasks", "stats", "runtime", "engine", "objectives", "workflows")
TEMPLATE = "retinafm/workflows/templates/report.html.j2"


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`python -m build --wheel` on a copy of the project (so no build/ or egg-info lands in the
    checkout), without build isolation: the test environment's setuptools, no network."""
    root = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, root / name)
    for licence in REPO.glob("LICEN[CS]E*"):
        shutil.copy2(licence, root / licence.name)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(root)], cwd=root)
    wheels = list(dist.glob("retinafm-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_every_subpackage_the_template_and_the_command(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points_file = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(entry_points_file).decode())
    assert TEMPLATE in names
    assert "retinafm/__init__.py" in names and "retinafm/cli.py" in names
    missing = [p for p in SUBPACKAGES if f"retinafm/{p}/__init__.py" not in names]
    assert not missing, f"subpackages missing from the wheel: {missing}"
    # Every module of the source tree is in the wheel (a folder without __init__.py would be dropped).
    source = {p.relative_to(REPO / "src").as_posix() for p in (REPO / "src" / "retinafm").rglob("*.py")}
    assert source <= names, sorted(source - names)
    assert entry_points["console_scripts"]["retinafm"].strip() == "retinafm.cli:main"


@pytest.mark.slow  # a venv, a pip install and two fresh interpreters: 3-12 s
def test_wheel_installs_in_a_clean_venv_with_a_working_command_and_template(wheel, tmp_path):
    venv = tmp_path / "venv"
    # --system-site-packages as asked of a clean install; the dependencies (torch, …) come from the test
    # environment through a path file, so nothing is downloaded or reinstalled. A plain path line (not
    # site.addsitedir) keeps the test environment's own .pth files, among them an editable retinafm,
    # out of the new venv: retinafm can only come from the wheel.
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp_path).stdout.strip())
    (purelib / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
          str(wheel)], cwd=tmp_path)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shown = _run([str(venv / "bin" / "retinafm"), "--help"], cwd=outside, env=env).stdout
    for verb in ("finetune", "evaluate", "predict", "embed", "report"):
        assert verb in shown, f"`retinafm --help` does not list {verb}:\n{shown}"
    check = (
        "import retinafm, retinafm.workflows.report, importlib.resources as r; "
        "assert r.files('retinafm.workflows').joinpath('templates/report.html.j2').is_file(); "
        "print(retinafm.__file__)"
    )
    location = Path(_run([str(python), "-c", check], cwd=outside, env=env).stdout.strip())
    assert location.is_relative_to(purelib), f"retinafm was imported from {location}, not from the installed wheel"
