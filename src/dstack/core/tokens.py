"""Bearer tokens: the one parser of `Authorization` headers, and the hash that is stored instead of
a token. Every part that reads a token (the API, the proxy, `/v2`, the gateway, the agent) uses
these, so a header is accepted or refused the same way everywhere."""

from __future__ import annotations

import hashlib
import secrets


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What is stored and compared: the SHA-256 of the token, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(value: str | bytes | None, *, bare: bool = False) -> str | None:
    """The token of an `Authorization` header value: `Bearer <t>` (the scheme in any case).

    With `bare=True` a value without the scheme is the token itself: RunPod workers send their
    key that way, and the control-plane API has always accepted it. None when there is no token.
    """
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    parts = text.split(None, 1)
    if len(parts) == 2 and parts[0].lower() == "bearer":
        return parts[1].strip() or None
    if not bare:
        return None
    return text.strip() or None
