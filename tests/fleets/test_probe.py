"""Host probing and the agent bundle, without hosts: parsing what a host says about itself, the
checks that refuse a host the agent cannot run on, and a bundle that names itself by content,
carries bytecode for what the agent imports, and is kept on disk until what went into it changes."""

import io
import os
import sys
import tarfile

import pytest

from dstack.core.errors import ConfigurationError
from dstack.core.yaml_loader import load_configuration_text
from dstack.server.backends.ssh import bundle as bundle_module
from dstack.server.backends.ssh.agent import AgentDeployError, check_python
from dstack.server.backends.ssh.bundle import AgentBundle, _build_into, _from_cache, cache_dir, fingerprint
from dstack.server.backends.ssh.probe import parse_probe
from dstack.server.services.fleets import _python_problem

OUTPUT = """\
cpus=16
mem_kb=65843212
disk_kb=1024000000
hostname=gpu-box
machine=x86_64
addrs=10.0.0.5 192.168.1.5
python=/usr/bin/python3 3.10
python=/usr/bin/python3.11 3.11
gpu=0, NVIDIA A100-SXM4-80GB, 81920
gpu=1, NVIDIA A100-SXM4-80GB, 81920
container=docker
systemd=1
"""


def test_parse_probe():
    p = parse_probe(OUTPUT)
    assert (p.cpus, p.memory_mib, p.disk_mib, p.hostname, p.machine) == (16, 64300, 1000000, "gpu-box", "x86_64")
    assert [g["name"] for g in p.gpus] == ["NVIDIA A100-SXM4-80GB"] * 2 and p.gpus[1]["memory_mib"] == 81920
    assert p.addresses == ["10.0.0.5", "192.168.1.5"]
    assert p.containers == ["docker"] and p.systemd
    assert p.python_for("3.11") == "/usr/bin/python3.11" and p.python_for("3.12") is None


def test_parse_probe_tolerates_garbage():
    p = parse_probe("motd banner\ncpus=lots\nmem_kb=\n=x\n")
    assert (p.cpus, p.memory_mib, p.gpus, p.pythons) == (0, 0, [], {})


def test_hosts_the_agent_cannot_run_on_are_refused():
    bundle = AgentBundle(data=b"", digest="0" * 64, python="3.11", machine="x86_64")
    assert check_python(parse_probe(OUTPUT), bundle) == "/usr/bin/python3.11"
    with pytest.raises(AgentDeployError, match=r"needs CPython 3.11 on the host \(found: 3.10\)"):
        check_python(parse_probe("machine=x86_64\npython=/usr/bin/python3 3.10\n"), bundle)
    with pytest.raises(AgentDeployError, match="aarch64"):
        check_python(parse_probe("machine=aarch64\npython=/usr/bin/python3 3.11\n"), bundle)
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert "needs CPython" in (_python_problem(parse_probe("python=/usr/bin/python3 2.7\n")) or "")
    assert _python_problem(parse_probe(f"python=/usr/bin/python3 {want}\n")) is None


def test_internal_ip_must_be_an_address():
    with pytest.raises(ConfigurationError, match="internal_ip"):
        load_configuration_text(
            "type: fleet\nname: f\nssh_config:\n  hosts:\n    - hostname: a\n      internal_ip: x y\n"
        )


@pytest.mark.slow  # imports the agent in a subprocess, compiles and compresses ~15 MB
def test_bundle_holds_the_agent_its_imports_and_their_bytecode_and_is_kept(tmp_path, monkeypatch):
    b = _build_into(tmp_path)
    tar = tarfile.open(fileobj=io.BytesIO(b.data))
    names = tar.getnames()
    tops = {n.split("/")[0] for n in names}
    # asyncssh: a dev environment's SSH server imports it lazily, with the agent's code
    assert {"dstack", "uvicorn", "fastapi", "pydantic", "pydantic_core", "psutil", "asyncssh", "cryptography"} <= tops
    assert "dstack/agent/__main__.py" in names
    assert any(t.startswith("pydantic_core-") and t.endswith(".dist-info") for t in tops)  # importlib.metadata
    tag = sys.implementation.cache_tag
    pyc = f"dstack/agent/__pycache__/app.{tag}.pyc"
    assert pyc in names and f"fastapi/__pycache__/routing.{tag}.pyc" in names
    header = tar.extractfile(pyc).read(16)  # type: ignore[union-attr]
    assert int.from_bytes(header[4:8], "little") == 1  # hash-based, unchecked: the host never recompiles
    assert not any(n.endswith(".pyc") and "/dstack/server/" in f"/{n}" for n in names)  # the agent's imports only
    assert len(b.data) < 64 * 1024 * 1024 and b.name == b.digest[:16]

    # kept: the next server reads it (no build), the same bytes
    monkeypatch.setattr(bundle_module, "_build", lambda *a: pytest.fail("built again"))
    again = _from_cache(tmp_path)
    assert again is not None and again.digest == b.digest
    # an archive that does not match its manifest is not used
    (archive,) = tmp_path.glob("agent-*.tar.gz")
    archive.write_bytes(archive.read_bytes()[:-1] + b"x")
    assert _from_cache(tmp_path) is None


def test_fingerprint_changes_with_what_went_into_the_bundle(tmp_path):
    pkg = tmp_path / "site" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    first = fingerprint([pkg])
    assert fingerprint([pkg]) == first
    (pkg / "a.py").write_text("x = 22\n")  # edited (size)
    second = fingerprint([pkg])
    assert second != first
    os.utime(pkg / "a.py", ns=(1, 1))  # touched (mtime)
    assert fingerprint([pkg]) != second
    third = fingerprint([pkg])
    (pkg / "__pycache__").mkdir()  # Python writing bytecode there changes nothing that is shipped
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"pyc")
    assert fingerprint([pkg]) == third
    (pkg / "b.py").write_text("")  # a module added
    fourth = fingerprint([pkg])
    assert fourth != third
    (tmp_path / "site" / "other").mkdir()  # a package installed beside it
    assert fingerprint([pkg]) != fourth


def test_cache_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("DSTACK_SERVER_AGENT_BUNDLE_CACHE", "off")
    assert cache_dir() is None
    monkeypatch.setenv("DSTACK_SERVER_AGENT_BUNDLE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DSTACK_SERVER_AGENT_BUNDLE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "dstack" / "agent-bundles"
