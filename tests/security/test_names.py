"""Finding 4 of issue 10: names of runs, projects, users (and repo ids) follow dstack's rule.

Every bad name gets a 4xx whose body states the rule, through the REST API and the CLI, and
nothing is stored under it.
"""

from __future__ import annotations

import uuid

import pytest

from tests.cli.test_cli_e2e import _task, dstack
from tests.security.helpers import BAD_NAMES, create_project, create_user, detail, post, run_names, task_spec

RULE = "lowercase letters, digits and '-', starting with a letter, at most 41 characters"


@pytest.fixture(scope="module")
def bob(server):
    """A plain user with a project of its own (the attacker in these tests)."""
    token = create_user(server, "bob-" + uuid.uuid4().hex[:6])
    project = "bobs-" + uuid.uuid4().hex[:6]
    create_project(server, project, token)
    return token, project


def _refused(resp, status=400) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    return detail(resp)


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_user_name_is_refused_and_not_stored(server, name):
    msg = _refused(post(server, "/api/users/create", {"username": name}))
    assert "invalid user name" in msg and RULE in msg
    users = post(server, "/api/users/list").json()
    assert name not in [u["username"] for u in users]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_project_name_is_refused_and_not_stored(server, bob, name):
    token, _ = bob
    msg = _refused(post(server, "/api/projects/create", {"project_name": name}, token=token))
    assert "invalid project name" in msg and RULE in msg
    projects = post(server, "/api/projects/list").json()
    assert name not in [p["project_name"] for p in projects]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_run_name_is_refused_by_plan_and_submit(server, bob, name):
    token, project = bob
    spec = {**task_spec(), "run_name": name}
    for op in ("get_plan", "submit"):
        resp = post(server, f"/api/project/{project}/runs/{op}", {"run_spec": spec}, token=token)
        if len(name) > 100:  # over the wire model's bound: refused before the service sees it
            assert resp.status_code == 422, resp.text
            assert "run_name" in resp.text
            continue
        msg = _refused(resp)
        assert "invalid run name" in msg and RULE in msg
    assert run_names(server, project, token) == []


@pytest.mark.parametrize("name", ["../x", "A", "a" * 42])
def test_bad_run_name_in_the_configuration_is_refused(server, bob, name):
    token, project = bob
    resp = post(server, f"/api/project/{project}/runs/submit", {"run_spec": task_spec(name=name)}, token=token)
    msg = _refused(resp)
    assert "name" in msg and RULE in msg
    assert run_names(server, project, token) == []


def test_names_at_the_limit_are_accepted(server, bob):
    token, _ = bob
    longest = "u" + "0123456789" * 4  # 41 characters
    assert post(server, "/api/users/create", {"username": longest}).status_code == 200
    project = "p" + uuid.uuid4().hex[:8] + "-x" * 16  # 41 characters
    assert len(project) == 41
    create_project(server, project, token)


@pytest.mark.parametrize("repo_id", ["a/b", "..", "a\nb", "a\\b", "x" * 201, ""], ids=repr)
def test_bad_repo_id_is_refused(server, bob, repo_id):
    token, project = bob
    resp = post(server, f"/api/project/{project}/repos/init", {"repo_id": repo_id, "repo_info": {}}, token=token)
    assert "invalid repo id" in _refused(resp)
    resp = post(server, f"/api/project/{project}/repos/upload_code", raw=b"", token=token, params={"repo_id": repo_id})
    assert "invalid repo id" in _refused(resp)


@pytest.mark.parametrize("name", ["../x", "a;rm -rf ~", "Upper", "a" * 42])
def test_cli_refuses_a_bad_run_name(server, tmp_path, name):
    path = _task(tmp_path, ["echo never"])
    result = dstack(server, "apply", "-f", str(path), "-n", name, "-y", "-d", cwd=path.parent)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "-n/--name: invalid run name" in result.stderr and RULE in result.stderr.replace("\n", " ")
    assert name not in run_names(server, "main")


@pytest.mark.parametrize("name", ["gw\n", "../gw", "GW", "g" * 42, "g/w", "gw\x00"], ids=repr)
def test_bad_gateway_name_is_refused_before_anything_starts(server, name):
    resp = post(server, "/api/project/main/gateways/create", {"name": name, "domain": "example.com", "port": 1})
    msg = _refused(resp)
    assert "invalid gateway name" in msg and RULE in msg
    listed = post(server, "/api/project/main/gateways/list").json()
    assert name not in [g["name"] for g in listed]


@pytest.mark.parametrize("field,value", [("domain", "d" * 300), ("region", "r" * 51), ("backend", "b" * 31)])
def test_gateway_strings_are_bounded(server, field, value):
    body = {"name": "gw-bounded", "domain": "example.com", "port": 1, field: value}
    resp = post(server, "/api/project/main/gateways/create", body)
    assert resp.status_code == 422, resp.text
    assert field in resp.text
