"""First start: the admin user, the `main` project, and the client config that makes the CLI work at once."""

import logging

from sqlalchemy import select

from dstack.server.db import Database
from dstack.server.models import MemberModel, ProjectModel, UserModel
from dstack.server.security import hash_token, new_token

logger = logging.getLogger(__name__)

DEFAULT_PROJECT = "main"


async def ensure_admin(db: Database, env_token: str | None = None) -> tuple[str | None, bool]:
    """Create the admin and `main` project when missing. Returns (token if known, created).

    `env_token` (settings: DSTACK_SERVER_ADMIN_TOKEN) becomes the admin's token, new or not."""
    async with db.session() as session:
        admin = (await session.execute(select(UserModel).where(UserModel.name == "admin"))).scalar_one_or_none()
        created = False
        token = None
        if admin is None:
            token = env_token or new_token()
            admin = UserModel(name="admin", global_role="admin", token_hash=hash_token(token))
            session.add(admin)
            await session.flush()
            created = True
        elif env_token and admin.token_hash != hash_token(env_token):
            admin.token_hash = hash_token(env_token)
            token = env_token
        elif env_token:
            token = env_token
        project = (
            await session.execute(select(ProjectModel).where(ProjectModel.name == DEFAULT_PROJECT))
        ).scalar_one_or_none()
        if project is None:
            project = ProjectModel(name=DEFAULT_PROJECT, owner_id=admin.id)
            session.add(project)
            await session.flush()
            session.add(MemberModel(project_id=project.id, user_id=admin.id, project_role="admin"))
        await session.commit()
        return token, created
