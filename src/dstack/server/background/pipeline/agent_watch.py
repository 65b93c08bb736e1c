"""One watch per instance's agent: a long poll (`POST /api/watch`, agent.watch) for all the jobs
the server has on it, instead of one `/pull` per job (one HTTP connection and SSH channel each).

Each answer is stored in one transaction for all its jobs, and the runs it names are woken. The
log cursor and state sent with every watch are what the database holds, so nothing is reported
twice after a server restart or a replaced agent. A job added while a watch is in flight gets
one immediate catch-up watch of its own; `since` (the last answer's `seq`) then makes the
in-flight watch answer at its next change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx

from dstack.agent.models import FINAL_STATES
from dstack.core.models.runs import JobStatus, JobTerminationReason
from dstack.server.agent_client import AgentClient, AgentError
from dstack.server.background.pipeline.common import LOG_LINGER_SECONDS, lost_job_message
from dstack.server.background.pipeline.jobs_running import ReportItem, store_reports
from dstack.server.db import retry_on_conflict

if TYPE_CHECKING:
    from dstack.server.background.pipeline.agent_tasks import AgentTasks

logger = logging.getLogger(__name__)

WATCH_WAIT_SECONDS = 20.0
#: at most this many jobs per watch (the agent's bound, agent.watch.MAX_JOBS); an agent with more
#: is watched a slice at a time, each watch the next slice (a slice's news answers at once)
MAX_JOBS_PER_WATCH = 10000
SLICE_WAIT_SECONDS = 1.0


@dataclass
class Watched:
    """A job on the instance's agent, as far as the database has it."""

    cursor: int
    known: str | None
    run_id: str
    #: the instance's client when the watch began (another one later: its agent was replaced)
    client: AgentClient


