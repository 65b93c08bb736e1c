"""Where the queue's statements run: `await executor.write(fn)` / `read(fn)` call `fn(conn)` with
a synchronous SQLAlchemy Connection inside a transaction and return what it returns.

Queue operations are plain functions of a connection, so one definition serves both databases:

- SQLite (`SqliteExecutor`): a thread owns one connection of a synchronous engine. Operations
  that arrive while a batch runs form the next batch: one `BEGIN IMMEDIATE`, the statements,
  one `COMMIT`, one wake-up of the event loop. A job's `/run`, claim and result thus share
  transactions (and thread hops) with everyone else's; each caller resumes only once its writes
  are committed. If any operation of a batch fails, the batch is rolled back and each operation
  runs again in a transaction of its own, so one bad call never takes others down with it.
- PostgreSQL (`AsyncEngineExecutor`): the same batching, on a few pooled connections of the
  async engine at once (`run_sync`); several server replicas share the queue with
  `FOR UPDATE SKIP LOCKED`.

Operations must not touch Python state: a batch that is retried runs them twice.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from dstack.core.tables import sqlite_pragmas
from dstack.serverless.ports import Database

T = TypeVar("T")
Op = Callable[[Connection], Any]
MAX_BATCH = 512


class _Call:
    __slots__ = ("fn", "write", "future", "result", "error")

    def __init__(self, fn: Op, write: bool, future: asyncio.Future) -> None:
        self.fn, self.write, self.future = fn, write, future
        self.result: Any = None
        self.error: BaseException | None = None


class _Executor:
    """`write(fn)` / `read(fn)`: `fn(conn)` in a transaction, once it is committed."""

    async def write(self, fn: Callable[[Connection], T]) -> T:
        return await self._submit(fn, True)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        return await self._submit(fn, False)

    async def _submit(self, fn: Op, write: bool) -> Any:
        raise NotImplementedError


class SqliteExecutor(_Executor):
    def __init__(self, url: str) -> None:
        self.engine = create_engine(
            url.replace("+aiosqlite", "", 1),
            poolclass=NullPool,
            connect_args={"timeout": 30, "check_same_thread": False},
        )
        event.listen(self.engine, "connect", _autocommit_driver)
        event.listen(self.engine, "connect", sqlite_pragmas)
        event.listen(self.engine, "begin", _begin)
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self.batches = 0  # transactions run, for tests and benchmarks

    async def _submit(self, fn: Op, write: bool) -> Any:
        loop = asyncio.get_running_loop()
        if self._thread is None or not self._thread.is_alive() or self._loop is not loop:
            self._start(loop)
        call = _Call(fn, write, loop.create_future())
        self._calls.put(call)
        return await call.future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                if self._loop is loop:
                    return
                self._calls.put(None)  # a new event loop (tests): a new thread for it
                self._thread.join()
            self._loop = loop
            self._thread = threading.Thread(target=self._serve, name="serverless-sqlite", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._calls.put(None)
            await asyncio.to_thread(thread.join)
        self._thread = None
        self.engine.dispose()

    # ---- the thread --------------------------------------------------------------------------

    def _serve(self) -> None:
        conn: Connection | None = None
        loop = self._loop
        assert loop is not None
        try:
            while True:
                first = self._calls.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        nxt = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                try:
                    if conn is None:
                        conn = self.engine.connect()
                    run_batch(conn, batch)
                    self.batches += 1
                except BaseException as e:  # the connection itself broke: fail the batch, reconnect
                    for call in batch:
                        call.error = call.error or e
                    if conn is not None:
                        _close_quietly(conn)
                    conn = None
                try:
                    loop.call_soon_threadsafe(_settle, batch)
                except RuntimeError:  # the loop is closed: nobody is waiting
                    return
                if stop:
                    return
        finally:
            if conn is not None:
                _close_quietly(conn)


def run_batch(conn: Connection, batch: list[_Call]) -> None:
    """The batch in one transaction; if an operation fails, each again in a transaction of its own."""
    conn.info["immediate"] = any(c.write for c in batch)
    try:
        with conn.begin():
            for call in batch:
                call.result = call.fn(conn)
        return
    except Exception as e:
        if len(batch) == 1:
            batch[0].result, batch[0].error = None, e
            return
    for call in batch:  # one of them failed: each alone, so only that one fails
        conn.info["immediate"] = call.write
        call.result, call.error = None, None
        try:
            with conn.begin():
                call.result = call.fn(conn)
        except Exception as e:
            call.error = e


def _settle(batch: list[_Call]) -> None:
    for call in batch:
        if call.future.done():
            continue
        if call.error is not None:
            call.future.set_exception(call.error)
        else:
            call.future.set_result(call.result)


def _close_quietly(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:
        pass


def _autocommit_driver(dbapi_connection, _record) -> None:
    # The sqlite3 module would open transactions on its own (and never IMMEDIATE ones); let
    # SQLAlchemy's begin event say when and how.
    dbapi_connection.isolation_level = None


def _begin(conn: Connection) -> None:
    # A write batch takes the write lock up front, so the busy timeout applies instead of a
    # read-to-write upgrade failing at once when another connection writes.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("immediate", True) else "BEGIN")


class AsyncEngineExecutor(_Executor):
    """Calls that arrive together share a transaction here too, on up to `RUNNERS` pooled
    connections at once, so one slow statement does not hold up everyone else's."""

    RUNNERS = 4

    def __init__(self, database: Database) -> None:
        self.engine = database.engine
        self._calls: asyncio.Queue[_Call] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runners: list[asyncio.Task] = []
        self.batches = 0

    async def _submit(self, fn: Op, write: bool) -> Any:
        loop = asyncio.get_running_loop()
        if self._calls is None or self._loop is not loop:
            self._loop, self._calls = loop, asyncio.Queue()
            self._runners = [loop.create_task(self._serve(self._calls)) for _ in range(self.RUNNERS)]
        call = _Call(fn, write, loop.create_future())
        self._calls.put_nowait(call)
        return await call.future

    async def _serve(self, calls: asyncio.Queue[_Call]) -> None:
        while True:
            batch = [await calls.get()]
            while len(batch) < MAX_BATCH and not calls.empty():
                batch.append(calls.get_nowait())
            try:
                async with self.engine.connect() as conn:
                    await conn.run_sync(run_batch, batch)
                self.batches += 1
            except asyncio.CancelledError:
                _fail(batch, RuntimeError("the queue is shutting down"))
                raise
            except Exception as e:  # no connection: the whole batch fails
                for call in batch:
                    call.error = call.error or e
            _settle(batch)

    async def close(self) -> None:
        for task in self._runners:
            task.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        if self._calls is not None:
            left = []
            while not self._calls.empty():
                left.append(self._calls.get_nowait())
            _fail(left, RuntimeError("the queue is shutting down"))
        self._runners, self._calls = [], None


def _fail(batch: list[_Call], error: BaseException) -> None:
    for call in batch:
        if not call.future.done():
            call.future.set_exception(error)


def executor_for(database: Database) -> SqliteExecutor | AsyncEngineExecutor:
    return SqliteExecutor(database.url) if database.is_sqlite else AsyncEngineExecutor(database)
