"""An engine that crashes never looks ready, is reported by its signal, and does not cycle forever.

The crash is real: the engine's Python (`DSTACK_ENGINE_PYTHON`, which a job's env may set) is a
script that dies of SIGSEGV the way llama.cpp's AMX kernels did at the first decode.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from dstack.api import CompletionService, Resources
from tests.conftest import SRC

pytestmark = pytest.mark.parametrize("server", ["sqlite"], indirect=True)

CRASHING_PYTHON = """#!/bin/sh
echo "loading the model (this engine will crash)"
exec {python} -c 'import ctypes, faulthandler; faulthandler.enable(); ctypes.string_at(0)'
"""


def test_crashing_engine_is_reported_and_the_run_fails_after_bounded_backoff(server):
    # Jobs may run as another user: the script lives where anyone may read and run it.
    folder = tempfile.mkdtemp(prefix="dstack-crashing-engine-")
    try:
        _crash_loop(server, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _crash_loop(server, folder: str) -> None:
    os.chmod(folder, 0o755)
    script = Path(folder) / "crashing-python"
    script.write_text(CRASHING_PYTHON.format(python=sys.executable))
    script.chmod(0o755)
    client = server.client()
    run = client.runs.submit(
        CompletionService(model_name="SmolLM2-135M-Instruct", env={"DSTACK_ENGINE_PYTHON": str(script)}),
        run_name="crashy",
        resources=Resources(cpu="0..1", memory="0.3GB"),
    )
    # While it cycles, the proxy says why there is no replica.
    saw_reason_in_proxy = False
    deadline = time.monotonic() + 240
    while not run.refresh().status.is_finished():
        assert time.monotonic() < deadline, f"still {run.status.value}: {run.error}"
        r = httpx.get(run.service_url + "health", headers=server.headers, timeout=10)
        if r.status_code == 404 and run.refresh().status.is_finished():
            break  # it failed between the two requests: the proxy forgot it
        assert r.status_code in (502, 503), r.text  # never ready
        saw_reason_in_proxy |= "engine crashed: SIGSEGV" in r.text
        time.sleep(0.3)
    assert run.status.value == "failed"
    assert "engine crashed: SIGSEGV" in run.error and "5 times in a row" in run.error, run.error
    assert saw_reason_in_proxy

    submissions = run._run.jobs[0].job_submissions
    assert len(submissions) == 5, [s.status for s in submissions]  # bounded: no endless cycle
    for sub in submissions:
        assert sub.termination_reason_message == "engine crashed: SIGSEGV"
        assert sub.exit_status == 139
    # Backed off: the k-th replacement started at least 2**(k-2) s after the previous crash.
    for k in range(2, 5):
        prev, nxt = submissions[k - 1], submissions[k]
        gap = _ts(nxt.submitted_at) - _ts(prev.finished_at)
        assert gap >= 2 ** (k - 2) - 0.2, (k, gap)

    logs = b"".join(run.logs(follow=False)).decode(errors="replace")
    assert "loading the model" in logs and "Fatal Python error: Segmentation fault" in logs
    assert "dstack: the process killed by SIGSEGV (exit status 139)" in logs

    ps = subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", "ps", "-a"],
        capture_output=True,
        text=True,
        env={**os.environ, **server.env, "PYTHONPATH": SRC, "COLUMNS": "250"},
        timeout=60,
    )
    assert "engine crashed: SIGSEGV" in ps.stdout, ps.stdout + ps.stderr


def _ts(value) -> float:
    return value.timestamp() if isinstance(value, datetime) else datetime.fromisoformat(str(value)).timestamp()
