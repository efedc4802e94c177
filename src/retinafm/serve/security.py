"""Who may use the server, and what it may read: the rules every route relies on.

- **Token.** With a token (any address but loopback must have one) every request carries it, as
  `Authorization: Bearer <token>` or the cookie the login page sets; without it the answer is 401 and
  nothing else. Only the login page answers without it.
- **Same origin.** A request that changes state (POST, PUT, PATCH, DELETE) from a browser page of another
  site is refused (403): the `Origin` header, when there is one, must be this server's, and
  `Sec-Fetch-Site` must not say cross-site. Without a token the `Host` must be a loopback name, so a
  rebinding DNS name cannot reach the server as if it were same-origin.
- **Confinement.** `confined(root, relative)` is the one way a route turns a name from a request into a
  path: relative, no `..`, no NUL, and after resolving symlinks still inside `root`; otherwise 403 (or 404
  when it does not exist).
- **Headers.** A content security policy without inline script, no MIME sniffing, no framing, no
  referrer, and no caching of API answers.
"""
from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from retinafm.serve.config import ServeConfig, is_loopback

COOKIE_PREFIX = "retinafm_token"
OPEN_PATHS = ("/login",)  # answered without the token: where it is entered
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def error(status: int, message: str) -> JSONResponse:
    """The JSON every refusal answers with: {"detail": message}."""
    return JSONResponse({"detail": message}, status_code=status)


def cookie_name(port: int) -> str:
    """The login cookie's name: with the port in it, since browsers share cookies between the ports of a host
    and two servers on one machine would otherwise log each other out."""
    return f"{COOKIE_PREFIX}_{port}"


def has_token(request: Request, token: str, cookie: str) -> bool:
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(cookie, "")
    return bool(given) and secrets.compare_digest(given.encode(), token.encode())


def _host_name(host_header: str) -> str:
    """The name in a Host header, without its port ([::1]:8000 -> ::1)."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _same_origin(request: Request) -> bool:
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser page's request (curl, a script): the token or loopback decides
    if origin == "null":
        return False  # a sandboxed or file:// page
    parts = urlsplit(origin)
    return parts.netloc.lower() == request.headers.get("host", "").lower() and parts.scheme in ("http", "https")


def guard(config: ServeConfig) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """The middleware: token, host and same-origin checks before any route, security headers after."""

    async def middleware(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if config.token is None and not is_loopback(_host_name(request.headers.get("host", ""))):
            response: Response = error(403, "this server answers on its loopback address only; open it as "
                                            "http://127.0.0.1 (or start it with --token to serve other names)")
        elif config.token is not None and path not in OPEN_PATHS and not has_token(request, config.token,
                                                                                    cookie_name(config.port)):
            response = (error(401, "a token is required: send 'Authorization: Bearer <token>' or log in at /login")
                        if path.startswith("/api/") else
                        HTMLResponse('<!doctype html><title>retinafm: log in</title><p>This server needs its token. '
                                     '<a href="/login">Log in</a>.</p>', status_code=401))
        elif request.method in STATE_CHANGING and not _same_origin(request):
            response = error(403, "cross-site request refused: state can only be changed from this server's own "
                                  "pages or with its token")
        else:
            try:
                response = await call_next(request)
            except Exception:  # a route's bug: logged for the operator, one line for the client, headers still on
                logging.getLogger("retinafm.serve").exception("error answering %s %s", request.method, path)
                response = error(500, "internal error; see the server's log")
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers.setdefault("Content-Security-Policy", CSP)
        if path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    return middleware


def confined(root: Path, relative: str, *, what: str = "file") -> Path:
    """`relative` (from a request) as a path inside `root`: refused with 403 when it is absolute, climbs
    with `..`, holds a NUL or a backslash, or resolves (symlinks followed) outside `root`; 404 when it does
    not exist."""
    text = str(relative)
    pure = PurePosixPath(text)
    if (not text or "\x00" in text or "\\" in text or pure.is_absolute() or ".." in pure.parts
            or (len(text) > 1 and text[1] == ":")):
        raise HTTPException(403, f"{what} {text!r} is not a relative path inside the served folder")
    try:
        base = root.resolve()
        target = (base / pure).resolve()
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
        raise HTTPException(403, f"{what} {text!r} leads nowhere (a symlink loop)") from None
    if target != base and base not in target.parents:
        raise HTTPException(403, f"{what} {text!r} leads outside the served folder")
    if not target.exists():
        raise HTTPException(404, f"no {what} {text!r}")
    return target
