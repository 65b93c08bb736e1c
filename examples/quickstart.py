"""The README's main command: start `dstack server` on the embedded defaults and run a task on this host.

It starts the server (SQLite under ~/.dstack/server, the local backend) unless one already
answers, submits a task through the Python API, streams its logs, and lists the runs.
"""

import subprocess
import sys
import time

import httpx

from dstack.api import Client, ClientError, Resources, Task

SERVER_URL = "http://127.0.0.1:3000"


def ensure_server() -> subprocess.Popen | None:
    try:
        httpx.get(f"{SERVER_URL}/healthcheck", timeout=2)
        print(f"Using the dstack server already running at {SERVER_URL}")
        return None
    except httpx.HTTPError:
        pass
    print("Starting `dstack server` ...")
    log = open("dstack-server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstack.cli.main", "server", "--port", "3000"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # keeps serving after this script ends
    )
    for _ in range(600):
        try:
            httpx.get(f"{SERVER_URL}/healthcheck", timeout=1)
            time.sleep(0.5)  # the admin config is written right after start-up
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("the server did not start")


def main() -> None:
    server = ensure_server()
    try:
        client = Client.from_config()
    except ClientError as e:
        raise SystemExit(f"Can't connect to the server: {e}")
    task = Task(
        commands=[
            "echo Hello from a dstack task on $(hostname)",
            "python -c 'import sys; print(\"Python\", sys.version.split()[0], \"in\", sys.prefix)'",
            "for i in 1 2 3; do echo step $i; sleep 0.2; done",
        ],
        resources=Resources(cpu=1, memory="1GB"),
    )
    run = client.runs.submit(configuration=task)
    print(f"Submitted run {run.name}; its logs:")
    for chunk in run.logs():
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    run.refresh()
    print(f"Run {run.name} finished: {run.status.value}")
    subprocess.run([sys.executable, "-m", "dstack.cli.main", "ps", "-a"])
    if server is not None:
        print(f"The server keeps running at {SERVER_URL} (pid {server.pid}, log in dstack-server.log); "
              f"stop it with `kill {server.pid}`.")


if __name__ == "__main__":
    main()
