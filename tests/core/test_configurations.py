"""Run configuration models: every accepted form normalises to one shape."""

import pytest
from pydantic import TypeAdapter, ValidationError

from dstack.core.errors import ConfigurationError
from dstack.core.models.common import PortMapping, format_duration, parse_duration, parse_env
from dstack.core.models.configurations import (
    AnyRunConfiguration,
    DevEnvironmentConfiguration,
    Serverless,
    ServerlessConfiguration,
    Service,
    ServiceConfiguration,
    Task,
    TaskConfiguration,
    parse_run_configuration,
)


def task(**fields):
    return parse_run_configuration({"type": "task", "commands": ["echo hi"], **fields})


def service(**fields):
    return parse_run_configuration({"type": "service", "commands": ["serve"], "port": 8000, **fields})


@pytest.mark.parametrize(
    "value,expected",
    [
        ("2h", 7200),
        ("30m", 1800),
        ("90s", 90),
        ("1d", 86400),
        ("1w", 604800),
        ("1h30m", 5400),
        (45, 45),
        ("45", 45),
        ("off", "off"),
        (False, "off"),
        (None, None),
    ],
)
def test_parse_duration(value, expected):
    assert parse_duration(value) == expected


@pytest.mark.parametrize("bad", ["2x", "h", "-5", -5, True, "1.5h", [1]])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_duration():
    assert format_duration(5400) == "1h30m"
    assert format_duration("off") == "off"
    assert format_duration(None) == "-"


def test_max_duration():
    assert task(max_duration="2h").max_duration == 7200
    assert task(max_duration="off").max_duration == "off"
    assert task(max_duration=False).max_duration == "off"  # YAML's bare `off`
    assert task().max_duration is None
    with pytest.raises(ConfigurationError) as e:
        task(max_duration=[1])
    assert e.value.field == "max_duration"


def test_env_forms(monkeypatch):
    monkeypatch.setenv("FROM_ENV", "secret")
    assert task(env=["A=1", "B=x=y", "FROM_ENV"]).env == {"A": "1", "B": "x=y", "FROM_ENV": "secret"}
    assert task(env={"A": 1, "B": True, "FROM_ENV": None}).env == {"A": "1", "B": "true", "FROM_ENV": "secret"}
    assert task(env=["EMPTY="]).env == {"EMPTY": ""}
    assert task().env == {}
    monkeypatch.delenv("FROM_ENV")
    with pytest.raises(ConfigurationError) as e:
        task(env=["FROM_ENV"])
    assert e.value.field == "env" and "FROM_ENV" in str(e.value)
    assert parse_run_configuration({"type": "task", "commands": ["x"], "env": ["K"]}, environ={"K": "v"}).env == {
        "K": "v"
    }
    assert parse_env(["K"], {"K": "v"}) == {"K": "v"}
    with pytest.raises(ValueError):
        parse_env(["1BAD=x"])


@pytest.mark.parametrize(
    "value,local,container,text",
    [
        (8080, 8080, 8080, "8080"),
        ("8080", 8080, 8080, "8080"),
        ("80:8080", 80, 8080, "80:8080"),
        ("*:8080", None, 8080, "*:8080"),
        ({"container_port": 22}, None, 22, "*:22"),
    ],
)
def test_port_forms(value, local, container, text):
    p = PortMapping.parse(value)
    assert (p.local_port, p.container_port) == (local, container)
    assert str(p) == text


@pytest.mark.parametrize("bad", ["abc", 0, 70000, "80:", ":80", True, "1:2:3"])
def test_port_rejects(bad):
    with pytest.raises(ValidationError):
        PortMapping.parse(bad)


def test_task_ports_and_nodes():
    t = task(ports=[8080, "80:8000", "*:22"], nodes=2)
    assert [str(p) for p in t.ports] == ["8080", "80:8000", "*:22"]
    assert t.nodes == 2
    assert task().nodes == 1
    with pytest.raises(ConfigurationError):
        task(nodes=0)


def test_retry_new_form():
    r = task(retry={"on_events": ["no-capacity", "error"], "duration": "1h"}).effective_retry()
    assert r.on_events == ["no-capacity", "error"] and r.duration == 3600
    r = task(retry=True).effective_retry()
    assert r.on_events == ["no-capacity", "interruption", "error"] and r.duration is None
    assert task(retry=False).effective_retry() is None
    assert task().effective_retry() is None
    assert task(retry={"on_events": []}).effective_retry() is None
    with pytest.raises(ConfigurationError):
        task(retry={"on_events": ["weather"]})


