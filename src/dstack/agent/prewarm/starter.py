# The body of a job's `python` on serverless workers (see dstack.agent.prewarm). The agent writes
# it into `<venv>/.dstack-prewarm/bin/python` below a header that sets REAL, SOCK and ZYGOTE, with
# a `#!<venv python> -IS` line: stdlib only, no site, so it starts in a few milliseconds.
#
# `python [-u] script.py args...` runs as a fork of the venv's warm zygote when one is up;
# anything else, or no zygote, runs the real interpreter (and starts a zygote for next time).
import array
import json
import os
import signal
import socket
import subprocess
import sys
import time

SPAWN_MARKER_SECONDS = 120


def real_python() -> None:
    os.execv(REAL, [REAL] + sys.argv[1:])  # noqa: F821 (set by the header)


def start_zygote() -> None:
    """Start the venv's zygote in the background, unless one is already being started."""
    marker = SOCK + ".spawn"  # noqa: F821
    try:
        if time.time() - os.stat(marker).st_mtime < SPAWN_MARKER_SECONDS:
            return
        os.unlink(marker)
    except FileNotFoundError:
        pass
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    with open(SOCK + ".log", "ab") as log:  # noqa: F821
        subprocess.Popen(
            [REAL, ZYGOTE, SOCK],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,  # noqa: F821
            env=env,
            start_new_session=True,
            close_fds=True,
        )


def connect() -> socket.socket | None:
    sys.path.insert(0, os.path.dirname(ZYGOTE))  # noqa: F821
    from zygote import site_stamp  # the zygote's own measure of "packages changed"

    venv = os.path.dirname(os.path.dirname(REAL))  # noqa: F821
    try:
        with open(SOCK + ".stamp") as f:  # noqa: F821
            stamp = float(f.read())
        if stamp != site_stamp(venv):
            return None  # packages changed since it started: it retires itself
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(SOCK)  # noqa: F821
        return conn
    except (OSError, ValueError):
        return None


def main() -> None:
    args = sys.argv[1:]
    unbuffered = False
    while args and args[0] == "-u":
        unbuffered, args = True, args[1:]
    if not args or not args[0].endswith(".py") or not os.path.isfile(args[0]):
        real_python()
    conn = connect()
    if conn is None:
        start_zygote()
        real_python()
    request = {"argv": args, "env": dict(os.environ), "cwd": os.getcwd(), "unbuffered": unbuffered}
    fds = array.array("i", [0, 1, 2])
    try:
        conn.sendmsg([json.dumps(request).encode() + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
    except OSError:
        real_python()

    def forward(sig, _frame) -> None:
        try:
            conn.sendall(json.dumps({"signal": sig}).encode() + b"\n")
        except OSError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    buf = b""
    while True:
        try:
            chunk = conn.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            sys.exit(1)  # the zygote went away without a word: report a failure
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if "exit" in msg:
                sys.exit(msg["exit"])
            if "signal" in msg:
                signal.signal(msg["signal"], signal.SIG_DFL)
                os.kill(os.getpid(), msg["signal"])
                sys.exit(128 + msg["signal"])


main()
