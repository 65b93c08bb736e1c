"""Credentials at rest: Fernet encryption with one server key, kept in a 0600 file.

Stored values that are secrets (registry passwords, env values, gateway and agent tokens) go
through `encrypt` before they reach the database and `decrypt` where the server uses them, so a
copy of the database alone reveals none of them. The key file (`<server dir>/encryption.key`,
or `DSTACK_SERVER_ENCRYPTION_KEY_FILE`) is created on first start and must be kept with the
database. Rotation: `python -m dstack.server.crypto rotate` puts a new key on the file's first
line (values are decrypted with any listed key and encrypted with the first) and re-encrypts
the database with it (`rekey.py`), after which the older keys may be removed.

Encrypted values are strings `enc:v1:<fernet token>`: a value without that prefix is taken as
plain text (rows written before encryption existed keep working).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from dstack.core.private import write_private

PREFIX = "enc:v1:"

_fernet: MultiFernet | None = None


class DecryptionError(Exception):
    """An encrypted value that none of the server's keys opens (wrong or lost key file)."""


def load_keys(path: Path) -> MultiFernet:
    """Read the key file, creating it (0600, in a 0700 directory) with a fresh key when missing."""
    path = Path(path).expanduser()
    if not path.exists():
        try:
            write_private(path, Fernet.generate_key().decode() + "\n", exclusive=True)
        except FileExistsError:  # another process made it first: use theirs
            pass
    keys = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not keys:
        raise ValueError(f"the encryption key file {path} holds no key")
    return MultiFernet([Fernet(k.encode()) for k in keys])


def init(path: Path) -> None:
    """Use the keys of `path` for this process (the server calls it once at start)."""
    global _fernet
    _fernet = load_keys(path)


def _keys() -> MultiFernet:
    if _fernet is None:
        from dstack.server.settings import ServerSettings

        init(ServerSettings().encryption_key_file)
    assert _fernet is not None
    return _fernet


def is_encrypted(value: str | None) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def encrypt(value: str) -> str:
    """`enc:v1:<token>`; a value that is already encrypted is returned as it is."""
    if is_encrypted(value):
        return value
    return PREFIX + _keys().encrypt(value.encode()).decode()


def decrypt(value: str) -> str:
    """The plain text of an `encrypt`ed value; any other value is returned as it is."""
    if not is_encrypted(value):
        return value
    try:
        return _keys().decrypt(value[len(PREFIX) :].encode()).decode()
    except InvalidToken:
        raise DecryptionError(
            "a stored secret cannot be decrypted with the server's encryption key (was the key file replaced?)"
        ) from None


def encrypt_env(env: dict[str, str]) -> dict[str, str]:
    return {k: encrypt(v) for k, v in env.items()}


def decrypt_env(env: dict[str, str]) -> dict[str, str]:
    return {k: decrypt(v) for k, v in env.items()}


def rotate(path: Path) -> Path:
    """Prepend a fresh key to the key file (old keys stay for reading); returns the path."""
    path = Path(path).expanduser()
    old = path.read_text() if path.exists() else ""
    write_private(path, Fernet.generate_key().decode() + "\n" + old)
    if _fernet is not None:
        init(path)
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m dstack.server.crypto rotate [KEY_FILE]`: put a fresh key first in the key file and
    re-encrypt the server's database with it (stop the server first)."""
    import argparse
    import asyncio

    from dstack.server.settings import ServerSettings

    parser = argparse.ArgumentParser(prog="python -m dstack.server.crypto")
    parser.add_argument("action", choices=["rotate"])
    parser.add_argument(
        "key_file", nargs="?", type=Path, help="default: the server's (see DSTACK_SERVER_ENCRYPTION_KEY_FILE)"
    )
    parser.add_argument("--no-database", action="store_true", help="only add the key; re-encrypt nothing")
    args = parser.parse_args(argv)
    settings = ServerSettings()
    path = rotate(args.key_file or settings.encryption_key_file)
    init(path)
    print(f"a new key is first in {path}")
    if args.no_database:
        return
    from sqlalchemy.exc import DBAPIError

    from dstack.server.db import Database
    from dstack.server.rekey import reencrypt

    async def run() -> int:
        db = Database(settings.resolved_database_url())
        try:
            return await reencrypt(db)
        finally:
            await db.dispose()

    try:
        changed = asyncio.run(run())
    except DBAPIError as e:
        raise SystemExit(f"the database was not re-encrypted ({e.orig}); the old keys stay in {path}") from None
    print(f"{changed} stored values re-encrypted with it: the older keys below it may now be removed")


if __name__ == "__main__":
    main()
