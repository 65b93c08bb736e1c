"""Per-job usage samples: CPU, memory and (where `nvidia-smi` answers) GPU, every second or so.

The agent keeps a bounded window of samples per job (in memory: the server pulls them through
`GET /api/jobs/{id}/metrics?after=TS` and stores its own retention window). A job's usage is that
of its process tree: the job's process and every descendant still attached to it. CPU time counts
each live process's own time plus the time of children it has already reaped, so work done by
short-lived children is not lost between samples; `cpu_percent` is of one core (a busy loop reads
about 100, two busy processes about 200). Memory is the tree's summed RSS. GPU readings are those
of the GPUs the job was given (`nvidia-smi` reports per device, not per process).

An image job's usage is its container's cgroup (`agent.cgroups`: CPU time and memory of every
process in it, `exec` sessions included), since its processes are not under the CLI process
the agent started; GPUs as for host jobs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psutil

from dstack.agent import cgroups
from dstack.core.env_numbers import number
from dstack.core.models.metrics import GpuSample, JobMetricsSample

if TYPE_CHECKING:
    from dstack.agent.jobs import JobManager

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_SECONDS = 1.0
DEFAULT_WINDOW = 300  # samples per job: 5 minutes at the default interval
NVIDIA_SMI_TIMEOUT_SECONDS = 5.0
MAX_SAMPLES_PER_ANSWER = 1000


def _env_number(name: str, default: float, low: float, high: float) -> float:
    try:
        return number(os.environ, name, default, low, high)
    except ValueError as e:  # names the variable
        raise SystemExit(str(e)) from None


@dataclass
class Target:
    """What a sample needs of a running job, copied on the event loop (the job table changes there)."""

    job_id: str
    pid: int
    create_time: float | None
    gpus: list[int]
    container: str | None = None  # an image job: its container's name ...
    cli: list[str] | None = None  # ... and the container CLI that knows it


@dataclass
class _Series:
    samples: deque[JobMetricsSample]
    last_cpu: tuple[float, float] | None = None  # (wall time, cpu seconds) of the previous sample


@dataclass
class GpuReading:
    index: int
    util_percent: float
    memory_used_bytes: int
    memory_total_bytes: int


def tree_usage(pid: int, create_time: float | None) -> tuple[float, int] | None:
    """(CPU seconds so far, RSS bytes) of `pid` and its descendants; None when it is gone (or its
    pid now names another process)."""
    try:
        root = psutil.Process(pid)
        if create_time is not None and abs(root.create_time() - create_time) > 0.01:
            return None
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    cpu, rss = 0.0, 0
    for proc in procs:
        try:
            with proc.oneshot():
                t = proc.cpu_times()
                mem = proc.memory_info()
        except psutil.Error:  # ended meanwhile: its time is in its parent's children_* once reaped
            continue
        cpu += t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
        rss += mem.rss
    return cpu, rss


class NvidiaSmi:
    """Per-GPU utilisation and memory from `nvidia-smi`; silent (and not asked again) where it is missing."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("nvidia-smi")
        self._warned = False

    @property
    def available(self) -> bool:
        return self.binary is not None

    def read(self) -> dict[int, GpuReading]:
        if self.binary is None:
            return {}
        argv = [
            self.binary,
            "--query-gpu=index,utilization.gpu,memory.used,memory.total",
            "--format=csv,noheader,nounits",
        ]
        try:
            out = subprocess.run(
                argv, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_SECONDS, check=True
            ).stdout
        except FileNotFoundError:
            self.binary = None
            return {}
        except (subprocess.SubprocessError, OSError) as e:
            if not self._warned:
                logger.warning("nvidia-smi did not answer; GPU metrics are missing: %s", e)
                self._warned = True
            return {}
        return parse_nvidia_smi(out)


def parse_nvidia_smi(out: str) -> dict[int, GpuReading]:
    """`0, 87, 1024, 81920` lines (index, util %, MiB used, MiB total); `[N/A]` fields read 0."""
    readings: dict[int, GpuReading] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            index = int(parts[0])
        except ValueError:
            continue
        util, used, total = (_number(p) for p in parts[1:])
        readings[index] = GpuReading(index, util, int(used * 2**20), int(total * 2**20))
    return readings


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


