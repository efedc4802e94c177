"""The guard of `retinafm serve` on the real app: with a token no route answers without it; without one
only loopback names are served; cross-site state changes are refused; every answer carries the security
headers; and the real server, started as a user starts it, behaves the same."""
from __future__ import annotations

import asyncio
import http.client
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers import assert_one_line_error, run_bounded
from starlette.routing import BaseRoute, Mount, Route

from retinafm.serve.app import create_app
from retinafm.serve.config import ServeConfig, resolve_token
from retinafm.serve.security import OPEN_PATHS, cookie_name
from retinafm.serve.server import make_config

TOKEN = "test-token-0123456789abcdef"
BASE = "http://127.0.0.1:8000"

COOKIE = cookie_name(8000)  # the login cookie of a server on the default port


def _routes(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, BaseRoute]]:
    """(full path prefix, route) for every route, inside included routers too (FastAPI 0.16x includes a
    router as one lazy `_IncludedRouter` entry of app.routes, holding the router and its prefix)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            context = getattr(route, "include_context", None)
            yield from _routes(included.routes, prefix + getattr(context, "prefix", ""))
        else:
            yield prefix, route


def _requests(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) for every route the app has, path parameters filled in, HEAD and OPTIONS added once
    (the guard must answer them too), the static mount by a file under it."""
    found: list[tuple[str, str]] = []
    for prefix, route in _routes(app.routes):
        if isinstance(route, Mount):
            found.append(("GET", prefix + route.path.rstrip("/") + "/app.js"))
        elif isinstance(route, Route):
            path = re.sub(r"\{[^}]+\}", "x", prefix + route.path)
            found += [(method, path) for method in sorted(route.methods or {"GET"}) if method != "HEAD"]
    found += [("HEAD", "/api/runs"), ("OPTIONS", "/api/runs")]
    return found


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir()
    return folder


@pytest.fixture
def token_app(runs: Path) -> FastAPI:
    return create_app(ServeConfig(runs=runs, token=TOKEN))


