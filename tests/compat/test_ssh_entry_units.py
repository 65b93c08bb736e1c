"""The SSH entry's pieces on their own: the `/logs_ws` handshake and frames, the user keys, and
what the wire shapes tell dstack's client about reaching a job."""

from __future__ import annotations

import stat

import asyncssh
import pytest

from dstack.server.routers import dstack_wire
from dstack.server.ssh_entry.access import JOB_ID
from dstack.server.ssh_entry.keys import EntryKeys, same_key
from dstack.server.ssh_entry.logs_ws import BadRequest, accept_key, frame, parse_request


def test_websocket_accept_key_is_rfc_6455s():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size, header", [(5, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
def test_frames_carry_their_length(size, header):
    data = frame(b"x" * size)
    assert data[0] == 0x82 and len(data) == size + header
    if header == 2:
        assert data[1] == size
    elif header == 4:
        assert data[1] == 126 and int.from_bytes(data[2:4], "big") == size
    else:
        assert data[1] == 127 and int.from_bytes(data[2:10], "big") == size


def _request(target: str, extra: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: localhost:10999\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def test_logs_ws_request_and_its_start_time():
    assert parse_request(_request("/logs_ws")) == ("dGhlIHNhbXBsZSBub25jZQ==", None)
    key, start = parse_request(_request("/logs_ws?start_time=2026-01-02T03%3A04%3A05.678%2B00%3A00"))
    assert start == 1767323045.0  # whole seconds, as dstack's runner keeps them


@pytest.mark.parametrize(
    "head, message",
    [
        (_request("/other"), "only GET /logs_ws"),
        (_request("/logs_ws?start_time=yesterday"), "start_time"),
        (b"GET /logs_ws HTTP/1.1\r\nHost: x\r\n\r\n", "not a WebSocket upgrade"),
        (b"nonsense\r\n\r\n", "malformed"),
    ],
)
def test_logs_ws_refuses_what_it_does_not_serve(head, message):
    with pytest.raises(BadRequest, match=message):
        parse_request(head)


def test_user_keys_are_stable_per_user_and_private(tmp_path):
    keys = EntryKeys(tmp_path)
    again = EntryKeys(tmp_path)  # a restart reads the same secret and host key
    assert keys.user_public_key("u1") == again.user_public_key("u1") != keys.user_public_key("u2")
    assert keys.host_key.public_data == again.host_key.public_data
    private = asyncssh.import_private_key(keys.user_private_key("u1"))
    assert same_key(private, keys.user_public_key("u1"))
    assert not same_key(private, keys.user_public_key("u2"))
    assert not same_key(private, "not a key") and not same_key(private, None)
    for path in (keys.dir / "user-keys.secret", keys.dir / "host_ed25519"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # another server directory, another secret: other keys
    assert EntryKeys(tmp_path / "other").user_public_key("u1") != keys.user_public_key("u1")


def test_job_ids_are_the_only_user_names_looked_up():
    assert JOB_ID.match("0b6c1b0e-6c3e-4a43-9d44-1f0f0e7a9b21")
    for name in ("root", "", "0b6c1b0e-6c3e-4a43-9d44-1f0f0e7a9b21; drop", "../etc"):
        assert not JOB_ID.match(name)


def test_provisioning_data_names_the_entry_only_when_it_is_on():
    jpd = {"backend": "local", "hostname": "10.0.0.5", "instance_name": "local", "resources": {}}
    off = dstack_wire.provisioning_data(jpd, "job-1", None)
    assert off is not None and (off["ssh_port"], off["dockerized"], off["hostname"]) == (None, False, "10.0.0.5")
    on = dstack_wire.provisioning_data(jpd, "job-1", dstack_wire.SshEntry("dstack.example.com", 3022))
    assert on is not None
    assert (on["hostname"], on["ssh_port"], on["username"], on["dockerized"]) == (
        "dstack.example.com",
        3022,
        "job-1",
        True,
    )
    assert on["ssh_proxy"] is None


def test_app_specs_are_a_tasks_ports_not_a_services():
    spec = {"ports": [8000, 9000]}
    conf = {"type": "task", "ports": [{"local_port": 18000, "container_port": 8000}, {"container_port": 9000}]}
    assert dstack_wire.app_specs(spec, conf) == [
        {"port": 8000, "map_to_port": 18000, "app_name": "app"},
        {"port": 9000, "map_to_port": None, "app_name": "app"},
    ]
    assert dstack_wire.app_specs(spec, {"type": "service", "port": 8000}) == []
