"""A job runs once unless its worker dies: across a server SIGKILL and restart, a live worker keeps
its jobs and its late results count; a worker that is really gone has its job run elsewhere; and
when a job was requeued anyway, the first result wins."""

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx

from .helpers import Server, endpoint, killpg, wait_until
from .test_durability import _final_rows, _submit


def test_server_sigkill_runs_each_job_once(tmp_path):
    log = tmp_path / "handled.log"
    srv = Server(
        tmp_path / "once",
        {"ep-once": endpoint("async_worker.py", 2, 2, env={"WORKER_CONCURRENCY": "4", "WORKER_LOG": str(log)})},
    )
    srv.start()
    try:
        wait_until(lambda: srv.health("ep-once")["workers"]["idle"] == 2, timeout=40, what="two warm workers")
        ids = asyncio.run(_submit(srv.url, "ep-once", [{"mode": "sleep", "seconds": 1.5} for _ in range(32)]))
        wait_until(
            lambda: srv.health("ep-once")["jobs"]["inProgress"] >= 4,
            timeout=30,
            interval=0.05,
            what="jobs running on both workers",
        )
        workers = srv.worker_pids()
        srv.kill()
        # Longer than the SDK's own three tries of a result post: the results of the jobs that
        # finish now reach the server only because the worker keeps trying.
        time.sleep(4.0)
        srv.start()
        wait_until(
            lambda: srv.health("ep-once")["jobs"]["completed"] == 32,
            timeout=120,
            interval=0.3,
            what="all 32 completed after the restart",
        )
        rows = _final_rows(srv.spec["db"])
        assert {r[0] for r in rows} == set(ids) and {r[1] for r in rows} == {"COMPLETED"}
        assert all(json.loads(r[2])["slept"] == 1.5 for r in rows)
        runs = Counter(log.read_text().split())
        assert set(runs) == set(ids)
        assert {j: n for j, n in runs.items() if n > 1} == {}, "jobs executed more than once on live workers"
        assert srv.worker_pids() == workers  # the restart neither killed nor replaced a worker
    finally:
        srv.close()


def test_killed_worker_job_completes_on_another(tmp_path):
    log = tmp_path / "handled.log"
    srv = Server(
        tmp_path / "dead",
        {"ep-dead": endpoint("async_worker.py", 2, 2, env={"WORKER_CONCURRENCY": "1", "WORKER_LOG": str(log)})},
    )
    srv.start()
    try:
        wait_until(lambda: srv.health("ep-dead")["workers"]["idle"] == 2, timeout=40, what="two warm workers")
        job = srv.run("ep-dead", {"mode": "sleep", "seconds": 3})
        first = srv.wait("ep-dead", job, ("IN_PROGRESS",))["workerId"]
        # IN_PROGRESS is set when the worker takes the job, a moment before its handler logs the
        # start: kill it only once the handler really runs the job.
        wait_until(
            lambda: log.exists() and job in log.read_text().split(),
            timeout=30,
            what="the first worker's handler to start the job",
        )
        killpg(srv.worker_pids()[first])
        final = srv.wait("ep-dead", job, timeout=90)
        assert final["status"] == "COMPLETED", final
        assert final["workerId"] != first and final["output"]["worker"] == final["workerId"]
        assert Counter(log.read_text().split())[job] == 2  # started on the dead worker, then on the other
    finally:
        srv.close()


class HandWorker:
    """A worker driven by the test over the worker protocol (the endpoint's script is "-")."""

    def __init__(self, env_file: Path) -> None:
        env = json.loads(env_file.read_text())
        self.id = env["RUNPOD_POD_ID"]
        self.take_url = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", self.id) + "&job_in_progress=0"
        self.done_tpl = env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", self.id)
        self.stop_url = env["RUNPOD_WEBHOOK_GET_JOB"].replace("job-take", "job-stop").replace("$ID", self.id)
        self.client = httpx.Client(headers={"Authorization": env["RUNPOD_AI_API_KEY"]}, timeout=30)

    def take(self) -> dict:
        r = self.client.get(self.take_url)
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()

    def done(self, job_id: str, output: object) -> None:
        r = self.client.post(
            self.done_tpl.replace("$ID", job_id) + "&isStream=false", content=json.dumps({"output": output})
        )
        assert r.status_code == 200, r.text

    def stops(self) -> list[str]:
        r = self.client.get(self.stop_url)
        return r.json()["jobsToStop"] if r.status_code == 200 else []