@pytest.fixture
def token_client(token_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(token_app, base_url=BASE, follow_redirects=False) as client:  # the lifespan runs too
        yield client


def test_the_app_has_routes_to_guard(token_app: FastAPI) -> None:
    """The walk over the routes finds them all: at least every one in the OpenAPI schema, and the others."""
    requests = set(_requests(token_app))
    schema = token_app.openapi()["paths"]
    for path, operations in schema.items():
        for method in operations:
            assert (method.upper(), re.sub(r"\{[^}]+\}", "x", path)) in requests, (method, path)
    assert {("GET", "/api/runs"), ("POST", "/api/compare"), ("GET", "/runs/x/report.html"),
            ("GET", "/static/app.js")} <= requests


def _assert_headers(response, what: str) -> None:
    policy = response.headers.get("content-security-policy", "")
    directives = dict((d.strip().split(" ", 1) + [""])[:2] for d in policy.split(";") if d.strip())
    script = directives.get("script-src", directives.get("default-src"))
    assert script is not None and "'unsafe-inline'" not in script and "'unsafe-eval'" not in script, (what, policy)
    assert "frame-ancestors" in directives, (what, policy)
    assert response.headers.get("x-content-type-options") == "nosniff", what
    assert response.headers.get("x-frame-options") == "DENY", what


def test_every_route_needs_the_token(token_app: FastAPI, token_client: TestClient) -> None:
    for method, path in _requests(token_app):
        if path in OPEN_PATHS:
            continue
        what = f"{method} {path}"
        response = token_client.request(method, path)
        assert response.status_code == 401, what
        _assert_headers(response, what)
        if method == "HEAD":
            continue
        if path.startswith("/api/"):
            assert response.json().keys() == {"detail"}, what
            assert "token" in response.json()["detail"], what
        else:  # a page: the short hint to log in, nothing of the page
            assert response.headers["content-type"].startswith("text/html"), what
            assert len(response.content) < 300 and b'href="/login"' in response.content, what


@pytest.mark.parametrize("wrong", [TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "", " ", "Bearer", TOKEN + "\u00e9"])
def test_a_wrong_token_is_refused(token_client: TestClient, wrong: str) -> None:
    header = f"Bearer {wrong}".encode()  # bytes: a non-ASCII token is sent as the raw UTF-8 a client may send
    assert token_client.get("/api/runs", headers={"Authorization": header}).status_code == 401
    if not wrong.isascii():
        return
    token_client.cookies.set(COOKIE, wrong)
    try:
        assert token_client.get("/api/runs").status_code == 401
    finally:
        token_client.cookies.clear()


def test_other_schemes_do_not_pass(token_client: TestClient) -> None:
    for header in (f"Basic {TOKEN}", TOKEN, f"Token {TOKEN}"):
        assert token_client.get("/api/runs", headers={"Authorization": header}).status_code == 401, header


def _login(client: TestClient, app: FastAPI) -> None:
    """The cookie as the login page sets it; set directly while the app has no POST /login."""
    if any(isinstance(r, Route) and r.path == "/login" and "POST" in (r.methods or ()) for r in app.routes):
        response = client.post("/login", data={"token": TOKEN})
        assert response.status_code < 400, response.text
        cookie = response.headers.get("set-cookie", "")
        assert cookie.startswith(f"{COOKIE}=") and "httponly" in cookie.lower() and "samesite" in cookie.lower()
        assert client.cookies.get(COOKIE) == TOKEN
    else:
        client.cookies.set(COOKIE, TOKEN)


@pytest.mark.parametrize("how", ["bearer", "cookie"])
def test_every_route_answers_with_the_token(token_app: FastAPI, token_client: TestClient, how: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"} if how == "bearer" else {}
    if how == "cookie":
        _login(token_client, token_app)
    for method, path in _requests(token_app):
        if path in OPEN_PATHS:
            continue  # the login page answers without the token; what it does with a form is its own test
        what = f"{how}: {method} {path}"
        response = token_client.request(method, path, headers=headers)
        assert response.status_code not in (401, 403), (what, response.status_code, response.text[:200])
        assert response.status_code < 500, (what, response.text[:500])
        if not (path.startswith("/runs/") and response.status_code == 200):  # a report has its own policy
            _assert_headers(response, what)
    assert token_client.get("/api/runs", headers=headers).json() == {"runs": []}


def test_the_token_is_compared_in_constant_time(token_client: TestClient, monkeypatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    original = secrets.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(secrets, "compare_digest", spy)
    assert token_client.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert token_client.get("/api/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert (TOKEN.encode(), TOKEN.encode()) in calls and (b"nope", TOKEN.encode()) in calls


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "192.168.1.20:8000", "127.0.0.1.evil.example",
                                  "localhost.evil.example:8000", "0.0.0.0:8000", ""])
def test_without_a_token_only_loopback_names_are_served(runs: Path, host: str) -> None:
    client = TestClient(create_app(ServeConfig(runs=runs)), base_url=BASE)
    response = client.get("/api/runs", headers={"host": host})
    assert response.status_code == 403 and response.json().keys() == {"detail"}, host
    _assert_headers(response, host)


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "127.0.0.2"])
def test_loopback_names_are_served(runs: Path, host: str) -> None:
    client = TestClient(create_app(ServeConfig(runs=runs)), base_url=BASE)
    assert client.get("/api/runs", headers={"host": host}).status_code == 200, host


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "http://127.0.0.1:8001"},  # another local server: another origin
    {"Origin": "null"},
    {"Origin": "file://"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.1:8000"},
])
@pytest.mark.parametrize("with_token", [False, True])
def test_cross_site_posts_are_refused(runs: Path, headers: dict[str, str], with_token: bool) -> None:
    client = TestClient(create_app(ServeConfig(runs=runs, token=TOKEN if with_token else None)), base_url=BASE)
    if with_token:
        client.cookies.set(COOKIE, TOKEN)  # what a browser would send along with a forged request
    response = client.post("/api/compare", json={"runs": ["a", "b"]}, headers=headers)
    assert response.status_code == 403, (headers, response.text)
    assert "cross-site" in response.json()["detail"]
    assert client.get("/api/runs", headers=headers).status_code == 200  # reading is not refused by origin


@pytest.mark.parametrize("headers", [{}, {"Origin": BASE}, {"Sec-Fetch-Site": "same-origin", "Origin": BASE},
                                     {"Sec-Fetch-Site": "none"}])
def test_same_origin_posts_pass(runs: Path, headers: dict[str, str]) -> None:
    client = TestClient(create_app(ServeConfig(runs=runs)), base_url=BASE)
    response = client.post("/api/compare", json={"runs": ["a"]}, headers=headers)
    assert response.status_code == 422, (headers, response.text)  # reached the route, which names the problem


