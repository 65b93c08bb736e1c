"""Secret storage, references and rotation on a real (SQLite) database migrated as the server does."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dstack.server import crypto, migrate
from dstack.server.db import Database
from dstack.server.models import ProjectModel, SecretModel, UserModel
from dstack.server.rekey import reencrypt
from dstack.server.services import secret_store


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Database, Path]]:
    """One migrated database for the module (migrating takes seconds)."""
    tmp_path = tmp_path_factory.mktemp("store")
    key_file = tmp_path / "encryption.key"
    crypto.init(key_file)
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    asyncio.run(migrate.upgrade(database))
    yield database, key_file
    asyncio.run(database.dispose())
    crypto._fernet = None  # the next test's key file, not this one's


def _run(database: Database, coro: Any) -> Any:
    async def run() -> Any:
        try:
            return await coro
        finally:
            await database.engine.dispose()  # pooled connections belong to this event loop

    return asyncio.run(run())


async def _project(db: Database) -> ProjectModel:
    suffix = uuid.uuid4().hex[:8]
    async with db.session() as session:
        user = UserModel(name=f"owner-{suffix}", token_hash=uuid.uuid4().hex * 2)
        session.add(user)
        await session.flush()
        project = ProjectModel(name=f"p-{suffix}", owner_id=user.id)
        session.add(project)
        await session.commit()
        return project


def test_values_are_encrypted_and_references_resolve(db: tuple[Database, Path]) -> None:
    database, _ = db

    async def scenario() -> None:
        project = await _project(database)
        async with database.session() as session:
            await secret_store.set_secret(session, project, "s1", "value-one")
            await secret_store.set_secret(session, project, "user", "robot")
            await secret_store.set_secret(session, project, "s1", "value-two")  # an update
            stored = (
                await session.execute(
                    select(SecretModel.name, SecretModel.value).where(SecretModel.project_id == project.id)
                )
            ).all()
            assert len(stored) == 2 and all(crypto.is_encrypted(v) and "value" not in v for _, v in stored)

            env = {"A": "x-${{ secrets.s1 }}-y", "B": "plain", "C": "${{secrets.s1}}${{ secrets.user }}"}
            auth = {"username": "${{ secrets.user }}", "password": "${{ secrets.s1 }}"}
            new_env, new_auth, secret_env = await secret_store.resolve(session, project.id, env, auth)
            assert new_env == {"A": "x-value-two-y", "B": "plain", "C": "value-tworobot"}
            assert new_auth == {"username": "robot", "password": "value-two"}
            assert secret_env == ["A", "C"]

            with pytest.raises(secret_store.UnknownSecrets) as e:
                await secret_store.resolve(session, project.id, {"D": "${{ secrets.gone }}"}, None)
            assert e.value.names == ["gone"] and "'gone'" in e.value.msg

            conf = {"env": ["K=${{ secrets.s1 }}", "M=${{ secrets.nope }}"], "registry_auth": auth}
            assert secret_store.references(conf) == {
                "s1": ["env.K", "registry_auth.password"],
                "nope": ["env.M"],
                "user": ["registry_auth.username"],
            }
            with pytest.raises(secret_store.UnknownSecrets) as e:
                await secret_store.check_references(session, project.id, conf)
            assert e.value.names == ["nope"] and e.value.fields == ["env.M"]
            await secret_store.check_references(session, project.id, {"env": {"K": "${{ secrets.s1 }}"}})

    _run(database, scenario())


def test_rotation_reencrypts_secrets(db: tuple[Database, Path]) -> None:
    database, key_file = db

    async def scenario() -> None:
        project = await _project(database)
        async with database.session() as session:
            await secret_store.set_secret(session, project, "tok", "the-value")
            before = (
                await session.execute(select(SecretModel.value).where(SecretModel.project_id == project.id))
            ).scalar_one()
        crypto.rotate(key_file)
        assert await reencrypt(database) >= 1
        key_file.write_text(key_file.read_text().split()[0] + "\n")  # only the new key is left
        crypto.init(key_file)
        async with database.session() as session:
            secret = await secret_store.get_secret(session, project, "tok")
            assert secret.value != before and secret_store.plain_value(secret) == "the-value"

    _run(database, scenario())
