"""Every field of dstack 0.22's task, service and dev-environment configurations either works here
(a field of our models, with the test that shows it) or is refused when set, naming the field.

`DSTACK_FIELDS` is dstack 0.22.5's field set; `test_field_list_matches_the_official_models`
checks it against the official package's models whenever that package is installed (tests/compat).
"""

import importlib
import json
import subprocess

import pytest

from dstack.core.errors import ConfigurationError
from dstack.core.models import unsupported
from dstack.core.models.configurations import RUN_CONFIGURATION_TYPES, parse_run_configuration

COMMON = {
    "type", "name", "image", "user", "privileged", "entrypoint", "working_dir", "home_dir", "registry_auth",
    "python", "nvcc", "single_branch", "env", "shell", "resources", "priority", "volumes", "docker", "repos",
    "files", "dstack", "setup", "backends", "regions", "availability_zones", "instance_types", "reservation",
    "spot_policy", "retry", "max_duration", "stop_duration", "max_price", "creation_policy", "idle_duration",
    "utilization_policy", "startup_order", "stop_criteria", "schedule", "fleets", "instances", "tags",
    "backend_options",
}  # fmt: skip
DSTACK_FIELDS = {
    "task": COMMON | {"nodes", "groups", "ports", "commands"},
    "service": COMMON
    | {"port", "gateway", "strip_prefix", "model", "https", "auth", "scaling", "rate_limits", "probes", "replicas"}
    | {"groups", "commands"},
    "dev-environment": COMMON | {"ide", "version", "init", "inactivity_duration", "ports"},
}

#: implemented fields and a test that shows each one at work ("module::function")
IMPLEMENTED = {
    "type": "tests.core.test_configurations::test_type_errors",
    "name": "tests.core.test_configurations::test_common_fields",
    "image": "tests.agent.test_containers::test_podman_run_with_script",
    "python": "tests.core.test_configurations::test_python_versions_and_image_exclusive",
    "env": "tests.core.test_configurations::test_env_forms",
    "setup": "tests.core.test_configurations::test_common_fields",
    "commands": "tests.compat.test_official_client::test_apply_ps_logs_of_a_task",
    "working_dir": "tests.core.test_configurations::test_common_fields",
    "registry_auth": "tests.core.test_configurations::test_common_fields",
    "resources": "tests.core.test_resources::test_resources_defaults_and_pretty",
    "max_duration": "tests.core.test_configurations::test_max_duration",
    "stop_duration": "tests.compat.test_job_settings::test_stop_duration_is_the_jobs_stop_grace",
    "retry": "tests.core.test_configurations::test_retry_new_form",
    "spot_policy": "tests.compat.test_placement::test_placement_filters_offers",
    "max_price": "tests.compat.test_placement::test_placement_filters_offers",
    "backends": "tests.compat.test_placement::test_placement_filters_offers",
    "regions": "tests.compat.test_placement::test_placement_filters_offers",
    "fleets": "tests.fleets.test_fleet_runs::test_task_runs_on_a_fleet_host",
    "volumes": "tests.volumes.test_volumes::test_data_written_by_one_run_is_there_for_the_next",
    "nodes": "tests.core.test_configurations::test_task_ports_and_nodes",
    "ports": "tests.core.test_configurations::test_task_ports_and_nodes",
    "port": "tests.core.test_configurations::test_service_port_and_defaults",
    "gateway": "tests.core.test_configurations::test_service_probes_and_extras",
    "strip_prefix": "tests.core.test_configurations::test_service_probes_and_extras",
    "model": "tests.core.test_configurations::test_service_model_forms",
    "auth": "tests.core.test_configurations::test_service_port_and_defaults",
    "scaling": "tests.core.test_configurations::test_service_replicas_and_scaling",
    "rate_limits": "tests.proxy.test_rate_limits::test_burst_gets_429_with_retry_after",
    "probes": "tests.server.test_probes::test_every_probe_with_its_method_headers_and_body",
    "replicas": "tests.core.test_configurations::test_service_replicas_and_scaling",
    "ide": "tests.devenv.test_devenv::test_ssh_lands_in_the_jobs_environment",
    "init": "tests.devenv.test_devenv::test_ssh_lands_in_the_jobs_environment",
    "inactivity_duration": "tests.devenv.test_devenv::test_inactivity_duration_stops_an_unused_dev_environment",
    "shell": "tests.compat.test_shell_entrypoint::test_host_jobs_run_with_their_shell",
    "entrypoint": "tests.compat.test_shell_entrypoint::test_host_entrypoint_gets_the_commands_as_arguments",
    "user": "tests.compat.test_container_user::test_image_job_user_and_home_dir",
    "home_dir": "tests.compat.test_container_user::test_image_job_user_and_home_dir",
    "privileged": "tests.compat.test_container_user::test_privileged_is_for_admins_and_gives_all_capabilities",
    "files": "tests.compat.test_files::test_a_task_reads_its_files",
}

