"""dstack's `shell` and `entrypoint` reach the job: on the host and in an image, through a real server.

`shell` (`sh`, `bash`, an absolute path) runs the setup and commands; `entrypoint` runs directly,
without a shell, with the commands as its arguments (dstack's Docker-like form).
"""

import os
import shutil

import pytest

from dstack.api import Resources, RunStatus, Task
from dstack.core.errors import ConfigurationError
from dstack.core.models.configurations import parse_run_configuration
from dstack.server.services.jobs import build_job_spec

SMALL = Resources(cpu=1, memory="0.5GB")


def _task(**fields):
    return parse_run_configuration({"type": "task", "commands": ["true"], **fields})


def test_shell_and_entrypoint_are_validated_and_reach_the_job_spec():
    assert build_job_spec("r", _task(shell="sh"), 0, 0).shell == "sh"
    assert build_job_spec("r", _task(shell="/usr/bin//zsh"), 0, 0).shell == "/usr/bin/zsh"
    spec = build_job_spec("r", _task(entrypoint="python -u"), 0, 0)
    assert spec.entrypoint == "python -u" and spec.shell is None
    assert parse_run_configuration({"type": "task", "entrypoint": "/bin/date"}).commands == []
    bad = [
        ({"shell": "zsh"}, "shell", "absolute path"),
        ({"shell": "/bin/bash -e"}, "shell", "absolute path"),
        ({"entrypoint": "  "}, "entrypoint", "must name a program"),
        ({"entrypoint": "python 'unclosed"}, "entrypoint", "not valid shell words"),
        ({"entrypoint": "python", "setup": ["pip install x"]}, "entrypoint", "setup cannot run"),
        ({"entrypoint": "python", "shell": "sh"}, "shell", "mutually exclusive"),
    ]
    for fields, field, words in bad:
        with pytest.raises(ConfigurationError) as e:
            _task(**fields)
        assert e.value.field == field and words in str(e.value), (fields, str(e.value))
    with pytest.raises(ConfigurationError) as e:
        parse_run_configuration({"type": "dev-environment", "ide": "vscode", "entrypoint": "sleep"})
    assert e.value.field == "entrypoint"


def _run(client, name, tmp_path, **task):
    repo = tmp_path / name
    repo.mkdir()
    run = client.runs.submit(Task(resources=SMALL, **task), run_name=name, repo_dir=repo)
    output = b"".join(run.logs()).decode()
    run.refresh()
    return run, output


def test_host_jobs_run_with_their_shell(client, tmp_path):
    probe = ['echo "bash=${BASH_VERSION:+yes}"']
    run, out = _run(client, "shell-default", tmp_path, commands=probe)
    assert run.status == RunStatus.DONE and out == "bash=yes\n", (run.error, out)
    run, out = _run(client, "shell-sh", tmp_path, shell="sh", commands=probe)
    assert run.status == RunStatus.DONE, (run.error, out)
    if "bash" not in os.path.realpath("/bin/sh"):  # dash, busybox: sh really ran the script
        assert out == "bash=\n"
    run, out = _run(client, "shell-path", tmp_path, shell=shutil.which("bash"), commands=probe)
    assert run.status == RunStatus.DONE and out == "bash=yes\n", (run.error, out)
    run, out = _run(client, "shell-missing", tmp_path, shell="/nonexistent/zsh", commands=["echo never"])
    assert run.status == RunStatus.FAILED and "never" not in out


def test_host_entrypoint_gets_the_commands_as_arguments(client, tmp_path):
    # no shell: the words reach printf as they are (no splitting, no $ expansion)
    run, out = _run(client, "entry-host", tmp_path, entrypoint="printf '%s|%s\\n'", commands=["a b", "$HOME"])
    assert run.status == RunStatus.DONE, (run.error, out)
    assert out == "a b|$HOME\n"


@pytest.fixture(scope="module")
def image():
    from tests.images import ensure_test_image

    return ensure_test_image()  # skips, saying why, without podman


def test_image_jobs_shell_and_entrypoint(client, image, tmp_path):
    run, out = _run(client, "img-sh", tmp_path, image=image, shell="sh", commands=["echo in sh", "exit 0"])
    assert run.status == RunStatus.DONE and out == "in sh\n", (run.error, out)
    # the test image has no bash: shell: bash is honoured, so the job fails
    run, out = _run(client, "img-bash", tmp_path, image=image, shell="bash", commands=["echo never"])
    assert run.status == RunStatus.FAILED and "never" not in out, (run.error, out)
    run, out = _run(client, "img-entry", tmp_path, image=image, entrypoint="/bin/echo from", commands=["a b", "$X"])
    assert run.status == RunStatus.DONE, (run.error, out)
    assert out == "from a b $X\n"
