"""Which gateway a service run is published on, and the URLs users reach it at."""

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.server.errors import InvalidRequest
from dstack.server.gateways.models import GatewayModel
from dstack.server.models import ProjectModel


def public_base(gw: GatewayModel, sub: str) -> str:
    """`https://<sub>.<domain>` with `:port` unless it is the scheme's default."""
    scheme = "https" if gw.tls else "http"
    default_port = 443 if gw.tls else 80
    port = "" if gw.port == default_port else f":{gw.port}"
    return f"{scheme}://{sub}.{gw.domain}{port}"


def service_urls(gw: GatewayModel, run_name: str) -> tuple[str, str]:
    """(service URL, OpenAI base URL) of a run published on `gw`."""
    return public_base(gw, run_name) + "/", public_base(gw, "gateway") + "/v1"


async def resolve_gateway(
    session: AsyncSession, project: ProjectModel, choice: bool | str | None
) -> GatewayModel | None:
    """The gateway a service uses: `gateway: <name>` that one, `false` none (the in-server proxy),
    unset the project's default if there is one, `true` the default (an error when there is none)."""
    if choice is False:
        return None
    query = select(GatewayModel).where(GatewayModel.project_id == project.id)
    if isinstance(choice, str):
        gw = (await session.execute(query.where(GatewayModel.name == choice))).scalar_one_or_none()
        if gw is None:
            raise InvalidRequest(f"gateway '{choice}' does not exist in project '{project.name}'", fields=["gateway"])
        return gw
    gw = (await session.execute(query.where(GatewayModel.default.is_(True)))).scalars().first()
    if gw is None and choice is True:
        raise InvalidRequest(
            f"project '{project.name}' has no default gateway; create one with `dstack gateway create`",
            fields=["gateway"],
        )
    return gw