#: a value other than "not set" for each unsupported field
SET_VALUES = {
    "nvcc": True,
    "single_branch": True,
    "docker": True,
    "dstack": True,
    "repos": [{"url": "https://github.com/example/repo"}],
    "priority": 10,
    "availability_zones": ["us-east-1a"],
    "instance_types": ["p4d.24xlarge"],
    "reservation": "cr-1",
    "creation_policy": "reuse",
    "idle_duration": "1h",
    "utilization_policy": {"min_gpu_utilization": 10, "time_window": "30m"},
    "startup_order": "workers-first",
    "stop_criteria": "master-done",
    "schedule": {"cron": "0 * * * *"},
    "instances": ["my-instance"],
    "tags": {"team": "ml"},
    "backend_options": [{"type": "vastai"}],
    "groups": [{"name": "g", "replicas": 1}],
    "https": True,
    "version": "1.90.0",
}

BASE = {
    "task": {"type": "task", "commands": ["echo hi"]},
    "service": {"type": "service", "commands": ["python -m http.server 8000"], "port": 8000},
    "dev-environment": {"type": "dev-environment", "ide": "vscode"},
}


def _cases():
    for kind, fields in DSTACK_FIELDS.items():
        for field in sorted(fields):
            yield pytest.param(kind, field, id=f"{kind}.{field}")


@pytest.mark.parametrize("kind,field", list(_cases()))
def test_every_field_works_or_is_refused(kind, field):
    ours = RUN_CONFIGURATION_TYPES[kind].model_fields
    refused = unsupported.fields_for(kind)
    assert (field in ours) != (field in refused), f"{field}: exactly one of implemented or refused"
    if field in ours:
        module, name = IMPLEMENTED[field].split("::")
        assert callable(getattr(importlib.import_module(module), name)), IMPLEMENTED[field]
        return
    for value in refused[field]:  # what dstack's client sends by default is accepted
        parse_run_configuration({**BASE[kind], field: value})
    with pytest.raises(ConfigurationError) as e:
        parse_run_configuration({**BASE[kind], field: SET_VALUES[field]})
    assert e.value.field == field
    assert f"{field!r} is not supported yet" in str(e.value)


def test_nested_unsupported_fields_are_refused():
    conf = {**BASE["service"], "replicas": "0..2", "scaling": {"metric": "rps", "target": 1, "window": None}}
    assert parse_run_configuration(conf).scaling.target == 1
    with pytest.raises(ConfigurationError) as e:
        parse_run_configuration({**conf, "scaling": {"metric": "rps", "target": 1, "window": "1m"}})
    assert e.value.field == "scaling.window"
    with pytest.raises(ConfigurationError) as e:
        parse_run_configuration({**BASE["service"], "probes": [{"url": "/", "until_ready": True}]})
    assert "until_ready" in str(e.value)


def test_the_default_request_of_the_official_client_parses():
    """The configuration JSON dstack 0.22.5 sends for a bare task: every field, with its default."""
    sent = {field: None for field in DSTACK_FIELDS["task"]}
    sent.update(
        {
            "type": "task",
            "commands": ["echo hi"],
            "ports": [],
            "privileged": False,
            "home_dir": "/root",
            "env": {},
            "volumes": [],
            "repos": [],
            "files": [],
            "dstack": False,
            "setup": [],
            "resources": {
                "cpu": {"arch": None, "count": {"min": 2, "max": None}},
                "memory": {"min": 8.0, "max": None},
                "shm_size": None,
                "gpu": {
                    "vendor": None,
                    "name": None,
                    "count": {"min": 0, "max": None},
                    "memory": None,
                    "total_memory": None,
                    "compute_capability": None,
                },
                "disk": {"size": {"min": 100.0, "max": None}},
            },
        }
    )
    del sent["groups"], sent["nodes"]  # the client leaves these out when unset
    conf = parse_run_configuration(sent)
    assert conf.commands == ["echo hi"] and conf.resources.cpu.min == 2 and conf.resources.disk.min == 100


@pytest.mark.slow  # may install the official package first
def test_field_list_matches_the_official_models(official_venv_dir):
    code = (
        "import json\n"
        "from dstack._internal.core.models import configurations as c\n"
        "print(json.dumps({'task': sorted(c.TaskConfiguration.model_fields),"
        " 'service': sorted(c.ServiceConfiguration.model_fields),"
        " 'dev-environment': sorted(c.DevEnvironmentConfiguration.model_fields)}))\n"
    )
    out = subprocess.run([str(official_venv_dir / "bin" / "python"), "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    official = json.loads(out.stdout)
    assert {k: set(v) for k, v in official.items()} == DSTACK_FIELDS


def test_profile_settings_apply_where_the_configuration_leaves_them_unset():
    from dstack.core.models.runs import RunSpec
    from dstack.server.routers.dstack_wire import fold_profile

    spec = RunSpec.model_validate(
        {
            "configuration": {**BASE["task"], "max_price": 2.0},
            "profile": {"name": "default", "default": True, "spot_policy": "spot", "max_price": 1.0, "tags": None},
        }
    )
    conf = parse_run_configuration(fold_profile(spec).configuration)
    assert conf.spot_policy == "spot" and conf.max_price == 2.0  # the configuration's own value wins
    assert "profile" not in spec.model_dump()  # never stored
    spec = RunSpec.model_validate({"configuration": BASE["task"], "profile": {"idle_duration": "1h"}})
    with pytest.raises(ConfigurationError) as e:  # a profile's unsupported setting is refused by name too
        parse_run_configuration(fold_profile(spec).configuration)
    assert e.value.field == "idle_duration"
