"""The Ray token of a state folder's cluster: Ray 2.60's token authentication, one secret per folder.

`dtrag up` writes it (`ensure_auth_token`) and makes its local Ray require it (`require_token`,
before Ray starts: every Ray process inherits the environment); clients read it
(`read_auth_token`) to send it as `Authorization: Bearer TOKEN`, and Ray's own CLI reads it
given RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from cluster.platform.errors import ServiceUnavailable

AUTH_TOKEN_FILE = "ray_auth_token"


def auth_token_file(state_dir: Path) -> Path:
    return state_dir / AUTH_TOKEN_FILE


def ensure_auth_token(state_dir: Path) -> Path:
    """The state folder's Ray token file, created on first use: readable by its owner only (0600).

    One token per state folder, not Ray's machine-wide `~/.ray/auth_token`, so two clusters
    on one machine do not share a secret, and the folder's owner is who may submit jobs.
    """
    path = auth_token_file(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    path.chmod(0o600)  # a copied or restored folder may have widened it
    return path


def read_auth_token(path: Path) -> str:
    """The token in `path` (never created here: a new token would match no cluster)."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise ServiceUnavailable(f"no Ray token at {path}: `dtrag up` writes it there when it starts Ray; "
                                 "start it, or point DTRAG_STATE_DIR at its state folder") from None
    if not token:
        raise ServiceUnavailable(f"the Ray token file {path} is empty; delete it and restart `dtrag up`")
    return token


def require_token(token_path: Path) -> None:
    """Token authentication for this process and every Ray process it starts (they inherit it).

    Ray reads RAY_AUTH_MODE into its config at import; re-initialising the config and the
    token cache makes this process see the change, as `ray.init` does for its own default.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
