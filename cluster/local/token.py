"""The local cluster's Ray auth token: generated once into ``<state>/auth_token`` (mode
0600), passed to Ray as a path, never printed."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from crucible.errors import CrucibleError

TOKEN_FILE = "auth_token"


def ensure_token(state_dir: Path) -> Path:
    """Create the auth token file (mode 0600) if missing; return its path."""
    path = state_dir / TOKEN_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CrucibleError(f"{path} is readable by others (mode {mode:o}); run chmod 600 {path}")
    return path


def read_token(path: Path) -> str:
    """Read a token file; the token itself is never printed."""
    try:
        return path.read_text().strip()
    except OSError as e:
        raise CrucibleError(f"cannot read the Ray auth token at {path}: {e.strerror}") from None


def auth_headers(token_path: Path) -> dict[str, str]:
    """HTTP headers that authenticate to a token-protected Ray dashboard."""
    return {"Authorization": f"Bearer {read_token(token_path)}"}
