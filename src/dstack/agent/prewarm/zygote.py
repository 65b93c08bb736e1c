"""A pre-warmed interpreter for serverless workers: imports once, forks per worker.

Run with a job venv's own Python (stdlib only: dstack is not installed there):
    <venv>/bin/python zygote.py SOCKET_PATH

A RunPod-style worker spends most of its start importing: the SDK pulls in aiohttp, paramiko,
requests, ... and probes the CPU in a subprocess (py-cpuinfo), about 2 s on a small host. This
process does that work once and then forks a child per worker start request, so a worker that
scales up from zero starts in a fraction of the time (the idea of RunPod's FlashBoot, done with
fork). The SDK package itself is *not* imported here: it reads the worker's RUNPOD_* environment
at import, so each child imports it fresh with its own environment.

Protocol on the unix socket (one connection per worker start): the client sends one JSON line
`{"argv": [...], "env": {...}, "cwd": "..."}` with its stdin/stdout/stderr attached (SCM_RIGHTS);
the zygote answers `{"pid": N}`, later `{"exit": CODE}` (or `{"signal": SIG}`), and closes. The
client writes `{"signal": SIG}` lines to forward signals; when the connection drops the child is
killed, so a worker never outlives the job that started it.
"""

import array
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

IDLE_EXIT_SECONDS = float(os.environ.get("DSTACK_ZYGOTE_IDLE_SECONDS", "1800"))
# What a RunPod worker imports, found by importing the SDK in a throwaway child.
SDK_PACKAGE = "runpod"


def site_stamp(prefix: str) -> float:
    """Newest mtime of the venv's site-packages: a change means its packages changed (the
    starter computes the same from outside to spot a zygote that has gone stale)."""
    import glob

    return max(
        [0.0] + [os.stat(p).st_mtime for p in glob.glob(os.path.join(prefix, "lib", "python*", "site-packages"))]
    )


def sdk_import_closure() -> list[str]:
    """Modules that `import runpod` loads, minus runpod's own (learned in a clean child)."""
    code = (
        "import json, sys\nbefore = set(sys.modules)\n"
        f"import {SDK_PACKAGE}\n"
        "print(json.dumps([m for m in sys.modules if m not in before]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        names = json.loads(out.stdout) if out.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        names = []
    return [n for n in names if n != SDK_PACKAGE and not n.startswith(SDK_PACKAGE + ".") and n != "__main__"]


def preload() -> int:
    loaded = 0
    for name in sdk_import_closure():
        try:
            __import__(name)
            loaded += 1
        except BaseException:  # some modules only import as a side effect of others; skip them
            pass
    _memoize_cpu_probe()
    return loaded


def _memoize_cpu_probe() -> None:
    """py-cpuinfo re-runs itself in a new interpreter on every call (~1 s); the answer cannot
    change on this host, so children get the result probed here."""
    mod = sys.modules.get("cpuinfo.cpuinfo")
    if mod is None or not hasattr(mod, "get_cpu_info_json"):
        return
    probed = mod.get_cpu_info_json()
    mod.get_cpu_info_json = lambda: probed


def recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data = b""
    while not data.endswith(b"\n"):
        msg, anc, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(3 * fds.itemsize))
        if not msg:
            raise ConnectionError("client went away before its request")
        data += msg
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return json.loads(data), list(fds)


def send(conn: socket.socket, obj: dict) -> None:
    try:
        conn.sendall(json.dumps(obj).encode() + b"\n")
    except OSError:
        pass


def run_child(conn: socket.socket, listener: socket.socket, req: dict, fds: list[int]) -> None:
    """In the forked child: become the requested `python [-u] script.py args...` and never return."""
    code = 1
    try:
        listener.close()
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.set_wakeup_fd(-1)
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        _reopen_stdio(unbuffered=bool(os.environ.get("PYTHONUNBUFFERED")) or req.get("unbuffered", False))
        _watch_connection(conn)
        sys.argv = list(req["argv"])
        run_as_main(os.path.abspath(sys.argv[0]))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:
        import traceback

        tb = e.__traceback__  # as a plain `python script.py` shows it: from the script's frame on
        while tb is not None and (
            tb.tb_frame.f_code.co_filename == __file__ or tb.tb_frame.f_code.co_filename.startswith("<frozen runpy")
        ):
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb)
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(code)


