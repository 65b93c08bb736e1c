"""Control-plane scale: one `dstack server`, a fleet of many SSH hosts and 1,000 active jobs.

Hosts are network namespaces with their own sshd (tests/fleets/hosts.py; needs root). They join
through the real fleet path — `client.fleets.apply` probes each host over SSH, ships the agent
over SFTP and reaches it through an SSH port forward — so nothing is inserted behind the
server's back and no bench-only hook exists. Jobs are `sleep` tasks (`cpu: 0..`, so a host
takes any number), pinned to the fleet, submitted in bursts with `client.runs.submit` (a plan
and a submit, as `dstack apply` does) from a few threads at once, and they stay active.

Measured, with the jobs active at the time:
- submit → RUNNING: from before `runs.submit` to the first `runs/get` that answers RUNNING
  (each pending run is polled every POLL seconds, so this includes up to POLL of wait), and the
  server's own view: the job's `started_at` (the agent's process start) minus its `submitted_at`;
- server CPU seconds (user + system, psutil) per job started, over the submission phase
  (polling included: the bench's own `runs/get`s are part of what the server answered);
- `dstack ps` wall time (the CLI in a subprocess) with all jobs active;
- the agents' memory: RSS summed over the agent processes.

The peer, in the same run on the same server: the same jobs pinned to the server's own
instance (`backends: [local]`, one agent, no SSH), after the fleet's jobs were stopped.

    python bench/fleets/bench_scale.py [--hosts 50] [--jobs 1000] [--burst 50] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import psutil  # noqa: E402

from dstack.api import Resources, RunStatus, Task  # noqa: E402
from dstack.core.models.fleets import FleetConfiguration  # noqa: E402
from tests.conftest import TEST_SERVER_ENV, ServerProcess, free_port, make_server  # noqa: E402
from tests.fleets.hosts import HostNetwork  # noqa: E402

POLL = 0.1  # seconds between two `runs/get` of one pending run
SUBMIT_THREADS = 8


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def fmt(values: list[float]) -> str:
    return f"p50 {pct(values, 50):6.3f} s  p99 {pct(values, 99):6.3f} s  max {max(values):6.3f} s  (n={len(values)})"


def _server(base: Path, postgres: str | None, jobs: int) -> ServerProcess:
    # the per-project quota of active jobs (default 256) is an operator's setting: raised for the bench
    env = {**TEST_SERVER_ENV, "DSTACK_SERVER_MAX_ACTIVE_JOBS_PER_PROJECT": str(2 * jobs + 100)}
    if postgres is None:
        return make_server(base, **env)
    from tests.pg import fresh_database

    home = base / "dstack-home"
    home.mkdir(parents=True, exist_ok=True)
    return ServerProcess(
        home=home,
        port=free_port(),
        token="bench-admin-token-" + os.urandom(6).hex(),
        database_url=fresh_database(postgres, prefix="dstack_bench"),
        extra_env=env,
    )


def _wait(what: str, cond, timeout: float, interval: float = 0.5) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def bring_up_fleet(client, net: HostNetwork, n: int, step: int) -> float:
    """The fleet applied `step` hosts at a time (re-applying adds hosts in place): 50 agents
    starting at once on a 2-core machine time out and are retried, which only takes longer."""
    hosts = net.add_hosts(n)
    t0 = time.monotonic()
    for upto in range(step, n + step, step):
        conf = FleetConfiguration.model_validate(
            {
                "type": "fleet",
                "name": "bench",
                "ssh_config": {"identity_file": str(net.key), "hosts": [h.address for h in hosts[:upto]]},
            }
        )
        client.fleets.apply(conf)
        want = min(upto, n)

        def all_idle(want: int = want) -> bool:
            insts = client.fleets.get("bench").instances
            return len(insts) == want and all(i.status == "idle" for i in insts)

        _wait(f"{want} hosts idle", all_idle, timeout=600, interval=1)
        print(f"  {want} hosts idle after {time.monotonic() - t0:.0f} s", flush=True)
    return time.monotonic() - t0


class Phase:
    """Submit `jobs` runs in bursts, each burst concurrently; watch each until RUNNING."""

    def __init__(self, srv: ServerProcess, task: Task, prefix: str) -> None:
        self.srv = srv
        self.task = task
        self.prefix = prefix
        self.client_local = threading.local()
        self.observed: dict[str, float] = {}  # run name -> submit → RUNNING seen by the client
        self.active_at_submit: dict[str, int] = {}

    def _client(self):
        c = getattr(self.client_local, "c", None)
        if c is None:
            c = self.client_local.c = self.srv.client()
        return c

    def _one(self, name: str, active: int) -> None:
        client = self._client()
        t0 = time.perf_counter()
        run = client.runs.submit(self.task, run_name=name)
        while True:
            status = run.status
            if status == RunStatus.RUNNING:
                self.observed[name] = time.perf_counter() - t0
                self.active_at_submit[name] = active
                return
            if status.is_finished():
                raise RuntimeError(f"{name} ended {status}: {run.error}")
            if time.perf_counter() - t0 > 300:
                raise RuntimeError(f"{name} not RUNNING after 300 s")
            time.sleep(POLL)
            run.refresh()

    def run(self, jobs: int, burst: int) -> float:
        proc = psutil.Process(self.srv.proc.pid)
        cpu0 = sum(proc.cpu_times()[:2])
        with ThreadPoolExecutor(SUBMIT_THREADS) as ex:
            for start in range(0, jobs, burst):
                names = [f"{self.prefix}-{i}" for i in range(start, min(jobs, start + burst))]
                for f in [ex.submit(self._one, name, start) for name in names]:
                    f.result()
                burst_s = sorted(self.observed[n] for n in names)
                print(
                    f"  {start + len(names)} active; this burst's submit -> RUNNING p50 {pct(burst_s, 50):.2f} s,"
                    f" max {burst_s[-1]:.2f} s; server CPU so far {sum(proc.cpu_times()[:2]) - cpu0:.0f} s",
                    flush=True,
                )
        return sum(proc.cpu_times()[:2]) - cpu0

    def server_view(self) -> list[float]:
        """started_at - submitted_at of every job, from the server's answers."""
        out = []
        for run in self._client().runs.list():
            if not run.name.startswith(self.prefix + "-"):
                continue
            sub = run.jobs[0].job_submissions[-1]
            if sub.started_at is not None:
                out.append((sub.started_at - sub.submitted_at).total_seconds())
        return out


