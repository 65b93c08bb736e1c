"""Offers from `sinfo`: one per partition × node shape (CPUs, memory, GPUs from GRES)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dstack.core.models.runs import InstanceOffer, InstanceResources

#: `sinfo -h -N -o SINFO_FORMAT`: node, partition, CPUs, memory (MiB), GRES, state; `|`-separated
SINFO_FORMAT = "%N|%P|%c|%m|%G|%t"
_GRES_GPU = re.compile(r"^gpu(?::(?P<type>[A-Za-z0-9_.\-]+))?:(?P<count>\d+)")
#: node states that take jobs now (`mix`: partly allocated) or later (`alloc`, `comp`)
_AVAILABLE = {"idle", "mix"}
_BUSY = {"alloc", "comp", "resv", "plnd"}


@dataclass(frozen=True)
class SlurmNode:
    name: str
    partition: str
    cpus: int
    memory_mib: int
    gpu_type: str | None
    gpu_count: int
    state: str


@dataclass
class SlurmShape:
    """Nodes of one partition with the same shape: one offer."""

    partition: str
    resources: InstanceResources
    gpu_type: str | None
    nodes: list[str] = field(default_factory=list)
    available: int = 0  # nodes idle or partly allocated

    def offer(self) -> InstanceOffer:
        return InstanceOffer(
            backend="slurm",
            region=self.partition,
            instance_name=f"{self.partition}:{','.join(self.nodes)}",
            resources=self.resources,
            price=0.0,
            availability="available" if self.available else "busy",
        )


def parse_gres(gres: str) -> tuple[str | None, int]:
    """GPU type and count from a node's GRES (`gpu:a100:4(S:0-1)`, `gpu:2`, `(null)`)."""
    for item in gres.split(","):
        m = _GRES_GPU.match(item.strip())
        if m:
            return m.group("type"), int(m.group("count"))
    return None, 0


def parse_sinfo(text: str) -> list[SlurmNode]:
    """Lines of `sinfo -h -N -o SINFO_FORMAT`; malformed lines are skipped."""
    nodes = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 6:
            continue
        name, partition, cpus, memory, gres, state = parts
        try:
            gpu_type, gpu_count = parse_gres(gres)
            nodes.append(
                SlurmNode(
                    name=name,
                    partition=partition.rstrip("*"),  # `*` marks the default partition
                    cpus=int(cpus),
                    memory_mib=int(memory.rstrip("+")),
                    gpu_type=gpu_type,
                    gpu_count=gpu_count,
                    state=state.rstrip("*~#!%$@^-").lower(),
                )
            )
        except ValueError:
            continue
    return nodes


def shapes(nodes: list[SlurmNode], partitions: list[str] | None = None) -> list[SlurmShape]:
    """Group usable nodes by partition and shape; down, drained and failed nodes are left out."""
    out: dict[tuple[str, int, int, str | None, int], SlurmShape] = {}
    for n in nodes:
        if partitions is not None and n.partition not in partitions:
            continue
        if n.state not in _AVAILABLE | _BUSY:
            continue
        key = (n.partition, n.cpus, n.memory_mib, n.gpu_type, n.gpu_count)
        shape = out.get(key)
        if shape is None:
            gpus = [
                {"index": i, "name": n.gpu_type or "gpu", "memory_mib": 0, "vendor": "nvidia"}
                for i in range(n.gpu_count)
            ]
            resources = InstanceResources(cpus=n.cpus, memory_mib=n.memory_mib, disk_mib=0, gpus=gpus)
            shape = out[key] = SlurmShape(partition=n.partition, resources=resources, gpu_type=n.gpu_type)
        shape.nodes.append(n.name)
        if n.state in _AVAILABLE:
            shape.available += 1
    return list(out.values())
