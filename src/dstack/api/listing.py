"""Listing runs: which runs to ask the server for, shared by `runs.list()` and `dstack ps`.

Kept free of pydantic: `list_run_views` gives `dstack ps` light views of the same JSON, so the
CLI answers without importing the run models.
"""

from typing import TYPE_CHECKING

from dstack.core.models.views import RunView

if TYPE_CHECKING:
    from dstack.api.client import Client

RECENT = 5


def list_runs_json(client: "Client", all: bool = False, limit: int | None = None) -> list[dict]:
    """All runs (newest first) with `all`; else the active ones plus the latest few, so a run
    that just finished is still visible. The server filters, so listing stays fast with
    thousands of runs stored."""
    path = f"/api/project/{client.project}/runs/list"
    if all:
        return client.api.post(path, {"only_active": False, "limit": limit or 1000})
    runs = client.api.post(path, {"only_active": True, "limit": limit or 1000})
    if len(runs) < RECENT:
        names = {r["run_name"] for r in runs}
        recent = client.api.post(path, {"only_active": False, "limit": RECENT})
        runs += [r for r in recent if r["run_name"] not in names][: RECENT - len(runs)]
        runs.sort(key=lambda r: r["submitted_at"], reverse=True)
    return runs


def list_run_views(client: "Client", all: bool = False, limit: int | None = None) -> list[RunView]:
    return [RunView.from_json(d) for d in list_runs_json(client, all=all, limit=limit)]
