"""The durable job queue: every transition is one guarded SQL statement, so a job has one owner,
terminal states are final, and duplicate or late worker posts change nothing.

Each operation is a plain function of a synchronous connection, run by the executor
(`dstack.serverless.executor`): batched in a thread on SQLite, one transaction per call on
PostgreSQL. The statements of the hot paths (submit, claim, result, status) are built once, with
bound parameters, so SQLAlchemy compiles them once and caches them by identity. On PostgreSQL
the claim uses `FOR UPDATE SKIP LOCKED`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, Row, and_, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from dstack.serverless.executor import executor_for
from dstack.serverless.models import (
    CANCELLED,
    FAILED,
    IN_PROGRESS,
    IN_QUEUE,
    ServerlessEndpointModel,
    ServerlessJobModel,
    ServerlessStreamChunkModel,
    ServerlessWebhookModel,
    ServerlessWorkerModel,
    new_job_id,
)
from dstack.serverless.ports import Database

E = ServerlessEndpointModel.__table__
J = ServerlessJobModel.__table__
C = ServerlessStreamChunkModel.__table__
W = ServerlessWebhookModel.__table__
WK = ServerlessWorkerModel.__table__

_STATUS_COLS = (
    J.c.id,
    J.c.status,
    J.c.output,
    J.c.error,
    J.c.worker_id,
    J.c.queued_at,
    J.c.started_at,
    J.c.finished_at,
    J.c.webhook,
    J.c.endpoint_id,
)

# ---- the hot statements, built once ----------------------------------------------------------

_SUBMIT = insert(J)
_GET = select(*_STATUS_COLS, J.c.expires_at).where(J.c.id == bindparam("b_id"), J.c.endpoint_id == bindparam("b_ep"))
_PICK = (
    select(J.c.id)
    .where(J.c.endpoint_id == bindparam("b_ep"), J.c.status == IN_QUEUE, J.c.expires_at > bindparam("b_now"))
    .order_by(J.c.low_priority, J.c.queued_at)
    .limit(bindparam("b_n", type_=Integer))
)
_CLAIM_VALUES = dict(
    status=IN_PROGRESS, worker_id=bindparam("b_worker"), started_at=bindparam("b_now"), attempts=J.c.attempts + 1
)
_CLAIM_RETURNING = (J.c.id, J.c.input, J.c.webhook, J.c.queued_at)
# SQLite: one writer at a time, so the subquery cannot race.
_CLAIM_SQLITE = (
    update(J).where(J.c.id.in_(_PICK), J.c.status == IN_QUEUE).values(**_CLAIM_VALUES).returning(*_CLAIM_RETURNING)
)
# PostgreSQL may run an `IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` subquery more than once
# while updating, each run skipping the rows just locked: a take for one job then claimed every
# queued job, and all but the first were never delivered. A materialized CTE picks them once.
_PICKED = _PICK.with_for_update(skip_locked=True).cte("picked").prefix_with("MATERIALIZED")
_CLAIM_PG = (
    update(J).where(J.c.id == _PICKED.c.id, J.c.status == IN_QUEUE).values(**_CLAIM_VALUES).returning(*_CLAIM_RETURNING)
)
_FINISH = (
    update(J)
    .where(J.c.id == bindparam("b_id"), J.c.status == IN_PROGRESS, J.c.worker_id == bindparam("b_worker"))
    .values(
        status=bindparam("b_status"),
        finished_at=bindparam("b_now"),
        output=bindparam("b_output"),
        error=bindparam("b_error"),
    )
    .returning(*_STATUS_COLS)
)


@dataclass
class Finished:
    """A job that just reached a terminal state."""

    id: str
    endpoint_id: str
    status: str
    worker_id: str | None
    hooked: bool  # a webhook delivery was queued with it
    displaced: str | None = None  # a worker that was running the job again; its run is now moot


@dataclass
class QueueCounts:
    """The endpoint's queue as the scaler reads it."""

    queued: int  # normal priority
    queued_any: int
    running: int  # normal priority
    oldest_queued_at: float | None
    busy_workers: dict[str, int]


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
        self.is_pg = not database.is_sqlite
        self.ex = executor_for(database)
        self._claim = _CLAIM_PG if self.is_pg else _CLAIM_SQLITE

    async def close(self) -> None:
        await self.ex.close()

    # ---- clients -------------------------------------------------------------------------

    async def submit(
        self,
        endpoint_id: str,
        input_json: str,
        webhook: str | None,
        execution_timeout_ms: int,
        ttl_ms: int,
        low_priority: bool,
    ) -> str:
        job_id, now = new_job_id(), time.time()
        row = dict(
            id=job_id,
            endpoint_id=endpoint_id,
            status=IN_QUEUE,
            input=input_json,
            webhook=webhook,
            execution_timeout_ms=execution_timeout_ms,
            ttl_ms=ttl_ms,
            low_priority=low_priority,
            attempts=0,
            retried=0,
            created_at=now,
            queued_at=now,
            expires_at=now + ttl_ms / 1000,
            stream_seq=0,
            stream_cursor=0,
        )
        await self.ex.write(lambda conn: conn.execute(_SUBMIT, row))
        return job_id

    async def get(self, endpoint_id: str, job_id: str) -> Row | None:
        row = await self.ex.read(lambda conn: conn.execute(_GET, {"b_id": job_id, "b_ep": endpoint_id}).first())
        if row is not None and row.expires_at < time.time():
            return None
        return row

    async def take_stream(self, endpoint_id: str, job_id: str) -> tuple[Row, list[str]] | None:
        """The job and its chunks since the last call (the cursor advances: each chunk is handed out once)."""

        def op(conn: Connection) -> tuple[Row, list[str]] | None:
            row = conn.execute(
                select(*_STATUS_COLS, J.c.stream_seq, J.c.stream_cursor, J.c.expires_at).where(
                    J.c.id == job_id, J.c.endpoint_id == endpoint_id
                )
            ).first()
            if row is None or row.expires_at < time.time():
                return None
            chunks: list[str] = []
            if row.stream_seq > row.stream_cursor:
                got = conn.execute(
                    select(C.c.seq, C.c.output)
                    .where(C.c.job_id == job_id, C.c.seq > row.stream_cursor)
                    .order_by(C.c.seq)
                ).all()
                if got:
                    chunks = [r.output for r in got]
                    conn.execute(
                        update(J)
                        .where(J.c.id == job_id, J.c.stream_cursor < got[-1].seq)
                        .values(stream_cursor=got[-1].seq)
                    )
            return row, chunks

        return await self.ex.write(op)

    async def cancel(self, endpoint_id: str, job_id: str) -> tuple[Row | None, Finished | None]:
        """Cancel a queued or running job; returns the (old) row and the transition if there was one."""

        def op(conn: Connection) -> tuple[Row | None, Finished | None]:
            row = conn.execute(
                select(*_STATUS_COLS, J.c.expires_at).where(J.c.id == job_id, J.c.endpoint_id == endpoint_id)
            ).first()
            if row is None or row.expires_at < time.time() or row.status not in (IN_QUEUE, IN_PROGRESS):
                return row, None
            done = _terminal(conn, and_(J.c.id == job_id, J.c.status == row.status), CANCELLED)
            return row, (done[0] if done else None)

        return await self.ex.write(op)

    async def retry(self, endpoint_id: str, job_id: str) -> str | None:
        """FAILED / TIMED_OUT → IN_QUEUE with the same id and input; returns the status it had."""

        def op(conn: Connection) -> str | None:
            now = time.time()
            row = conn.execute(
                select(J.c.status, J.c.expires_at).where(J.c.id == job_id, J.c.endpoint_id == endpoint_id)
            ).first()
            if row is None or row.expires_at < now:
                return None
            if row.status in ("FAILED", "TIMED_OUT"):
                conn.execute(
                    update(J)
                    .where(J.c.id == job_id, J.c.status == row.status)
                    .values(
                        status=IN_QUEUE,
                        output=None,
                        error=None,
                        worker_id=None,
                        started_at=None,
                        finished_at=None,
                        queued_at=now,
                        attempts=0,
                        retried=J.c.retried + 1,
                        stream_seq=0,
                        stream_cursor=0,
                        past_workers=None,
                    )
                )
                conn.execute(delete(C).where(C.c.job_id == job_id))
            return row.status

        return await self.ex.write(op)

    async def purge(self, endpoint_id: str) -> int:
        res = await self.ex.write(
            lambda conn: conn.execute(delete(J).where(J.c.endpoint_id == endpoint_id, J.c.status == IN_QUEUE))
        )
        return res.rowcount or 0

    async def counts(self, endpoint_id: str) -> dict[str, int]:
        rows = await self.ex.read(
            lambda conn: conn.execute(
                select(J.c.status, func.count(), func.coalesce(func.sum(J.c.retried), 0))
                .where(J.c.endpoint_id == endpoint_id, J.c.expires_at >= time.time())
                .group_by(J.c.status)
            ).all()
        )
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

    async def queue_counts(self, endpoint_id: str) -> QueueCounts:
        def op(conn: Connection) -> QueueCounts:
            rows = conn.execute(
                select(J.c.status, J.c.low_priority, func.count(), func.min(J.c.queued_at))
                .where(J.c.endpoint_id == endpoint_id, J.c.status.in_([IN_QUEUE, IN_PROGRESS]))
                .group_by(J.c.status, J.c.low_priority)
            ).all()
            busy = dict(
                conn.execute(
                    select(J.c.worker_id, func.count())
                    .where(J.c.endpoint_id == endpoint_id, J.c.status == IN_PROGRESS)
                    .group_by(J.c.worker_id)
                ).all()
            )
            return QueueCounts(
                queued=sum(r[2] for r in rows if r[0] == IN_QUEUE and not r[1]),
                queued_any=sum(r[2] for r in rows if r[0] == IN_QUEUE),
                running=sum(r[2] for r in rows if r[0] == IN_PROGRESS and not r[1]),
                oldest_queued_at=min((r[3] for r in rows if r[0] == IN_QUEUE and not r[1]), default=None),
                busy_workers=busy,
            )

        return await self.ex.read(op)

    # ---- workers -------------------------------------------------------------------------

    async def claim(self, endpoint_id: str, worker_id: str, n: int) -> list[Row]:
        """Atomically hand up to `n` queued jobs (normal before low priority, FIFO) to one worker."""
        params = {"b_ep": endpoint_id, "b_worker": worker_id, "b_now": time.time(), "b_n": n}
        rows = await self.ex.write(lambda conn: conn.execute(self._claim, params).all())
        rows.sort(key=lambda r: r.queued_at)
        return rows

    async def unclaim(self, worker_id: str, job_ids: Sequence[str]) -> list[str]:
        """Give back jobs a worker claimed but was never handed (it was lost while the claim ran):
        queued again as if never taken, the attempt not counted. The ids put back."""
        if not job_ids:
            return []
        cond = and_(J.c.id.in_(list(job_ids)), J.c.worker_id == worker_id, J.c.status == IN_PROGRESS)
        stmt = (
            update(J)
            .where(cond)
            .values(status=IN_QUEUE, worker_id=None, started_at=None, attempts=J.c.attempts - 1)
            .returning(J.c.id)
        )
        return [r[0] for r in await self.ex.write(lambda conn: conn.execute(stmt).all())]

    async def finish(
        self, job_id: str, worker_id: str, status: str, output_json: str | None, error: str | None
    ) -> Finished | None:
        """A worker's result; ignored (None) unless that worker holds the job IN_PROGRESS, or held
        it before a requeue and the job is not finished yet (first result wins)."""
        params = {
            "b_id": job_id,
            "b_worker": worker_id,
            "b_status": status,
            "b_now": time.time(),
            "b_output": output_json,
            "b_error": error,
        }

        def op(conn: Connection) -> Finished | None:
            row = conn.execute(_FINISH, params).first()
            if row is not None:
                return _queue_hooks(conn, [row], params["b_now"])[0]
            return _finish_from_past_worker(conn, params)

        return await self.ex.write(op)

    async def progress(self, job_id: str, worker_id: str, output_json: str) -> bool:
        res = await self.ex.write(
            lambda conn: conn.execute(
                update(J)
                .where(J.c.id == job_id, J.c.status == IN_PROGRESS, J.c.worker_id == worker_id)
                .values(output=output_json)
            )
        )
        return bool(res.rowcount)

    async def add_chunk(self, job_id: str, worker_id: str, output_json: str) -> bool:
        def op(conn: Connection) -> bool:
            seq = conn.execute(
                update(J)
                .where(J.c.id == job_id, J.c.status == IN_PROGRESS, J.c.worker_id == worker_id)
                .values(stream_seq=J.c.stream_seq + 1)
                .returning(J.c.stream_seq)
            ).scalar()
            if seq is None:
                return False
            conn.execute(insert(C).values(job_id=job_id, seq=seq, output=output_json))
            return True

        return await self.ex.write(op)

    async def jobs_of_worker(self, worker_id: str) -> list[Row]:
        return await self.ex.read(
            lambda conn: list(
                conn.execute(
                    select(J.c.id, J.c.started_at).where(J.c.worker_id == worker_id, J.c.status == IN_PROGRESS)
                ).all()
            )
        )

    async def statuses(self, job_ids: Sequence[str]) -> list[Row]:
        if not job_ids:
            return []
        ids = list(job_ids)
        return await self.ex.read(
            lambda conn: list(conn.execute(select(J.c.id, J.c.status, J.c.worker_id).where(J.c.id.in_(ids))).all())
        )

    async def requeue(
        self, worker_id: str, max_attempts: int, reason: str, job_ids: Sequence[str] | None = None
    ) -> tuple[list[str], list[Finished]]:
        """Put a lost worker's jobs back in the queue (keeping their place); FAILED past max_attempts."""
        cond = and_(J.c.worker_id == worker_id, J.c.status == IN_PROGRESS)
        if job_ids is not None:
            if not job_ids:
                return [], []
            cond = and_(cond, J.c.id.in_(list(job_ids)))
        error = json.dumps(
            {"error_type": "WorkerLost", "error_message": f"{reason}; gave up after {max_attempts} attempts"}
        )

        def op(conn: Connection) -> tuple[list[str], list[Finished]]:
            failed = _terminal(conn, and_(cond, J.c.attempts >= max_attempts), FAILED, error=error)
            requeued = [
                r[0]
                for r in conn.execute(
                    update(J)
                    .where(cond)
                    .values(
                        status=IN_QUEUE,
                        worker_id=None,
                        started_at=None,
                        output=None,
                        stream_seq=0,
                        stream_cursor=0,
                        past_workers=func.coalesce(J.c.past_workers, "") + _past_mark(worker_id),
                    )
                    .returning(J.c.id)
                ).all()
            ]
            if requeued:
                conn.execute(delete(C).where(C.c.job_id.in_(requeued)))
            return requeued, failed

        return await self.ex.write(op)

    # ---- worker rows -----------------------------------------------------------------------

    async def load_workers(self) -> list[Row]:
        return await self.ex.read(lambda conn: list(conn.execute(select(WK)).all()))

    async def endpoint_workers(self, endpoint_id: str) -> tuple[list[Row], set[str]]:
        """The endpoint's worker rows, and which workers hold a job now."""

        def op(conn: Connection) -> tuple[list[Row], set[str]]:
            workers = list(
                conn.execute(select(WK.c.worker_id, WK.c.state).where(WK.c.endpoint_id == endpoint_id)).all()
            )
            busy = set(
                conn.execute(
                    select(J.c.worker_id).where(J.c.endpoint_id == endpoint_id, J.c.status == IN_PROGRESS).distinct()
                )
                .scalars()
                .all()
            )
            return workers, busy

        return await self.ex.read(op)

    async def add_worker(self, worker_id: str, endpoint_id: str, state: str, now: float) -> None:
        await self.ex.write(
            lambda conn: conn.execute(
                insert(WK).values(
                    worker_id=worker_id, endpoint_id=endpoint_id, state=state, created_at=now, jobs_in_flight=0
                )
            )
        )

    async def adopt_worker(self, worker_id: str, endpoint_id: str, state: str, now: float) -> str | None:
        """A worker calling in that this process did not launch: its stored state, or a new row."""

        def op(conn: Connection) -> str | None:
            exists = conn.execute(select(WK.c.state).where(WK.c.worker_id == worker_id)).first()
            if exists is None:
                conn.execute(
                    insert(WK).values(
                        worker_id=worker_id,
                        endpoint_id=endpoint_id,
                        state=state,
                        created_at=now,
                        last_ping_at=now,
                        jobs_in_flight=0,
                    )
                )
                return None
            return exists.state

        return await self.ex.write(op)

    async def set_worker_state(
        self, worker_id: str, state: str, reason: str | None = None, only_from: str | None = None
    ) -> None:
        stmt = update(WK).where(WK.c.worker_id == worker_id)
        if only_from is not None:
            stmt = stmt.where(WK.c.state == only_from)
        values: dict[str, Any] = {"state": state}
        if reason is not None:
            values["stop_reason"] = reason
        await self.ex.write(lambda conn: conn.execute(stmt.values(**values)))

    async def note_ping(self, worker_id: str, now: float, jobs_in_flight: int, version: str) -> None:
        await self.ex.write(
            lambda conn: conn.execute(
                update(WK)
                .where(WK.c.worker_id == worker_id)
                .values(last_ping_at=now, jobs_in_flight=jobs_in_flight, runpod_version=version[:40])
            )
        )

    async def delete_worker(self, worker_id: str) -> None:
        await self.ex.write(lambda conn: conn.execute(delete(WK).where(WK.c.worker_id == worker_id)))

    async def delete_endpoint(self, endpoint_id: str) -> None:
        await self.ex.write(lambda conn: conn.execute(delete(E).where(E.c.endpoint_id == endpoint_id)))

    # ---- timers --------------------------------------------------------------------------

    async def time_out(self) -> list[Finished]:
        def op(conn: Connection) -> list[Finished]:
            cond = and_(J.c.status == IN_PROGRESS, J.c.execution_timeout_ms < (time.time() - J.c.started_at) * 1000)
            return _terminal(
                conn, cond, "TIMED_OUT", error_fn=lambda r: f"execution timeout exceeded ({r.execution_timeout_ms} ms)"
            )

        return await self.ex.write(op)

    async def expire(self, retention: float) -> list[Row]:
        """Delete jobs past their TTL, and finished jobs past the retention period."""

        def op(conn: Connection) -> list[Row]:
            now = time.time()
            gone = list(
                conn.execute(delete(J).where(J.c.expires_at < now).returning(J.c.id, J.c.status, J.c.worker_id)).all()
            )
            conn.execute(delete(J).where(J.c.finished_at.is_not(None), J.c.finished_at < now - retention))
            conn.execute(delete(W).where(W.c.status != "pending", W.c.created_at < now - retention))
            return gone

        return await self.ex.write(op)

    # ---- webhooks ------------------------------------------------------------------------

    async def due_webhooks(self, exclude: set[int], limit: int = 50) -> list[Row]:
        stmt = (
            select(W.c.id, W.c.url, W.c.payload, W.c.attempts)
            .where(W.c.status == "pending", W.c.next_attempt_at <= time.time())
            .order_by(W.c.next_attempt_at)
            .limit(limit + len(exclude))
        )
        rows = await self.ex.read(lambda conn: conn.execute(stmt).all())
        return [r for r in rows if r.id not in exclude][:limit]

    async def webhook_result(
        self, delivery_id: int, attempts: int, ok: bool, error: str | None, max_attempts: int, retry_delay: float
    ) -> None:
        if ok:
            values: dict[str, Any] = {"status": "delivered", "attempts": attempts, "last_error": None}
        elif attempts >= max_attempts:
            values = {"status": "failed", "attempts": attempts, "last_error": error}
        else:
            values = {"attempts": attempts, "last_error": error, "next_attempt_at": time.time() + retry_delay}
        await self.ex.write(lambda conn: conn.execute(update(W).where(W.c.id == delivery_id).values(**values)))


