"""The Runs page's API: every run directory under --runs with its headline metrics, its report, and `compare`.

- `GET /api/runs` lists run directories: folders under --runs (the folder itself included) holding
  metrics_<split>.json, a checkpoint-*.pth or a report.html, found a few levels deep. Hidden folders
  (.jobs, .git) are skipped, and a symlink is followed only when it resolves inside --runs, so the
  listing never shows or reads anything outside it. A run's parsed entry is cached against the sizes
  and times of the files it was read from, so a page that polls a folder of many runs re-reads only
  the runs that changed.
- `GET /runs/<id>/report.html` answers the run's report.html (a path confined to --runs) with a policy
  of its own: the report is self-contained (inline CSS, base64 images, no script), so it gets
  `default-src 'none'` plus `sandbox`: a report.html that someone else's run folder brought along cannot
  run script or act as this origin even if it tried.
- `POST /api/compare {"runs": [id, ...]}` runs the library's `compare_runs` into a private temporary
  folder (deleted afterwards) and answers its rows and forest plot; nothing is written under --runs.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from retinafm.files.inputs import CONFIG_MAX_BYTES, InputFileError, open_regular
from retinafm.serve.config import ServeConfig
from retinafm.serve.security import confined, error

router = APIRouter()

SPLIT_ORDER = ("test", "val", "train")  # the split whose metrics a run shows first, when it has several
MAX_DEPTH = 4  # levels below --runs searched for runs (runs/<model>/<task>/<seed> is three)
MAX_FOLDERS = 5000  # folders looked at per listing: --runs pointed at a data set must not take seconds
METRICS_MAX_BYTES = 16 * 2**20
REPORT_MAX_BYTES = 512 * 2**20  # a report embeds its figures and overlays; a huge one is still refused
CACHE_SIZE = 10_000
MAX_COMPARE_RUNS = 20
COMPARE_BOOTSTRAP = 1000  # compare's own default
# Files whose change changes a run's entry; their (size, mtime) is the cache key.
WATCHED = ("config.yaml", "report.html", "checkpoint-best.pth")
REPORT_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'; "
              "base-uri 'none'; form-action 'none'; sandbox")
# compare runs the CPU flat out (a parallel bootstrap): one at a time, in a worker thread off the event loop.
# A thread lock rather than an anyio limiter: it is not tied to one event loop.
COMPARE_TIMEOUT_S = 1800  # a compare of many runs with 10,000 replicates takes minutes, not hours
_compare_lock = threading.Lock()


@dataclasses.dataclass
class _Folder:
    """One folder seen by the walk: its id (posix, relative to --runs) and the files of interest in it."""

    id: str
    path: Path
    files: dict[str, os.stat_result]  # name -> stat, for regular files that stay inside --runs


_cache: OrderedDict[tuple[str, str], tuple[tuple[Any, ...], dict[str, Any]]] = OrderedDict()
_cache_lock = threading.Lock()


# --------------------------------------------------------------------------- listing
@router.get("/api/runs")
def list_runs(request: Request) -> JSONResponse:
    """Every run under --runs, newest first. A sync route: FastAPI runs it in a worker thread, so the
    walk and the JSON parsing never block the event loop."""
    config: ServeConfig = request.app.state.config
    return JSONResponse({"runs": find_runs(config.runs)})


def find_runs(runs: Path) -> list[dict[str, Any]]:
    """The entries of every run directory under `runs` (see the module docstring), newest first."""
    root = runs.resolve()
    entries = [_entry(root, folder) for folder in _walk(root)]
    entries.sort(key=lambda e: (e["modified"] or "", e["id"]), reverse=True)
    return entries


def _inside(root: Path, path: Path) -> bool:
    """Whether `path`, symlinks resolved, lies in `root`; a symlink loop (RuntimeError before Python 3.13,
    OSError after) leads nowhere and so not inside."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return False
    return resolved == root or root in resolved.parents


