"""The main test server: one real server process with several endpoints, shared by the module
tests. RUNPOD_ENDPOINT_BASE_URL is set here, before any test module imports runpod."""

import os

import pytest

from .helpers import Server, endpoint, free_port

MAIN_PORT = free_port()
os.environ["RUNPOD_ENDPOINT_BASE_URL"] = f"http://127.0.0.1:{MAIN_PORT}/v2"

MAIN_ENDPOINTS = {
    "ep-sync": endpoint("sync_worker.py", 1, 1),
    "ep-async": endpoint("async_worker.py", 1, 1, env={"WORKER_CONCURRENCY": "4"}),
    "ep-stock": endpoint("async_worker.py", 1, 1, env={"WORKER_CONCURRENCY": "4", "DSTACK_RUNPOD_LOOP": "0"}),
    "ep-gen": endpoint("gen_worker.py", 1, 1),
    "ep-agen": endpoint("agen_worker.py", 1, 1),
    "ep-timeout": endpoint("async_worker.py", 0, 1, idle_timeout=2),
    "ep-idle": endpoint("async_worker.py", 0, 1),
    "ep-scale": endpoint(
        "async_worker.py",
        0,
        3,
        env={"WORKER_CONCURRENCY": "1"},
        idle_timeout=1,
        scaler_type="request_count",
        scaler_value=2,
    ),
}


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("main"), MAIN_ENDPOINTS, port=MAIN_PORT).start()
    yield srv
    srv.close()
