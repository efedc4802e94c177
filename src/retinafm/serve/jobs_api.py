"""The Jobs page's API and its queue: finetune, evaluate, predict and embed + probe, run one at a time.

Why subprocesses of the CLI: each job runs `python -m retinafm <verb> <flags>` in its own process
(and process group), so the server stays responsive, survives a job that crashes or runs out of
memory, and can stop a job with everything it started (DataLoader workers included). The command
line is the record of exactly what ran: a user can copy it from the page and run it by hand.

- **Forms**: GET /api/forms, generated from the settings dataclasses (see `forms`).
- **Submit**: POST /api/jobs {"verb", "name", "settings": {setting: value}} -> {"id", ...}. Checked
  before anything is queued: paths confined to --data-root / --runs (403/404; no --data-root: 409),
  values by the settings class's own validate() (422 {"detail", "setting"}), the name (letters,
  digits, . _ -) must not name anything under --runs yet (409). The job's folder <runs>/<name> is
  created at once (empty), so two jobs cannot be given one name.
- **Queue**: FIFO, one job at a time, a worker thread starting the next when one ends. stdout and
  stderr go to <runs>/.jobs/<id>/log.txt, each command preceded by a `$ retinafm ...` line.
  embed-probe is two commands in one job: embed (into the record folder) then probe (into the job's
  folder); the job fails at the first that fails.
- **Cancel**: POST /api/jobs/<id>/cancel. A queued job is dropped (its empty folder removed, the
  name free again); a running one gets SIGTERM to its process group, SIGKILL after `grace` seconds.
- **Records**: <runs>/.jobs/<id>/job.json (written atomically at each change of state) and log.txt,
  so a restarted server lists past jobs. A job the records show as running or queued when a server
  starts was cut off by that server's end: it is marked failed with the reason "the server stopped"
  (a process it left running is stopped first), and a queued one's empty folder is removed so its
  name can be used again. Queued jobs are not rerun by themselves: a restart should not start hours
  of training nobody asked for again.
- **One server per --runs**: the queue holds a lock (<runs>/.jobs/queue.lock); a second server on the
  same folder lists the jobs but refuses to start any (409), so it never takes the other's running
  job for a dead one.
- **Progress**: GET /api/jobs/<id>: the run folder's log.csv (one row per finished epoch) against the
  epochs the settings ask for, and the last lines of log.txt with progress bars' carriage returns
  collapsed to each line's last state.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import math
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from retinafm.files import open_regular, read_table, write_json
from retinafm.serve import forms
from retinafm.serve.config import ServeConfig
from retinafm.settings import ConfigError

router = APIRouter()
log = logging.getLogger("retinafm.serve.jobs")

JOBS_DIR = ".jobs"  # under --runs: one folder per job (job.json, log.txt, embed-probe's embeddings)
QUEUE_LOCK = "queue.lock"
STATUSES = ("queued", "running", "done", "failed", "cancelled")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
JOB_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
GRACE_SECONDS = 10.0  # between SIGTERM and SIGKILL
TAIL_LINES = 40
TAIL_BYTES = 64 * 1024  # log.txt is read from its end: a long run's log is never read whole
RECORD_MAX_BYTES = 1 << 20
STOPPED = "the server stopped"


def _now() -> str:
    """UTC, to the millisecond: jobs submitted within one second still list in the order they came."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class JobError(Exception):
    """A refusal of the jobs API: its HTTP status, a message, and the form setting it names (if any)."""

    def __init__(self, status: int, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.setting = status, message, setting


@dataclass
class Job:
    """One job. `argv`: the command lines it runs, in order (embed-probe has two); `out`: its folder relative
    to --runs; `pid`: the process (and process group) of the command running now; `step`: its index."""

    id: str
    verb: str
    name: str
    out: str
    argv: list[list[str]]
    settings: dict[str, Any]
    epochs: int | None = None
    status: str = "queued"
    returncode: int | None = None
    reason: str | None = None
    created: str = field(default_factory=_now)
    started: str | None = None
    finished: str | None = None
    pid: int | None = None
    step: int | None = None
    # Not recorded: the moment a cancel was asked for (monotonic), and the event set when the job has ended.
    cancel_requested: float | None = field(default=None, repr=False, compare=False)
    ended: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    RECORDED = ("id", "verb", "name", "out", "argv", "settings", "epochs", "status", "returncode", "reason",
                "created", "started", "finished", "pid", "step")

    def record(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.RECORDED}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Job:
        """A job read back from its job.json; ValueError when the file is not one."""
        if not isinstance(data, dict) or not JOB_ID.fullmatch(str(data.get("id", ""))) \
                or not NAME.fullmatch(str(data.get("name", ""))) or data.get("status") not in STATUSES \
                or not isinstance(data.get("argv"), list) or not isinstance(data.get("settings", {}), dict) \
                or not all(isinstance(a, list) and all(isinstance(x, str) for x in a) for a in data["argv"]):
            raise ValueError("not a job record")
        job = cls(**{key: data.get(key) for key in cls.RECORDED if key in data})
        job.out = job.name  # the folder is always <runs>/<name>: never a path a record file could redirect
        if job.status not in ("queued", "running"):
            job.ended.set()
        return job

    @property
    def commands(self) -> list[str]:
        """Each command as a user would type it: `retinafm <verb> <flags>`."""
        return [shlex.join(["retinafm", *argv[3:]]) if argv[1:3] == ["-m", "retinafm"] else shlex.join(argv)
                for argv in self.argv]


class JobQueue:
    """The server's jobs: records on disk, a FIFO queue and one worker thread. `start()` / `stop()` are called
    by the app's lifespan; every public method is safe from any thread (the routes call them in a thread pool).
    `grace`: seconds between SIGTERM and SIGKILL when a job is cancelled; `python`: the interpreter jobs use."""

    def __init__(self, config: ServeConfig, *, grace: float = GRACE_SECONDS, python: str = sys.executable) -> None:
        self.config = config
        self.grace = grace
        self.python = python
        self.runs = Path(config.runs).resolve()  # jobs run in their record folder: every path they get is absolute
        self.root = self.runs / JOBS_DIR
        self._jobs: dict[str, Job] = {}
        self._queue: list[Job] = []
        self._running: Job | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cond = threading.Condition(threading.RLock())
        self._worker: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._started = False  # between start() and stop()
        self._ever_started = False
        self._stopping = False

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        """Read the past jobs, take the queue lock (when another server holds it: list only) and start the worker."""
        with self._cond:
            if self._started:
                return
            self._started, self._ever_started, self._stopping = True, True, False
            if self.root.is_dir():
                self._take_lock()
            self._load()
            self._worker = threading.Thread(target=self._work, name="retinafm-jobs", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        """The app is shutting down: queued jobs will not run (failed, "the server stopped"), the running one is
        cancelled (SIGTERM, SIGKILL after the grace period) and waited for, the lock released."""
        with self._cond:
            if not self._started:
                return
            self._stopping = True
            for job in self._queue:
                self._finish_unstarted(job, "failed", f"{STOPPED} before it started")
            self._queue.clear()
            running = self._running
            if running is not None:
                running.reason = STOPPED
                self._request_cancel(running)
            self._cond.notify_all()
        if running is not None:
            running.ended.wait(self.grace + 5)
        if self._worker is not None:
            self._worker.join(timeout=self.grace + 5)
        with self._cond:
            self._started = False
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _take_lock(self) -> bool:
        """The queue lock: this server runs the jobs of this --runs folder. False: another server does."""
        if self._lock_fd is not None:
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / QUEUE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _load(self) -> None:
        """The records under <runs>/.jobs; with the lock held, the jobs a stopped server left queued or running
        are ended ("the server stopped")."""
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.iterdir()):
            if not JOB_ID.fullmatch(folder.name) or folder.name in self._jobs:
                continue
            try:
                with open_regular(folder / "job.json", what="job record", max_bytes=RECORD_MAX_BYTES) as fh:
                    job = Job.from_record(json.loads(fh.read().decode("utf-8")))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipping job record %s: %s", folder, exc)
                continue
            if job.id != folder.name:
                continue
            self._jobs[job.id] = job
            if job.status in ("queued", "running") and self._lock_fd is not None:
                if job.status == "running":
                    _end_orphan(job.pid, self.grace)
                    job.status, job.reason, job.finished = "failed", f"{STOPPED} while it ran", _now()
                    job.ended.set()
                    self._save(job)
                else:
                    self._finish_unstarted(job, "failed", f"{STOPPED} before it started")

    # ------------------------------------------------------------------ the API
    def _ensure_started(self) -> None:
        """An app used without its lifespan (a test client outside `with`) still reads and runs jobs; after
        stop() the queue stays stopped (reads still answer, submissions are refused)."""
        if not self._ever_started:
            self.start()

    def submit(self, verb: str, name: Any, settings: Any) -> Job:
        """Check a job and queue it (see the module docstring for the refusals); the queued job."""
        self._ensure_started()
        if verb not in forms.VERBS:
            raise JobError(422, f"unknown verb {verb!r}; the jobs are {', '.join(forms.VERBS)}")
        data_root = self.config.data_root
        if data_root is None:
            raise JobError(409, "jobs read their data from --data-root: start the server with --data-root DIR")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise JobError(422, "name: 1 to 80 letters, digits, '.', '_' or '-', starting with a letter or digit "
                                f"(it names the job's folder under --runs); got {name!r}", "name")
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise JobError(422, "settings must be an object of setting: value")
        runs = self.runs
        out = runs / name
        if os.path.lexists(out):
            raise JobError(409, f"{name!r} already exists under --runs; choose another name", "name")
        job_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        work = self.root / job_id
        try:
            plan = forms.plan(verb, settings, data_root=Path(data_root), runs=runs, out=out, work=work)
        except (ConfigError, ValueError) as exc:
            message = str(exc)
            raise JobError(422, message, forms.setting_named(verb, message)) from None
        job = Job(id=job_id, verb=verb, name=name, out=name,
                  argv=[[self.python, "-m", "retinafm", *args] for args in plan.commands], settings=plan.settings,
                  epochs=plan.epochs)
        with self._cond:
            if self._stopping or not self._started:
                raise JobError(503, "the server is stopping; no new jobs")
            if self._lock_fd is None:
                if not self._take_lock():
                    raise JobError(409, "another retinafm server runs the jobs of this --runs folder; start jobs "
                                        "there")
                self._jobs.clear()
                self._load()  # now this server's: end what a stopped one left queued or running
            try:
                out.mkdir()  # the name is taken now: a second job of that name is refused even while this one waits
            except FileExistsError:
                raise JobError(409, f"{name!r} already exists under --runs; choose another name", "name") from None
            work.mkdir(parents=True)
            self._jobs[job.id] = job
            self._save(job)
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job (dropped) or the running one (SIGTERM to its process group, SIGKILL after the
        grace period); waits for a running job to end (at most the grace period and a little more)."""
        self._ensure_started()
        with self._cond:
            job = self._get(job_id)
            if job.status == "queued":
                self._queue.remove(job)
                self._finish_unstarted(job, "cancelled", "cancelled before it started")
                return job
            if job.status != "running":
                raise JobError(409, f"job {job_id} has already ended ({job.status}); nothing to cancel")
            self._request_cancel(job)
        job.ended.wait(self.grace + 5)
        return job

    def get(self, job_id: str) -> Job:
        self._ensure_started()
        with self._cond:
            self._refresh()
            return self._get(job_id)

    def jobs(self) -> list[Job]:
        """Every job, newest first."""
        self._ensure_started()
        with self._cond:
            self._refresh()
            return sorted(self._jobs.values(), key=lambda j: (j.created, j.id), reverse=True)

    def describe(self, job: Job, *, tail: bool = True) -> dict[str, Any]:
        """A job as the API answers it (GET /api/jobs/<id>; the list leaves out the log tail)."""
        with self._cond:
            answer = {key: getattr(job, key) for key in ("id", "verb", "name", "status", "out", "settings",
                                                         "returncode", "reason", "created", "started", "finished")}
            answer["commands"] = job.commands
            answer["step"] = job.argv[job.step][3] if job.step is not None and job.status == "running" else None
            epochs = job.epochs
        answer["progress"] = read_progress(self.runs / job.out / "log.csv", epochs)
        if tail:
            answer["log_tail"] = log_tail(self.root / job.id / "log.txt")
        return answer

    def _get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise JobError(404, f"no job {job_id!r}")
        return job

    def _refresh(self) -> None:
        """Without the lock another server runs the jobs (or none has been started): read the records again."""
        if self._lock_fd is None:
            self._jobs.clear()
            self._load()

    # ------------------------------------------------------------------ running
    def _work(self) -> None:
        """The worker thread: the next queued job, until stop()."""
        while True:
            with self._cond:
                while not self._stopping and not self._queue:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.pop(0)
                job.status, job.started = "running", _now()
                self._running = job
                self._save(job)
            try:
                self._run(job)
            except Exception as exc:  # the worker must outlive any job: a failure is the job's, never the server's
                log.exception("job %s", job.id)
                self._end(job, None, f"the server could not run it: {exc}")
            finally:
                with self._cond:
                    self._running, self._proc = None, None

    def _run(self, job: Job) -> None:
        folder = self.root / job.id
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines reach log.txt as they are printed
        returncode: int | None = 0
        reason: str | None = None
        with open(folder / "log.txt", "ab") as logfile:
            for step, argv in enumerate(job.argv):
                with self._cond:
                    if job.cancel_requested is not None:
                        break
                logfile.write(f"$ {job.commands[step]}\n".encode())
                logfile.flush()
                try:
                    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                                            cwd=folder, env=env, start_new_session=True)
                except OSError as exc:
                    returncode, reason = None, f"could not start {argv[3] if len(argv) > 3 else argv[0]}: {exc}"
                    break
                with self._cond:
                    self._proc = proc
                    job.pid, job.step = proc.pid, step
                    self._save(job)
                    if job.cancel_requested is not None:  # asked for while the process was starting
                        _signal_group(proc.pid, signal.SIGTERM)
                returncode = self._wait(job, proc)
                _signal_group(proc.pid, signal.SIGKILL)  # whatever the command left behind in its group
                if returncode != 0:
                    command = argv[3] if len(argv) > 3 else argv[0]
                    reason = (f"{command} exited with code {returncode}" if returncode > 0
                              else f"{command} was stopped by signal {-returncode}")
                    break
        self._end(job, returncode, reason)

    def _wait(self, job: Job, proc: subprocess.Popen[bytes]) -> int:
        """The command's return code; SIGKILL to its group once a cancel is `grace` seconds old."""
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            with self._cond:
                asked = job.cancel_requested
            if asked is not None and time.monotonic() - asked > self.grace:
                _signal_group(proc.pid, signal.SIGKILL)

    def _end(self, job: Job, returncode: int | None, reason: str | None) -> None:
        with self._cond:
            if job.cancel_requested is not None:
                job.status = "cancelled"
                job.reason = job.reason or "cancelled"
            else:
                job.status = "done" if returncode == 0 and reason is None else "failed"
                job.reason = reason
            job.returncode, job.finished, job.pid = returncode, _now(), None
            self._save(job)
            job.ended.set()

    def _request_cancel(self, job: Job) -> None:
        """SIGTERM to the running job's process group (the worker sends SIGKILL after the grace period)."""
        if job.cancel_requested is None:
            job.cancel_requested = time.monotonic()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)

    def _finish_unstarted(self, job: Job, status: str, reason: str) -> None:
        """A job that never ran: ended, and its (still empty) folder removed so the name is free again."""
        job.status, job.reason, job.finished = status, reason, _now()
        job.ended.set()
        self._save(job)
        folder = self.runs / job.name
        with contextlib.suppress(OSError):
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()

    def _save(self, job: Job) -> None:
        try:
            write_json(self.root / job.id / "job.json", job.record())
        except OSError as exc:  # a full disk must not stop the queue; the job goes on, its record is stale
            log.warning("cannot write the record of job %s: %s", job.id, exc)