def _walk(root: Path) -> list[_Folder]:
    """Run folders under `root`, breadth first, at most MAX_DEPTH levels down and MAX_FOLDERS folders looked at.
    Symlinks (to folders or files) count only when they resolve inside `root`; each real folder is seen once."""
    found: list[_Folder] = []
    queue: list[tuple[Path, str, int]] = [(root, ".", 0)]
    seen: set[Path] = {root}
    looked = 0
    while queue and looked < MAX_FOLDERS:
        folder, rel, depth = queue.pop(0)
        looked += 1
        files: dict[str, os.stat_result] = {}
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        for child in children:
            if child.name.startswith("."):
                continue  # .jobs, .git, .retinafm.lock: not runs, and not to be shown
            try:
                link = child.is_symlink()
                if link and not _inside(root, Path(child.path)):
                    continue  # never followed out of --runs
                if child.is_dir():
                    target = Path(child.path).resolve()  # a loop was refused by _inside above
                    if depth < MAX_DEPTH and target not in seen:
                        seen.add(target)
                        queue.append((Path(child.path), child.name if rel == "." else f"{rel}/{child.name}",
                                      depth + 1))
                elif child.is_file() and _interesting(child.name):
                    files[child.name] = child.stat()
            except OSError:
                continue  # vanished or unreadable between listing and stat
        if _is_run(files):
            found.append(_Folder(rel, folder, files))
    return found


def _interesting(name: str) -> bool:
    return name in WATCHED or _marks_run(name)


def _marks_run(name: str) -> bool:
    """A file that makes its folder a run: metrics_<split>.json, checkpoint-*.pth or report.html."""
    return (name == "report.html" or (name.startswith("metrics_") and name.endswith(".json"))
            or (name.startswith("checkpoint-") and name.endswith(".pth")))


def _is_run(files: dict[str, os.stat_result]) -> bool:
    return any(_marks_run(name) for name in files)


def _entry(root: Path, folder: _Folder) -> dict[str, Any]:
    """The run's entry, from the cache while none of the files it was built from changed."""
    key = (str(root), folder.id)
    signature = tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in folder.files.items()))
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None and cached[0] == signature:
            _cache.move_to_end(key)
            return cached[1]
    entry = _build_entry(folder)
    with _cache_lock:
        _cache[key] = (signature, entry)
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return entry


