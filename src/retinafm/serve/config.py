"""What a server was started with: its folders, its address and who may use it."""
from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

MiB = 2**20
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class ServeConfig:
    """`runs`: the folder whose checkpoints and run directories the app shows, and where jobs write.
    `data_root`: the only folder jobs may read images and manifests from (None: jobs cannot start).
    `token`: None only on a loopback address; every request must then carry it."""

    runs: Path
    data_root: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_file_bytes: int = 64 * MiB  # one uploaded file
    max_request_bytes: int = 512 * MiB  # everything one request uploads
    max_files: int = 200  # files in one predict request
    cached_models: int = 4  # checkpoints kept loaded (least recently used evicted)
    heatmap_method: str = "grad-rollout"  # the overlays on the Predict page


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> tuple[str | None, bool]:
    """(the token to require, whether it was generated). Loopback without --token needs none; any other
    address requires one, generated when not given (printed once by the server)."""
    if token:
        if len(token) < 16:
            raise ValueError("--token must be at least 16 characters; omit it to have one generated")
        return token, False
    if is_loopback(host):
        return None, False
    return secrets.token_urlsafe(24), True
