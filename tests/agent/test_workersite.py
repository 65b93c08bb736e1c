"""dstack's start-up hook for serverless workers (agent.workersite), in real interpreters with
the real runpod==1.12.0: the SDK's JobScaler gets event-driven loops only where it should."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from dstack.agent.workersite import with_worker_site

PROBE = (
    "from runpod.serverless.modules import rp_scale; "
    "print(bool(getattr(rp_scale.JobScaler, 'dstack_event_loops', False)))"
)


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DSTACK_RUNPOD_LOOP")}
    return subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=120
    )


def test_runpod_scaler_gets_event_loops_with_the_hook_only() -> None:
    assert _python(PROBE, with_worker_site({})).stdout.strip() == "True"
    assert _python(PROBE, {}).stdout.strip() == "False"
    assert _python(PROBE, with_worker_site({"DSTACK_RUNPOD_LOOP": "0"})).stdout.strip() == "False"


def test_a_sitecustomize_further_along_the_path_still_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'a').write('theirs ran')\n")
    p = _python(PROBE, with_worker_site({"PYTHONPATH": str(tmp_path)}))
    assert p.stdout.strip() == "True", p.stderr
    assert marker.read_text().startswith("theirs ran")


def test_an_sdk_version_it_was_not_written_for_is_left_alone(tmp_path: Path) -> None:
    pkg = tmp_path / "runpod"
    (pkg / "serverless" / "modules").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "version.py").write_text("__version__ = '2.0.0'\n")
    (pkg / "serverless" / "__init__.py").write_text("")
    (pkg / "serverless" / "modules" / "__init__.py").write_text("")
    (pkg / "serverless" / "modules" / "rp_scale.py").write_text(
        textwrap.dedent("""
        class JobScaler:
            async def get_jobs(self, session): return "stock"
            async def run_jobs(self, session): return "stock"
            def set_scale(self): pass
            def current_occupancy(self): return 0
            def is_alive(self): return True
            async def handle_job(self, session, job): pass
    """)
    )
    env = with_worker_site({"PYTHONPATH": str(tmp_path)})
    p = _python(PROBE, env)
    assert p.stdout.strip() == "False" and p.stderr == ""