# ---- shared by the operations above -----------------------------------------------------------


def _past_mark(worker_id: str) -> str:
    return f"|{worker_id}|"


def _finish_from_past_worker(conn: Connection, params: dict[str, Any]) -> Finished | None:
    """A result from a worker the job was requeued away from (its result was late: the server
    restarted, or the worker looked lost but was not). While the job is not finished the first
    result wins: it finishes the job, and whoever runs it again now is named in `displaced`."""
    row = conn.execute(
        select(J.c.status, J.c.worker_id).where(
            J.c.id == params["b_id"],
            J.c.status.in_([IN_QUEUE, IN_PROGRESS]),
            J.c.past_workers.contains(_past_mark(params["b_worker"]), autoescape=True),
        )
    ).first()
    if row is None:
        return None
    holder = J.c.worker_id.is_(None) if row.worker_id is None else J.c.worker_id == row.worker_id
    done = conn.execute(
        update(J)
        .where(J.c.id == params["b_id"], J.c.status == row.status, holder)
        .values(
            status=params["b_status"],
            finished_at=params["b_now"],
            output=params["b_output"],
            error=params["b_error"],
            worker_id=params["b_worker"],
        )
        .returning(*_STATUS_COLS)
    ).first()
    if done is None:
        return None
    finished = _queue_hooks(conn, [done], params["b_now"])[0]
    finished.displaced = row.worker_id if row.status == IN_PROGRESS else None
    return finished