def dstack_ps(srv: ServerProcess, repeat: int = 3) -> tuple[float, int]:
    times, lines = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "dstack.cli.main", "ps"], env=srv.env, capture_output=True, text=True, check=True
        ).stdout
        times.append(time.perf_counter() - t0)
        lines = len(out.splitlines())
    return statistics.median(times), lines


def agents_rss(home_hint: str | None = None) -> tuple[int, float]:
    """(agent processes, their RSS summed in MiB): every `python -m dstack.agent` on this machine
    started for this bench (its command line names the bench's directory)."""
    n, rss = 0, 0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "dstack.agent" in cmd and "zygote" not in cmd and (home_hint is None or home_hint in cmd):
            n += 1
            rss += p.info["memory_info"].rss
    return n, rss / 2**20


def stop_all(client, prefix: str, n: int) -> None:
    names = [f"{prefix}-{i}" for i in range(n)]
    for i in range(0, n, 200):
        client.api.post(client.runs._path("stop"), {"runs_names": names[i : i + 200], "abort": True})

    def done() -> bool:
        # `runs.list()` keeps the latest few finished runs too: wait for none of ours to be unfinished
        return not [r for r in client.runs.list() if r.name.startswith(prefix + "-") and not r.status.is_finished()]

    _wait(f"{prefix} runs stopped", done, timeout=600, interval=2)


