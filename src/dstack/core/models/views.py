"""Read-only attribute views over the server's run JSON, without pydantic.

`dstack ps` must answer in a fraction of a second, and importing pydantic alone costs ~0.1 s;
listings read runs through these views instead of the validated models in `runs.py`.
"""

from datetime import datetime
from types import SimpleNamespace
from typing import Any

FINISHED_RUN_STATUSES = frozenset({"terminated", "failed", "done"})


def pretty_resources(cpus: int, memory_mib: int, disk_mib: int, gpus: list[dict[str, Any]]) -> str:
    """`2xCPU, 24GB, 1xA100 (80GB), 252GB (disk)` — one formatting for models and views."""
    parts = [f"{cpus}xCPU", f"{memory_mib / 1024:.0f}GB"]
    if gpus:
        names = {g["name"] for g in gpus}
        mem = gpus[0].get("memory_mib", 0) / 1024
        parts.append(f"{len(gpus)}x{'/'.join(sorted(names))} ({mem:.0f}GB)")
    parts.append(f"{disk_mib / 1024:.0f}GB (disk)")
    return ", ".join(parts)


class ResourcesView(SimpleNamespace):
    def pretty(self) -> str:
        return pretty_resources(self.cpus, self.memory_mib, self.disk_mib, self.gpus)


def _view(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        if key == "extra":
            return value  # free-form: stays a mapping
        fields = {k: _view(v, k) for k, v in value.items()}
        return ResourcesView(**fields) if key == "resources" else SimpleNamespace(**fields)
    if isinstance(value, list):
        return [_view(v, key) for v in value]
    if isinstance(value, str) and key.endswith("_at"):
        return datetime.fromisoformat(value)
    return value


class RunView(SimpleNamespace):
    """One run as listed: the wire JSON's fields plus the conveniences `Run` has."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunView":
        view = cls(**{k: _view(v, k) for k, v in data.items()})
        view.name = data["run_name"]
        view.service_url = (data.get("service") or {}).get("url")
        view.endpoint_url = (data.get("extra") or {}).get("endpoint_url")
        return view

    def is_finished(self) -> bool:
        return self.status in FINISHED_RUN_STATUSES
