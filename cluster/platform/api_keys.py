"""API keys: `dtrag_<key id>_<secret>`, stored as the key id, a SHA-256 of the secret, and scopes.

The secret is 256 random bits, so a fast hash is enough (there is nothing to brute-force); the
plain key is shown once, at creation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from cluster.core.vocabulary import SCOPES
from cluster.platform.database import DatabaseUnavailable, unavailable_on_connection_errors

_PREFIX = "dtrag"
_TOKEN = re.compile(rf"{_PREFIX}_([0-9a-f]+)_([A-Za-z0-9_-]+)")  # what `create_key` makes, nothing else


@dataclasses.dataclass(frozen=True)
class Principal:
    key_id: str
    name: str
    scopes: frozenset[str]


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    key_id: str
    name: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _split(token: str) -> tuple[str, str] | None:
    """The key id and secret; None for anything `create_key` cannot have made (so it never
    reaches the database, control characters included)."""
    match = _TOKEN.fullmatch(token)
    return (match[1], match[2]) if match else None


def validate_scopes(scopes: Sequence[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {list(scopes)}")
    return sorted(set(scopes))


async def create_key(connection: asyncpg.Connection, name: str, scopes: Sequence[str]) -> str:
    """Store a new key and return it in plain text (the only time it is available)."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    await connection.execute(
        "INSERT INTO api_keys (id, name, secret_hash, scopes) VALUES ($1, $2, $3, $4)",
        key_id, name, _hash(secret), validate_scopes(scopes),
    )
    return f"{_PREFIX}_{key_id}_{secret}"


async def list_keys(connection: asyncpg.Connection) -> list[KeyInfo]:
    rows = await connection.fetch(
        "SELECT id, name, scopes, created_at, revoked_at FROM api_keys ORDER BY created_at"
    )
    return [KeyInfo(r["id"], r["name"], list(r["scopes"]), r["created_at"], r["revoked_at"]) for r in rows]


async def revoke_key(connection: asyncpg.Connection, key_id: str) -> bool:
    """Revoke a key by id; False when no active key has that id."""
    status = await connection.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id
    )
    return status.endswith(" 1")


class ApiKeyVerifier:
    """Checks keys against the database, trusting an answer for `cache_seconds`.

    The cache keeps the database off the request path; revocation reaches a replica within
    that time. While the database is unavailable, a key's last answer stands, however old, so an
    operator can still act (roll back) during an outage; no key can be revoked meanwhile anyway.
    """

    def __init__(self, pool: asyncpg.Pool, cache_seconds: float):
        self._pool = pool
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def verify(self, token: str) -> Principal | None:
        now = time.monotonic()
        cached = self._cache.get(token)
        if cached and now - cached[0] < self._cache_seconds:
            return cached[1]
        try:
            principal = await self._lookup(token)
        except DatabaseUnavailable:
            if cached is None:
                raise
            return cached[1]
        if len(self._cache) > 10_000:  # bound memory against floods of random keys
            self._cache.clear()
        self._cache[token] = (now, principal)
        return principal

    async def _lookup(self, token: str) -> Principal | None:
        parts = _split(token)
        if parts is None:
            return None
        key_id, secret = parts
        async with unavailable_on_connection_errors("API key check"):
            row = await self._pool.fetchrow(
                "SELECT name, secret_hash, scopes FROM api_keys WHERE id = $1 AND revoked_at IS NULL",
                key_id,
            )
        if row is None or not hmac.compare_digest(bytes(row["secret_hash"]), _hash(secret)):
            return None
        return Principal(key_id, row["name"], frozenset(row["scopes"]))