def report(label: str, phase: Phase, cpu: float, jobs: int, ps: tuple[float, int]) -> dict[str, float]:
    seen = list(phase.observed.values())
    server = phase.server_view()
    tail = max(phase.active_at_submit.values())  # the last burst: submitted with the most jobs active
    last = [v for k, v in phase.observed.items() if phase.active_at_submit[k] == tail]
    print(f"[{label}]")
    print(f"  submit -> RUNNING (client, poll {POLL:g} s)   {fmt(seen)}")
    print(f"  ... last burst ({tail} active before)   {fmt(last)}")
    print(f"  submit -> started (server rows)         {fmt(server)}")
    print(f"  server CPU per job started              {cpu / jobs * 1000:.1f} ms ({cpu:.1f} s for {jobs})")
    print(f"  `dstack ps` with {jobs} active           {ps[0]:.2f} s ({ps[1]} lines)")
    return {"p50": pct(seen, 50), "p99": pct(seen, 99), "cpu": cpu / jobs, "ps": ps[0], "srv50": pct(server, 50)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--burst", type=int, default=50)
    ap.add_argument("--host-step", type=int, default=10, help="hosts added per apply while bringing the fleet up")
    ap.add_argument("--postgres", metavar="URL", help="a PostgreSQL server URL (a fresh database is made)")
    ap.add_argument("--no-peer", action="store_true", help="skip the local-instance peer")
    ap.add_argument("--py-spy", metavar="OUT", help="record the server with py-spy (on PATH) during the fleet phase")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    net = HostNetwork(base / "net")
    srv = _server(base, args.postgres, args.jobs)
    srv.start()
    try:
        client = srv.client()
        up = bring_up_fleet(client, net, args.hosts, args.host_step)
        n_agents, rss = agents_rss(".dstack")
        print(
            f"{args.hosts} hosts idle {up:.1f} s after apply; {n_agents} agents, RSS {rss:.0f} MiB in all", flush=True
        )
        task = Task(
            commands=["sleep 3600"],
            resources=Resources(cpu="0..", memory="0GB..", disk="0GB.."),
            fleets=["bench"],
        )
        fleet = Phase(srv, task, "f")
        spy = None
        if args.py_spy:
            spy = subprocess.Popen(
                ["py-spy", "record", "-p", str(srv.proc.pid), "-o", args.py_spy, "-f", "raw", "-r", "20"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        cpu = fleet.run(args.jobs, args.burst)
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        n_agents, rss = agents_rss()
        ps = dstack_ps(srv)
        res = report(f"{args.hosts} fleet hosts over SSH", fleet, cpu, args.jobs, ps)
        mem = psutil.virtual_memory()
        print(f"  agents: {n_agents} processes, RSS {rss:.0f} MiB; machine available {mem.available / 2**30:.1f} GiB")
        print(f"  server RSS {psutil.Process(srv.proc.pid).memory_info().rss / 2**20:.0f} MiB", flush=True)
        if args.no_peer:
            return
        stop_all(client, "f", args.jobs)
        local = Task(
            commands=["sleep 3600"],
            resources=Resources(cpu="0..", memory="0GB..", disk="0GB.."),
            backends=["local"],
        )
        peer = Phase(srv, local, "l")
        cpu = peer.run(args.jobs, args.burst)
        ps = dstack_ps(srv)
        ref = report("peer: the server's own instance (one agent, no SSH)", peer, cpu, args.jobs, ps)
        print("ratios fleet / local:")
        for k, label in (("p50", "submit->RUNNING p50"), ("p99", "p99"), ("cpu", "CPU per job"), ("ps", "dstack ps")):
            print(f"  {label:22s} {res[k] / ref[k]:.2f}x")
        stop_all(client, "l", args.jobs)
    finally:
        srv.stop()
        srv.kill_agents()
        net.close()
        print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
