"""`POST /api/watch` on a real agent process: news of many jobs in one long poll (agent.watch)."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import httpx

from tests.agent.test_agent import submit


def watch(client: httpx.Client, jobs: dict[str, tuple[int, str | None]], **params: Any) -> dict[str, Any]:
    body = {"jobs": {k: {"cursor": c, "state": s} for k, (c, s) in jobs.items()}, **params}
    r = client.post("/api/watch", json=body, timeout=30)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def follow(client: httpx.Client, job_ids: list[str], until: set[str]) -> tuple[dict[str, str], dict[str, bytes]]:
    """Watch the jobs as the server does (its stored cursor and state sent back each time) until each
    reached a state in `until` with all its lines: each job's last state and its whole output."""
    known: dict[str, tuple[int, str | None]] = {j: (0, None) for j in job_ids}
    output = {j: b"" for j in job_ids}
    since = None
    for _ in range(200):
        answer = watch(client, known, since=since, wait=10)
        assert answer["unknown"] == []
        since = answer["seq"]
        for job_id, report in answer["jobs"].items():
            cursor, _ = known[job_id]
            assert [r["seq"] for r in report["logs"]] == list(range(cursor + 1, report["next_cursor"] + 1))
            output[job_id] += b"".join(base64.b64decode(r["data"]) for r in report["logs"])
            known[job_id] = (report["next_cursor"], report["state"])
        if all(s in until for _, s in known.values()):
            return {j: s for j, (_, s) in known.items() if s is not None}, output
    raise AssertionError(f"jobs never reached {until}: {known}")


def test_one_watch_reports_every_jobs_state_and_lines_once(client: httpx.Client) -> None:
    a = submit(client, ["echo a1", "sleep 0.3", "echo a2"])
    b = submit(client, ["echo b1", "exit 3"])
    states, output = follow(client, [a, b], {"done", "failed"})
    assert states == {a: "done", b: "failed"}
    assert output == {a: b"a1\na2\n", b: b"b1\n"}
    # What was reported is not reported again: with the stored cursors and states, no news.
    r = client.get(f"/api/jobs/{a}/pull").json()
    again = watch(client, {a: (r["next_cursor"], "done")}, wait=0.3)
    assert again["jobs"] == {}


def test_a_change_of_an_unlisted_job_answers_a_watch_with_since(client: httpx.Client) -> None:
    quiet = submit(client, ["sleep 30"])
    try:
        first = watch(client, {quiet: (0, None)}, wait=0)
        assert first["jobs"][quiet]["state"] in ("preparing", "running")
        state = follow(client, [quiet], {"running"})[0][quiet]
        seq = watch(client, {quiet: (0, state)}, wait=0)["seq"]
        # Nothing changed since `seq`: the watch holds until its wait runs out.
        held = watch(client, {quiet: (0, state)}, since=seq, wait=0.5)
        assert held["jobs"] == {} and held["seq"] == seq
        # A job the watch does not list changes: the watch answers (its caller lists the job next).
        other = submit(client, ["echo hi"])
        woke = watch(client, {quiet: (0, state)}, since=seq, wait=20)
        assert woke["seq"] > seq and woke["jobs"] == {}
        assert follow(client, [other], {"done"})[1][other] == b"hi\n"
    finally:
        client.post(f"/api/jobs/{quiet}/stop", json={"abort": True})


def test_jobs_the_agent_does_not_know_are_named(client: httpx.Client) -> None:
    ghost = f"job-{uuid.uuid4().hex[:12]}"
    answer = watch(client, {ghost: (0, "running")}, wait=5)
    assert answer["unknown"] == [ghost] and answer["jobs"] == {}


def test_a_job_submitted_with_start_runs_without_a_start_request(client: httpx.Client) -> None:
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    r = client.post(
        "/api/jobs", params={"start": "true"}, json={"job_id": job_id, "run_name": "t", "commands": ["echo hi"]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["state"] in ("preparing", "running", "done")
    states, output = follow(client, [job_id], {"done", "failed"})
    assert states == {job_id: "done"} and output == {job_id: b"hi\n"}
    # Without `start` the job waits for its start, as before.
    other = submit(client, ["echo no"], start=False)
    assert watch(client, {other: (0, None)}, wait=0)["jobs"][other]["state"] == "submitted"


def test_a_submit_with_start_can_answer_once_the_job_runs(client: httpx.Client) -> None:
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    body = {"job_id": job_id, "run_name": "t", "commands": ["sleep 30"]}
    r = client.post("/api/jobs", params={"start": "true", "wait_running": 10}, json=body)
    try:
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["state"] == "running" and answer["started_at"] is not None
        assert answer["address"] == "127.0.0.1" or answer["network"] == "isolated"
    finally:
        client.post(f"/api/jobs/{job_id}/stop", json={"abort": True})