def run_as_main(path: str) -> None:
    """What `python path` does: a fresh `__main__` (absolute `__file__`), the script's directory
    first on sys.path, argv left as given."""
    import builtins
    import importlib.machinery
    import types

    sys.path[0] = os.path.dirname(path)
    main = types.ModuleType("__main__")
    main.__dict__.update(
        __file__=path,
        __builtins__=builtins,
        __cached__=None,
        __loader__=importlib.machinery.SourceFileLoader("__main__", path),
    )
    sys.modules["__main__"] = main
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    exec(code, main.__dict__)


def _reopen_stdio(unbuffered: bool) -> None:
    import io

    def text(fd: int, mode: str):
        raw = io.FileIO(fd, mode, closefd=False)
        if "r" in mode:
            return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8", errors="replace")
        buffered = io.BufferedWriter(raw)
        return io.TextIOWrapper(
            buffered,
            encoding="utf-8",
            errors="backslashreplace",
            write_through=unbuffered,
            line_buffering=not unbuffered and raw.isatty(),
        )

    sys.stdin, sys.stdout, sys.stderr = text(0, "r"), text(1, "w"), text(2, "w")
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


def _watch_connection(conn: socket.socket) -> None:
    """Forwarded signals arrive on the connection; its end means the starter is gone. The
    worker leads its own process group (a fork cannot join the job's), so signals go to that
    whole group, as the agent's go to the job's: helpers it forked (the SDK's heartbeat
    process) stop with it."""
    import threading

    def watch() -> None:
        buf = b""
        while True:
            try:
                chunk = conn.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                os.killpg(0, signal.SIGKILL)
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    sig = int(json.loads(line)["signal"])
                except (ValueError, KeyError, TypeError):
                    continue
                os.killpg(0, sig)

    threading.Thread(target=watch, name="dstack-zygote-watch", daemon=True).start()


def serve(sock_path: str) -> None:
    venv = sys.prefix
    stamp = site_stamp(venv)
    loaded = preload()
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path + ".tmp")
    os.chmod(sock_path + ".tmp", 0o600)
    listener.listen(64)
    os.rename(sock_path + ".tmp", sock_path)  # clients see it only once it accepts
    with open(sock_path + ".stamp", "w") as f:
        f.write(repr(stamp))
    try:
        os.unlink(sock_path + ".spawn")  # the starters' "being started" marker
    except FileNotFoundError:
        pass
    print(f"zygote {os.getpid()} ready: {loaded} modules preloaded", flush=True)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    last_used = time.monotonic()
    retiring = False
    while not (retiring and not children):
        for key, _ in sel.select(timeout=30):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                last_used = time.monotonic()
                try:
                    req, fds = recv_request(conn)
                except (OSError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    run_child(conn, listener, req, fds)
                for fd in fds:
                    os.close(fd)
                send(conn, {"pid": pid})
                children[pid] = conn
            else:
                os.read(wake_r, 4096)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                if os.WIFSIGNALED(status):
                    send(conn, {"signal": os.WTERMSIG(status)})
                else:
                    send(conn, {"exit": os.WEXITSTATUS(status)})
                conn.close()
        idle = not children and time.monotonic() - last_used > IDLE_EXIT_SECONDS
        stale = not os.path.isdir(venv) or site_stamp(venv) != stamp or not os.path.exists(sock_path)
        if (idle or stale) and not retiring:
            # Take no new workers (they start the usual way); wait for the running ones.
            retiring = True
            sel.unregister(listener)
            listener.close()
            for path in (sock_path, sock_path + ".stamp"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass


if __name__ == "__main__":
    serve(sys.argv[1])
