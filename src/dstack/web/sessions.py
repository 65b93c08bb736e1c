"""Dashboard sessions: a signed cookie that names a user, never holding their token.

The cookie is `<user id>.<expiry>.<mac>`, where the MAC (HMAC-SHA256 with a random key kept in a
0600 file in the server's directory) also covers the user's current token hash: rotating or
revoking the token ends every session made with it, and a copy of the cookie alone cannot be
turned back into a token. CSRF tokens are a second MAC over the cookie, so a form posted from
another site (which cannot read the cookie) cannot carry one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from pathlib import Path

from dstack.core.private import write_private

COOKIE = "dstack_session"
MAX_AGE = 7 * 24 * 3600
_MAX_COOKIE = 200  # a real cookie is ~100 characters; anything longer is refused unread


class SessionKeys:
    """The signing key of one server (created on first use, shared by its restarts)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def load(cls, path: Path) -> SessionKeys:
        if not path.exists():
            try:
                write_private(path, base64.b64encode(secrets.token_bytes(32)).decode() + "\n", exclusive=True)
            except FileExistsError:  # another process made it first: use theirs
                pass
        return cls(base64.b64decode(path.read_text().strip()))

    def _mac(self, *parts: str) -> str:
        digest = hmac.new(self._key, "\n".join(parts).encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def issue(self, user_id: str, token_hash: str, now: float | None = None) -> str:
        expiry = str(int((now or time.time()) + MAX_AGE))
        return f"{user_id}.{expiry}.{self._mac('session', user_id, expiry, token_hash)}"

    def user_id(self, cookie: str | None, now: float | None = None) -> str | None:
        """The user id a well-formed, unexpired cookie names (its MAC is checked by `verify`)."""
        if not cookie or len(cookie) > _MAX_COOKIE:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) < (now or time.time()):
            return None
        return parts[0]

    def verify(self, cookie: str, token_hash: str) -> bool:
        user_id, expiry, mac = cookie.split(".")
        return hmac.compare_digest(mac, self._mac("session", user_id, expiry, token_hash))

    def csrf(self, cookie: str) -> str:
        return self._mac("csrf", cookie)

    def check_csrf(self, cookie: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf(cookie))
