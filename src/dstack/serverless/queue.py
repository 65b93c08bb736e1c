"""The durable job queue: every transition is one guarded SQL statement, so a job has one owner,
terminal states are final, and duplicate or late worker posts change nothing.

Core statements (not ORM sessions) on the hot paths keep a job's round trip to a few
milliseconds. On SQLite, writers are serialised by an in-process lock instead of spinning in
SQLite's busy handler; on PostgreSQL the claim uses `FOR UPDATE SKIP LOCKED`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, and_, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from dstack.server.db import Database
from dstack.serverless.models import (
    CANCELLED,
    FAILED,
    IN_PROGRESS,
    IN_QUEUE,
    ServerlessJobModel,
    ServerlessStreamChunkModel,
    ServerlessWebhookModel,
    new_job_id,
)

J = ServerlessJobModel.__table__
C = ServerlessStreamChunkModel.__table__
W = ServerlessWebhookModel.__table__

_STATUS_COLS = (J.c.id, J.c.status, J.c.output, J.c.error, J.c.worker_id, J.c.queued_at, J.c.started_at,
                J.c.finished_at, J.c.webhook, J.c.endpoint_id)


@dataclass
class Finished:
    """A job that just reached a terminal state."""

    id: str
    endpoint_id: str
    status: str
    worker_id: str | None
    payload: dict[str, Any]


def status_object(row: Any, now: float | None = None) -> dict[str, Any]:
    """The `/status` body: id, status, delayTime/executionTime in ms, workerId, output, error."""
    now = time.time() if now is None else now
    end = row.finished_at or now
    if row.started_at is not None:
        delay = row.started_at - row.queued_at
        execution = end - row.started_at
    else:
        delay, execution = end - row.queued_at, 0.0
    body: dict[str, Any] = {
        "id": row.id,
        "status": row.status,
        "delayTime": max(0, int(delay * 1000)),
        "executionTime": max(0, int(execution * 1000)),
    }
    if row.worker_id:
        body["workerId"] = row.worker_id
    if row.output is not None:
        body["output"] = json.loads(row.output)
    if row.error is not None:
        body["error"] = row.error
    return body


class Store:
    def __init__(self, database: Database) -> None:
        self.db = database
        self.engine = database.engine
        self.is_pg = not database.is_sqlite
        self._lock = asyncio.Lock()
        self._conn: AsyncConnection | None = None  # SQLite: the one writer connection
        self._group: asyncio.Future[None] | None = None  # commit of the open group transaction

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction. PostgreSQL: one per call. SQLite: group commit — blocks run one
        at a time on one connection, and the writers that queued meanwhile share one COMMIT;
        each caller resumes only once its writes are committed."""
        if self.is_pg:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._lock:
            if self._conn is None:
                self._conn = await self.engine.connect()
            conn = self._conn
            if self._group is None:
                self._group = asyncio.get_running_loop().create_future()
                asyncio.ensure_future(self._commit_group())
            group = self._group
            if not conn.in_transaction():
                await conn.begin()
            try:
                yield conn
            except BaseException as e:
                await self._abort_group(e)
                raise
        await asyncio.shield(group)

    async def _commit_group(self) -> None:
        # Queued behind the writers already waiting for the lock (asyncio.Lock is FIFO), so
        # they all join this transaction before it commits.
        async with self._lock:
            group, self._group = self._group, None
            if group is None or group.done():
                return
            try:
                assert self._conn is not None
                await self._conn.commit()
            except BaseException as e:
                await self._reset_conn()
                group.set_exception(e)
                group.exception()  # mark retrieved: callers re-raise it
                return
            group.set_result(None)

    async def _abort_group(self, error: BaseException) -> None:
        group, self._group = self._group, None
        await self._reset_conn()
        if group is not None and not group.done():
            group.set_exception(RuntimeError(f"transaction rolled back: {error}"))
            group.exception()

    async def _reset_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.rollback()
                await conn.close()
            except Exception:
                pass

    async def close(self) -> None:
        async with self._lock:
            await self._reset_conn()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    # ---- clients -------------------------------------------------------------------------

    async def submit(self, endpoint_id: str, input_json: str, webhook: str | None, execution_timeout_ms: int,
                     ttl_ms: int, low_priority: bool) -> str:
        job_id, now = new_job_id(), time.time()
        async with self.write() as conn:
            await conn.execute(insert(J).values(
                id=job_id, endpoint_id=endpoint_id, status=IN_QUEUE, input=input_json, webhook=webhook,
                execution_timeout_ms=execution_timeout_ms, ttl_ms=ttl_ms, low_priority=low_priority,
                attempts=0, retried=0, created_at=now, queued_at=now, expires_at=now + ttl_ms / 1000,
                stream_seq=0, stream_cursor=0,
            ))
        return job_id

    async def get(self, endpoint_id: str, job_id: str) -> Row | None:
        async with self.read() as conn:
            res = await conn.execute(select(*_STATUS_COLS, J.c.expires_at).where(J.c.id == job_id, J.c.endpoint_id == endpoint_id))
            row = res.first()
        if row is not None and row.expires_at < time.time():
            return None
        return row

    async def take_stream(self, endpoint_id: str, job_id: str) -> tuple[Row, list[str]] | None:
        """The job and its chunks since the last call (the cursor advances: each chunk is handed out once)."""
        async with self.write() as conn:
            res = await conn.execute(select(*_STATUS_COLS, J.c.stream_seq, J.c.stream_cursor, J.c.expires_at)
                                     .where(J.c.id == job_id, J.c.endpoint_id == endpoint_id))
            row = res.first()
            if row is None or row.expires_at < time.time():
                return None
            chunks: list[str] = []
            if row.stream_seq > row.stream_cursor:
                res = await conn.execute(select(C.c.seq, C.c.output).where(C.c.job_id == job_id, C.c.seq > row.stream_cursor)
                                         .order_by(C.c.seq))
                got = res.all()
                if got:
                    chunks = [r.output for r in got]
                    await conn.execute(update(J).where(J.c.id == job_id, J.c.stream_cursor < got[-1].seq)
                                       .values(stream_cursor=got[-1].seq))
        return row, chunks

    async def cancel(self, endpoint_id: str, job_id: str) -> tuple[Row | None, Finished | None]:
        """Cancel a queued or running job; returns the (old) row and the transition if there was one."""
        async with self.write() as conn:
            res = await conn.execute(select(*_STATUS_COLS, J.c.expires_at).where(J.c.id == job_id, J.c.endpoint_id == endpoint_id))
            row = res.first()
            if row is None or row.expires_at < time.time() or row.status not in (IN_QUEUE, IN_PROGRESS):
                return row, None
            done = await self._terminal(conn, and_(J.c.id == job_id, J.c.status == row.status), CANCELLED, keep_output=True)
        return row, (done[0] if done else None)

    async def retry(self, endpoint_id: str, job_id: str) -> str | None:
        """FAILED / TIMED_OUT → IN_QUEUE with the same id and input; returns the status it had."""
        now = time.time()
        async with self.write() as conn:
            res = await conn.execute(select(J.c.status, J.c.expires_at).where(J.c.id == job_id, J.c.endpoint_id == endpoint_id))
            row = res.first()
            if row is None or row.expires_at < now:
                return None
            if row.status in ("FAILED", "TIMED_OUT"):
                await conn.execute(update(J).where(J.c.id == job_id, J.c.status == row.status).values(
                    status=IN_QUEUE, output=None, error=None, worker_id=None, started_at=None, finished_at=None,
                    queued_at=now, attempts=0, retried=J.c.retried + 1, stream_seq=0, stream_cursor=0))
                await conn.execute(delete(C).where(C.c.job_id == job_id))
            return row.status

    async def purge(self, endpoint_id: str) -> int:
        async with self.write() as conn:
            res = await conn.execute(delete(J).where(J.c.endpoint_id == endpoint_id, J.c.status == IN_QUEUE))
        return res.rowcount or 0

    async def counts(self, endpoint_id: str) -> dict[str, int]:
        async with self.read() as conn:
            res = await conn.execute(select(J.c.status, func.count(), func.coalesce(func.sum(J.c.retried), 0))
                                     .where(J.c.endpoint_id == endpoint_id, J.c.expires_at >= time.time())
                                     .group_by(J.c.status))
            rows = res.all()
        by = {r[0]: int(r[1]) for r in rows}
        return {
            "completed": by.get("COMPLETED", 0),
            "failed": by.get("FAILED", 0) + by.get("TIMED_OUT", 0),
            "inProgress": by.get(IN_PROGRESS, 0),
            "inQueue": by.get(IN_QUEUE, 0),
            "retried": sum(int(r[2]) for r in rows),
            "cancelled": by.get(CANCELLED, 0),
            "timedOut": by.get("TIMED_OUT", 0),
        }

    # ---- workers -------------------------------------------------------------------------

    async def claim(self, endpoint_id: str, worker_id: str, n: int) -> list[Row]:
        """Atomically hand up to `n` queued jobs (normal before low priority, FIFO) to one worker."""
        now = time.time()
        pick = (select(J.c.id).where(J.c.endpoint_id == endpoint_id, J.c.status == IN_QUEUE, J.c.expires_at > now)
                .order_by(J.c.low_priority, J.c.queued_at).limit(n))
        values = dict(status=IN_PROGRESS, worker_id=worker_id, started_at=now, attempts=J.c.attempts + 1)
        if self.is_pg:
            # PostgreSQL may run an `IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` subquery more
            # than once while updating, each run skipping the rows just locked: a take for one job
            # then claimed every queued job, and all but the first were never delivered. A
            # materialized CTE picks the rows exactly once.
            picked = pick.with_for_update(skip_locked=True).cte("picked").prefix_with("MATERIALIZED")
            stmt = update(J).where(J.c.id == picked.c.id, J.c.status == IN_QUEUE)
        else:  # one writer at a time: the subquery cannot race
            stmt = update(J).where(J.c.id.in_(pick), J.c.status == IN_QUEUE)
        stmt = stmt.values(**values).returning(J.c.id, J.c.input, J.c.webhook, J.c.queued_at)
        async with self.write() as conn:
            rows = (await conn.execute(stmt)).all()
        rows.sort(key=lambda r: r.queued_at)
        return rows

    async def finish(self, job_id: str, worker_id: str, status: str, output_json: str | None,
                     error: str | None) -> Finished | None:
        """A worker's result; ignored (None) unless that worker holds the job IN_PROGRESS."""
        async with self.write() as conn:
            done = await self._terminal(
                conn, and_(J.c.id == job_id, J.c.status == IN_PROGRESS, J.c.worker_id == worker_id),
                status, output_json=output_json, error=error)
        return done[0] if done else None

    async def progress(self, job_id: str, worker_id: str, output_json: str) -> bool:
        async with self.write() as conn:
            res = await conn.execute(update(J).where(J.c.id == job_id, J.c.status == IN_PROGRESS, J.c.worker_id == worker_id)
                                     .values(output=output_json))
        return bool(res.rowcount)

    async def add_chunk(self, job_id: str, worker_id: str, output_json: str) -> bool:
        async with self.write() as conn:
            res = await conn.execute(update(J).where(J.c.id == job_id, J.c.status == IN_PROGRESS, J.c.worker_id == worker_id)
                                     .values(stream_seq=J.c.stream_seq + 1).returning(J.c.stream_seq))
            seq = res.scalar()
            if seq is None:
                return False
            await conn.execute(insert(C).values(job_id=job_id, seq=seq, output=output_json))
        return True

    async def jobs_of_worker(self, worker_id: str) -> list[Row]:
        async with self.read() as conn:
            res = await conn.execute(select(J.c.id, J.c.started_at).where(J.c.worker_id == worker_id, J.c.status == IN_PROGRESS))
            return list(res.all())

    async def statuses(self, job_ids: Sequence[str]) -> list[Row]:
        if not job_ids:
            return []
        async with self.read() as conn:
            res = await conn.execute(select(J.c.id, J.c.status, J.c.worker_id).where(J.c.id.in_(list(job_ids))))
            return list(res.all())

    async def requeue(self, worker_id: str, max_attempts: int, reason: str,
                      job_ids: Sequence[str] | None = None) -> tuple[list[str], list[Finished]]:
        """Put a lost worker's jobs back in the queue (keeping their place); FAILED past max_attempts."""
        cond = and_(J.c.worker_id == worker_id, J.c.status == IN_PROGRESS)
        if job_ids is not None:
            if not job_ids:
                return [], []
            cond = and_(cond, J.c.id.in_(list(job_ids)))
        async with self.write() as conn:
            failed = await self._terminal(
                conn, and_(cond, J.c.attempts >= max_attempts), FAILED,
                error=json.dumps({"error_type": "WorkerLost", "error_message": f"{reason}; gave up after {max_attempts} attempts"}),
                keep_output=True)
            res = await conn.execute(update(J).where(cond).values(
                status=IN_QUEUE, worker_id=None, started_at=None, output=None, stream_seq=0, stream_cursor=0,
            ).returning(J.c.id))
            requeued = [r[0] for r in res.all()]
            if requeued:
                await conn.execute(delete(C).where(C.c.job_id.in_(requeued)))
        return requeued, failed

    # ---- timers --------------------------------------------------------------------------

    async def time_out(self) -> list[Finished]:
        now = time.time()
        cond = and_(J.c.status == IN_PROGRESS, J.c.execution_timeout_ms < (now - J.c.started_at) * 1000)
        async with self.write() as conn:
            return await self._terminal(conn, cond, "TIMED_OUT", keep_output=True,
                                        error_fn=lambda r: f"execution timeout exceeded ({r.execution_timeout_ms} ms)")

    async def expire(self, retention: float) -> list[Row]:
        """Delete jobs past their TTL, and finished jobs past the retention period."""
        now = time.time()
        async with self.write() as conn:
            res = await conn.execute(delete(J).where(J.c.expires_at < now).returning(J.c.id, J.c.status, J.c.worker_id))
            gone = list(res.all())
            await conn.execute(delete(J).where(J.c.finished_at.is_not(None), J.c.finished_at < now - retention))
            await conn.execute(delete(W).where(W.c.status != "pending", W.c.created_at < now - retention))
        return gone

    # ---- webhooks ------------------------------------------------------------------------

    async def due_webhooks(self, exclude: set[int], limit: int = 50) -> list[Row]:
        async with self.read() as conn:
            stmt = select(W.c.id, W.c.url, W.c.payload, W.c.attempts).where(
                W.c.status == "pending", W.c.next_attempt_at <= time.time()).order_by(W.c.next_attempt_at).limit(limit + len(exclude))
            rows = (await conn.execute(stmt)).all()
        return [r for r in rows if r.id not in exclude][:limit]

    async def webhook_result(self, delivery_id: int, attempts: int, ok: bool, error: str | None,
                             max_attempts: int, retry_delay: float) -> None:
        if ok:
            values: dict[str, Any] = {"status": "delivered", "attempts": attempts, "last_error": None}
        elif attempts >= max_attempts:
            values = {"status": "failed", "attempts": attempts, "last_error": error}
        else:
            values = {"attempts": attempts, "last_error": error, "next_attempt_at": time.time() + retry_delay}
        async with self.write() as conn:
            await conn.execute(update(W).where(W.c.id == delivery_id).values(**values))

    # ---- internals -----------------------------------------------------------------------

    async def _terminal(self, conn: AsyncConnection, cond: Any, status: str, *, output_json: str | None = None,
                        error: str | None = None, keep_output: bool = False, error_fn: Any = None) -> list[Finished]:
        """Move matching jobs to a terminal status and queue their webhooks, in the caller's transaction."""
        now = time.time()
        values: dict[str, Any] = {"status": status, "finished_at": now}
        if not keep_output:
            values["output"] = output_json
        if error is not None:
            values["error"] = error
        if error_fn is not None:
            rows = (await conn.execute(select(J.c.id, J.c.execution_timeout_ms).where(cond))).all()
            if not rows:
                return []
            for r in rows:
                await conn.execute(update(J).where(J.c.id == r.id, cond).values(**values, error=error_fn(r)))
            ids = [r.id for r in rows]
            res = await conn.execute(select(*_STATUS_COLS).where(J.c.id.in_(ids), J.c.status == status))
        else:
            res = await conn.execute(update(J).where(cond).values(**values).returning(*_STATUS_COLS))
        finished = []
        hooks = []
        for row in res.all():
            payload = status_object(row, now)
            finished.append(Finished(row.id, row.endpoint_id, row.status, row.worker_id, payload))
            if row.webhook:
                hooks.append({"job_id": row.id, "url": row.webhook, "payload": json.dumps(payload), "status": "pending",
                              "attempts": 0, "next_attempt_at": now, "created_at": now})
        if hooks:
            await conn.execute(insert(W), hooks)
        return finished
