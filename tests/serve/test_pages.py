"""The web app's pages (serve/pages.py): they render, hold no inline script or style (the CSP would block it),
escape what they show, and the login page sets the token cookie."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from retinafm.serve.app import create_app
from retinafm.serve.config import ServeConfig
from retinafm.serve.security import cookie_name

PAGES = ("/models", "/predict", "/runs", "/jobs", "/login")
TOKEN = "a-long-enough-test-token-0123456789"
BASE = "http://127.0.0.1:8000"

COOKIE = cookie_name(8000)  # the login cookie of a server on the default port


def _client(config: ServeConfig) -> TestClient:
    return TestClient(create_app(config), base_url=BASE, follow_redirects=False)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir()
    return folder


def _assert_csp_clean(html: str) -> None:
    # Every <script> loads a file (no inline code), and no inline style anywhere.
    scripts = re.findall(r"<script\b[^>]*>", html, flags=re.IGNORECASE)
    assert scripts and all(re.search(r"\bsrc=", tag) for tag in scripts), scripts
    bodies = re.findall(r"<script\b[^>]*>(.*?)</script>", html, flags=re.IGNORECASE | re.DOTALL)
    assert len(bodies) == len(scripts) and not any(body.strip() for body in bodies)  # nothing between the tags
    assert " style=" not in html.lower() and "<style" not in html.lower()
    assert not re.search(r"\son[a-z]+=", html, flags=re.IGNORECASE)  # no onclick="..." handlers either


@pytest.mark.parametrize("path", PAGES)
def test_each_page_renders_with_the_nav_and_no_inline_code(runs: Path, path: str) -> None:
    response = _client(ServeConfig(runs=runs)).get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    html = response.text
    _assert_csp_clean(html)
    assert '<script src="/static/app.js" defer></script>' in html
    assert '<link rel="stylesheet" href="/static/style.css">' in html
    for href, label in (("/models", "Models"), ("/predict", "Predict"), ("/runs", "Runs"), ("/jobs", "Jobs")):
        assert f'href="{href}"' in html and f">{label}</a>" in html
    assert str(runs) in html  # the server's runs folder is shown
    page = path.strip("/")
    assert f'data-page="{page}"' in html
    if path != "/login":
        assert re.search(rf'<a href="{path}"[^>]*aria-current="page"', html)  # the nav marks where we are


def test_root_redirects_to_predict(runs: Path) -> None:
    response = _client(ServeConfig(runs=runs)).get("/")
    assert response.status_code in (302, 303, 307) and response.headers["location"] == "/predict"


def test_predict_page_hands_the_limits_to_the_script(runs: Path) -> None:
    config = ServeConfig(runs=runs, max_files=7, max_file_bytes=1234, max_request_bytes=5678)
    html = _client(config).get("/predict").text
    assert 'data-max-files="7"' in html and 'data-max-file-bytes="1234"' in html
    assert 'data-max-request-bytes="5678"' in html
    assert 'id="files"' in html and 'type="file" multiple' in html and 'id="drop"' in html


def test_jobs_page_says_when_there_is_no_data_root(tmp_path: Path, runs: Path) -> None:
    assert "--data-root" in _client(ServeConfig(runs=runs)).get("/jobs").text
    data = tmp_path / "data"
    data.mkdir()
    html = _client(ServeConfig(runs=runs, data_root=data)).get("/jobs").text
    assert "without <code>--data-root</code>" not in html and str(data) in html


def test_shown_text_is_escaped(tmp_path: Path) -> None:
    # A folder may be named anything; on the page it must stay text.
    runs = tmp_path / "<script>alert(1)<img src=x>&\"x'"
    runs.mkdir()
    html = _client(ServeConfig(runs=runs)).get("/runs").text
    assert "<script>alert(1)" not in html and "<img src=x>" not in html
    assert "&lt;script&gt;alert(1)&lt;img src=x&gt;&amp;&#34;x&#39;" in html
    _assert_csp_clean(html)


def test_static_script_and_style_are_served(runs: Path) -> None:
    client = _client(ServeConfig(runs=runs))
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert ".innerHTML" not in script.text  # all text goes in as text
    assert "http://" not in script.text and "https://" not in script.text  # nothing from the network
    style = client.get("/static/style.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert "@import" not in style.text and "url(" not in style.text


# --- login ---------------------------------------------------------------------------------------------------

def test_login_with_the_right_token_sets_a_strict_httponly_cookie(runs: Path) -> None:
    client = _client(ServeConfig(runs=runs, token=TOKEN))
    assert client.get("/predict").status_code == 401  # the guard: no token, no page
    form = client.get("/login")
    assert form.status_code == 200 and 'name="token"' in form.text and 'method="post"' in form.text
    _assert_csp_clean(form.text)

    response = client.post("/login", data={"token": TOKEN})
    assert response.status_code == 303 and response.headers["location"] == "/predict"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={TOKEN};")
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and "Path=/" in cookie
    # The client keeps the cookie: the pages now answer.
    assert client.get("/predict").status_code == 200


@pytest.mark.parametrize("given", ["", "wrong-token-wrong-token-wrong", TOKEN[:-1], TOKEN + "x"])
def test_login_with_a_wrong_token_is_401_and_the_form_again(runs: Path, given: str) -> None:
    client = _client(ServeConfig(runs=runs, token=TOKEN))
    response = client.post("/login", data={"token": given})
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert 'name="token"' in response.text and "not this server" in response.text
    if given:
        assert given not in response.text  # a mistyped token is not echoed into the page
    _assert_csp_clean(response.text)
    assert client.get("/predict").status_code == 401


def test_login_from_another_site_is_refused(runs: Path) -> None:
    client = _client(ServeConfig(runs=runs, token=TOKEN))
    response = client.post("/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"})
    assert response.status_code == 403 and "set-cookie" not in response.headers


def test_login_on_a_server_without_token_just_goes_on(runs: Path) -> None:
    client = _client(ServeConfig(runs=runs))
    assert "needs no token" in client.get("/login").text
    response = client.post("/login", data={"token": "anything"})
    assert response.status_code == 303 and response.headers["location"] == "/predict"
    assert "set-cookie" not in response.headers
