"""Volume configurations and `volumes:` entries: what is accepted, and the errors for what is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstack.agent.mounts import AgentMount, Bind, stash_lines, target_lines, wrap_plain
from dstack.core.errors import ConfigurationError
from dstack.core.models.configurations import parse_run_configuration
from dstack.core.models.volumes import InstanceMountPoint, VolumeMountPoint
from dstack.core.yaml_loader import load_configuration


def _run(volumes: object) -> list[VolumeMountPoint | InstanceMountPoint]:
    return parse_run_configuration({"type": "task", "commands": ["true"], "volumes": volumes}).volumes


def test_mount_forms_and_round_trip() -> None:
    mounts = _run(["data:/data", "/srv/in:/in", {"name": "b", "path": "/b/"}, {"instance_path": "/x", "path": "/y"}])
    assert mounts == [
        VolumeMountPoint(name="data", path="/data"),
        InstanceMountPoint(instance_path="/srv/in", path="/in"),
        VolumeMountPoint(name="b", path="/b"),
        InstanceMountPoint(instance_path="/x", path="/y"),
    ]
    conf = parse_run_configuration({"type": "task", "commands": ["true"], "volumes": ["data:/data"]})
    again = parse_run_configuration(conf.model_dump(mode="json"))
    assert again.volumes == conf.volumes
    # dstack's client sends null or [] for "no volumes"
    assert _run(None) == [] and _run([]) == []


@pytest.mark.parametrize(
    "volumes,message",
    [
        (["data:relative"], "must be an absolute path"),
        (["data:/proc"], "may not be mounted at /proc"),
        (["data:/"], "may not be mounted at /"),
        (["nocolon"], "NAME:/path or /host/dir:/path"),
        (["a:/d", "b:/d"], "two volumes are mounted at /d"),
        (["Bad Name!:/d"], "volume"),
        (["/a/../b:/d"], "'..'"),
        ([{"name": ["a", "b"], "path": "/d"}], "list of volume names is not supported"),
    ],
)
def test_bad_mounts_are_refused_naming_the_field(volumes: object, message: str) -> None:
    with pytest.raises(ConfigurationError) as e:
        _run(volumes)
    assert message in str(e.value)
    assert (e.value.field or "").startswith("volumes")


def test_volume_file_errors_name_file_line_and_field(tmp_path: Path) -> None:
    good = tmp_path / "vol.dstack.yml"
    good.write_text("type: volume\nname: my-data\nsize: 10GB\n")
    conf = load_configuration(good)
    assert conf.name == "my-data" and float(conf.size) == 10 and conf.backend == "local"  # type: ignore[union-attr]
    for body, line, text in [
        ("type: volume\nname: v\nbackend: ssh\n", 1, "backend ssh needs region: the name of the fleet"),
        ("type: volume\nname: v\nbackend: ssh\nregion: Bad_Name!\n", 4, "invalid fleet name"),
        ("type: volume\nname: v\navailability_zone: h1\n", 3, "availability_zone is for backend ssh"),
        ("type: volume\nname: v\nbackend: aws\n", 3, "unknown volume backend 'aws'"),
        ("type: volume\nname: v\nvolume_id: relative/dir\n", 3, "absolute path"),
        ("type: volume\nname: v\nauto_cleanup_duration: 1h\n", 3, "auto_cleanup_duration"),
    ]:
        bad = tmp_path / "bad.dstack.yml"
        bad.write_text(body)
        with pytest.raises(ConfigurationError) as e:
            load_configuration(bad)
        assert f"bad.dstack.yml:{line}" in str(e.value), str(e.value)
        assert text in str(e.value)


def test_agent_mount_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="either volume_id or instance_path"):
        AgentMount(path="/d")
    with pytest.raises(ValueError, match="either volume_id or instance_path"):
        AgentMount(volume_id="v", instance_path="/x", path="/d")
    with pytest.raises(ValueError):
        AgentMount(volume_id="../up", path="/d")


def test_mount_script_holds_sources_then_binds_targets() -> None:
    binds = [Bind(Path("/srv/vol one"), "/data")]
    first, last = stash_lines(binds, "mount", "mkdir"), target_lines(binds, "mount", "mkdir")
    assert "mount --rbind '/srv/vol one' /run/dstack-agent/mounts/0" in first
    assert last == ["mkdir -p /data", "mount --rbind /run/dstack-agent/mounts/0 /data"]
    assert wrap_plain(["true"], []) == ["true"]  # no volumes: no namespace


def test_runs_with_named_volumes_stay_on_the_servers_host() -> None:
    from dstack.server.services.offers import placement_mismatch

    named = parse_run_configuration({"type": "task", "commands": ["true"], "volumes": ["data:/data"]})
    host_dir = parse_run_configuration({"type": "task", "commands": ["true"], "volumes": ["/srv:/srv"]})
    assert placement_mismatch(named, "local", "local", 0) is None
    assert "volumes live on the server's host" in (placement_mismatch(named, "ssh", "my-fleet", 0) or "")
    assert placement_mismatch(host_dir, "ssh", "my-fleet", 0) is None  # a host path is on whichever host


def test_runs_with_named_volumes_go_to_the_volumes_host() -> None:
    from dstack.core.models.volumes import VolumeHome
    from dstack.server.services.offers import placement_mismatch

    conf = parse_run_configuration({"type": "task", "commands": ["true"], "volumes": ["data:/data", "/srv:/srv"]})
    on_h1 = {"data": VolumeHome("ssh", "gpus", "10.0.0.2")}

    def why(backend: str, region: str, host: str | None, homes: dict[str, VolumeHome]) -> str | None:
        return placement_mismatch(conf, backend, region, 0, hostname=host, volume_homes=homes)

    assert why("ssh", "gpus", "10.0.0.2", on_h1) is None
    assert why("ssh", "gpus", "10.0.0.3", on_h1) == "volume 'data' lives on host 10.0.0.2 of fleet gpus"
    assert why("ssh", "other", "10.0.0.2", on_h1) == "volume 'data' lives on host 10.0.0.2 of fleet gpus"
    assert why("local", "local", "server", on_h1) == "volume 'data' lives on host 10.0.0.2 of fleet gpus"
    local = {"data": VolumeHome("local", "local")}
    assert why("local", "local", "server", local) is None
    assert why("ssh", "gpus", "10.0.0.2", local) == "volume 'data' lives on the server's host (backend local)"
    assert why("local", "local", "server", {}) == "volume 'data' does not exist"


def test_ssh_volume_configuration() -> None:
    from dstack.core.models.volumes import VolumeConfiguration

    conf = VolumeConfiguration.model_validate(
        {"name": "v", "backend": "ssh", "region": "gpus", "availability_zone": "10.0.0.2", "size": "10GB"}
    )
    assert (conf.region, conf.availability_zone) == ("gpus", "10.0.0.2")
    with pytest.raises(ValueError, match="availability_zone is a host"):
        VolumeConfiguration.model_validate(
            {"name": "v", "backend": "ssh", "region": "gpus", "availability_zone": "a b"}
        )
    with pytest.raises(ValueError, match="backend local has one region"):
        VolumeConfiguration.model_validate({"name": "v", "region": "gpus"})
