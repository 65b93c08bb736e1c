"""Project secrets: stored encrypted, resolved into a job's env and registry_auth only at provisioning.

A configuration refers to a secret as `${{ secrets.NAME }}` inside an `env` value or a
`registry_auth` field. The run spec keeps the reference (never the value), so the value exists in
plain text only in the server's memory while a job is provisioned and in the job's environment.
Submitting a run that names a secret the project lacks is refused with the missing names; a
secret deleted between submission and provisioning fails the job with its name.

Who: global admins and the project's admins and managers may list, read, set and delete
secrets (as in dstack); `list` never carries values, `get` does (it is how `dstack secret get`
shows one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.server import crypto
from dstack.server.errors import Forbidden, InvalidRequest, ResourceNotFound
from dstack.server.models import MemberModel, ProjectModel, SecretModel, UserModel, utcnow

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,200}$"
MAX_VALUE_LENGTH = 5000  # as dstack: enough for tokens and keys, not a place for files
MAX_NAMES_PER_REQUEST = 100
MANAGER_ROLES = ("admin", "manager")

# `${{ secrets.NAME }}`, spaces optional; NAME as NAME_PATTERN allows.
REFERENCE = re.compile(r"\$\{\{\s*secrets\.([A-Za-z0-9_-]+)\s*\}\}")


class UnknownSecrets(InvalidRequest):
    """A configuration names secrets the project does not have."""

    def __init__(self, names: Iterable[str], fields: list[str] | None = None) -> None:
        missing = sorted(set(names))
        quoted = ", ".join(f"'{n}'" for n in missing)
        noun = "secret" if len(missing) == 1 else "secrets"
        super().__init__(
            f"the configuration refers to {noun} {quoted} that the project does not have "
            f"(set one with `dstack secret set NAME VALUE`)",
            fields=fields,
        )
        self.names = missing


# --- access -------------------------------------------------------------------------------------


async def require_manager(session: AsyncSession, user: UserModel, project: ProjectModel) -> None:
    """Secrets are for global admins and the project's admins and managers (403 otherwise)."""
    if user.global_role == "admin":
        return
    role = (
        await session.execute(
            select(MemberModel.project_role).where(MemberModel.project_id == project.id, MemberModel.user_id == user.id)
        )
    ).scalar_one_or_none()
    if role not in MANAGER_ROLES:
        raise Forbidden("only the project's admins and managers may manage its secrets")


def validate_name(name: str, field: str = "name") -> None:
    if not re.match(NAME_PATTERN, name):
        raise InvalidRequest(f"invalid secret name {name[:210]!r}: 1-200 letters, digits, '-' or '_'", fields=[field])


def validate_value(value: str) -> None:
    if len(value) > MAX_VALUE_LENGTH:
        raise InvalidRequest(f"a secret value may be at most {MAX_VALUE_LENGTH} characters", fields=["value"])
    if "\x00" in value:
        raise InvalidRequest("a secret value may not contain NUL characters", fields=["value"])


# --- storage ------------------------------------------------------------------------------------


async def list_secrets(session: AsyncSession, project: ProjectModel) -> list[SecretModel]:
    query = select(SecretModel).where(SecretModel.project_id == project.id).order_by(SecretModel.name)
    return list((await session.execute(query)).scalars())


async def get_secret(session: AsyncSession, project: ProjectModel, name: str) -> SecretModel:
    secret = (
        await session.execute(select(SecretModel).where(SecretModel.project_id == project.id, SecretModel.name == name))
    ).scalar_one_or_none()
    if secret is None:
        raise ResourceNotFound(f"secret '{name}' does not exist in project '{project.name}'", fields=["name"])
    return secret


def plain_value(secret: SecretModel) -> str:
    return crypto.decrypt(secret.value)


async def set_secret(session: AsyncSession, project: ProjectModel, name: str, value: str) -> SecretModel:
    """Create the secret, or replace its value."""
    validate_name(name)
    validate_value(value)
    for _ in range(2):  # a concurrent create of the same name: the second round updates it
        existing = (
            await session.execute(
                select(SecretModel).where(SecretModel.project_id == project.id, SecretModel.name == name)
            )
        ).scalar_one_or_none()
        if existing is not None:
            existing.value = crypto.encrypt(value)
            existing.updated_at = utcnow()
            await session.commit()
            return existing
        secret = SecretModel(project_id=project.id, name=name, value=crypto.encrypt(value))
        session.add(secret)
        try:
            await session.commit()
            return secret
        except IntegrityError:
            await session.rollback()
    raise InvalidRequest(f"secret '{name}' is being changed by another request; try again")