# --------------------------------------------------------------------------- processes
def _signal_group(pid: int, sig: int) -> None:
    """`sig` to the process group `pid` leads (jobs start their own session); gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _end_orphan(pid: Any, grace: float) -> None:
    """A job process a stopped server left running (it was in its own session, so it outlived the server):
    stopped, when the pid still names a retinafm command leading its own session (not a reused pid)."""
    if not isinstance(pid, int) or pid <= 1:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"retinafm" not in cmdline or os.getsid(pid) != pid:
            return
    except OSError:
        return
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.1)
    _signal_group(pid, signal.SIGKILL)  # the rest of its group, or the leader that ignored SIGTERM


def _running(pid: int) -> bool:
    """Whether `pid` runs: neither gone nor a zombie (an orphan's zombie waits for an init that may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --------------------------------------------------------------------------- progress
def _number(value: Any) -> float | int | None:
    """A log cell for JSON: finite numbers only (NaN is not JSON)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """log.csv's rows; a last line cut short (a copy caught mid-write) is left out."""
    import pandas as pd

    try:
        frame = read_table(path, what="log.csv", text=())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        try:
            with open_regular(path, what="log.csv", max_bytes=16 << 20) as fh:
                lines = fh.read().decode("utf-8", errors="replace").splitlines()
            frame = pd.read_csv(io.StringIO("\n".join(lines[:-1])))
        except (OSError, ValueError):
            return []
    return frame.to_dict("records")


def read_progress(path: Path, epochs: int | None) -> dict[str, Any] | None:
    """{"epoch" (finished epochs), "epochs", "train_loss", "val_loss", the validation metrics of the last
    epoch, "history": [{"epoch", "train_loss", "val_loss"}]}; None for a job without an epoch loop."""
    if epochs is None:
        return None
    rows = [row for row in _read_rows(path) if _number(row.get("epoch")) is not None]
    progress: dict[str, Any] = {"epoch": 0, "epochs": epochs, "train_loss": None, "val_loss": None, "history": []}
    if not rows:
        return progress
    last = rows[-1]
    progress["epoch"] = int(_number(last["epoch"]) or 0) + 1  # log.csv counts epochs from 0
    progress["train_loss"] = _number(last.get("train_loss"))
    progress["val_loss"] = _number(last.get("val_loss"))
    for key, value in last.items():
        if isinstance(key, str) and key.startswith("val_") and key != "val_loss":
            progress[key] = _number(value)
    progress["history"] = [{"epoch": int(_number(row["epoch"]) or 0) + 1, "train_loss": _number(row.get("train_loss")),
                            "val_loss": _number(row.get("val_loss"))} for row in rows]
    return progress


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a job's log, each progress bar line at its last state (tqdm redraws a line
    with carriage returns; the log holds every redraw)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - TAIL_BYTES))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > TAIL_BYTES:
        text = text.split("\n", 1)[-1]  # the first line read is a part of one
    shown = []
    for line in text.split("\n"):
        states = [state.rstrip() for state in line.split("\r")]
        visible = [state for state in states if state.strip()]
        shown.append(visible[-1] if visible else "")
    while shown and not shown[-1]:
        shown.pop()
    return "\n".join(shown[-lines:])