def _terminal(
    conn: Connection, cond: Any, status: str, *, error: str | None = None, error_fn: Any = None
) -> list[Finished]:
    """Move matching jobs to a terminal status (output kept) and queue their webhooks, in the
    caller's transaction."""
    now = time.time()
    values: dict[str, Any] = {"status": status, "finished_at": now}
    if error is not None:
        values["error"] = error
    if error_fn is not None:
        rows = conn.execute(select(J.c.id, J.c.execution_timeout_ms).where(cond)).all()
        if not rows:
            return []
        for r in rows:
            conn.execute(update(J).where(J.c.id == r.id, cond).values(**values, error=error_fn(r)))
        res = conn.execute(select(*_STATUS_COLS).where(J.c.id.in_([r.id for r in rows]), J.c.status == status))
    else:
        res = conn.execute(update(J).where(cond).values(**values).returning(*_STATUS_COLS))
    return _queue_hooks(conn, res.all(), now)


def _queue_hooks(conn: Connection, rows: Sequence[Any], now: float) -> list[Finished]:
    """The transitions as `Finished`, with a webhook delivery queued for each job that has one."""
    hooks = [
        {
            "job_id": r.id,
            "url": r.webhook,
            "payload": json.dumps(status_object(r, now)),
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for r in rows
        if r.webhook
    ]
    if hooks:
        conn.execute(insert(W), hooks)
    return [Finished(r.id, r.endpoint_id, r.status, r.worker_id, bool(r.webhook)) for r in rows]
