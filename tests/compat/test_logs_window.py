"""`logs/poll` as dstack's client may send it: `descending`, `start_time`/`end_time`, `limit`,
following `next_token` until it is null."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import httpx

from tests.util import wait_until


def _poll(server, **body) -> dict:
    r = httpx.post(
        f"{server.url}/api/project/main/logs/poll",
        headers={**server.headers, "X-API-VERSION": "0.22.5"},
        json={"run_name": "window-task", **body},
    )
    assert r.status_code == 200, r.text
    return r.json()


def _lines(page: dict) -> list[str]:
    return [base64.b64decode(x["message"]).decode().strip() for x in page["logs"]]


def _follow(server, **body) -> list[list[str]]:
    pages, token = [], None
    while True:
        page = _poll(server, **body, next_token=token)
        pages.append(_lines(page))
        token = page["next_token"]
        if token is None:
            return pages
        assert len(pages) < 20, pages


def test_descending_windows_and_limits(server):
    conf = {"type": "task", "commands": ["for i in 1 2 3 4 5; do echo line$i; sleep 0.3; done"]}
    r = httpx.post(
        f"{server.url}/api/project/main/runs/submit",
        headers=server.headers,
        json={"run_spec": {"run_name": "window-task", "configuration": conf}},
    )
    assert r.status_code == 200, r.text

    def finished() -> dict | None:
        run = httpx.post(
            f"{server.url}/api/project/main/runs/get", headers=server.headers, json={"run_name": "window-task"}
        ).json()
        return run if run["status"] in ("done", "failed", "terminated") else None

    run = wait_until(finished, timeout=120, interval=0.5, what="the task to finish")
    assert run["status"] == "done", run
    sub = run["jobs"][0]["job_submissions"][-1]
    everything = [ln for page in _follow(server, limit=1000) for ln in page]
    assert everything == [f"line{i}" for i in range(1, 6)]

    # newest first, two at a time, following next_token to the oldest
    assert _follow(server, descending=True, limit=2, job_submission_id=sub["id"]) == [
        ["line5", "line4"],
        ["line3", "line2"],
        ["line1"],
    ]
    # a time window: lines at or after line2's time and strictly before line5's
    stamps = {
        base64.b64decode(x["message"]).decode().strip(): x["timestamp"] for x in _poll(server, limit=1000)["logs"]
    }
    start = datetime.fromtimestamp(stamps["line2"], UTC).isoformat()
    end = datetime.fromtimestamp(stamps["line5"], UTC).isoformat()
    window = [ln for page in _follow(server, start_time=start, end_time=end, limit=2) for ln in page]
    assert window == ["line2", "line3", "line4"]
    newest_first = [ln for page in _follow(server, start_time=start, end_time=end, descending=True) for ln in page]
    assert newest_first == ["line4", "line3", "line2"]