async def delete_secrets(session: AsyncSession, project: ProjectModel, names: list[str]) -> None:
    """Delete all of `names`, or none of them when one does not exist (404 naming those)."""
    for name in names:
        validate_name(name, "secrets_names")
    found = set(
        (
            await session.execute(
                select(SecretModel.name).where(SecretModel.project_id == project.id, SecretModel.name.in_(names))
            )
        ).scalars()
    )
    missing = sorted(set(names) - found)
    if missing:
        raise ResourceNotFound(
            f"no such secret in project '{project.name}': {', '.join(missing)}", fields=["secrets_names"]
        )
    await session.execute(delete(SecretModel).where(SecretModel.project_id == project.id, SecretModel.name.in_(names)))
    await session.commit()


# --- references ---------------------------------------------------------------------------------


def _reference_fields(configuration: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    """(field path, value) of every place a reference may be: env values and registry_auth."""
    env = configuration.get("env") or {}
    if isinstance(env, list):  # as submitted: `KEY=VALUE` strings
        env = dict(e.partition("=")[::2] for e in env if isinstance(e, str))
    if isinstance(env, Mapping):
        for key, value in env.items():
            if isinstance(value, str):
                yield f"env.{key}", value
    auth = configuration.get("registry_auth") or {}
    if isinstance(auth, Mapping):
        for key in ("username", "password"):
            value = auth.get(key)
            if isinstance(value, str):
                yield f"registry_auth.{key}", value


def references(configuration: Mapping[str, Any]) -> dict[str, list[str]]:
    """Secret name → the fields that refer to it (values as submitted, before encryption)."""
    found: dict[str, list[str]] = {}
    for path, value in _reference_fields(configuration):
        for name in REFERENCE.findall(value):
            found.setdefault(name, []).append(path)
    return found


async def _existing_names(session: AsyncSession, project_id: str, names: Iterable[str]) -> set[str]:
    wanted = list(set(names))
    if not wanted:
        return set()
    query = select(SecretModel.name).where(SecretModel.project_id == project_id, SecretModel.name.in_(wanted))
    return set((await session.execute(query)).scalars())


async def check_references(session: AsyncSession, project_id: str, configuration: Mapping[str, Any]) -> None:
    """Refuse (400, naming them) a configuration that refers to secrets the project lacks."""
    refs = references(configuration)
    missing = set(refs) - await _existing_names(session, project_id, refs)
    if missing:
        raise UnknownSecrets(missing, fields=sorted({f for n in missing for f in refs[n]}))


async def _values(session: AsyncSession, project_id: str, names: set[str]) -> dict[str, str]:
    if not names:
        return {}
    rows = await session.execute(
        select(SecretModel.name, SecretModel.value).where(
            SecretModel.project_id == project_id, SecretModel.name.in_(list(names))
        )
    )
    values = {name: crypto.decrypt(value) for name, value in rows.all()}
    missing = names - set(values)
    if missing:
        raise UnknownSecrets(missing)
    return values


def _substitute(text: str, values: Mapping[str, str]) -> str:
    return REFERENCE.sub(lambda m: values[m.group(1)], text)


async def resolve(
    session: AsyncSession, project_id: str, env: Mapping[str, str], registry_auth: Mapping[str, str] | None
) -> tuple[dict[str, str], dict[str, str] | None, list[str]]:
    """`env` and `registry_auth` (both already decrypted) with every reference replaced by the
    secret's value, and the names of the env variables that now hold a secret (the agent keeps
    those off its disk). `UnknownSecrets` when one is gone."""
    names = {n for v in env.values() for n in REFERENCE.findall(v)}
    if registry_auth:
        names |= {n for v in registry_auth.values() if isinstance(v, str) for n in REFERENCE.findall(v)}
    values = await _values(session, project_id, names)
    if not values:
        return dict(env), dict(registry_auth) if registry_auth else None, []
    secret_env = sorted(k for k, v in env.items() if REFERENCE.search(v))
    new_env = {k: _substitute(v, values) for k, v in env.items()}
    new_auth = {k: _substitute(v, values) for k, v in registry_auth.items()} if registry_auth else None
    return new_env, new_auth, secret_env
