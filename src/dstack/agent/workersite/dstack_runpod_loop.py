"""Event-driven job loops for the runpod SDK's JobScaler, in workers that dstack starts.

runpod 1.x runs a worker as two loops around an in-memory queue: one takes jobs from the
server, the other starts them. The starting loop looks at the queue every 100 ms, so a job
that reaches an idle worker waits 50 ms on average before its handler runs; and once every
slot is taken, the taking loop sleeps a whole second before it asks again, however soon a
slot frees. These replacements keep each loop's contract (the concurrency modifier, the same
queue and in-progress set, the fetch timeout, the 429 debounce, the same log lines and the
drain at shutdown) but wake on the events themselves: a job queued, a job finished.

Applied by `sitecustomize` right after `runpod.serverless.modules.rp_scale` loads, only to
SDK versions whose JobScaler has the shape these methods were written against; the same call
makes result posts outlive a server restart (`dstack_runpod_results`) and the heartbeat end
with its worker (`dstack_runpod_heartbeat`).
"""

import asyncio
import sys

SUPPORTED = ("1.12.",)
# How long a loop sleeps with nothing to wake it: only bounds how late it sees a shutdown.
IDLE_CHECK_SECONDS = 0.1
FULL_CHECK_SECONDS = 1.0
_REQUIRED = ("set_scale", "current_occupancy", "is_alive", "handle_job", "get_jobs", "run_jobs")


class _Wakers:
    """Per-scaler events, made inside the worker's running loop."""

    def __init__(self):
        self.queued = asyncio.Event()  # a job entered the queue, or a slot freed
        self.slot_free = asyncio.Event()


def _wakers(scaler):
    w = scaler.__dict__.get("_dstack_wakers")
    if w is None:
        w = scaler.__dict__["_dstack_wakers"] = _Wakers()
    return w


async def _wait(event, timeout):
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass


def patch(rp_scale):
    """Replace JobScaler's two loops in the freshly loaded module; False where left alone."""
    try:
        from runpod.version import __version__ as version
    except Exception:
        return False
    scaler = getattr(rp_scale, "JobScaler", None)
    if not str(version).startswith(SUPPORTED) or scaler is None or not all(hasattr(scaler, a) for a in _REQUIRED):
        return False
    rp_http = sys.modules.get("runpod.serverless.modules.rp_http")  # loaded by rp_scale's imports
    if rp_http is not None:
        import dstack_runpod_results

        dstack_runpod_results.patch(rp_http)
    rp_ping = sys.modules.get("runpod.serverless.modules.rp_ping")  # worker.py imports it first
    if rp_ping is not None:
        import dstack_runpod_heartbeat

        dstack_runpod_heartbeat.patch(rp_ping)
    log = rp_scale.log
    too_many = rp_scale.TooManyRequests

    async def get_jobs(self, session):
        """Take as many jobs as there are free slots; with none free, wait for one to free."""
        w = _wakers(self)
        while self.is_alive():
            await self.set_scale()
            jobs_needed = self.current_concurrency - self.current_occupancy()
            if jobs_needed <= 0:  # nothing runs between this check and the clear: no wake-up is lost
                w.slot_free.clear()
                await _wait(w.slot_free, FULL_CHECK_SECONDS)
                continue
            try:
                log.debug("JobScaler.get_jobs | Starting job acquisition.")
                acquired = await asyncio.wait_for(
                    self.jobs_fetcher(session, jobs_needed), timeout=self.jobs_fetcher_timeout
                )
                if not acquired:
                    log.debug("JobScaler.get_jobs | No jobs acquired.")
                    continue
                for job in acquired:
                    await self.jobs_queue.put(job)
                    self.job_progress.add(job)
                    log.debug("Job Queued", job["id"])  # noqa: PLE1205 (runpod logger: message, request_id)
                w.queued.set()
                log.info(f"Jobs in queue: {self.jobs_queue.qsize()}")
            except too_many:
                log.debug("JobScaler.get_jobs | Too many requests. Debounce for 5 seconds.")
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                log.debug("JobScaler.get_jobs | Job acquisition timed out. Retrying.")
            except TypeError as error:
                log.debug(f"JobScaler.get_jobs | Unexpected error: {error}.")
            except Exception as error:
                log.error(f"Failed to get job. | Error Type: {type(error).__name__} | Error Message: {error}")
            finally:
                await asyncio.sleep(0)

    async def run_jobs(self, session):
        """Start queued jobs the moment they are queued, up to the concurrency."""
        w = _wakers(self)
        tasks = set()
        last_count = 0

        def finished(task):
            tasks.discard(task)
            w.slot_free.set()
            w.queued.set()

        while self.is_alive() or not self.jobs_queue.empty():
            while len(tasks) < self.current_concurrency and not self.jobs_queue.empty():
                job = self.jobs_queue.get_nowait()
                task = asyncio.create_task(self.handle_job(session, job))
                tasks.add(task)
                self.jobs_tasks[job["id"]] = task
                task.add_done_callback(finished)
            if tasks and len(tasks) != last_count:
                log.info(f"Jobs in progress: {len(tasks)}")
            last_count = len(tasks)
            w.queued.clear()
            if self.jobs_queue.empty() or len(tasks) >= self.current_concurrency:
                await _wait(w.queued, IDLE_CHECK_SECONDS)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, asyncio.CancelledError):
                log.error(f"JobScaler.run_jobs | Task failed during shutdown drain: {result}")

    scaler.get_jobs = get_jobs
    scaler.run_jobs = run_jobs
    scaler.dstack_event_loops = True
    return True
