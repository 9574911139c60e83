"""The demo key `dtrag up` prints, kept in the state folder (only its hash is in the database)."""

from __future__ import annotations

from pathlib import Path

from cluster.platform.api_keys import ApiKeyVerifier, create_key
from cluster.platform.database import create_pool
from cluster.platform.settings import Settings

_FILE = "demo-key"


def _path(settings: Settings) -> Path:
    return settings.state_dir / _FILE


def stored_demo_key(settings: Settings) -> str | None:
    path = _path(settings)
    return path.read_text().strip() if path.is_file() else None


async def ensure_demo_key(settings: Settings) -> str:
    """The stored key while the database still accepts it, else a new search+admin key."""
    assert settings.database.url
    pool = await create_pool(settings.database.url, settings.database)
    try:
        token = stored_demo_key(settings)
        if token and await ApiKeyVerifier(pool, 0).verify(token):
            return token
        async with pool.acquire() as connection:
            token = await create_key(connection, "demo", ["search", "admin"])
    finally:
        await pool.close()
    path = _path(settings)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token
