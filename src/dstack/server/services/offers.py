"""Matching a job's resource requirements against instances, and reserving what it gets."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dstack.core.models.resources import ResourcesSpec
from dstack.core.models.runs import InstanceResources

if TYPE_CHECKING:
    from dstack.core.models.configurations import BaseRunConfiguration
    from dstack.core.models.volumes import VolumeHome

MIB_PER_GB = 1024


@dataclass
class Reservation:
    cpus: int
    memory_mib: int
    gpus: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "memory_mib": self.memory_mib, "gpus": self.gpus}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Reservation":
        d = d or {}
        return cls(cpus=d.get("cpus", 0), memory_mib=d.get("memory_mib", 0), gpus=list(d.get("gpus", [])))


def _gb_to_mib(value: float) -> int:
    return int(round(float(value) * MIB_PER_GB))


def matching_gpus(spec: ResourcesSpec, gpus: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The instance GPUs that satisfy the GPU spec's name/memory filters (count is checked by the caller)."""
    gspec = spec.gpu
    if gspec is None:
        return []
    out = []
    for g in gpus:
        if gspec.vendor and g.get("vendor", "nvidia").lower() != gspec.vendor.lower():
            continue
        if gspec.name and not any(n.lower() in g["name"].lower() for n in gspec.name):
            continue
        if gspec.memory is not None and not gspec.memory.contains(g.get("memory_mib", 0) / MIB_PER_GB):
            continue
        out.append(g)
    return out


def wants_gpu(spec: ResourcesSpec) -> bool:
    return spec.gpu is not None and (spec.gpu.count.min or 0) > 0


def fits_total(spec: ResourcesSpec, res: InstanceResources) -> bool:
    """Whether the instance could ever run the job (ignoring what other jobs hold)."""
    if spec.cpu.min is not None and res.cpus < spec.cpu.min:
        return False
    if spec.memory.min is not None and res.memory_mib < _gb_to_mib(spec.memory.min):
        return False
    if spec.disk.min is not None and res.disk_mib < _gb_to_mib(spec.disk.min):
        return False
    if spec.gpu is not None and wants_gpu(spec):
        if len(matching_gpus(spec, res.gpus)) < (spec.gpu.count.min or 1):
            return False
    return True


def reserve(spec: ResourcesSpec, res: InstanceResources, held: list[Reservation]) -> Reservation | None:
    """What the job gets from the free part of the instance, or None when it must wait.

    A job holds the lower bound of each range: the most it may need to start, leaving the
    rest for others. GPUs are whole devices.
    """
    cpus = spec.cpu.min or 0
    memory = _gb_to_mib(spec.memory.min) if spec.memory.min is not None else 0
    used_cpus = sum(r.cpus for r in held)
    used_mem = sum(r.memory_mib for r in held)
    used_gpus = {i for r in held for i in r.gpus}
    if used_cpus + cpus > res.cpus or used_mem + memory > res.memory_mib:
        return None
    gpus: list[int] = []
    if spec.gpu is not None and wants_gpu(spec):
        free = [g["index"] for g in matching_gpus(spec, res.gpus) if g["index"] not in used_gpus]
        need = spec.gpu.count.min or 1
        if len(free) < need:
            return None
        gpus = free[:need]
    return Reservation(cpus=cpus, memory_mib=memory, gpus=gpus)


def describe_shortfall(spec: ResourcesSpec, instances: list[tuple[str, InstanceResources]]) -> str:
    """The message for a request no instance can meet: what was asked, what exists."""
    have = "; ".join(f"{name}: {res.pretty()}" for name, res in instances) or "no instances"
    return f"no offers match the requirements: asked for {spec.pretty_format()}; available: {have}"


#: dstack's names for our backends (`backends: [remote]` in a dstack configuration means these)
BACKEND_ALIASES: dict[str, tuple[str, ...]] = {"local": ("local", "remote"), "ssh": ("ssh", "remote")}


def volume_mismatch(
    conf: "BaseRunConfiguration", backend: str, region: str, hostname: str | None, homes: Mapping[str, "VolumeHome"]
) -> str | None:
    """Why the run's named volumes rule out an instance: a volume lives on one host
    (services.volumes.volume_homes), so a run naming it goes there."""
    for m in conf.volumes:
        name = getattr(m, "name", None)
        if name is None:
            continue  # an instance path is on whichever host
        home = homes.get(name)
        if home is None:
            return f"volume {name!r} does not exist"
        if not home.admits(backend, region, hostname):
            return f"volume {name!r} lives on {home.describe()}"
    return None


def placement_mismatch(
    conf: "BaseRunConfiguration",
    backend: str,
    region: str,
    price: float,
    spot: bool = False,
    *,
    hostname: str | None = None,
    volume_homes: Mapping[str, "VolumeHome"] | None = None,
) -> str | None:
    """Why the configuration's placement settings (`backends`, `regions`, `spot_policy`,
    `max_price`) and its named volumes rule out an instance, or None when they allow it.
    Today's instances are all on-demand, so `spot_policy: spot` rules every one out. Without
    `volume_homes` (a caller that did not look them up) named volumes keep a run on the
    server's host."""
    if conf.backends is not None:
        names = BACKEND_ALIASES.get(backend, (backend,))
        if not any(b.lower() in names for b in conf.backends):
            return f"backend {backend!r} is not in backends {conf.backends}"
    if volume_homes is not None:
        why = volume_mismatch(conf, backend, region, hostname, volume_homes)
        if why is not None:
            return why
    elif backend != "local" and any(getattr(m, "name", None) for m in conf.volumes):
        return "the run's volumes live on the server's host (backend local)"
    if conf.fleets and (backend != "ssh" or region not in conf.fleets):  # a fleet host's region is its fleet
        return f"not a host of fleets {conf.fleets}"
    if conf.regions is not None and region.lower() not in {r.lower() for r in conf.regions}:
        return f"region {region!r} is not in regions {conf.regions}"
    if conf.spot_policy == "spot" and not spot:
        return "spot_policy is spot and the instance is on-demand"
    if conf.spot_policy == "on-demand" and spot:
        return "spot_policy is on-demand and the instance is spot"
    if conf.max_price is not None and price > conf.max_price:
        return f"price ${price:g}/h is above max_price ${conf.max_price:g}/h"
    return None


def describe_placement(conf: "BaseRunConfiguration", excluded: list[tuple[str, str]]) -> str:
    """The message for instances that fit but were ruled out by placement settings."""
    return "no offers match the placement settings: " + "; ".join(f"{name}: {why}" for name, why in excluded)
