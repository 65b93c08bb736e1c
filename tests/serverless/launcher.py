"""Test WorkerLauncher: runs a real handler script (`python handler.py`) with the RUNPOD_* env.

Each worker gets its own session (process group) so the SDK's heartbeat child goes with it; a
pid file per worker lets tests kill workers and clean up after a server that was SIGKILLed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from dstack.agent.workersite import with_worker_site


class SubprocessLauncher:
    def __init__(self, scripts: dict[str, str], extra_env: dict[str, dict[str, str]], run_dir: str) -> None:
        self.scripts = scripts
        self.extra_env = extra_env
        self.pid_dir = Path(run_dir) / "pids"
        self.log_dir = Path(run_dir) / "logs"
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.service: Any = None
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start_worker(self, endpoint_id: str, worker_id: str, env: dict[str, str]) -> None:
        if self.scripts[endpoint_id] == "-":  # a worker driven by hand (benchmarks): just publish its env
            (self.pid_dir.parent / f"{worker_id}.env.json").write_text(__import__("json").dumps(env))
            return
        full = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
        full.update(self.extra_env.get(endpoint_id, {}))
        full.update(env)
        if full.get("DSTACK_RUNPOD_LOOP") != "0":  # as the agent starts serverless workers
            full = with_worker_site(full)
        log = open(self.log_dir / f"{worker_id}.log", "wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            self.scripts[endpoint_id],
            env=full,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs[worker_id] = proc
        (self.pid_dir / f"{worker_id}.pid").write_text(str(proc.pid))
        asyncio.ensure_future(self._watch(endpoint_id, worker_id, proc))

    async def _watch(self, endpoint_id: str, worker_id: str, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        _killpg(proc.pid, signal.SIGKILL)  # the heartbeat child outlives a SIGKILLed parent
        self.procs.pop(worker_id, None)
        (self.pid_dir / f"{worker_id}.pid").unlink(missing_ok=True)
        if self.service is not None:
            await self.service.on_worker_exited(endpoint_id, worker_id, f"exit code {rc}")

    async def stop_worker(self, endpoint_id: str, worker_id: str) -> None:
        proc = self.procs.get(worker_id)
        if proc is None:
            pid_file = self.pid_dir / f"{worker_id}.pid"
            if pid_file.exists():  # launched by a previous server process
                _killpg(int(pid_file.read_text()), signal.SIGKILL)
                pid_file.unlink(missing_ok=True)
                if self.service is not None:
                    await self.service.on_worker_exited(endpoint_id, worker_id, "killed")
            return
        _killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 3)
        except TimeoutError:
            _killpg(proc.pid, signal.SIGKILL)


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_all(run_dir: str) -> None:
    """Kill every worker recorded under run_dir (test teardown)."""
    for pid_file in (Path(run_dir) / "pids").glob("*.pid"):
        try:
            _killpg(int(pid_file.read_text()), signal.SIGKILL)
        except ValueError:
            pass
        pid_file.unlink(missing_ok=True)
