"""Jobs with an image: command lines (unit tests) and real podman containers through the agent's API."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from dstack.agent import containers
from dstack.agent.containers import ContainerRuntime, ContainerSpec
from dstack.agent.launcher import start_agent
from tests.agent.test_agent import TOKEN, _stop_agent, make_tar, pull, run, submit, text, wait_final, wait_gone
from tests.images import DEFAULT_CMD_OUTPUT, ensure_test_image
from tests.util import wait_until

PODMAN = ContainerRuntime("podman", "/usr/bin/podman", "/usr/sbin/runc", ("nofile=1024:1024", "nproc=1024:1024"))
DOCKER = ContainerRuntime("docker", "/usr/bin/docker")


def spec(**kw: Any) -> ContainerSpec:
    base: dict[str, Any] = dict(
        name="dstack-abc-j1",
        job_id="j1",
        image="img:1",
        code_dir=Path("/h/jobs/j1/repo"),
        workdir="/workflow",
        network="host",
    )
    return ContainerSpec(**{**base, **kw})


# -- command lines -------------------------------------------------------------------------------


def test_podman_run_with_script() -> None:
    argv = PODMAN.run_cmd(
        spec(script=Path("/h/jobs/j1/job.sh"), env_by_name=["HF_TOKEN"], env_by_value={"PATH": "/x"}, stop_grace=5)
    )
    assert argv[:4] == ["/usr/bin/podman", "--runtime", "/usr/sbin/runc", "run"]
    joined = " ".join(argv)
    for part in (
        "--rm --name dstack-abc-j1",
        "--ulimit nofile=1024:1024 --ulimit nproc=1024:1024",
        "--network host",
        "-v /h/jobs/j1/repo:/workflow -w /workflow",
        "-v /h/jobs/j1/job.sh:/dstack/job.sh:ro",
        "--env HF_TOKEN --env PATH=/x",
        "--stop-timeout 5",
        "--replace",
        "--init",
    ):
        assert part in joined
    # the script runs with the image's /bin/sh, which picks bash when the image has it
    i = argv.index("--entrypoint")
    assert argv[i:] == ["--entrypoint", "/bin/sh", "img:1", "-c", containers.SHELL_WRAPPER, "/dstack/job.sh"]
    assert "--device" not in argv and "--gpus" not in argv


def test_run_without_commands_uses_image_entrypoint_with_args() -> None:
    argv = PODMAN.run_cmd(spec(args=["--model-id", "m", "--port", "8000"]))
    assert argv[-5:] == ["img:1", "--model-id", "m", "--port", "8000"]
    assert "--entrypoint" not in argv and "/dstack/job.sh:ro" not in " ".join(argv)


def test_isolated_network_joins_the_job_namespace() -> None:
    net = containers.network_arg(Path("/run/netns/dstack-abcd1234"))
    assert net == "ns:/run/netns/dstack-abcd1234"
    assert "--network ns:/run/netns/dstack-abcd1234" in " ".join(PODMAN.run_cmd(spec(network=net)))
    assert containers.network_arg(None) == "host"


def test_gpus_podman_cdi_and_docker() -> None:
    argv = PODMAN.run_cmd(spec(gpus=[0, 2]))
    assert "--device nvidia.com/gpu=0 --device nvidia.com/gpu=2" in " ".join(argv)
    argv = DOCKER.run_cmd(spec(gpus=[0, 2]))
    i = argv.index("--gpus")
    assert argv[i + 1] == '"device=0,2"'
    assert argv[:2] == ["/usr/bin/docker", "run"] and "--replace" not in argv and "--ulimit" not in argv


def test_stop_kill_remove_pull_commands() -> None:
    assert PODMAN.stop_cmd("n", 7.6)[-4:] == ["stop", "-t", "8", "n"]
    assert PODMAN.kill_cmd("n")[-2:] == ["kill", "n"]
    assert PODMAN.remove_cmd("n")[-6:] == ["rm", "-f", "-i", "-t", "0", "n"]
    assert DOCKER.remove_cmd("n") == ["/usr/bin/docker", "rm", "-f", "n"]
    assert PODMAN.image_exists_cmd("i")[-3:] == ["image", "exists", "i"]
    assert DOCKER.image_exists_cmd("i")[1:3] == ["image", "inspect"]
    assert PODMAN.pull_cmd("i")[-3:] == ["pull", "-q", "i"]


def test_private_registry_credentials_reach_the_pull(tmp_path: Path) -> None:
    import base64
    import json
    import stat

    assert containers.registry_host("ghcr.io/org/img:1") == "ghcr.io"
    assert containers.registry_host("localhost:5000/img") == "localhost:5000"
    assert containers.registry_host("library/ubuntu") == containers.registry_host("ubuntu") == "docker.io"
    auth_dir = containers.write_auth(tmp_path / "auth", "ghcr.io/org/img:1", "me", "s3cret")
    path = auth_dir / containers.AUTH_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    auth = json.loads(path.read_text())["auths"]["ghcr.io"]["auth"]
    assert base64.b64decode(auth).decode() == "me:s3cret"
    assert PODMAN.pull_cmd("i", auth_dir)[-4:] == ["-q", "--authfile", str(path), "i"]
    assert DOCKER.pull_cmd("i", auth_dir) == ["/usr/bin/docker", "--config", str(auth_dir), "pull", "-q", "i"]


def test_workdir_env_split_and_names(tmp_path: Path) -> None:
    assert containers.container_workdir(None) == "/workflow"
    assert containers.container_workdir("sub/dir/") == "/workflow/sub/dir"
    assert containers.container_workdir("/opt/app") == "/opt/app"
    by_name, by_value = containers.split_env({"HF_TOKEN": "s", "PATH": "/p", "DOCKER_HOST": "x", "GOOGLE_KEY": "k"})
    assert by_name == ["HF_TOKEN", "GOOGLE_KEY"] and by_value == {"PATH": "/p", "DOCKER_HOST": "x"}
    a, b = containers.container_name(tmp_path / "a", "j1"), containers.container_name(tmp_path / "b", "j1")
    assert a != b and a.endswith("-j1") and a == containers.container_name(tmp_path / "a", "j1")


def test_pull_error_keeps_the_runtime_error_line() -> None:
    stderr = 'Trying to pull x...\ntime="..." level=warning msg="Failed, retrying"\nError: initializing source: no such host\n'
    assert containers.pull_error(stderr) == "Error: initializing source: no such host"
    assert containers.pull_error("") == "the pull failed with no message"


def test_detection(tmp_path: Path) -> None:
    assert containers.detect({"DSTACK_CONTAINER_RUNTIME": "none"}) is None
    assert "disabled" in containers.why_unavailable({"DSTACK_CONTAINER_RUNTIME": "none"})
    broken = tmp_path / "docker"  # a docker CLI without a daemon: `docker version` fails
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    assert containers.detect({"DSTACK_CONTAINER_RUNTIME": str(broken)}) is None
    fake = tmp_path / "podman"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    rt = containers.detect(
        {
            "DSTACK_CONTAINER_RUNTIME": str(fake),
            "DSTACK_CONTAINER_OCI_RUNTIME": "default",
            "DSTACK_CONTAINER_ULIMITS": "nofile=10:20, nproc=5:5",
        }
    )
    assert rt == ContainerRuntime("podman", str(fake), None, ("nofile=10:20", "nproc=5:5"))
    assert rt.global_args == [str(fake)]


def test_default_ulimits_are_the_agents_own() -> None:
    import resource

    limits = dict(item.split("=") for item in containers.default_ulimits())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        assert limits["nofile"] == f"{soft}:{hard}"
    s, h = (int(x) for x in limits["nproc"].split(":"))
    assert s <= h


# -- real containers through the agent -------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> str:
    return ensure_test_image()


def wait_for_output(client: httpx.Client, job_id: str, needle: str, timeout: float = 30) -> None:
    deadline, cursor, seen = time.monotonic() + timeout, 0, ""
    while time.monotonic() < deadline:
        resp = pull(client, job_id, cursor, wait=2)
        cursor = resp["next_cursor"]
        seen += text(resp["logs"], None)
        if needle in seen:
            return
        assert resp["state"] not in ("done", "failed", "terminated", "aborted"), (resp, seen)
    raise AssertionError(f"{needle!r} not printed by {job_id}: {seen!r}")


def test_host_reports_containers(client: httpx.Client, image: str) -> None:
    host = client.get("/api/host").json()
    assert host["containers"] is True and host["container_runtime"] == "podman"


def test_image_job_env_code_and_shell(client: httpx.Client, image: str) -> None:
    code = make_tar({"hello.txt": b"hello from code\n"})
    commands = [
        'echo "MY=$MY_VAR"',
        'echo "SEC=$SECRET_TOKEN"',
        'echo "SETUP=$FROM_SETUP"',
        "cat hello.txt",
        "pwd",
        'echo "bash=${BASH_VERSION:-none}"',
        "test -x /bin/busybox && echo in-image",
    ]
    resp, records = run(
        client,
        commands,
        code=code,
        image=image,
        setup=["export FROM_SETUP=1"],
        env={"MY_VAR": "x y", "SECRET_TOKEN": "s3cr3t"},
    )
    assert resp["state"] == "done" and resp["exit_status"] == 0, (resp, text(records, None))
    assert text(records).splitlines() == [
        "MY=x y",
        "SEC=s3cr3t",
        "SETUP=1",
        "hello from code",
        "/workflow",
        "bash=none",
        "in-image",
    ]


def test_image_job_working_dir(client: httpx.Client, image: str) -> None:
    code = make_tar({"top.txt": b"top\n", "sub/dir/inner.txt": b"inner\n"})
    resp, records = run(
        client, ["cat inner.txt", "cat ../../top.txt", "pwd"], code=code, image=image, working_dir="sub/dir"
    )
    assert resp["state"] == "done", text(records, None)
    assert text(records).splitlines() == ["inner", "top", "/workflow/sub/dir"]


def test_image_job_nonzero_exit(client: httpx.Client, image: str) -> None:
    resp, records = run(client, ["echo before", "exit 3", "echo never"], image=image)
    assert resp["state"] == "failed" and resp["exit_status"] == 3, resp
    assert resp["message"] == "exited with status 3"
    assert text(records) == "before\n"


def test_image_entrypoint_without_commands(client: httpx.Client, image: str) -> None:
    resp, records = run(client, [], image=image)
    assert resp["state"] == "done", (resp, text(records, None))
    assert text(records) == DEFAULT_CMD_OUTPUT + "\n"
    resp, records = run(client, [], image=image, args=["/bin/echo", "from args"])
    assert text(records) == "from args\n"


def test_image_job_stop_is_terminated(client: httpx.Client, image: str) -> None:
    job_id = submit(client, ["trap 'echo got-term; exit 0' TERM", "echo started", "sleep 60 & wait"], image=image)
    wait_for_output(client, job_id, "started")
    client.post(f"/api/jobs/{job_id}/stop", json={})
    resp, records = wait_final(client, job_id)
    assert resp["state"] == "terminated", resp
    assert "got-term" in text(records)
    assert resp["message"] == "stopped on request (SIGTERM)"


def test_image_job_killed_after_grace(client: httpx.Client, image: str) -> None:
    job_id = submit(
        client, ["trap '' TERM", "echo started", "while true; do sleep 0.1; done"], image=image, stop_grace_seconds=1
    )
    wait_for_output(client, job_id, "started")
    t0 = time.monotonic()
    client.post(f"/api/jobs/{job_id}/stop", json={})
    resp, _ = wait_final(client, job_id)
    assert resp["state"] == "terminated" and resp["exit_status"] == 137, resp
    assert "grace" in resp["message"] and time.monotonic() - t0 >= 0.9


def test_image_job_abort(client: httpx.Client, image: str) -> None:
    job_id = submit(client, ["echo started", "sleep 60"], image=image)
    wait_for_output(client, job_id, "started")
    client.post(f"/api/jobs/{job_id}/stop", json={"abort": True})
    resp, _ = wait_final(client, job_id)
    assert resp["state"] == "aborted" and resp["exit_status"] == 137, resp
    assert resp["message"] == "aborted on request (SIGKILL)"


def test_missing_image_fails_clearly(client: httpx.Client, image: str) -> None:
    resp, _ = run(client, ["true"], image="registry.invalid/dstack/no-such-image:1")
    assert resp["state"] == "failed", resp
    msg = resp["message"]
    assert msg.startswith("cannot pull image 'registry.invalid/dstack/no-such-image:1' with podman: Error"), msg


def test_isolated_image_job_serves_on_its_address(client: httpx.Client, image: str) -> None:
    host = client.get("/api/host").json()
    if not host["network_isolation"]:
        pytest.skip("network isolation is unavailable here (needs root and iproute2)")
    code = make_tar({"hello.txt": b"served from the container\n"})
    job_id = submit(
        client,
        ["echo started", "exec httpd -f -p 8080 -h /workflow"],
        code=code,
        image=image,
        network="isolated",
        ports=[8080],
    )
    wait_for_output(client, job_id, "started")
    address = pull(client, job_id)["address"]
    assert address and address != "127.0.0.1"
    last: list[httpx.Response | Exception] = [AssertionError("not asked yet")]

    def served() -> bool:
        try:
            last[0] = httpx.get(f"http://{address}:8080/hello.txt", timeout=2)
            return last[0].status_code == 200
        except httpx.HTTPError as e:
            last[0] = e
            return False

    try:
        wait_until(served, timeout=15, interval=0.1, what=f"the container's server at {address}:8080")
    except AssertionError as e:
        raise AssertionError(f"{e}; last answer: {last[0]!r}") from None
    assert isinstance(last[0], httpx.Response) and last[0].text == "served from the container\n", last[0]
    client.post(f"/api/jobs/{job_id}/stop", json={"abort": True})
    assert wait_final(client, job_id)[0]["state"] == "aborted"


def _container_exists(name: str) -> bool:
    return subprocess.run(["podman", "container", "exists", name]).returncode == 0


def test_delete_removes_the_container(client: httpx.Client, image: str, home: Path) -> None:
    job_id = submit(client, ["echo started", "sleep 60"], image=image)
    wait_for_output(client, job_id, "started")
    name = containers.container_name(home, job_id)
    assert _container_exists(name)
    assert client.delete(f"/api/jobs/{job_id}").status_code == 200
    assert not _container_exists(name)


def test_restarted_agent_removes_its_container(tmp_path: Path, image: str) -> None:
    home = tmp_path / "agent-home"
    info = start_agent(home, TOKEN)
    try:
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            job_id = submit(c, ["echo started", "sleep 60"], image=image, job_id=f"r-{uuid.uuid4().hex[:8]}")
            wait_for_output(c, job_id, "started")
        name = containers.container_name(home, job_id)
        assert _container_exists(name)
        os.kill(info.pid, signal.SIGKILL)  # the agent dies; its container does not
        wait_gone(info.pid)
        assert _container_exists(name)
        info = start_agent(home, TOKEN)
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            resp = pull(c, job_id)
        assert resp["state"] == "failed" and resp["message"] == "agent restarted", resp
        assert not _container_exists(name)
    finally:
        _stop_agent(info)


def test_pull_with_credentials_fails_clearly_and_leaves_no_secret(client: httpx.Client, image: str, home: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: the pull is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job_id = submit(
        client,
        ["true"],
        image=f"127.0.0.1:{port}/private:1",
        registry_auth={"username": "me", "password": "s3cret-value"},
    )
    resp, _ = wait_final(client, job_id, timeout=60)
    assert resp["state"] == "failed" and "cannot pull image" in resp["message"], resp
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 1_000_000:
            assert b"s3cret-value" not in path.read_bytes(), path  # neither the state file nor an auth file


def test_stop_during_a_pull_ends_it(client: httpx.Client, image: str) -> None:
    import socket

    with socket.socket() as registry:  # accepts connections and never answers: the pull hangs
        registry.bind(("127.0.0.1", 0))
        registry.listen(8)
        port = registry.getsockname()[1]
        job_id = submit(client, ["true"], image=f"127.0.0.1:{port}/hangs:1")
        registry.settimeout(10)
        puller, _ = registry.accept()  # the pull is under way: it connected to the registry
        with puller:
            assert pull(client, job_id)["state"] == "preparing"
            t0 = time.monotonic()
            client.post(f"/api/jobs/{job_id}/stop", json={})
            resp, _ = wait_final(client, job_id, timeout=10)
    assert resp["state"] == "terminated" and resp["message"] == "stopped before the process started", resp
    assert time.monotonic() - t0 < 5
