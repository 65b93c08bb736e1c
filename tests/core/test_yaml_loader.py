"""The YAML loader: configurations from files, and errors that name file, line and field."""

import textwrap

import pytest

from dstack.core.errors import ConfigurationError, DstackError
from dstack.core.models.configurations import ServiceConfiguration, TaskConfiguration
from dstack.core.yaml_loader import is_configuration_file_name, load_configuration, load_configuration_text


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(text, path="x.dstack.yml", **kw):
    with pytest.raises(ConfigurationError) as e:
        load_configuration_text(textwrap.dedent(text), path=path, **kw)
    return e.value


def test_loads_task_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    path = write(
        tmp_path,
        ".dstack.yml",
        """\
        type: task
        name: train
        python: 3.11
        env:
          - HF_TOKEN
          - MODE=fast
        commands:
          - pip install -r requirements.txt
          - python train.py
        ports: [8080, "80:8080", "*:22"]
        resources:
          gpu: A100:80GB:2
          memory: 24GB..80GB
        max_duration: off
        retry_policy:
          retry: true
          limit: 1h
        """,
    )
    conf = load_configuration(path)
    assert isinstance(conf, TaskConfiguration)
    assert conf.python == "3.11" and conf.env == {"HF_TOKEN": "hf_x", "MODE": "fast"}
    assert conf.resources.gpu.pretty_format() == "A100:80GB:2"
    assert conf.max_duration == "off" and conf.effective_retry().duration == 3600
    assert [str(p) for p in conf.ports] == ["8080", "80:8080", "*:22"]


def test_loads_service(tmp_path):
    path = write(
        tmp_path,
        "serve.dstack.yml",
        """\
        type: service
        image: ghcr.io/huggingface/text-generation-inference:latest
        env: {MODEL_ID: mistralai/Mistral-7B}
        commands: [text-generation-launcher]
        port: 80
        replicas: 1..4
        scaling: {metric: rps, target: 10}
        model:
          name: mistralai/Mistral-7B
          format: tgi
        probes:
          - {type: http, url: /health, interval: 15s, timeout: 10s, ready_after: 1}
        python: 3.10
        """,
    )
    with pytest.raises(ConfigurationError) as e:
        load_configuration(path)
    assert e.value.line == 13 and "mutually exclusive" in str(e.value)
    text = path.read_text().replace("python: 3.10\n", "")
    conf = load_configuration_text(text, path=str(path))
    assert isinstance(conf, ServiceConfiguration)
    assert conf.model.format == "tgi" and conf.replicas.max == 4 and conf.probes[0].url == "/health"


def test_bad_gpu_spec_names_file_line_and_field():
    err = load_error(
        """\
        type: service
        commands: [serve]
        port: 8000
        resources:
          cpu: 4
          gpu: A100:xx
        """,
        path="serve.dstack.yml",
    )
    assert str(err).startswith("serve.dstack.yml:6: resources.gpu: invalid GPU spec 'A100:xx'")
    assert (err.path, err.line, err.field) == ("serve.dstack.yml", 6, "resources.gpu")


def test_unknown_field_suggestion():
    err = load_error(
        """\
        type: task
        commands: [a]
        comands: [b]
        """,
        path="task.dstack.yml",
    )
    assert str(err) == "task.dstack.yml:3: unknown field 'comands' — did you mean 'commands'?"
    assert err.line == 3 and err.field == "comands"
    err = load_error("""\
        type: service
        commands: [a]
        port: 80
        scaling:
          metric: rps
          targett: 1
        """)
    assert "x.dstack.yml:6: unknown field 'scaling.targett' — did you mean 'target'?" in str(err).splitlines()
    err = load_error("""\
        type: task
        commands: [a]
        zzzzzz: 1
        """)
    assert "did you mean" not in str(err) and "unknown field 'zzzzzz'" in str(err)


def test_wrong_types_report_path_and_line():
    err = load_error("""\
        type: task
        commands: [a]
        nodes: abc
        resources:
          memory: 8XB
        ports:
          - 80
          - "99999"
        """)
    lines = str(err).splitlines()
    assert lines[0].startswith("x.dstack.yml:3: nodes:") and "'abc'" in lines[0]
    assert lines[1].startswith("x.dstack.yml:5: resources.memory: invalid memory size '8XB'")
    assert lines[2].startswith("x.dstack.yml:8: ports[1]: invalid port")
    assert err.line == 3 and err.field == "nodes"


def test_probe_in_list_points_at_item():
    err = load_error("""\
        type: service
        commands: [a]
        port: 80
        probes:
          - url: /health
          - url: /ready
            interval: soon
        """)
    assert err.line == 7 and err.field == "probes[1].interval"


def test_malformed_yaml_has_line():
    err = load_error("""\
        type: task
        commands:
          - echo: [
        """)
    assert err.line is not None and err.line >= 3 and "invalid YAML" in str(err)
    err = load_error("type: task\ncommands: [a]\n  bad: indent\n")
    assert err.line == 3 and str(err).startswith("x.dstack.yml:3: invalid YAML")


def test_missing_and_unknown_type():
    err = load_error("name: x\ncommands: [a]\n")
    assert "missing field 'type'" in str(err) and "task, service, serverless" in str(err) and err.field == "type"
    err = load_error("commands: [a]\ntype: job\n")
    assert err.line == 2 and "unknown type 'job'" in str(err)


def test_empty_and_non_mapping():
    assert "empty" in str(load_error(""))
    assert "mapping" in str(load_error("- a\n- b\n"))


def test_duplicate_keys():
    err = load_error("type: task\ncommands: [a]\ncommands: [b]\n")
    assert err.line == 3 and "duplicate key 'commands'" in str(err)


def test_env_from_environment_missing():
    err = load_error("type: task\ncommands: [a]\nenv:\n  - NOT_SET_ANYWHERE_123\n", environ={})
    assert err.line == 3 and err.field == "env" and "NOT_SET_ANYWHERE_123" in str(err)
    conf = load_configuration_text("type: task\ncommands: [a]\nenv: [K]\n", environ={"K": "v"})
    assert conf.env == {"K": "v"}


def test_replica_range_without_scaling_points_at_replicas():
    err = load_error("type: service\ncommands: [a]\nport: 80\nreplicas: 1..4\n")
    assert err.line == 4 and "scaling" in str(err)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigurationError) as e:
        load_configuration(tmp_path / "nope.dstack.yml")
    assert "no such file" in str(e.value)
    assert isinstance(e.value, DstackError)


def test_any_name_accepted_and_name_check(tmp_path):
    path = write(tmp_path, "whatever.yaml", "type: task\ncommands: [a]\n")
    assert load_configuration(path).commands == ["a"]
    assert is_configuration_file_name(".dstack.yml")
    assert is_configuration_file_name("dir/serve.dstack.yml")
    assert not is_configuration_file_name("serve.yml")
    assert not is_configuration_file_name("dstack.yml")
