"""The web app's pages: server-rendered HTML shells that static/app.js fills from the JSON API.

Every page is a Jinja2 template under serve/templates/ (autoescaped: run names, paths and anything else that
reaches a page is text, never markup) extending one layout with the nav bar. The content security policy
forbids inline script and style, so the pages hold no <script> body and no style="" attribute: behaviour is
static/app.js, look is static/style.css, and what the script needs from the server travels in data-*
attributes. `/login` is the one page the guard answers without the token: it sets the token as an HttpOnly,
SameSite=Strict cookie, so the script's same-origin fetches carry it and no page script can read it.
"""
from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader

from retinafm.serve.config import ServeConfig
from retinafm.serve.security import cookie_name

router = APIRouter()

# autoescape=True for every template (not select_autoescape by extension): all of them are HTML.
_templates = Environment(loader=PackageLoader("retinafm.serve", "templates"), autoescape=True,
                         trim_blocks=True, lstrip_blocks=True)

# (path, label) of the nav bar, in order
NAV = (("/models", "Models"), ("/predict", "Predict"), ("/runs", "Runs"), ("/jobs", "Jobs"))


def _render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    config: ServeConfig = request.app.state.config
    html = _templates.get_template(template).render(
        nav=NAV, path=request.url.path, runs=str(config.runs),
        data_root=str(config.data_root) if config.data_root else None, token_required=config.token is not None,
        config=config, **context)
    # Pages hold no data of their own (the script fetches it), but a cached page could outlive a logout.
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})


@router.get("/", include_in_schema=False)
def home() -> RedirectResponse:
    return RedirectResponse("/predict", status_code=303)


# The pages are the same shell around app.js: a template and a title each.
PAGES = {"/models": ("models.html", "Models"), "/predict": ("predict.html", "Predict"),
         "/runs": ("runs.html", "Runs"), "/jobs": ("jobs.html", "Jobs")}


def _page(template: str, title: str):
    def page(request: Request) -> HTMLResponse:
        return _render(request, template, title=title)

    page.__name__ = f"{template.split('.')[0]}_page"
    return page


for _path, (_template, _title) in PAGES.items():
    router.add_api_route(_path, _page(_template, _title), methods=["GET"], response_class=HTMLResponse,
                         include_in_schema=False)


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request) -> HTMLResponse:
    return _render(request, "login.html", title="Log in")


@router.post("/login", include_in_schema=False)
def login(request: Request, token: str = Form("")) -> Response:
    """The right token: the cookie, and on to Predict (303, so the browser follows with a GET). A wrong one:
    401 and the form again, saying so (the token itself is never echoed back)."""
    expected = request.app.state.config.token
    if expected is None:  # a loopback server without a token: nothing to log in to
        return RedirectResponse("/predict", status_code=303)
    if not (token and secrets.compare_digest(token.encode(), expected.encode())):
        return _render(request, "login.html", status_code=401, title="Log in",
                       failed="That token is not this server's. Copy the token the server printed when it started.")
    response = RedirectResponse("/predict", status_code=303)
    # HttpOnly: page script never sees it; SameSite=Strict: another site's links and forms do not send it.
    # Not Secure: the server speaks plain HTTP (loopback, or a LAN behind the token).
    response.set_cookie(cookie_name(request.app.state.config.port), token, httponly=True, samesite="strict", path="/")
    return response