@dataclass
class MetricsSampler:
    """Samples every running job of `manager` each `interval` seconds, keeping `window` samples a job."""

    manager: JobManager
    interval: float = field(
        default_factory=lambda: _env_number("DSTACK_AGENT_METRICS_INTERVAL", DEFAULT_INTERVAL_SECONDS, 0.2, 60)
    )
    window: int = field(
        default_factory=lambda: int(_env_number("DSTACK_AGENT_METRICS_WINDOW", DEFAULT_WINDOW, 2, 100_000))
    )
    gpus: NvidiaSmi = field(default_factory=NvidiaSmi)
    _series: dict[str, _Series] = field(default_factory=dict)
    # image jobs' cgroup files, else their container's first process (no cgroup of its own), found once
    _cgroups: dict[str, cgroups.CgroupFiles | int] = field(default_factory=dict)

    def targets(self) -> list[Target]:
        out = []
        for job in list(self.manager.jobs.values()):
            if job.state != "running" or not job.pid:
                continue
            target = Target(job.spec.job_id, job.pid, job.pid_create_time, list(job.spec.gpus))
            if job.spec.image:
                if job.container is None or job.runtime is None:
                    continue
                target.container, target.cli = job.container, list(job.runtime.global_args)
            out.append(target)
        return out

    def usage(self, t: Target) -> tuple[float, int] | None:
        """(CPU seconds, memory bytes) of a job: its process tree, or its container's cgroup."""
        if t.container is None or t.cli is None:
            return tree_usage(t.pid, t.create_time)
        found = self._cgroups.get(t.job_id)
        if found is None:
            pid = cgroups.container_pid(t.cli, t.container)
            if pid is None:  # not started yet: next time
                return None
            found = self._cgroups[t.job_id] = cgroups.files_for(pid) or pid
        # no cgroup of its own: the process tree of its first process (`exec` sessions not counted)
        read = tree_usage(found, None) if isinstance(found, int) else found.read()
        if read is None:  # the container is gone (a new one would have another cgroup)
            self._cgroups.pop(t.job_id, None)
        return read

    async def run(self) -> None:
        """The sampling loop (a task of the agent's lifespan); never raises out."""
        while True:
            started = time.monotonic()
            try:
                targets = self.targets()
                if targets:
                    measured = await asyncio.to_thread(self.measure, targets)
                    self.record(measured)
                self.forget(self.manager.jobs.keys())
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("sampling job metrics failed")
            await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - started)))

    def measure(self, targets: list[Target]) -> list[tuple[str, float, float, int, list[GpuSample]]]:
        """(job id, time, cpu seconds, rss, gpus) per target still alive; runs in a thread."""
        readings = self.gpus.read() if any(t.gpus for t in targets) else {}
        out = []
        for t in targets:
            usage = self.usage(t)
            if usage is None:
                continue
            gpus = [
                GpuSample(
                    index=i,
                    util_percent=readings[i].util_percent,
                    memory_used_bytes=readings[i].memory_used_bytes,
                    memory_total_bytes=readings[i].memory_total_bytes,
                )
                for i in t.gpus
                if i in readings
            ]
            out.append((t.job_id, time.time(), usage[0], usage[1], gpus))
        return out

    def record(self, measured: Iterable[tuple[str, float, float, int, list[GpuSample]]]) -> None:
        for job_id, now, cpu_seconds, rss, gpus in measured:
            series = self._series.get(job_id)
            if series is None:
                series = self._series[job_id] = _Series(deque(maxlen=self.window))
            if series.last_cpu is None:
                series.last_cpu = (now, cpu_seconds)  # a rate needs two readings
                continue
            wall = now - series.last_cpu[0]
            if wall <= 0:
                continue
            percent = max(0.0, (cpu_seconds - series.last_cpu[1]) / wall * 100)
            series.last_cpu = (now, cpu_seconds)
            series.samples.append(
                JobMetricsSample(
                    ts=round(now, 3),
                    cpu_percent=round(percent, 1),
                    cpu_seconds=round(cpu_seconds, 3),
                    memory_bytes=rss,
                    gpus=gpus,
                )
            )

    def forget(self, known_job_ids: Iterable[str]) -> None:
        """Drop the windows of deleted jobs."""
        known = set(known_job_ids)
        for job_id in [j for j in self._series if j not in known]:
            del self._series[job_id]
        for job_id in [j for j in self._cgroups if j not in known]:
            del self._cgroups[job_id]

    def samples(self, job_id: str, after: float = 0.0, limit: int = MAX_SAMPLES_PER_ANSWER) -> list[JobMetricsSample]:
        """The job's kept samples newer than `after`, oldest first (at most `limit`, the newest)."""
        series = self._series.get(job_id)
        if series is None:
            return []
        newer = [s for s in series.samples if s.ts > after]
        return newer[-limit:]
