"""Warm starts: a job's `python script.py` forks the venv's zygote, and behaves like python.

The venv is a real one (made with `venv`, no pip) holding a stand-in `runpod` package that
imports a dependency (which notes every process that imports it) and reads its RUNPOD_* env at
import, like the real SDK."""

import os
import signal
import subprocess
import time
import venv
from pathlib import Path

import pytest

from dstack.agent.prewarm import socket_path, with_prewarm_path
from tests.util import alive, wait_until

SDK = """
import os
import heavy_dep  # what the zygote should have imported already
POD = os.environ.get("RUNPOD_POD_ID")
"""
HEAVY = """
import os
with open(os.environ["MARKS"], "a") as f:
    f.write(f"{os.getpid()}\\n")
"""


@pytest.fixture
def warm_venv(tmp_path):
    root = tmp_path / "venv"
    venv.create(root, with_pip=False)
    site = next((root / "lib").glob("python*/site-packages"))
    (site / "runpod").mkdir()
    (site / "runpod" / "__init__.py").write_text(SDK)
    (site / "heavy_dep.py").write_text(HEAVY)
    marks = tmp_path / "marks.txt"
    env = with_prewarm_path({**os.environ, "MARKS": str(marks), "PATH": f"{root / 'bin'}:{os.environ['PATH']}"}, root)
    env.pop("PYTHONPATH", None)
    yield root, env, marks
    sock = socket_path(root)
    subprocess.run(["pkill", "-f", f"zygote.py {sock}"], check=False)


def run(env, cwd, *args, **kw):
    return subprocess.run(["python", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, **kw)


def wait_for_zygote(root: Path, timeout: float = 60) -> None:
    sock = socket_path(root)
    log = Path(str(sock) + ".log")
    try:
        wait_until(sock.exists, timeout, interval=0.1, what="the zygote's socket")
    except AssertionError as e:
        raise AssertionError(f"no zygote: {log.read_text() if log.exists() else ''}") from e


SCRIPT = """
import os, sys, runpod
print("pod", runpod.POD, "argv", sys.argv, "cwd", os.getcwd(), "file", __file__, "pid", os.getpid(), flush=True)
sys.exit(int(os.environ.get("CODE", "0")))
"""


def test_first_start_is_plain_python_then_children_of_the_zygote(warm_venv, tmp_path):
    root, env, marks = warm_venv
    (tmp_path / "w.py").write_text(SCRIPT)
    first = run({**env, "RUNPOD_POD_ID": "w1", "CODE": "3"}, tmp_path, "w.py", "a")
    assert first.returncode == 3, first.stderr
    assert "pod w1 argv ['w.py', 'a']" in first.stdout
    wait_for_zygote(root)
    before = marks.read_text().split()
    second = run({**env, "RUNPOD_POD_ID": "w2", "CODE": "4"}, tmp_path, "-u", "w.py", "b")
    assert second.returncode == 4, second.stderr
    assert f"pod w2 argv ['w.py', 'b'] cwd {tmp_path} file {tmp_path / 'w.py'}" in second.stdout
    # the dependency came preloaded: the worker process did not import it again
    assert marks.read_text().split() == before
    child_pid = int(second.stdout.split("pid ")[1].split()[0])
    assert str(child_pid) not in before


def test_stdin_errors_and_other_forms(warm_venv, tmp_path):
    root, env, _ = warm_venv
    (tmp_path / "noop.py").write_text("pass\n")
    run(env, tmp_path, "noop.py")
    wait_for_zygote(root)
    (tmp_path / "echo.py").write_text("print(input().upper())\n")
    assert run(env, tmp_path, "echo.py", input="hello\n").stdout == "HELLO\n"
    (tmp_path / "boom.py").write_text("raise ValueError('boom')\n")
    r = run(env, tmp_path, "boom.py")
    assert r.returncode == 1 and "ValueError: boom" in r.stderr and "zygote" not in r.stderr
    assert run(env, tmp_path, "-c", "import sys; print(sys.prefix)").stdout.strip() == str(root)


def test_signals_reach_the_worker_and_it_dies_with_its_starter(warm_venv, tmp_path):
    root, env, _ = warm_venv
    (tmp_path / "noop.py").write_text("pass\n")
    run(env, tmp_path, "noop.py")
    wait_for_zygote(root)
    (tmp_path / "trap.py").write_text(
        "import os, signal, sys, time\n"
        # os.write: the signal may land while print() is still flushing the pid line
        "signal.signal(signal.SIGTERM, lambda *a: (os.write(1, b'got term\\n'), sys.exit(7)))\n"
        "print(os.getpid(), flush=True)\ntime.sleep(60)\n"
    )
    p = subprocess.Popen(["python", "trap.py"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    worker = int(p.stdout.readline())
    assert worker != p.pid
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 7
    assert "got term" in p.stdout.read()
    # a helper process the worker forks (as the runpod SDK does for its heartbeat) ends with it
    (tmp_path / "forks.py").write_text(
        "import os, time\npid = os.fork()\nif pid == 0:\n    time.sleep(60)\n    os._exit(0)\n"
        "print(os.getpid(), pid, flush=True)\nos.waitpid(pid, 0)\n"
    )
    for how in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL: nothing can be forwarded
        p = subprocess.Popen(["python", "forks.py"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        pids = [int(x) for x in p.stdout.readline().split()]
        p.send_signal(how)
        p.wait(10)
        wait_until(
            lambda pids=pids: not any(alive(pid) for pid in pids),
            timeout=10,
            what=f"the worker and its helper to end with their starter ({how!r})",
        )


def test_changed_packages_retire_the_zygote(warm_venv, tmp_path):
    root, env, marks = warm_venv
    (tmp_path / "w.py").write_text(SCRIPT)
    run(env, tmp_path, "w.py")
    wait_for_zygote(root)
    site = next((root / "lib").glob("python*/site-packages"))
    (site / "new_pkg.py").write_text("")  # a pip install: the preloaded modules may be stale now
    os.utime(site, (time.time() + 5, time.time() + 5))
    r = run({**env, "RUNPOD_POD_ID": "w9"}, tmp_path, "w.py")
    assert r.returncode == 0 and "pod w9" in r.stdout
    pid = int(r.stdout.split("pid ")[1].split()[0])
    assert str(pid) in marks.read_text().split()  # a plain interpreter: imported everything itself
