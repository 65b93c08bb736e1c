"""What a user may ask a gateway to bind and serve, checked before anything starts.

A gateway listens on the server's host: binding an address other hosts reach publishes on the
host's network, so only global admins may (others bind loopback). Its certificate and key come
as PEM contents, checked here with the `ssl` module; global admins may also name files on the
server host. Every problem with them gets one answer, "invalid TLS certificate or key", so the
endpoint is no oracle for which server files exist or what they hold.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import tempfile
from pathlib import Path

from dstack.server.errors import Forbidden, InvalidRequest

MAX_PEM = 64 * 1024
INVALID_TLS = "invalid TLS certificate or key: send the PEM contents of a certificate and its private key"


def check_bind_address(host: str | None, admin: bool) -> str:
    """The address to bind: given, or 0.0.0.0 for admins and 127.0.0.1 for other users."""
    if host is None or not host.strip():
        return "0.0.0.0" if admin else "127.0.0.1"
    host = host.strip()
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if host.lower() != "localhost" and not admin:
            raise _forbidden(host) from None
        if host.lower() != "localhost" and not _hostname_ok(host):
            raise InvalidRequest(f"host must be an IP address or a host name, got {host!r}", fields=["host"]) from None
        return host
    if not addr.is_loopback and not admin:
        raise _forbidden(host)
    return str(addr)


def _hostname_ok(host: str) -> bool:
    return len(host) <= 253 and all(c.isalnum() or c in "-." for c in host)


def _forbidden(host: str) -> Forbidden:
    return Forbidden(
        f"binding {host} publishes on the host's network: only a global admin may; "
        "bind a loopback address (127.0.0.1 or ::1) instead",
        fields=["host"],
    )


def read_tls_pair(cert: str, key: str, admin: bool) -> tuple[str, str]:
    """The PEM certificate and key, validated; paths are read for global admins only."""
    if _is_pem(cert) and _is_pem(key):
        cert_pem, key_pem = cert, key
    elif admin and not _is_pem(cert) and not _is_pem(key):
        cert_pem, key_pem = _read(cert), _read(key)
    elif not admin:
        raise Forbidden(
            "tls_cert and tls_key must be PEM contents: only a global admin may name files on the server host",
            fields=["tls_cert", "tls_key"],
        )
    else:
        raise _invalid()
    _check_pair(cert_pem, key_pem)
    return cert_pem, key_pem


def _is_pem(value: str) -> bool:
    return "-----BEGIN " in value


def _read(path: str) -> str:
    p = Path(path).expanduser()
    try:
        if not p.is_absolute() or p.stat().st_size > MAX_PEM:
            raise _invalid()
        return p.read_text()
    except (OSError, UnicodeDecodeError):
        raise _invalid() from None


def _check_pair(cert_pem: str, key_pem: str) -> None:
    """Load them as the gateway's TLS server would; any failure is one uniform 400."""
    with tempfile.TemporaryDirectory(prefix="dstack-tls-") as d:
        cert_file, key_file = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        for path, data in ((cert_file, cert_pem), (key_file, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(data)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError, ValueError):
            raise _invalid() from None


def _invalid() -> InvalidRequest:
    return InvalidRequest(INVALID_TLS, fields=["tls_cert", "tls_key"])
