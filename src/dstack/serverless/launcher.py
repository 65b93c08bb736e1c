"""How the queue gets worker processes: the server implements this by running the endpoint's
commands as a job with the given environment; tests run a handler script as a subprocess."""

from typing import Protocol


class WorkerLauncher(Protocol):
    async def start_worker(self, endpoint_id: str, worker_id: str, env: dict[str, str]) -> None:
        """Start a worker with `env` (the RUNPOD_* variables). Return once it is launched, not ready;
        when the process ends, call `ServerlessService.on_worker_exited`."""

    async def stop_worker(self, endpoint_id: str, worker_id: str) -> None:
        """Stop the worker (SIGTERM, then kill); a no-op for an unknown or finished worker."""