def test_retry_old_form():
    t = task(retry_policy={"retry": True, "limit": "30m"})
    assert t.effective_retry().duration == 1800
    assert t.effective_retry().on_events == ["no-capacity", "interruption", "error"]
    assert task(retry_policy={"retry": False}).effective_retry() is None
    assert task(retry_policy={"retry": True}).effective_retry().duration is None
    assert "retry_policy" not in t.model_dump()
    with pytest.raises(ConfigurationError):
        task(retry=True, retry_policy={"retry": True})


def test_python_versions_and_image_exclusive():
    assert task(python="3.11").python == "3.11"
    assert task(python=3.11).python == "3.11"
    assert task(python=3.10).python == "3.10"  # YAML reads 3.10 as the float 3.1
    assert task(python=3.8).python == "3.8"
    with pytest.raises(ConfigurationError):
        task(python="3.7")
    with pytest.raises(ConfigurationError) as e:
        task(python="3.11", image="ubuntu")
    assert e.value.field == "python" and "mutually exclusive" in str(e.value)


def test_common_fields():
    t = task(
        name="my-run",
        image="nvcr.io/x:1",
        setup=["pip install x"],
        working_dir="/w",
        home_dir="/root",  # dstack's default: accepted, anything else is refused (tests/compat)
        registry_auth={"username": "u", "password": "p"},
        spot_policy="auto",
        max_price=1.5,
        backends=["local"],
        regions="eu",
        resources={"gpu": "24GB"},
    )
    assert t.registry_auth.username == "u" and t.regions == ["eu"] and t.resources.gpu.memory.min == 24
    assert task(commands="echo one").commands == ["echo one"]
    for bad in (
        {"spot_policy": "cheap"},
        {"max_price": -1},
        {"name": "Bad_Name"},
        {"registry_auth": {"username": "u"}},
    ):
        with pytest.raises(ConfigurationError):
            task(**bad)


def test_task_needs_commands_or_image():
    with pytest.raises(ConfigurationError) as e:
        parse_run_configuration({"type": "task"})
    assert e.value.field == "commands"
    assert parse_run_configuration({"type": "task", "image": "busybox"}).commands == []


def test_unknown_field_suggestion():
    with pytest.raises(ConfigurationError) as e:
        parse_run_configuration({"type": "task", "comands": ["x"]})
    assert "did you mean 'commands'" in str(e.value)
    with pytest.raises(ConfigurationError) as e:
        task(resources={"gpus": 1})
    assert e.value.field == "resources.gpus" and "did you mean 'gpu'" in str(e.value)


def test_type_errors():
    with pytest.raises(ConfigurationError) as e:
        parse_run_configuration({"commands": ["x"]})
    assert "task, service, serverless" in str(e.value) and e.value.field == "type"
    with pytest.raises(ConfigurationError) as e:
        parse_run_configuration({"type": "job"})
    assert "unknown type 'job'" in str(e.value)
    with pytest.raises(ConfigurationError):
        parse_run_configuration({"type": "fleet"})


def test_service_port_and_defaults():
    s = service()
    assert s.port.container_port == 8000 and s.auth is True and s.strip_prefix is True
    assert (s.replicas.min, s.replicas.max) == (1, 1)
    assert service(port="80:8000").port.local_port == 80
    with pytest.raises(ConfigurationError) as e:
        parse_run_configuration({"type": "service", "commands": ["x"]})
    assert e.value.field == "port"


def test_service_replicas_and_scaling():
    assert service(replicas=3).replicas.max == 3
    s = service(replicas="0..2", scaling={"metric": "rps", "target": 10})
    assert (s.replicas.min, s.replicas.max) == (0, 2)
    assert (s.scaling.scale_up_delay, s.scaling.scale_down_delay) == (300, 600)
    s = service(replicas="1..4", scaling={"target": 2.5, "scale_up_delay": "1m", "scale_down_delay": "30s"})
    assert (s.scaling.target, s.scaling.scale_up_delay, s.scaling.scale_down_delay) == (2.5, 60, 30)
    for bad in (
        {"replicas": "1..4"},
        {"replicas": "1..", "scaling": {"target": 1}},
        {"replicas": 0},
        {"replicas": "0..2", "scaling": {"target": 0}},
        {"replicas": "0..2", "scaling": {"metric": "cpu", "target": 1}},
    ):
        with pytest.raises(ConfigurationError) as e:
            service(**bad)
    with pytest.raises(ConfigurationError) as e:
        service(replicas="1..4")
    assert "scaling" in str(e.value) and e.value.field == "replicas"