# --------------------------------------------------------------------------- routes
def _queue(request: Request) -> JobQueue:
    return request.app.state.jobs


def _refusal(exc: JobError) -> JSONResponse:
    body: dict[str, Any] = {"detail": exc.message}
    if exc.setting:
        body["setting"] = exc.setting
    return JSONResponse(body, status_code=exc.status)


@router.get("/api/forms")
def get_forms() -> dict[str, list[dict[str, Any]]]:
    """{verb: [{"name", "flag", "type", "default", "help", "choices", "required", "bounds", "root", "list",
    "step"}]}: every setting a job form offers, from the settings dataclasses."""
    return forms.forms()


@router.get("/api/jobs")
def list_jobs(request: Request) -> dict[str, Any]:
    queue = _queue(request)
    return {"jobs": [queue.describe(job, tail=False) for job in queue.jobs()]}


@router.post("/api/jobs")
async def create_job(request: Request) -> Any:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return JSONResponse({"detail": "send a JSON object: {\"verb\", \"name\", \"settings\"}"}, status_code=422)
    if not isinstance(body, dict):
        return JSONResponse({"detail": "send a JSON object: {\"verb\", \"name\", \"settings\"}"}, status_code=422)
    queue = _queue(request)
    try:
        job = await run_in_threadpool(queue.submit, body.get("verb"), body.get("name"), body.get("settings"))
    except JobError as exc:
        return _refusal(exc)
    return {"id": job.id, **queue.describe(job, tail=False)}


@router.get("/api/jobs/{job_id}")
def get_job(job_id: str, request: Request) -> Any:
    queue = _queue(request)
    try:
        return queue.describe(queue.get(job_id))
    except JobError as exc:
        return _refusal(exc)


@router.post("/api/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request) -> Any:
    queue = _queue(request)
    try:
        return queue.describe(queue.cancel(job_id))
    except JobError as exc:
        return _refusal(exc)


__all__ = ["GRACE_SECONDS", "Job", "JobError", "JobQueue", "log_tail", "read_progress", "router"]
