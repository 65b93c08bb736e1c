"""Credentials inside run configurations: encrypted when stored, hidden in every answer.

A configuration holds credentials in two kinds of places: fields named like one
(`registry_auth.password`, and any `password`, `token`, `secret`, `api_key` field), and `env`.
`seal_configuration` encrypts both before the run spec is stored; `reveal_env` /
`reveal_registry_auth` decrypt what the agent needs at provisioning; `redact_configuration` and
`redact_env` make the wire view, where credential fields and env values whose names look like
credentials (`HF_TOKEN`, `AWS_SECRET_ACCESS_KEY`, ...) read `***` and other env values are shown.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from dstack.server import crypto
from dstack.server.errors import InvalidRequest

REDACTED = "***"

_CREDENTIAL_FIELD = re.compile(
    r"^(?:.*_)?(?:password|passwd|secret|api_key|apikey|private_key)$|^(?:token|auth_token|access_token|hf_token)$"
)
# PASSWORD/SECRET/CREDENTIAL anywhere in the name; TOKEN and *_KEY as words of it (HF_TOKEN, API_KEY),
# so TOKENIZERS_PARALLELISM or MONKEY_MODE stay visible.
_CREDENTIAL_ENV = re.compile(
    r"PASSW(?:OR)?D|SECRET|CREDENTIAL|(?:^|[_.-])(?:TOKEN|(?:API|ACCESS|PRIVATE|SECRET)[_.-]?KEY|APIKEY)(?:$|[_.-])",
    re.I,
)


def is_credential_field(name: str) -> bool:
    return bool(_CREDENTIAL_FIELD.match(name.lower()))


def is_credential_env(name: str) -> bool:
    return bool(_CREDENTIAL_ENV.search(name))


def _walk(
    value: Any,
    on_secret: Callable[[str, str], str],
    on_env: Callable[[str, dict[str, str]], Any],
    path: str = "",
) -> Any:
    """A copy of `value` with credential fields passed through `on_secret(path, value)` and
    `env` mappings through `on_env(path, env)`."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            where = f"{path}.{k}" if path else str(k)
            if k == "env" and isinstance(v, dict):
                out[k] = on_env(where, v)
            elif isinstance(v, str) and is_credential_field(str(k)):
                out[k] = on_secret(where, v)
            else:
                out[k] = _walk(v, on_secret, on_env, where)
        return out
    if isinstance(value, list):
        return [_walk(v, on_secret, on_env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def seal_configuration(configuration: dict[str, Any]) -> dict[str, Any]:
    """The configuration as stored: credential fields and every env value encrypted."""
    sealed: dict[str, Any] = _walk(
        configuration, lambda _, v: crypto.encrypt(v), lambda _, env: crypto.encrypt_env(env)
    )
    return sealed


def redact_env(env: dict[str, str]) -> dict[str, str]:
    """Env as answered: credential-looking names `***`, other values in plain text."""
    return {k: REDACTED if is_credential_env(k) else _plain_or_redacted(v) for k, v in env.items()}


def _plain_or_redacted(value: str) -> str:
    try:
        return crypto.decrypt(value)
    except crypto.DecryptionError:
        return REDACTED


def redact_configuration(configuration: dict[str, Any]) -> dict[str, Any]:
    """The configuration as answered: no credential in any form, encrypted or not."""
    redacted: dict[str, Any] = _walk(configuration, lambda _, v: REDACTED, lambda _, env: redact_env(env))
    return redacted


def reveal_env(env: dict[str, str]) -> dict[str, str]:
    """The job's real environment, for the agent."""
    return crypto.decrypt_env(env)


def reveal_registry_auth(configuration: dict[str, Any]) -> dict[str, str] | None:
    auth = configuration.get("registry_auth")
    if not auth:
        return None
    return {"username": auth["username"], "password": crypto.decrypt(auth["password"])}


def refuse_redacted(configuration: dict[str, Any]) -> None:
    """Refuse what a submitted configuration may not hold where credentials go: `***` (a plan
    sent back as it was answered: it would run with `***` as the password), and values that look
    encrypted (`enc:v1:...`), which only the server writes: the pipeline would decrypt one taken
    from a copy of the database into the submitter's job."""
    redacted: list[str] = []
    encrypted: list[str] = []

    def check(path: str, v: str) -> None:
        if v == REDACTED:
            redacted.append(path)
        elif crypto.is_encrypted(v):
            encrypted.append(path)

    def secret(path: str, v: str) -> str:
        check(path, v)
        return v

    def env(path: str, e: dict[str, str]) -> dict[str, str]:
        for k, v in e.items():
            check(f"{path}.{k}", v)
        return e

    _walk(configuration, secret, env)
    if redacted:
        raise InvalidRequest(
            f"{', '.join(redacted)}: '{REDACTED}' is how answers hide credentials, not a credential; "
            "send the configuration with the real values",
            fields=redacted,
        )
    if encrypted:
        raise InvalidRequest(
            f"{', '.join(encrypted)}: values starting with '{crypto.PREFIX}' are reserved for what the server encrypts",
            fields=encrypted,
        )
