"""Serverless queue endpoints: RunPod-compatible client API and worker protocol over a durable queue.

Unmodified RunPod handler workers (`runpod.serverless.start({"handler": h})`, runpod==1.12.0) and
the SDK's client (`runpod.Endpoint`) talk to `/v2/{endpoint_id}/...`; jobs are rows, so nothing
queued or running is lost when the server restarts.

Seam with the server (the server wires these; nothing here imports `dstack.server`):

- Tables: `dstack.serverless.models` — `serverless_endpoints`, `serverless_jobs`,
  `serverless_stream_chunks`, `serverless_workers`, `serverless_webhook_deliveries`, all on
  `dstack.core.tables.Base`, the declarative base the server's tables use too (one MetaData: the
  foreign keys to `projects` and `runs` resolve by name; the `0003_serverless` migration is
  generated from them).
- `EndpointSettings` (`dstack.serverless.settings`): workers_min/max, idle_timeout (s),
  scaler_type ("queue_delay" | "request_count"), scaler_value, execution_timeout (s).
  `EndpointSettings.from_configuration(conf)` reads a `ServerlessConfiguration`.
- `ServerPorts` (`dstack.serverless.ports`): what the server hands in — `database` (its
  `Database`), `launcher` (a `WorkerLauncher`), `access` (the `AuthCache` the proxy shares: token
  answers ALLOWED / DENIED / UNKNOWN_TOKEN per project name) and `project_name(project_id)`.
- `WorkerLauncher` (`dstack.serverless.launcher`), implemented by the server:
  `async start_worker(endpoint_id, worker_id, env: dict[str, str]) -> None` — run the endpoint's
  commands as a job with `env` added; `async stop_worker(endpoint_id, worker_id) -> None`.
  When a worker's job ends for any reason, call `service.on_worker_exited(endpoint_id,
  worker_id, reason)`: the worker takes no new jobs, and its jobs are requeued once it has been
  silent for `ServiceOptions.lost_grace` (2 ping intervals; a report can be wrong, and a live
  worker's jobs must not run twice); after `max_attempts` claims a job is FAILED.
- `ServerlessService(ports, base_url, options: ServiceOptions | None = None)`
  (`dstack.serverless.service`); `base_url` is how workers reach the server, e.g.
  `http://10.0.0.5:3000`. Lifecycle: `await service.start()` at app start-up (reloads endpoints
  and workers, starts the scaler / timeout / TTL / heartbeat / webhook / retention loops) and
  `await service.stop()` at shutdown (workers are left running: they are jobs of the run).
  Inside: `pool.py` (endpoints, workers and their lifecycle), `client_api.py` (`service.client`),
  `worker_protocol.py` (`service.worker`), `scaler.py`, `webhooks.py`.
  - `await register_endpoint(session, endpoint_id, project_id, run_id, settings)` when a
    `type: serverless` run is submitted (`endpoint_id` = run name, unique; the caller commits the
    session); again on a settings change. `await deregister_endpoint(endpoint_id)` when the run
    stops: workers are stopped, the endpoint and its jobs are deleted.
  - `worker_env(endpoint_id, worker_id) -> dict[str, str]`: the RUNPOD_* variables (the
    launcher receives them already; exposed for debugging).
  - `await endpoint_status(endpoint_id) -> {"jobs": {completed, failed, inProgress, inQueue,
    retried, cancelled, timedOut}, "workers": {idle, running, initializing, ready, unhealthy,
    stopping, throttled}}` for `dstack ps`.
- Errors: `ServerlessError(kind, msg, code)` (`errors.py`) carries an `ErrorKind`, never an HTTP
  status; the router answers through `dstack.core.http_errors`, as the control-plane API does.
- HTTP: `app.mount("/v2", dstack.serverless.router.ServerlessApp(lambda: service))`, a raw
  ASGI app (the hot paths skip FastAPI); CORS for these routes is handled by the app itself.
  Uvicorn should be given `timeout_graceful_shutdown` of a few seconds: job-take and job-stop are
  long polls (`ServiceOptions.take_wait`, 20 s).
"""
