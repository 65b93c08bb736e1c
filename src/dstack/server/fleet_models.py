"""ORM models of fleets: a fleet row, and one row per fleet host next to its `instances` row.

Kept apart from `models.py` (like the gateways' models): the `instances` table stays the one
the scheduler reads, and `fleet_instances` holds what only fleets need — how to reach the host
over SSH, its trusted host key, which fleet and project it belongs to.
"""

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from dstack.server.db import Base
from dstack.server.models import InstanceModel, ProjectModel, _dt, new_id, utcnow


class FleetModel(Base):
    __tablename__ = "fleets"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), default="active")  # active | terminated
    #: the configuration as applied (JSON), private keys `crypto.encrypt`ed
    spec: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_dt(), default=utcnow)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    project: Mapped[ProjectModel] = relationship(lazy="joined")

    __table_args__ = (Index("ix_fleets_project_name", "project_id", "name"),)


class FleetInstanceModel(Base):
    __tablename__ = "fleet_instances"
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True)
    fleet_id: Mapped[str] = mapped_column(ForeignKey("fleets.id", ondelete="CASCADE"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    instance_num: Mapped[int] = mapped_column(Integer)
    hostname: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer, default=22)
    user: Mapped[str] = mapped_column(String(64))
    internal_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: JSON: private key (encrypted), proxy_jump, trusted host keys (first use, then enforced)
    ssh: Mapped[str] = mapped_column(Text, default="{}")
    status_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    instance: Mapped[InstanceModel] = relationship(lazy="joined")

    __table_args__ = (Index("ix_fleet_instances_fleet", "fleet_id"),)
