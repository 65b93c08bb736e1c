"""The SSH entry's keys: its own host key, and one key pair per user.

dstack's official client attaches with "the user's SSH key", a pair the server keeps for each user
and hands to that user (`users/get_my_user`: `ssh_public_key`, `ssh_private_key`). Here a user's
pair is derived, not stored: an Ed25519 key whose seed is HMAC-SHA256(server secret, user id). The
secret (`<server dir>/ssh-entry/user-keys.secret`, 0600) never leaves the server; rotating it
(deleting the file) replaces every user's key at once. No database column, no migration.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path

import asyncssh
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dstack.core.private import private_dir, write_private


class EntryKeys:
    """Loads (or creates, first writer wins) the entry's host key and the user-key secret."""

    def __init__(self, server_dir: Path) -> None:
        self.dir = private_dir(Path(server_dir) / "ssh-entry")
        self._secret = self._load(self.dir / "user-keys.secret", lambda: os.urandom(32).hex().encode()).decode()
        host = self._load(
            self.dir / "host_ed25519", lambda: asyncssh.generate_private_key("ssh-ed25519").export_private_key()
        )
        self.host_key = asyncssh.import_private_key(host)

    @staticmethod
    def _load(path: Path, make: Callable[[], bytes]) -> bytes:
        if not path.exists():
            try:
                write_private(path, make(), exclusive=True)
            except FileExistsError:  # another process made it first: use theirs
                pass
        return path.read_bytes()

    def _user_key(self, user_id: str) -> Ed25519PrivateKey:
        seed = hmac.new(bytes.fromhex(self._secret), b"dstack-user-ssh-key:" + user_id.encode(), hashlib.sha256)
        return Ed25519PrivateKey.from_private_bytes(seed.digest())

    def user_public_key(self, user_id: str) -> str:
        """One OpenSSH line (`ssh-ed25519 AAAA... dstack-user`), always the same text: dstack's
        client compares it with the run's `ssh_key_pub` as strings."""
        raw = (
            self._user_key(user_id)
            .public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
        return f"{raw.decode()} dstack-user\n"

    def user_private_key(self, user_id: str) -> str:
        """The OpenSSH private key text: only ever for that user."""
        raw = self._user_key(user_id).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        return raw.decode()


def same_key(a: asyncssh.SSHKey, line: str | None) -> bool:
    """Whether the OpenSSH public key line `line` is the key `a`."""
    if not line:
        return False
    try:
        b = asyncssh.import_public_key(line.strip())
    except (asyncssh.KeyImportError, ValueError):
        return False
    return hmac.compare_digest(a.public_data, b.public_data)