def _build_entry(folder: _Folder) -> dict[str, Any]:
    files = folder.files
    split = next((s for s in SPLIT_ORDER if f"metrics_{s}.json" in files), None)
    if split is None:
        others = sorted(n[len("metrics_"):-len(".json")] for n in files if n.startswith("metrics_")
                        and n.endswith(".json"))
        split = others[0] if others else None
    metrics = _read_json(folder.path / f"metrics_{split}.json") if split else {}
    config = _read_config(folder.path / "config.yaml") if "config.yaml" in files else {}
    task_info = metrics.get("task") if isinstance(metrics.get("task"), dict) else {}
    task = task_info.get("name") or config.get("task")
    model = config.get("model") or metrics.get("model")
    prefix = "" if folder.id == "." else f"{folder.id}/"
    newest = max(st.st_mtime for st in files.values())
    entry: dict[str, Any] = {
        "id": folder.id,
        "task": str(task) if task else None,
        "model": str(model) if model else None,
        "split": split if metrics else None,
        "metrics": _headline(metrics, str(task) if task else None),
        "n": _number(metrics.get("n")),
        "report": report_url(folder.id) if "report.html" in files else None,
        "checkpoint": f"{prefix}checkpoint-best.pth" if "checkpoint-best.pth" in files else None,
        "modified": _dt.datetime.fromtimestamp(newest, tz=_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return entry


def report_url(run_id: str) -> str:
    """Where a run's report is served: /runs/<id>/report.html (the --runs folder's own: /runs/report.html)."""
    return "/runs/report.html" if run_id == "." else f"/runs/{run_id}/report.html"


def _read_json(path: Path) -> dict[str, Any]:
    """A metrics file's content, or {} when it cannot be read (a run still writing it, a hostile file):
    one broken run must not break the listing of the others."""
    try:
        with open_regular(path, what="run metrics", max_bytes=METRICS_MAX_BYTES, kind="metrics files") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except (OSError, InputFileError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_config(path: Path) -> dict[str, Any]:
    """The `model` and `task` of a run's config.yaml. The file is written by retinafm as one flat mapping, so
    only those two top-level lines are parsed (each alone, with yaml's safe loader): composing the whole
    document cost 10 ms a run, most of a first listing of many runs."""
    import yaml

    wanted: dict[str, Any] = {}
    try:
        with open_regular(path, what="run config.yaml", max_bytes=CONFIG_MAX_BYTES, kind="YAML settings files") as fh:
            lines = fh.read().decode("utf-8").splitlines()
    except (OSError, InputFileError, UnicodeDecodeError):
        return wanted
    for line in lines:
        if line.startswith(("model:", "task:")):
            try:
                value = yaml.safe_load(line)
            except yaml.YAMLError:
                continue
            if isinstance(value, dict):
                wanted.update({k: v for k, v in value.items() if isinstance(v, str)})
    return wanted


def _number(value: Any) -> float | None:
    """A finite float for JSON, else None (NaN and infinities are not JSON)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _headline(metrics: dict[str, Any], task: str | None) -> dict[str, dict[str, float | None]]:
    """{metric: {"value", "ci_low", "ci_high"}} for the task's report headline (as report.html shows it);
    for an unknown task, every metric that has a CI."""
    from retinafm.tasks import TASKS

    ci = metrics.get("ci") if isinstance(metrics.get("ci"), dict) else {}
    names = [k for k in TASKS[task].report_headline if k in metrics] if task in TASKS else list(ci)
    out: dict[str, dict[str, float | None]] = {}
    for name in names:
        bounds = ci.get(name)
        low, high = (bounds[0], bounds[1]) if isinstance(bounds, list) and len(bounds) == 2 else (None, None)
        out[name] = {"value": _number(metrics.get(name)), "ci_low": _number(low), "ci_high": _number(high)}
    return out


# --------------------------------------------------------------------------- reports
@router.get("/runs/report.html")
def root_report(request: Request) -> Response:
    """The report of --runs itself, when --runs is a single run directory."""
    return _report(request, ".")


@router.get("/runs/{run_id:path}/report.html")
def run_report(request: Request, run_id: str) -> Response:
    """A run's report.html, confined to --runs (403 for a name leading out, 404 when there is none)."""
    return _report(request, run_id)


def _confined(root: Path, relative: str, what: str) -> Path:
    """security.confined, with a symlink loop (which Path.resolve raises as RuntimeError or OSError) refused
    as a path that leads nowhere instead of ending the request in a 500."""
    try:
        return confined(root, relative, what=what)
    except (RuntimeError, OSError):
        raise HTTPException(403, f"{what} {relative!r} leads nowhere (a symlink loop)") from None


def _report(request: Request, run_id: str) -> Response:
    config: ServeConfig = request.app.state.config
    relative = "report.html" if run_id in (".", "") else f"{run_id}/report.html"
    path = _confined(config.runs, relative, "report")
    try:
        with open_regular(path, what="report", max_bytes=REPORT_MAX_BYTES, kind="reports") as fh:
            body = fh.read()
    except InputFileError as exc:
        raise HTTPException(403, f"report {relative!r}: {exc.reason}") from None
    except OSError:
        raise HTTPException(404, f"no report {relative!r}") from None
    return Response(body, media_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": REPORT_CSP,
        "X-Frame-Options": "SAMEORIGIN",  # as frame-ancestors 'self': the Runs page may show it in a frame
        "Cache-Control": "no-store",
    })


# --------------------------------------------------------------------------- compare
@router.post("/api/compare")
async def compare(request: Request) -> JSONResponse:
    """{"runs": [id, ...], optional "metric", "bootstrap"} → {"rows", "forest", "notes", "wilcoxon"}.
    The first run is the reference, as on the command line."""
    config: ServeConfig = request.app.state.config
    try:
        body = await request.json()
    except ValueError:
        return error(422, 'send a JSON object: {"runs": ["<run id>", "<run id>", ...]}')
    if not isinstance(body, dict) or not isinstance(body.get("runs"), list) \
            or not all(isinstance(r, str) for r in body["runs"]):
        return error(422, '"runs" must be a list of run ids (as GET /api/runs gives them)')
    ids: list[str] = body["runs"]
    if len(ids) < 2:
        return error(422, "choose at least two runs to compare (the first is the reference)")
    if len(ids) > MAX_COMPARE_RUNS:
        return error(422, f"compare at most {MAX_COMPARE_RUNS} runs at once, not {len(ids)}")
    if len(set(ids)) != len(ids):
        return error(422, "each run may be chosen once")
    metric = body.get("metric")
    if metric is not None and not isinstance(metric, str):
        return error(422, '"metric" must be a metric name such as "auroc_macro"')
    bootstrap = body.get("bootstrap", COMPARE_BOOTSTRAP)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or not 100 <= bootstrap <= 10_000:
        return error(422, '"bootstrap" must be a whole number of replicates from 100 to 10000')
    folders = []
    for run_id in ids:
        folder = _confined(config.runs, run_id or ".", "run")
        if not folder.is_dir():
            return error(422, f"run {run_id!r} is not a run directory")
        for needed in ("predictions_test.csv", "metrics_test.json"):
            if not (folder / needed).exists():
                return error(422, f"run {run_id!r} has no {needed}: compare runs that finished their test "
                                  "evaluation")
            _confined(config.runs, f"{run_id}/{needed}", "run file")  # 403 for a symlink leading out
        folders.append(folder)
    try:
        result = await anyio.to_thread.run_sync(_run_compare, config.runs, folders, metric, bootstrap)
    except (ValueError, KeyError, TypeError, OSError, subprocess.TimeoutExpired) as exc:  # refused, unreadable
        message = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        return error(422, "these runs cannot be compared: " + _relative_message(message, config.runs))
    return JSONResponse(result)


def _run_compare(runs: Path, folders: list[Path], metric: str | None, bootstrap: int) -> dict[str, Any]:
    """`retinafm compare` (the command, in its own process, as the jobs run theirs) into a private temporary
    folder (0700, deleted on the way out), its comparison.json and forest.png answered as JSON. A refusal of
    the command (exit 2, one `error:` line) becomes a ValueError with that line."""
    argv = [sys.executable, "-m", "retinafm", "compare", *map(str, folders), "--bootstrap", str(bootstrap)]
    if metric:
        argv += ["--metric", metric]
    with _compare_lock, tempfile.TemporaryDirectory(prefix="retinafm-compare-") as tmp:
        out = Path(tmp) / "comparison"
        done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=COMPARE_TIMEOUT_S,
                              env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            raise ValueError(lines[0][len("error:"):].strip() if lines else
                             f"compare stopped (exit {done.returncode}): {done.stderr.strip()[-300:]}")
        written = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
        forest = out / "forest.png"
        image = base64.b64encode(forest.read_bytes()).decode("ascii") if forest.is_file() else None
    notes = [line[len("warning:"):].strip() for line in done.stderr.splitlines() if line.startswith("warning:")]
    notes += [f"{w['model']}: {w['note']}" for w in written.get("wilcoxon", []) if w.get("note")]
    return {
        "rows": [_clean(row, runs) for row in written.get("comparisons", [])],
        "forest": f"data:image/png;base64,{image}" if image else None,
        "notes": list(dict.fromkeys(_relative_message(n, runs) for n in notes)),
        "wilcoxon": [_clean(w, runs) for w in written.get("wilcoxon", [])],
    }


def _clean(row: dict[str, Any], runs: Path) -> dict[str, Any]:
    """NaN and infinities as null (JSON has no NaN: a metric undefined on one class), and a run named by
    its path (two runs with one folder name) named by its id instead of the server's path."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else
                _relative_message(v, runs) if isinstance(v, str) else v) for k, v in row.items()}


def _relative_message(message: str, runs: Path) -> str:
    """A library message with the server's own paths shortened to run ids."""
    return message.replace(f"{runs.resolve()}/", "").replace(str(runs.resolve()), "--runs")
