"""The Slurm backends of each project (from `config.yml`) and what they offer, cached.

The pipeline decides placements inside a database transaction, where no command may run: it
reads the shapes cached here, which `refresh()` renews outside any transaction (the allocation
manager calls it every few seconds; the run plan calls it before answering).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.core.models.resources import ResourcesSpec
from dstack.core.models.runs import InstanceOffer, InstanceResources
from dstack.server.backends.slurm.backend import SlurmBackend, _without_disk
from dstack.server.backends.slurm.commands import SlurmCommandError
from dstack.server.backends.slurm.offers import SlurmShape
from dstack.server.services import offers

if TYPE_CHECKING:
    from dstack.core.models.configurations import BaseRunConfiguration
    from dstack.server.config_file import ServerConfig

logger = logging.getLogger(__name__)

#: shapes older than this are refreshed before a plan answers
PLAN_MAX_AGE_SECONDS = 5.0


@dataclass(frozen=True)
class SlurmPlacement:
    """Where a job goes on Slurm: the project's `index`-th Slurm backend, `partition`."""

    project: str
    index: int
    partition: str
    resources: InstanceResources


class SlurmBackends:
    def __init__(self, config: ServerConfig, server_dir: Path) -> None:
        self.server_dir = server_dir
        self.by_project: dict[str, list[SlurmBackend]] = {}
        self._shapes: dict[tuple[str, int], list[SlurmShape]] = {}
        self._refreshed = 0.0
        self._retired: list[SlurmBackend] = []
        self.apply(config)

    def apply(self, config: ServerConfig) -> None:
        """Use `config`'s backends from now on (a reload): an entry whose settings did not change
        keeps its backend (connection, cached shapes); a changed or removed one is closed once the
        next `refresh` has read the new ones. A project's backends are known by their position."""
        old = self.by_project
        new: dict[str, list[SlurmBackend]] = {}
        for project in config.projects:
            kept = old.get(project.name, [])
            new[project.name] = [
                kept[i]
                if i < len(kept) and kept[i].config == b
                else SlurmBackend(b, self.server_dir / "slurm" / project.name / str(i))
                for i, b in enumerate(project.backends)
            ]
        in_use = {id(b) for backends in new.values() for b in backends}
        self._retired += [b for backends in old.values() for b in backends if id(b) not in in_use]
        for key in list(self._shapes):
            name, i = key
            was = old.get(name, [])
            now = new.get(name, [])
            if i >= len(now) or i >= len(was) or now[i] is not was[i]:
                del self._shapes[key]
        self.by_project = new
        self._refreshed = 0.0  # the next refresh reads the new backends at once

    def __bool__(self) -> bool:
        return any(self.by_project.values())

    def backend(self, project: str, index: int) -> SlurmBackend | None:
        found = self.by_project.get(project, [])
        return found[index] if 0 <= index < len(found) else None

    async def refresh(self, max_age: float = 0.0) -> None:
        """Read every backend's shapes again (a cluster that does not answer keeps none)."""
        if time.monotonic() - self._refreshed < max_age:
            return
        for project, backends in self.by_project.items():
            for i, b in enumerate(backends):
                try:
                    self._shapes[(project, i)] = await b.shapes()
                except SlurmCommandError as e:
                    logger.warning("Slurm backend %d of project %s: %s", i, project, e)
                    self._shapes[(project, i)] = []
        self._refreshed = time.monotonic()
        retired, self._retired = self._retired, []
        for b in retired:
            await b.shutdown()

    def cached_shapes(self, project: str, index: int) -> list[SlurmShape]:
        """The shapes last read for the project's `index`-th backend (empty before the first read)."""
        return list(self._shapes.get((project, index), []))

    def offers(self, project: str, spec: ResourcesSpec, conf: BaseRunConfiguration | None) -> list[InstanceOffer]:
        """The cached shapes that could run `spec` and the placement settings allow."""
        return [s.offer() for _, s in self._fitting(project, spec, conf)]

    def placement(self, project: str, spec: ResourcesSpec, conf: BaseRunConfiguration) -> SlurmPlacement | None:
        """The partition a job goes to: the first fitting shape with a free node, else the first fitting."""
        fitting = self._fitting(project, spec, conf)
        if not fitting:
            return None
        fitting.sort(key=lambda t: t[1].available == 0)
        index, shape = fitting[0]
        return SlurmPlacement(project, index, shape.partition, shape.resources)

    def _fitting(
        self, project: str, spec: ResourcesSpec, conf: BaseRunConfiguration | None
    ) -> list[tuple[int, SlurmShape]]:
        out = []
        for i, _ in enumerate(self.by_project.get(project, [])):
            for shape in self._shapes.get((project, i), []):
                if not offers.fits_total(_without_disk(spec), shape.resources):
                    continue
                if conf is not None and offers.placement_mismatch(conf, "slurm", shape.partition, 0.0) is not None:
                    continue
                out.append((i, shape))
        return out

    async def close(self) -> None:
        for b in self._retired:
            await b.shutdown()
        self._retired = []
        for backends in self.by_project.values():
            for b in backends:
                await b.shutdown()


_current: SlurmBackends | None = None


def set_slurm_backends(backends: SlurmBackends | None) -> None:
    global _current
    _current = backends


def slurm_backends() -> SlurmBackends | None:
    """The server's Slurm backends (None before start or when `config.yml` configures none)."""
    return _current if _current else None
