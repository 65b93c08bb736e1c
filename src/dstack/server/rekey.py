"""Re-encrypt every stored credential with the newest key, so older keys can leave the key file.

Covers run and job specs, agent and gateway tokens, and project secrets.

`python -m dstack.server.crypto rotate` runs it after putting a fresh key first; run it with the
server stopped. Values stored in plain text by a server older than encryption are encrypted too.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text

from dstack.server import crypto
from dstack.server.db import Database


def _again(value: str) -> str:
    """`value` encrypted with the first key (decrypted with whichever key opens it)."""
    return crypto.encrypt(crypto.decrypt(value)) if crypto.is_encrypted(value) else crypto.encrypt(value)


def _run_spec(raw: str) -> str:
    from dstack.server.services.secrets import _walk

    spec = json.loads(raw)
    spec["configuration"] = _walk(
        spec.get("configuration") or {}, lambda _, v: _again(v), lambda _, env: {k: _again(v) for k, v in env.items()}
    )
    return json.dumps(spec)


def _job_spec(raw: str) -> str:
    spec = json.loads(raw)
    spec["env"] = {k: _again(v) for k, v in (spec.get("env") or {}).items()}
    return json.dumps(spec)


def _agent(raw: str) -> str:
    agent: dict[str, Any] = json.loads(raw or "{}")
    if agent.get("token"):
        agent["token"] = _again(agent["token"])
    return json.dumps(agent)


# table, key column, value column, how to re-encrypt the value
_COLUMNS = (
    ("runs", "id", "run_spec", _run_spec),
    ("jobs", "id", "job_spec", _job_spec),
    ("instances", "id", "agent", _agent),
    ("gateways", "id", "token", _again),
    ("secrets", "id", "value", _again),  # project secrets (services.secret_store)
)


async def reencrypt(db: Database) -> int:
    """Rewrite every credential in the database with the first key; returns the rows changed."""
    changed = 0
    async with db.engine.begin() as conn:
        for table, key, column, redo in _COLUMNS:
            rows = (await conn.execute(text(f"SELECT {key}, {column} FROM {table}"))).all()
            for row_id, value in rows:
                if value is None:
                    continue
                try:
                    new = redo(value)
                except (ValueError, TypeError, AttributeError):  # not the JSON it should be: leave it
                    continue
                if new != value:
                    await conn.execute(
                        text(f"UPDATE {table} SET {column} = :v WHERE {key} = :k"), {"v": new, "k": row_id}
                    )
                    changed += 1
    return changed
