"""`retinafm serve`: uvicorn on the app, on loopback unless told otherwise (then with a token)."""
from __future__ import annotations

from pathlib import Path

from retinafm.serve.config import ServeConfig, is_loopback, resolve_token


def make_config(runs: str | Path, data_root: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
                token: str | None = None) -> tuple[ServeConfig, bool]:
    """The server's config (the folders checked, the token resolved) and whether the token was generated."""
    runs_path = Path(runs)
    if not runs_path.is_dir():
        raise ValueError(f"--runs {runs}: no such folder; give the folder holding your run directories "
                         "(e.g. demo_output after `make demo`)")
    data_path = Path(data_root) if data_root else None
    if data_path is not None and not data_path.is_dir():
        raise ValueError(f"--data-root {data_root}: no such folder; give the folder jobs may read data from")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be 0-65535, got {port}")
    resolved, generated = resolve_token(host, token)
    return ServeConfig(runs=runs_path.resolve(), data_root=data_path.resolve() if data_path else None, host=host,
                       port=port, token=resolved), generated


def serve(config: ServeConfig, *, generated_token: bool = False) -> None:
    """Run the server until interrupted; print where it is, and the token once when it was generated."""
    import uvicorn

    from retinafm.serve.app import create_app

    shown = f"[{config.host}]" if ":" in config.host else config.host
    print(f"retinafm serving {config.runs} at http://{shown}:{config.port}"
          + ("" if is_loopback(config.host) else " (reachable from other machines)"), flush=True)
    if config.token and generated_token:
        print(f"token (shown once; give it at /login or as 'Authorization: Bearer ...'): {config.token}", flush=True)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning", access_log=False)
