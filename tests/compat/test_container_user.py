"""dstack's `user`, `home_dir` and `privileged` for image jobs, through a real server and podman.

Host jobs run as the project's own sandbox user, so these settings are refused there by name
(`home_dir: /root`, what dstack's client sends by default, is accepted). `privileged` gives the
container the host's root powers: only a global admin may submit it (403 for anyone else).
"""

import httpx
import pytest

from dstack.api import Client, Resources, RunStatus, Task
from dstack.core.errors import ConfigurationError, ServerClientError
from dstack.core.models.configurations import parse_run_configuration
from dstack.server.services.jobs import build_job_spec

SMALL = Resources(cpu=1, memory="0.5GB")


def test_settings_are_validated_and_refused_for_host_jobs():
    conf = parse_run_configuration(
        {"type": "task", "image": "img", "commands": ["id"], "user": "1000:1000", "home_dir": "/home//u/"}
    )
    spec = build_job_spec("r", conf, 0, 0)
    assert (spec.user, spec.home_dir, spec.privileged) == ("1000:1000", "/home/u", False)
    default_home = parse_run_configuration({"type": "task", "commands": ["id"], "home_dir": "/root"})
    assert build_job_spec("r", default_home, 0, 0).home_dir is None  # the client's default: the image's own
    bad = [
        ({"user": "ubuntu"}, "user", "applies to image jobs"),
        ({"home_dir": "/home/ubuntu"}, "home_dir", "applies to image jobs"),
        ({"privileged": True}, "privileged", "applies to image jobs"),
        ({"image": "img", "user": "bad user"}, "user", "user name or uid"),
        ({"image": "img", "user": "a:b:c"}, "user", "user name or uid"),
        ({"image": "img", "home_dir": "relative/dir"}, "home_dir", "absolute path"),
    ]
    for fields, field, words in bad:
        with pytest.raises(ConfigurationError) as e:
            parse_run_configuration({"type": "task", "commands": ["id"], **fields})
        assert e.value.field == field and words in str(e.value), (fields, str(e.value))


@pytest.fixture(scope="module")
def image():
    from tests.images import ensure_test_image

    return ensure_test_image()  # skips, saying why, without podman


def _run(client, name, tmp_path, **task):
    repo = tmp_path / name
    repo.mkdir()
    run = client.runs.submit(Task(resources=SMALL, **task), run_name=name, repo_dir=repo)
    output = b"".join(run.logs()).decode()
    run.refresh()
    return run, output


def test_image_job_user_and_home_dir(client, image, tmp_path):
    probe = ['echo "$(id -u):$(id -g) $HOME"']
    run, out = _run(client, "as-user", tmp_path, image=image, user="1234:5678", home_dir="/tmp/home", commands=probe)
    assert run.status == RunStatus.DONE, (run.error, out)
    assert out == "1234:5678 /tmp/home\n"
    run, out = _run(client, "as-default", tmp_path, image=image, commands=probe)
    # without them: the image's user (root) and its HOME (this image has no /etc/passwd: podman's "/")
    assert run.status == RunStatus.DONE and out in ("0:0 /\n", "0:0 /root\n"), (run.error, out)


def _caps(out: str) -> int:
    return int(out.split()[1], 16)


def test_privileged_is_for_admins_and_gives_all_capabilities(server, client, image, tmp_path):
    probe = ["grep CapEff /proc/self/status"]
    run, plain = _run(client, "unprivileged", tmp_path, image=image, commands=probe)
    assert run.status == RunStatus.DONE, (run.error, plain)
    run, priv = _run(client, "privileged", tmp_path, image=image, privileged=True, commands=probe)
    assert run.status == RunStatus.DONE, (run.error, priv)
    assert _caps(priv) > _caps(plain) and _caps(priv) & (1 << 21)  # CAP_SYS_ADMIN only when privileged
    assert not _caps(plain) & (1 << 21)

    r = httpx.post(server.url + "/api/users/create", json={"username": "not-admin"}, headers=server.headers)
    assert r.status_code == 200, r.text
    token = r.json()["creds"]["token"]
    r = httpx.post(
        server.url + "/api/projects/create",
        json={"project_name": "not-admin-own"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text
    other = Client.from_config(project_name="not-admin-own", server_url=server.url, user_token=token)
    (tmp_path / "repo").mkdir()
    with pytest.raises(ServerClientError) as e:
        other.runs.submit(
            Task(resources=SMALL, image=image, privileged=True, commands=["true"]), repo_dir=tmp_path / "repo"
        )
    assert e.value.status == 403 and "global admins only" in str(e.value), str(e.value)
