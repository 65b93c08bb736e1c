"""Fault soak of serverless endpoints: N jobs while the server, the agent and workers are SIGKILLed
at random moments; counts what the queue promises (every job runs and finishes once).

Two stacks, loopback only:
- `--stack queue` (default): the serverless app in a small server (tests/serverless/server_app.py,
  SQLite) with real runpod==1.12.0 workers started as subprocesses; kills the server and workers.
- `--stack product`: a real `dstack server`, its local agent, and workers that are dstack jobs of a
  `type: serverless` run; kills the server, the agent and workers.

Every handler run appends "job-id worker-id pid time" to a log, so executions are counted outside
the server, and a watcher notes when each worker process ends (killed by the soak, or by anything
else, such as a restarted agent cleaning up). A job that ran twice is "duplicated after a worker
death" when a worker that ran it had ended before the next run started, and "duplicated with a
live worker" otherwise (the job was taken from a worker that was alive). Lost: not finished when the soak ends; failed: FAILED,
TIMED_OUT or CANCELLED. A `/run` whose answer was cut by a server kill may have queued a job the
client never heard of; such jobs are counted (as orphans), not retried blindly.

Usage: .venv/bin/python bench/serverless/bench_faults.py [--jobs 10000] [--stack queue|product]
       [--kills K] [--max-seconds S] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src"), str(ROOT)]
from serverless.helpers import TOKEN, Server, wait_until  # noqa: E402

HANDLER = """
import asyncio
import os
import random
import time

import runpod

LOG = os.environ["FAULT_LOG"]
WORKER = os.environ.get("RUNPOD_POD_ID", "?")
PIDS = os.environ.get("FAULT_PIDS")
if PIDS:  # how the soak finds workers that the agent started
    with open(os.path.join(PIDS, WORKER), "w") as f:
        f.write(str(os.getpid()))


async def handler(job):
    with open(LOG, "a") as f:
        f.write(f"{job['id']} {WORKER} {os.getpid()} {time.time():.3f}\\n")
    await asyncio.sleep(random.uniform(0, 2 * job["input"]["seconds"]))
    return {"i": job["input"]["i"]}


runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda current: int(os.environ["FAULT_CONCURRENCY"])})
"""
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


def _killpg(pid: int) -> None:
    try:
        pgid = os.getpgid(pid)
        if pgid not in (os.getpgid(0),):
            os.killpg(pgid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """Running, and not a zombie (a killed worker whose dead agent cannot reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class QueueStack:
    """tests/serverless/server_app.py with subprocess workers (no agent)."""

    kinds = ("server", "worker")

    def __init__(self, tmp: Path, workers: int, concurrency: int) -> None:
        script = tmp / "fault_handler.py"
        script.write_text(HANDLER)
        self.log = tmp / "executions.log"
        self.endpoint = "soak"
        env = {"FAULT_LOG": str(self.log), "FAULT_CONCURRENCY": str(concurrency)}
        self.srv = Server(
            tmp / "server",
            {
                self.endpoint: {
                    "script": str(script),
                    "env": env,
                    "settings": {"workers_min": workers, "workers_max": workers},
                }
            },
            options={"retention": 3600.0},
        )  # results stay readable until the soak reads them all
        self.v2 = f"{self.srv.url}/v2/{self.endpoint}"
        self.headers = {"Authorization": f"Bearer {TOKEN}"}
        self.workers = workers

    def start(self) -> None:
        self.srv.start()

    def kill_server(self) -> None:
        self.srv.kill()

    def start_server(self) -> None:
        self.srv.start()

    def worker_pids(self) -> dict[str, int]:
        return {w: p for w, p in self.srv.worker_pids().items() if _alive(p)}

    def kill_agent(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.srv.close()


class ProductStack:
    """A real `dstack server` with its local agent; workers are jobs of a serverless run."""

    kinds = ("server", "agent", "worker")

    def __init__(self, tmp: Path, workers: int, concurrency: int) -> None:
        from conftest import make_server

        self.tmp = tmp
        # Jobs run as an unprivileged per-project user that sees only directories it may enter:
        # the handler reports into a world-writable directory of its own, outside the 0700 `tmp`.
        self.shared = Path(tempfile.mkdtemp(prefix="bench-faults-shared-"))
        self.shared.chmod(0o1777)
        self.log = self.shared / "executions.log"
        self.log.touch(mode=0o666)
        self.log.chmod(0o666)
        self.pids = self.shared / "pids"
        self.pids.mkdir()
        self.pids.chmod(0o1777)
        self.srv = make_server(tmp)
        self.workers, self.concurrency = workers, concurrency
        self.endpoint = "soak"
        self.headers = self.srv.headers
        self.v2 = ""

    def start(self) -> None:
        from dstack.api import Resources, Serverless

        self.srv.start()
        repo = self.tmp / "repo"
        repo.mkdir()
        (repo / "handler.py").write_text(HANDLER)
        conf = Serverless(
            setup=["pip install -q runpod==1.12.0"],
            commands=["python handler.py"],
            workers=f"{self.workers}..{self.workers}",
            resources=Resources(cpu=0, memory="0.3GB"),
            env={"FAULT_LOG": str(self.log), "FAULT_PIDS": str(self.pids), "FAULT_CONCURRENCY": str(self.concurrency)},
        )
        run = self.srv.client().runs.submit(conf, run_name=self.endpoint, repo_dir=repo)
        self.v2 = run.endpoint_url
        wait_until(
            lambda: (
                httpx.get(f"{self.v2}/health", headers=self.headers, timeout=30).json()["workers"]["idle"]
                >= self.workers
            ),
            timeout=600,
            interval=1,
            what="warm workers (the first pays a pip install)",
        )

    def kill_server(self) -> None:
        self.srv.kill()

    def start_server(self) -> None:
        self.srv.start()

    def worker_pids(self) -> dict[str, int]:
        out = {}
        for p in self.pids.iterdir():
            try:
                pid = int(p.read_text())
            except ValueError:
                continue
            if _alive(pid):
                out[p.name] = pid
        return out

    def kill_agent(self) -> None:
        for info in self.srv.home.rglob("agent.json"):
            try:
                os.kill(json.loads(info.read_text())["pid"], signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass

    def close(self) -> None:
        try:
            httpx.post(
                f"{self.srv.url}/api/project/main/runs/stop",
                headers=self.headers,
                json={"runs_names": [self.endpoint], "abort": True},
                timeout=30,
            )
        except httpx.HTTPError:
            pass
        self.srv.stop()
        self.kill_agent()
        for pid in self.worker_pids().values():
            _killpg(pid)
        shutil.rmtree(self.shared, ignore_errors=True)
        home = str(self.srv.home)
        for proc in Path("/proc").iterdir():  # this soak's warm-start zygotes (they live under its home)
            try:
                if proc.name.isdigit() and home in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


class Soak:
    def __init__(
        self, stack, n: int, rate: float, job_seconds: float, kills: int, max_seconds: float, rng: random.Random
    ) -> None:
        self.stack, self.n, self.rate, self.job_seconds = stack, n, rate, job_seconds
        self.kills_left, self.max_seconds, self.rng = kills, max_seconds, rng
        self.ids: list[str | None] = [None] * n
        self.ambiguous_submits = 0  # /run answers cut off by a kill (the job may exist twice)
        self.killed_workers: dict[str, float] = {}
        self.ended: dict[str, float] = {}  # worker id -> when its process was first seen gone
        self.events: list[dict] = []
        self.server_up = asyncio.Event()
        self.server_up.set()
        self.t0 = 0.0

    async def _submit(self, c: httpx.AsyncClient, i: int) -> None:
        body = {"input": {"i": i, "seconds": self.job_seconds}}
        while time.time() - self.t0 < self.max_seconds:
            await self.server_up.wait()
            try:
                r = await c.post(f"{self.stack.v2}/run", json=body)
                if r.status_code == 200:
                    self.ids[i] = r.json()["id"]
                    return
            except (httpx.ConnectError, httpx.ConnectTimeout):
                pass  # nothing was sent
            except httpx.HTTPError:
                self.ambiguous_submits += 1
            await asyncio.sleep(0.2)

    async def submitter(self) -> None:
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(headers=self.stack.headers, timeout=30) as c:

            async def one(i: int) -> None:
                async with sem:
                    await self._submit(c, i)

            tasks = []
            for i in range(self.n):
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(1 / self.rate)
            await asyncio.gather(*tasks)

    async def chaos(self, until_done: asyncio.Event) -> None:
        window = self.n / self.rate
        times = sorted(self.rng.uniform(1.0, max(2.0, window)) for _ in range(self.kills_left))
        last = 0.0
        for at in times:
            at = max(at, last + 1.0)  # a server kill's outage may have run past the next kills' times
            await asyncio.sleep(max(0.0, at - (time.time() - self.t0)))
            last = time.time() - self.t0
            if until_done.is_set():
                return
            kind = self.rng.choice(self.stack.kinds)
            event = {"t": round(time.time() - self.t0, 2), "kill": kind}
            if kind == "server":
                self.server_up.clear()
                self.stack.kill_server()
                down = self.rng.uniform(0.5, 5.0)
                await asyncio.sleep(down)
                await asyncio.to_thread(self.stack.start_server)
                self.server_up.set()
                event["down_s"] = round(down, 2)
            elif kind == "agent":
                self.stack.kill_agent()
            else:
                pids = self.stack.worker_pids()
                if not pids:
                    event["skipped"] = "no live worker"
                else:
                    wid = self.rng.choice(sorted(pids))
                    self.killed_workers[wid] = time.time()
                    self.ended.setdefault(wid, time.time())
                    _killpg(pids[wid])
                    event["worker"] = wid
            self.events.append(event)
            print(f"  t={event['t']:7.2f}s kill {kind} {event.get('worker', '')}", flush=True)

    async def watcher(self, stop: asyncio.Event) -> None:
        seen: set[str] = set()
        while not stop.is_set():
            alive = set(self.stack.worker_pids())
            now = time.time()
            for wid in seen - alive:
                self.ended.setdefault(wid, now)
            seen |= alive
            await asyncio.sleep(0.2)

    async def _statuses(self, c: httpx.AsyncClient) -> dict[str, str]:
        out: dict[str, str] = {}
        sem = asyncio.Semaphore(16)

        async def one(job_id: str) -> None:
            async with sem:
                for _ in range(50):
                    try:
                        r = await c.get(f"{self.stack.v2}/status/{job_id}")
                        out[job_id] = r.json().get("status", "?") if r.status_code == 200 else f"HTTP {r.status_code}"
                        if r.status_code == 200:
                            out[job_id + ":output"] = json.dumps(r.json().get("output"))
                        return
                    except httpx.HTTPError:
                        await asyncio.sleep(1)

        await asyncio.gather(*(one(j) for j in self.ids if j))
        return out

    async def run(self) -> dict:
        self.t0 = time.time()
        done = asyncio.Event()
        chaos = asyncio.create_task(self.chaos(done))
        watcher = asyncio.create_task(self.watcher(done))
        await self.submitter()
        submitted_s = time.time() - self.t0
        async with httpx.AsyncClient(headers=self.stack.headers, timeout=30) as c:
            while time.time() - self.t0 < self.max_seconds:
                await self.server_up.wait()
                try:
                    jobs = (await c.get(f"{self.stack.v2}/health")).json()["jobs"]
                    if jobs["inQueue"] == 0 and jobs["inProgress"] == 0 and chaos.done():
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                await asyncio.sleep(0.5)
            done.set()
            await chaos
            await watcher
            await self.server_up.wait()
            drained_s = time.time() - self.t0
            statuses = await self._statuses(c)
        return self.report(statuses, submitted_s, drained_s)

    def report(self, statuses: dict[str, str], submitted_s: float, drained_s: float) -> dict:
        runs: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for line in self.stack.log.read_text().splitlines() if self.stack.log.exists() else []:
            parts = line.split()
            if len(parts) >= 4:
                runs[parts[0]].append((float(parts[3]), parts[1]))
        known = {j: i for i, j in enumerate(self.ids) if j}
        by_status = Counter(statuses.get(j, "no answer") for j in known)
        lost = [j for j in known if statuses.get(j) not in TERMINAL]
        failed = [j for j in known if statuses.get(j) in TERMINAL - {"COMPLETED"}]
        wrong = [
            j
            for j, i in known.items()
            if statuses.get(j) == "COMPLETED" and json.loads(statuses.get(j + ":output", "null") or "null") != {"i": i}
        ]
        never_ran = [j for j in known if statuses.get(j) == "COMPLETED" and not runs.get(j)]
        dup_live, dup_dead = [], []
        for j in known:
            ran = sorted(runs.get(j, []))
            if len(ran) > 1:  # every earlier run's worker ended before the run after it started (+ the watcher's lag)
                dead = all(self.ended.get(w, float("inf")) <= ran[k + 1][0] + 0.5 for k, (_, w) in enumerate(ran[:-1]))
                (dup_dead if dead else dup_live).append(j)
        kills = Counter(e["kill"] for e in self.events if "skipped" not in e)
        return {
            "jobs": self.n,
            "submitted": len(known),
            "not_submitted": self.n - len(known),
            "completed": by_status.get("COMPLETED", 0),
            "lost": len(lost),
            "failed": len(failed),
            "duplicated_with_live_worker": len(dup_live),
            "duplicated_after_worker_death": len(dup_dead),
            "executions": sum(len(runs.get(j, [])) for j in known),
            "orphan_jobs_run": len([j for j in runs if j not in known]),
            "ambiguous_submits": self.ambiguous_submits,
            "wrong_output": len(wrong),
            "completed_never_ran": len(never_ran),
            "statuses": dict(by_status),
            "kills": dict(kills),
            "kill_events": self.events,
            "submit_s": round(submitted_s, 1),
            "drain_s": round(drained_s, 1),
            "workers_ended": len(self.ended),
            "workers_killed_by_soak": len(self.killed_workers),
            "examples": {"lost": lost[:5], "failed": failed[:5], "dup_live": dup_live[:5], "dup_dead": dup_dead[:5]},
        }


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--stack", choices=("queue", "product"), default="queue")
    ap.add_argument("--kills", type=int, help="SIGKILLs in all (default: one per 400 jobs, at least 3, at most 40)")
    ap.add_argument("--rate", type=float, default=40.0, help="jobs submitted per second")
    ap.add_argument("--job-seconds", type=float, default=0.5, help="mean handler time")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8, help="jobs at once per worker")
    ap.add_argument("--max-seconds", type=float, default=1800, help="bound on the whole soak")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).with_name("last-run-faults.json")))
    args = ap.parse_args()
    kills = args.kills if args.kills is not None else min(40, max(3, args.jobs // 400))
    tmp = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    stack = (QueueStack if args.stack == "queue" else ProductStack)(tmp, args.workers, args.concurrency)
    result: dict = {
        "stack": args.stack,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seed": args.seed,
        "args": vars(args) | {"kills": kills},
        "load_before": os.getloadavg(),
    }
    try:
        stack.start()
        wait_until(lambda: len(stack.worker_pids()) >= args.workers, timeout=120, what="workers up")
        soak = Soak(stack, args.jobs, args.rate, args.job_seconds, kills, args.max_seconds, random.Random(args.seed))
        result.update(asyncio.run(soak.run()))
    finally:
        result["load_after"] = os.getloadavg()
        stack.close()
        Path(args.out).write_text(json.dumps(result, indent=2))
    summary = {
        k: result.get(k)
        for k in (
            "jobs",
            "completed",
            "lost",
            "failed",
            "duplicated_with_live_worker",
            "duplicated_after_worker_death",
            "orphan_jobs_run",
            "kills",
            "drain_s",
        )
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