class InstanceWatch:
    """The watch of one instance's agent; its task runs while it has jobs."""

    def __init__(self, owner: AgentTasks, instance_id: str, on_drop: Callable[[str], None]) -> None:
        self.owner = owner
        self.instance_id = instance_id
        self._on_drop = on_drop  # job id: no longer watched here
        self.jobs: dict[str, Watched] = {}
        self._new: dict[str, Watched] = {}  # added since the last watch was sent
        self._added = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._offset = 0  # where the next slice starts (more jobs than MAX_JOBS_PER_WATCH)
        self._forgets: set[asyncio.Task[None]] = set()  # deletes of ended jobs on the agent, in flight

    def add(self, job_id: str, watched: Watched) -> None:
        self._new[job_id] = watched
        self._added.set()
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run_logged(), name=f"watch-instance-{self.instance_id}")

    async def _run_logged(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("watching the agent of instance %s failed", self.instance_id)
            for job_id in [*self.jobs, *self._new]:
                self._on_drop(job_id)  # the next pass routes them again
            self.jobs.clear()
            self._new.clear()

    def _take_new(self) -> dict[str, Watched]:
        new = dict(self._new)
        self._new.clear()
        self._added.clear()
        self.jobs.update(new)
        return new

    async def _run(self) -> None:
        since: int | None = None
        seen: AgentClient | None = None
        failing_since: float | None = None
        while not self.owner._stopping:
            self._take_new()
            if not self.jobs:
                return
            try:
                client = self.owner.agents.client(self.instance_id)  # a replaced agent: its successor
            except KeyError:  # the instance was removed (its fleet deleted): nothing to watch there
                for job_id in [*self.jobs]:
                    self._drop(job_id)
                return
            if client is not seen:
                since, seen = None, client
            asked = self._slice()
            # Without a `since` (the first watch of this agent) answer at once, to learn its seq;
            # watched a slice at a time, wait briefly on each (the others' news comes in turn).
            wait = WATCH_WAIT_SECONDS if len(asked) == len(self.jobs) else SLICE_WAIT_SECONDS
            if since is None:
                wait = 0.0
            poll = asyncio.create_task(client.watch(asked, since, wait=wait, linger=LOG_LINGER_SECONDS))
            try:
                while not poll.done():
                    added = asyncio.create_task(self._added.wait())
                    try:
                        await asyncio.wait({poll, added}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        added.cancel()
                    if self._added.is_set() and not poll.done():
                        await self._catch_up(client)
                answer = poll.result()
            except (httpx.HTTPError, AgentError) as e:
                now = time.time()
                failing_since = failing_since or now
                if now - failing_since > self.owner.agents.recovery_hold_seconds:
                    await self._give_up(client, f"agent unreachable: {e}")
                    return
                await asyncio.sleep(0.5)
                continue
            finally:
                if not poll.done():
                    poll.cancel()
            failing_since = None
            if answer is None:
                self._to_legacy(client)
                continue
            since = answer["seq"]
            await self._store(client, answer, asked)

    def _slice(self) -> dict[str, tuple[int, str | None]]:
        """The jobs the next watch lists: all of them, or the next MAX_JOBS_PER_WATCH in turn."""
        items = list(self.jobs.items())
        if len(items) > MAX_JOBS_PER_WATCH:
            start = self._offset % len(items)
            items = (items[start:] + items[:start])[:MAX_JOBS_PER_WATCH]
            self._offset = start + MAX_JOBS_PER_WATCH
        return {k: (w.cursor, w.known) for k, w in items}

    async def _catch_up(self, client: AgentClient) -> None:
        """Jobs added while a watch is in flight: their news now (that watch does not list them)."""
        new = self._take_new()
        asked = {k: (w.cursor, w.known) for k, w in list(new.items())[:MAX_JOBS_PER_WATCH]}
        try:
            answer = await client.watch(asked, None, wait=0.0)
        except (httpx.HTTPError, AgentError):
            return  # the next watch lists them
        if answer is None:
            self._to_legacy(client)
            return
        await self._store(client, answer, asked)

    def _to_legacy(self, client: AgentClient) -> None:
        """An agent older than `/api/watch`: its jobs are pulled one by one."""
        self.owner.legacy_clients.add(client)
        jobs = [*self.jobs, *self._new]
        self.jobs.clear()
        self._new.clear()
        for job_id in jobs:
            self._on_drop(job_id)
            self.owner.watch(job_id)

    async def _store(
        self, client: AgentClient, answer: dict[str, Any], asked: dict[str, tuple[int, str | None]]
    ) -> None:
        items: list[ReportItem] = []
        for job_id, report in answer["jobs"].items():
            w = self.jobs.get(job_id)
            if w is None or asked.get(job_id) != (w.cursor, w.known) or not isinstance(report, dict):
                continue  # dropped meanwhile, or already past this answer
            state = report["state"]
            records: list[dict[str, Any]] = report.get("logs", [])
            # A final state is stored with its last lines only: a job seen ended has all its output.
            apply_state = state != w.known and not (state in FINAL_STATES and records)
            if records or apply_state:
                items.append((job_id, report, records, apply_state))
        if items:
            async with self.owner.db.session() as session:
                gone = await retry_on_conflict(session, partial(store_reports, session, items))
            changed: set[str] = set()
            logs: set[str] = set()
            ended: list[str] = []
            for job_id, report, records, apply_state in items:
                w = self.jobs[job_id]
                if job_id in gone:
                    self._drop(job_id)
                    continue
                if records:
                    w.cursor = report["next_cursor"]
                    logs.add(w.run_id)
                if apply_state:
                    w.known = report["state"]
                    changed.add(w.run_id)
                    if w.known in FINAL_STATES:
                        ended.append(job_id)
                        self._drop(job_id)
            for run_id in logs:
                self.owner._on_logs(run_id)
            for run_id in changed:
                self.owner._on_job_changed(run_id)
            for job_id in ended:
                # In the background: a slow delete on the agent must not hold up the news of
                # every other job on the host.
                task = asyncio.create_task(_forget(client, job_id), name=f"forget-{job_id}")
                self._forgets.add(task)
                task.add_done_callback(self._forgets.discard)
        for job_id in answer.get("unknown", []):
            w = self.jobs.get(job_id)
            if w is None or job_id not in asked:
                continue
            self._drop(job_id)
            msg = lost_job_message(client is not w.client, "agent unreachable: the agent does not know this job")
            await self.owner.finish_job(job_id, JobStatus.FAILED, JobTerminationReason.INSTANCE_UNREACHABLE, msg)

    async def _give_up(self, client: AgentClient, message: str) -> None:
        """The agent stayed unreachable past the hold: every job watched here ends."""
        jobs = {**self.jobs, **self._new}
        self.jobs.clear()
        self._new.clear()
        for job_id, w in jobs.items():
            self._on_drop(job_id)
            msg = lost_job_message(client is not w.client, message)
            await self.owner.finish_job(job_id, JobStatus.FAILED, JobTerminationReason.INSTANCE_UNREACHABLE, msg)

    def _drop(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self._on_drop(job_id)


async def _forget(client: AgentClient, job_id: str) -> None:
    try:
        await client.delete(job_id)
    except (httpx.HTTPError, AgentError):
        pass  # the agent forgets it with the job's directory later; nothing of ours waits on it