def test_service_model_forms():
    m = service(model="meta-llama/Llama-3-8B").model
    assert (m.name, m.format, m.type, m.prefix) == ("meta-llama/Llama-3-8B", "openai", "chat", "/v1")
    m = service(
        model={"type": "chat", "name": "m", "format": "tgi", "chat_template": "{{x}}", "eos_token": "</s>"}
    ).model
    assert (m.format, m.chat_template, m.eos_token) == ("tgi", "{{x}}", "</s>")
    with pytest.raises(ConfigurationError):
        service(model={"name": "m", "format": "vllm"})


def test_service_probes_and_extras():
    s = service(
        probes=[{"type": "http", "url": "/health", "interval": "15s", "timeout": "10s", "ready_after": 1}],
        https="auto",  # dstack's default; true/false are refused (the gateway's tls decides)
        gateway="my-gw",
        strip_prefix=False,
        rate_limits=[{"prefix": "/v1", "rps": 5, "burst": 10}],
    )
    p = s.probes[0]
    assert (p.url, p.interval, p.timeout, p.ready_after) == ("/health", 15, 10, 1)
    assert s.gateway == "my-gw" and s.rate_limits[0].rps == 5
    assert service(gateway=False).gateway is False
    with pytest.raises(ConfigurationError):
        service(probes=[{"url": "health"}])


def test_serverless():
    s = parse_run_configuration({"type": "serverless", "image": "worker:1"})
    assert isinstance(s, ServerlessConfiguration)
    assert (s.workers.min, s.workers.max) == (0, 3)
    assert (s.idle_timeout, s.execution_timeout) == (5, 600)
    assert (s.scaler.type, s.scaler.value) == ("queue_delay", 4)
    s = parse_run_configuration(
        {
            "type": "serverless",
            "commands": ["python handler.py"],
            "workers": 2,
            "scaler": {"type": "request_count"},
            "idle_timeout": "1m",
            "execution_timeout": "1h",
        }
    )
    assert (s.workers.min, s.workers.max, s.scaler.value, s.idle_timeout, s.execution_timeout) == (2, 2, 4, 60, 3600)
    with pytest.raises(ConfigurationError):
        parse_run_configuration({"type": "serverless", "image": "w", "workers": "1.."})


def test_dev_environment():
    d = parse_run_configuration({"type": "dev-environment", "ide": "vscode", "python": "3.12"})
    assert isinstance(d, DevEnvironmentConfiguration)


def test_python_api_constructors():
    assert Task is TaskConfiguration and Service is ServiceConfiguration and Serverless is ServerlessConfiguration
    t = Task(commands=["python app.py"], ports=["80"], env={"A": "1"}, image="python:3.11")
    assert t.type == "task" and t.ports[0].container_port == 80 and t.env == {"A": "1"}
    s = Service(commands=["serve"], port=80, model="m", resources={"gpu": "A100:80GB:2"})
    assert s.type == "service" and s.resources.gpu.count.min == 2


@pytest.mark.parametrize(
    "conf",
    [
        {"type": "task", "commands": ["x"], "ports": ["*:22"], "retry": True, "max_duration": "off", "env": ["A=1"]},
        {
            "type": "service",
            "commands": ["x"],
            "port": "80:8000",
            "replicas": "0..2",
            "scaling": {"target": 1},
            "model": "m",
            "resources": {"gpu": "A100:80GB:2"},
        },
        {"type": "serverless", "image": "w", "scaler": {"type": "request_count", "value": 2}},
    ],
)
def test_round_trip(conf):
    c = parse_run_configuration(conf)
    assert parse_run_configuration(c.model_dump()) == c
    assert parse_run_configuration(c.model_dump(mode="json")) == c
    assert TypeAdapter(AnyRunConfiguration).validate_json(c.model_dump_json()) == c


def test_fleets_as_dstack_clients_send_them():
    """dstack's clients send fleet references as objects; names and shorthands stay as they are."""
    refs = [{"project": None, "name": "a"}, "b", {"project": "other", "name": "c"}, {"name": "d"}]
    assert task(fleets=refs).fleets == ["a", "b", "other/c", "d"]
    assert task(fleets="a").fleets == ["a"]
    with pytest.raises((ConfigurationError, ValidationError)):
        task(fleets=[{"name": 3}])
