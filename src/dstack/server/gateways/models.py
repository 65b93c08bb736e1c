"""The gateways table."""

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from dstack.server.db import Base
from dstack.server.models import ProjectModel, new_id, utcnow


class GatewayModel(Base):
    """A gateway process on this host serving `<run>.<domain>` for one project's services."""

    __tablename__ = "gateways"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_gateways_project_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    backend: Mapped[str] = mapped_column(String(30), default="local")
    region: Mapped[str] = mapped_column(String(50), default="local")
    domain: Mapped[str] = mapped_column(String(253))
    host: Mapped[str] = mapped_column(String(100), default="0.0.0.0")  # the address it binds
    port: Mapped[int] = mapped_column(Integer)
    tls_cert: Mapped[str | None] = mapped_column(Text, nullable=True)  # path on the server host
    tls_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    default: Mapped[bool] = mapped_column(Boolean, default=False)
    token: Mapped[str] = mapped_column(Text, unique=True)  # registration token, both ways; encrypted (crypto)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    server_url: Mapped[str | None] = mapped_column(Text, nullable=True)  # the auth/wake URLs' base it was started with
    status: Mapped[str] = mapped_column(String(20), default="submitted")  # submitted|running|failed|stopped
    status_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    project: Mapped[ProjectModel] = relationship(lazy="joined")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)
