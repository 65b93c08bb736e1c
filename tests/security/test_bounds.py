"""Finding 5 (and the parse-time half of 1) of issue 10: numbers and bodies are bounded.

Huge integers, infinities, absurd durations and malformed bodies get a 4xx that names the
field, never a 500, and no run is stored.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.security.helpers import create_project, create_user, detail, post, raw_json, run_names, task_spec


@pytest.fixture(scope="module")
def carol(server):
    token = create_user(server, "carol-" + uuid.uuid4().hex[:6])
    project = "carols-" + uuid.uuid4().hex[:6]
    create_project(server, project, token)
    return token, project


BAD_CONFIGURATIONS = [
    ({"retry": {"on_events": ["error"], "duration": "99999999999w"}}, "retry.duration", "too long"),
    ({"retry": {"on_events": ["error"], "duration": 10**30}}, "retry.duration", "too long"),
    ({"max_duration": "1000000d"}, "max_duration", "too long"),
    ({"max_duration": float("inf")}, "max_duration", "invalid duration"),
    ({"resources": {"memory": float("inf")}}, "resources.memory", "finite"),
    ({"resources": {"memory": "9" * 400 + "GB"}}, "resources.memory", "invalid memory size"),
    ({"resources": {"disk": 10**30}}, "resources.disk", "finite"),
    ({"resources": {"cpu": 10**30}}, "resources.cpu", "out of bounds"),
    ({"resources": {"gpu": {"count": 10**30}}}, "resources.gpu.count", "out of bounds"),
    ({"resources": {"gpu": {"compute_capability": 10**30}}}, "compute_capability", "invalid compute capability"),
    ({"nodes": 10**30}, "nodes", "less than or equal to 1000"),
    ({"max_price": float("inf")}, "max_price", "finite"),
    ({"max_price": 10**30}, "max_price", "less than or equal"),
]


@pytest.mark.parametrize("conf,field,words", BAD_CONFIGURATIONS, ids=lambda v: v if isinstance(v, str) else None)
def test_out_of_bounds_configuration_is_a_400_naming_the_field(server, carol, conf, field, words):
    token, project = carol
    for op in ("get_plan", "submit"):
        resp = post(
            server, f"/api/project/{project}/runs/{op}", raw=raw_json({"run_spec": task_spec(**conf)}), token=token
        )
        assert resp.status_code == 400, (op, resp.status_code, resp.text)
        msg = detail(resp)
        assert field in msg and words in msg, msg
    assert run_names(server, project, token) == []


@pytest.mark.parametrize(
    "conf,field",
    [
        ({"type": "service", "port": 80, "replicas": "0..2", "scaling": {"target": float("inf")}}, "scaling.target"),
        ({"type": "service", "port": 80, "request_hold_timeout": 10**30}, "request_hold_timeout"),
        ({"type": "serverless", "execution_timeout": 1e300}, "execution_timeout"),
        ({"type": "serverless", "scaler": {"value": float("nan")}}, "scaler.value"),
    ],
)
def test_out_of_bounds_service_and_serverless_fields(server, carol, conf, field):
    token, project = carol
    resp = post(
        server, f"/api/project/{project}/runs/submit", raw=raw_json({"run_spec": task_spec(**conf)}), token=token
    )
    assert resp.status_code == 400, resp.text
    assert field in detail(resp)
    assert run_names(server, project, token) == []


def test_apply_without_a_run_spec_is_a_422(server, carol):
    token, project = carol
    for body in ({"plan": {}}, {"plan": {"run_spec": {}}}, {"plan": None}, {}):
        resp = post(server, f"/api/project/{project}/runs/apply", body, token=token)
        assert resp.status_code == 422, (body, resp.text)
        assert "plan" in str(resp.json()["detail"])
    assert run_names(server, project, token) == []


@pytest.mark.parametrize(
    "path,body",
    [
        ("runs/list", {"limit": 10**30}),
        ("runs/list", {"limit": -1}),
        ("logs/poll", {"run_name": "x", "start_after": 10**30}),
        ("logs/poll", {"run_name": "x", "job_num": 10**30}),
        ("logs/poll", {"run_name": "x", "replica_num": -(10**30)}),
        ("logs/poll", {"run_name": "x", "wait": float("inf")}),
    ],
)
def test_huge_numbers_in_request_bodies_are_a_422(server, carol, path, body):
    token, project = carol
    resp = post(server, f"/api/project/{project}/{path}", raw=raw_json(body), token=token)
    assert resp.status_code == 422, resp.text
    field = next(iter(k for k in body if k != "run_name"))
    assert field in str(resp.json()["detail"])


def test_unparseable_bodies_are_4xx(server, carol):
    token, project = carol
    for raw in (b"{", b"[" * 100_000 + b"]" * 100_000, b'{"limit": ' + b"9" * 5000 + b"}", b"\xff\xfe"):
        resp = post(server, f"/api/project/{project}/runs/list", raw=raw, token=token)
        assert 400 <= resp.status_code < 500, (raw[:20], resp.status_code, resp.text)


@pytest.fixture(scope="module")
def endpoint(server, carol):
    """A serverless endpoint with no workers until a job arrives."""
    token, project = carol
    name = "ep-" + uuid.uuid4().hex[:6]
    spec = {**task_spec(type="serverless", workers="0..1"), "run_name": name}
    resp = post(server, f"/api/project/{project}/runs/submit", {"run_spec": spec}, token=token)
    assert resp.status_code == 200, resp.text
    yield name
    post(server, f"/api/project/{project}/runs/stop", {"runs_names": [name], "abort": True}, token=token)


@pytest.mark.parametrize(
    "policy",
    [
        {"executionTimeout": 1e300},
        {"ttl": 1e300},
        {"ttl": 10**30},
        {"executionTimeout": 10**400},
        {"ttl": float("inf")},
        {"executionTimeout": 0},
        {"ttl": "1"},
    ],
    ids=str,
)
def test_serverless_policy_out_of_bounds_is_a_400(server, carol, endpoint, policy):
    import httpx

    token, _ = carol
    body = raw_json({"input": {"x": 1}, "policy": policy})
    resp = httpx.post(
        f"{server.url}/v2/{endpoint}/run",
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 400, resp.text
    assert "policy." in detail(resp)
    health = httpx.get(f"{server.url}/v2/{endpoint}/health", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert health.status_code == 200
    assert health.json()["jobs"]["inQueue"] == 0


def test_serverless_deeply_nested_body_is_a_400(server, carol, endpoint):
    import httpx

    token, _ = carol
    body = b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = httpx.post(
        f"{server.url}/v2/{endpoint}/run", content=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert resp.status_code == 400, resp.text


def test_the_server_still_answers(server, carol):
    """After everything above: no pass of the pipeline died on a stored bad value."""
    token, project = carol
    deadline = time.time() + 10
    while time.time() < deadline:
        assert post(server, "/api/users/get_my_user", token=token).status_code == 200
        time.sleep(1)  # it keeps answering for 10 s: the duration is what is checked
    assert "Traceback" not in server.logs(tail=200_000)


@pytest.mark.parametrize(
    "conf,field",
    [
        ({"image": "x" * 3000, "commands": []}, "image"),
        ({"working_dir": "w" * 5000}, "working_dir"),
        ({"registry_auth": {"username": "u", "password": "p" * 70_000}, "image": "x"}, "registry_auth.password"),
        ({"engine": {"model_name": "m" * 3000}, "commands": []}, "engine.model_name"),
    ],
)
def test_long_strings_in_the_configuration_are_refused(server, carol, conf, field):
    token, project = carol
    before = run_names(server, project, token)
    resp = post(server, f"/api/project/{project}/runs/submit", {"run_spec": task_spec(**conf)}, token=token)
    assert resp.status_code == 400, resp.text
    assert field in detail(resp) and "at most" in detail(resp)
    assert run_names(server, project, token) == before


def test_yaml_retry_duration_out_of_bounds_names_file_line_and_field(tmp_path):
    from dstack.core.errors import ConfigurationError
    from dstack.core.yaml_loader import load_configuration

    path = tmp_path / ".dstack.yml"
    for duration in ("99999999999w", str(10**30)):
        path.write_text(f"type: task\ncommands: [echo]\nretry:\n  on_events: [error]\n  duration: {duration}\n")
        with pytest.raises(ConfigurationError) as err:
            load_configuration(path)
        assert err.value.field == "retry.duration" and err.value.line == 5
        assert str(err.value).startswith(f"{path}:5: retry.duration: duration") and "too long" in str(err.value)