def _hand_server(tmp_path: Path) -> Server:
    # a worker silent for 2 s counts as lost: its job is requeued
    return Server(
        tmp_path / "hand",
        {"ep-hand": {"script": "-", "settings": {"workers_min": 1, "workers_max": 1}}},
        options={"heartbeat_timeout": 2.0, "take_wait": 1.0},
    ).start()


def _next_worker(srv: Server, seen: set[str]) -> HandWorker:
    path = wait_until(
        lambda: next(
            (p for p in sorted(srv.run_dir.glob("ep-hand-*.env.json")) if p.name.split(".")[0] not in seen), None
        ),
        timeout=30,
        what="a hand worker's env",
    )
    seen.add(path.name.split(".")[0])
    return HandWorker(path)


def test_late_result_of_a_requeued_job_wins(tmp_path):
    srv = _hand_server(tmp_path)
    seen: set[str] = set()
    try:
        a = _next_worker(srv, seen)
        job = srv.run("ep-hand", {"n": 1})
        assert a.take()["id"] == job
        # a falls silent: the job goes back to the queue, and a replacement worker is started
        srv.wait("ep-hand", job, ("IN_QUEUE",), timeout=30)
        b = _next_worker(srv, seen)
        assert b.take()["id"] == job
        a.done(job, "from a")  # a was alive after all: its result is the first one
        st = srv.status("ep-hand", job)
        assert st["status"] == "COMPLETED" and st["output"] == "from a" and st["workerId"] == a.id
        assert b.stops() == [job]  # b is told to drop its now pointless run
        b.done(job, "from b")  # the second result changes nothing
        assert srv.status("ep-hand", job)["output"] == "from a"
        a.done(job, "again")  # nor does a repeat
        assert srv.status("ep-hand", job)["output"] == "from a"
    finally:
        srv.close()


def test_late_result_completes_a_requeued_job_before_it_runs_again(tmp_path):
    srv = _hand_server(tmp_path)
    seen: set[str] = set()
    try:
        a = _next_worker(srv, seen)
        job = srv.run("ep-hand", {"n": 2})
        assert a.take()["id"] == job
        srv.wait("ep-hand", job, ("IN_QUEUE",), timeout=30)
        a.done(job, {"late": True})
        st = srv.status("ep-hand", job)
        assert st["status"] == "COMPLETED" and st["output"] == {"late": True}
        b = _next_worker(srv, seen)
        r = b.client.get(b.take_url)
        assert r.status_code == 204  # nothing left to run
        # a worker that never held the job cannot finish it
        other = srv.run("ep-hand", {"n": 3})
        b.done(other, "not mine")
        assert srv.status("ep-hand", other)["status"] == "IN_QUEUE"
    finally:
        srv.close()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_heartbeat_of_a_killed_worker_stops_vouching_for_its_jobs(tmp_path):
    """Only the worker's main process is killed (not its group): the SDK's heartbeat child must
    not keep naming the job, or the server would wait for that job forever."""
    import os
    import signal
    import subprocess
    import sys

    from dstack.agent.workersite import with_worker_site

    from .helpers import WORKERS

    srv = _hand_server(tmp_path)
    proc = None
    try:
        env_file = wait_until(
            lambda: next(iter(sorted(srv.run_dir.glob("ep-hand-*.env.json"))), None),
            timeout=30,
            what="the worker's env",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
        env.update(json.loads(env_file.read_text()))  # the worker the server launched, run by the test
        proc = subprocess.Popen(
            [sys.executable, str(WORKERS / "async_worker.py")],
            env=with_worker_site(env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        job = srv.run("ep-hand", {"mode": "sleep", "seconds": 60})
        srv.wait("ep-hand", job, ("IN_PROGRESS",), timeout=60)
        heartbeat = wait_until(lambda: _children(proc.pid), timeout=30, what="the SDK's heartbeat process")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_until(lambda: not any(_running(p) for p in heartbeat), timeout=30, what="the orphaned heartbeat to end")
        # silent now: the job goes back to the queue instead of waiting for a dead worker
        srv.wait("ep-hand", job, ("IN_QUEUE",), timeout=30)
    finally:
        if proc is not None:
            killpg(proc.pid)
        srv.close()