def _raw_get(app: FastAPI, path: str) -> tuple[int, bytes]:
    """GET `path` as a server hands it to the app once decoded ('?', '#', '../' inside the path), which an
    HTTP client would not send as is."""
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


@pytest.mark.parametrize("path", ["/login?/../api/runs", "/login#/../api/runs", "/login/../api/runs", "/login/",
                                  "/LOGIN", "/login\\..\\api\\runs", "//api/runs", "/api/runs?", "/login\x00"])
def test_paths_near_the_login_page_need_the_token(token_app: FastAPI, path: str) -> None:
    """Only the login page itself is open; nothing that merely starts with it or decodes to another route."""
    status, body = _raw_get(token_app, path)
    assert status in (401, 404), (path, status)
    assert b'"runs"' not in body


def test_an_error_in_a_route_still_has_the_headers(runs: Path) -> None:
    app = create_app(ServeConfig(runs=runs))

    def fails() -> None:
        raise RuntimeError("internal detail")

    app.add_api_route("/api/fails", fails)
    response = TestClient(app, base_url=BASE, raise_server_exceptions=False).get("/api/fails")
    assert response.status_code == 500 and b"internal detail" not in response.content
    _assert_headers(response, "500")


# --------------------------------------------------------------------------- config and command line
def test_tokens_are_resolved(runs: Path) -> None:
    assert resolve_token("127.0.0.1", None) == (None, False)
    assert resolve_token("::1", None) == (None, False)
    assert resolve_token("localhost", None) == (None, False)
    for host in ("0.0.0.0", "192.168.1.20", "::", "myhost"):
        token, generated = resolve_token(host, None)
        assert generated and token and len(token) >= 16, host
    assert resolve_token("0.0.0.0", TOKEN) == (TOKEN, False)
    assert resolve_token("0.0.0.0", None)[0] != resolve_token("0.0.0.0", None)[0]  # random, not a constant
    with pytest.raises(ValueError, match="at least 16"):
        resolve_token("127.0.0.1", "short")
    config, generated = make_config(runs, host="0.0.0.0")
    assert generated and config.token and config.runs == runs.resolve()


def test_serve_refuses_a_missing_runs_folder(tmp_path: Path) -> None:
    outcome = run_bounded("serve", "--runs", tmp_path / "missing", "--port", "0", timeout=60)
    assert_one_line_error(outcome, "--runs", "missing")


def test_serve_refuses_a_short_token(runs: Path) -> None:
    outcome = run_bounded("serve", "--runs", runs, "--port", "0", "--token", "short", timeout=60)
    assert_one_line_error(outcome, "--token", "16")


# --------------------------------------------------------------------------- the real server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A raw GET: http.client sends the path as given ('../' included), as a hostile client would."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_real_server(trained_run: Path, tmp_path: Path) -> None:
    """`python -m retinafm serve` on a free loopback port: it answers, needs its token, lists the run and
    refuses a raw traversal; it is always stopped."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "run", ignore=shutil.ignore_patterns("checkpoint-last.pth"))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "report.html").write_text("SECRET-OF-THE-HOST")
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "retinafm", "serve", "--runs", str(runs), "--port", str(port),
                                "--token", TOKEN], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                status, body = _get(port, "/api/runs", auth)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer within 90 s"
                time.sleep(0.3)
        assert status == 200
        import json

        listed = json.loads(body)["runs"]
        assert [r["id"] for r in listed] == ["run"] and listed[0]["metrics"]["auroc_macro"]["ci_low"] is not None
        assert _get(port, "/api/runs")[0] == 401
        assert _get(port, "/runs/run/report.html", auth)[0] == 200
        for path in ("/runs/../outside/report.html", "/runs/run/../../outside/report.html",
                     "/runs/%2e%2e/outside/report.html", "/runs/..%2foutside/report.html"):
            status, body = _get(port, path, auth)
            assert status in (403, 404) and b"SECRET-OF-THE-HOST" not in body, (path, status)
    finally:
        process.terminate()
        try:
            output = process.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
    assert f"127.0.0.1:{port}" in output and "Traceback" not in output and TOKEN not in output, output


def test_confined_refuses_a_symlink_loop(tmp_path: Path) -> None:
    from fastapi import HTTPException

    from retinafm.serve.security import confined

    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(HTTPException) as refused:
        confined(tmp_path, "loop/report.html")
    assert refused.value.status_code in (403, 404)
