"""The README's main command, start to finish: `examples/quickstart.py` as a new user runs it.

It starts its own `dstack server` (SQLite, local backend) in a fresh home, deploys SmolLM2 with
`CompletionService`, and asks it a question through the openai SDK and through curl. On a CPU
whose llama.cpp kernels crash (the AMX case) the engine never turns ready and this fails.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from tests.conftest import SRC
from tests.util import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def _kill_server_on(port: int) -> None:
    """The script leaves the server (and through it the agent and the model) running: end them all."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "server" in cmdline and "--port" in cmdline and str(port) in cmdline:
            family = [proc, *proc.children(recursive=True)]
            for p in family:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGKILL)
            psutil.wait_procs(family, timeout=30)


def test_readme_main_command(tmp_path):
    port = free_port()
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DSTACK_HOME", None)
    env.pop("DSTACK_SERVER_ADMIN_TOKEN", None)
    try:
        out = subprocess.run(
            [sys.executable, str(SCRIPT), "--port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        _kill_server_on(port)
    log = (
        (tmp_path / "dstack-server.log").read_text(errors="replace")
        if (tmp_path / "dstack-server.log").exists()
        else ""
    )
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}\nserver log tail:\n{log[-4000:]}"
    answers = re.findall(r"^\s+< (.+)$", out.stdout, re.M)
    assert len(answers) == 2 and all(a.strip() for a in answers), out.stdout
    assert f"http://127.0.0.1:{port}/proxy/models/main/v1" in out.stdout
    assert (tmp_path / ".dstack" / "config.yml").exists()
