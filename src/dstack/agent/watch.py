"""`POST /api/watch`: one long poll for news of many jobs (docs/contracts.md, "Agent HTTP API").

The server keeps one watch per agent instead of one `/pull` per job: with 20 jobs on a host that
is one request (and one SSH channel) where there were 20. The caller says, per job, the log cursor
and state it has stored; the answer holds every listed job that has news against that (a new
state, lines past the cursor) and the jobs this agent does not know. Nothing is kept here between
requests, so a restarted server (or a replaced agent) is reconciled by its first watch.

`since` closes the gap for jobs the caller has not listed yet (one it has just started): the
answer comes at once when any job changed after the caller's last answer (its `seq`).
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

if TYPE_CHECKING:  # types only: importing this module does not load the job machinery
    from dstack.agent.jobs import Job, JobManager

MAX_JOBS = 10000
MAX_WAIT_SECONDS = 60.0
MAX_LINGER_SECONDS = 1.0
MAX_RECORDS_PER_JOB = 10000
#: about this much log output per answer; jobs past it wait for the next watch (left out whole)
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class WatchedJob(BaseModel):
    cursor: int = Field(0, ge=0)
    #: the state the caller has stored (None: report the job's state whatever it is)
    state: str | None = None


class WatchRequest(BaseModel):
    jobs: dict[str, WatchedJob] = Field(default_factory=dict, max_length=MAX_JOBS)
    #: the `seq` of the caller's last answer (None: only the listed jobs' news answers)
    since: int | None = None
    wait: float = Field(0.0, ge=0)
    #: with only new lines to report, hold the answer this much longer (a state change answers at once)
    linger: float = Field(0.0, ge=0)
    limit: int = Field(1000, ge=1)


def _has_news(job: Job, want: WatchedJob) -> bool:
    return job.state != want.state or job.logs.last_seq > want.cursor


def _state_news(manager: JobManager, req: WatchRequest) -> bool:
    return any((j := manager.jobs.get(k)) is None or j.state != w.state for k, w in req.jobs.items())


async def watch(manager: JobManager, req: WatchRequest) -> bytes:
    """The JSON body of a watch answer, once a listed job has news, any job changed since
    `req.since`, or `req.wait` has passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(req.wait, MAX_WAIT_SECONDS)
    changes = manager.changes
    while True:
        seq = changes.version
        news = [k for k, w in req.jobs.items() if (j := manager.jobs.get(k)) is None or _has_news(j, w)]
        if news or (req.since is not None and req.since != seq):
            break
        if not await changes.wait_any(deadline - loop.time()):
            seq = changes.version
            break
    linger = min(req.linger, MAX_LINGER_SECONDS)
    if news and linger > 0 and not _state_news(manager, req):
        until = loop.time() + linger
        while not _state_news(manager, req) and await changes.wait_any(until - loop.time()):
            pass
        seq = changes.version
    return _answer(manager, req, seq)


def _answer(manager: JobManager, req: WatchRequest, seq: int) -> bytes:
    limit = min(req.limit, MAX_RECORDS_PER_JOB)
    parts: list[bytes] = []
    unknown: list[str] = []
    size = 0
    for job_id, want in req.jobs.items():
        job = manager.jobs.get(job_id)
        if job is None:
            unknown.append(job_id)
            continue
        if not _has_news(job, want):
            continue
        state = job.state  # read before the logs: a final state then implies all logs are stored
        records, next_cursor = job.logs.read(want.cursor, limit)
        batch = sum(len(r) for r in records)
        if records and parts and size + batch > MAX_ANSWER_BYTES:
            continue  # its news waits for the next watch (which answers at once)
        size += batch
        head = json.dumps({**job.status(state), "next_cursor": next_cursor}).encode()
        # Records are stored already encoded; splice them in rather than re-serialising.
        parts.append(json.dumps(job_id).encode() + b":" + head[:-1] + b', "logs": [' + b",".join(records) + b"]}")
    head = json.dumps({"seq": seq, "unknown": unknown}).encode()
    return head[:-1] + b', "jobs": {' + b",".join(parts) + b"}}"
