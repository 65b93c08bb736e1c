"""dstack's `files:`: extra local paths travel with the run's code and appear at their job paths."""

import io
import os
import tarfile

import httpx
import pytest

from dstack.api import Resources, RunStatus, Task
from dstack.api.code import CodeTooLargeError, archive_code
from dstack.core.errors import ConfigurationError
from dstack.core.models.configurations import parse_run_configuration


def _files(value):
    return parse_run_configuration({"type": "task", "commands": ["true"], "files": value}).files


def test_files_entries_parse_or_are_refused_by_name():
    got = _files(["data", "../cfg:configs", "~/.netrc:/workflow/.netrc", {"local_path": "/a/b", "path": "x/y/"}])
    assert [(f.local_path, f.path) for f in got] == [
        ("data", "data"),
        ("../cfg", "configs"),
        ("~/.netrc", ".netrc"),
        ("/a/b", "x/y"),
    ]
    assert _files(None) == [] and _files([]) == []
    bad = [
        (["~/.netrc"], "give its job path"),
        (["../up"], "give its job path"),
        (["a:/etc/passwd"], "not supported yet"),
        (["a:../../x"], "inside the repo directory"),
        (["a:"], "local_path:path"),
        ([{"local_path": "a"}], "path"),
        ("a", "must be a list"),
        ([f"f{i}" for i in range(101)], "at most 100"),
    ]
    for value, words in bad:
        with pytest.raises(ConfigurationError) as e:
            _files(value)
        assert e.value.field and e.value.field.startswith("files") and words in str(e.value), (value, str(e.value))


def test_files_are_packed_into_the_code_archive(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "a.txt").write_text("repo\n")
    (tmp_path / "cfg" / "sub").mkdir(parents=True)
    (tmp_path / "cfg" / "sub" / "run.yaml").write_text("lr: 1\n")
    (tmp_path / "token").write_text("t\n")
    blob, _ = archive_code(tmp_path / "repo", files=[(tmp_path / "cfg", "configs"), (tmp_path / "token", "t/tok")])
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert sorted(tar.getnames()) == ["a.txt", "configs/sub/run.yaml", "t/tok"]
    # the files count against the code's size limit
    (tmp_path / "big").write_bytes(os.urandom(300_000))
    with pytest.raises(CodeTooLargeError, match="big"):
        archive_code(tmp_path / "repo", max_size=100_000, files=[(tmp_path / "big", "big")])


def test_a_task_reads_its_files(client, server, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "main.txt").write_text("code\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text("lr: 0.1\n")
    (tmp_path / "netrc").write_text("machine example\n")
    conf_path = ".dstack.yml"  # relative to repo_dir, as the CLI gives it: `../configs` is beside repo
    task = Task(
        commands=["cat main.txt configs/run.yaml home/.netrc"],
        files=["../configs:configs", f"{tmp_path / 'netrc'}:/workflow/home/.netrc"],
        resources=Resources(cpu=1, memory="0.5GB"),
    )
    run = client.runs.submit(task, run_name="with-files", repo_dir=repo, configuration_path=conf_path)
    out = b"".join(run.logs()).decode()
    run.refresh()
    assert run.status == RunStatus.DONE, (run.error, out)
    assert out == "code\nlr: 0.1\nmachine example\n"

    # a client that did not pack them (dstack's own uploads them elsewhere) is refused, not ignored
    spec = {"run_spec": {"configuration": {"type": "task", "commands": ["true"], "files": ["a:b"]}}}
    r = httpx.post(f"{server.url}/api/project/main/runs/submit", json=spec, headers=server.headers)
    assert r.status_code == 400 and "files" in r.text, r.text
