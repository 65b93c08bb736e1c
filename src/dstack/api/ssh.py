"""The user's SSH key and the `Host RUN` entries that make `ssh RUN` reach a dev environment.

The key is `~/.dstack/ssh/id_rsa` (made on first use, like dstack's CLI); only its public half
ever leaves this machine, as the run spec's `ssh_key_pub`. Entries go into `~/.dstack/ssh/config`,
which `~/.ssh/config` includes (added once), so plain `ssh RUN` and VS Code's Remote-SSH find
them. Each entry's `ProxyCommand` is `dstack tunnel`: the connection goes through the server's
WebSocket tunnel (server/routers/tunnel.py), authenticated with the user's token.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from dstack.api.config import dstack_home

_HOST_LINE = re.compile(r"^Host\s+(\S+)\s*$")


def ssh_dir() -> Path:
    return dstack_home() / "ssh"


def key_path() -> Path:
    return ssh_dir() / "id_rsa"


def public_key() -> str:
    """The user's public key line, making the key pair first if there is none."""
    private = key_path()
    public = private.with_name("id_rsa.pub")
    if not private.exists():
        import asyncssh

        private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = asyncssh.generate_private_key("ssh-rsa", key_size=3072, comment="dstack")
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key("openssh"))
        public.write_bytes(key.export_public_key("openssh"))
    elif not public.exists():
        import asyncssh

        public.write_bytes(asyncssh.read_private_key(str(private)).export_public_key("openssh"))
    return public.read_text().strip()


def _dstack_command() -> list[str]:
    exe = Path(sys.executable).with_name("dstack")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("dstack")
    return [found] if found else [sys.executable, "-m", "dstack.cli.main"]


def host_entry(run_name: str, project: str) -> str:
    proxy = shlex.join([*_dstack_command(), "tunnel", "--project", project, run_name])
    return "\n".join(
        [
            f"Host {run_name}",
            f"    HostName {run_name}",
            "    User dstack",
            f"    IdentityFile {key_path()}",
            "    IdentitiesOnly yes",
            # the dev environment's host key is made afresh at each start; the tunnel is what is
            # authenticated (the user's token over the server's URL)
            "    StrictHostKeyChecking no",
            "    UserKnownHostsFile /dev/null",
            "    LogLevel ERROR",
            "    ServerAliveInterval 30",
            f"    ProxyCommand {proxy}",
            "",
        ]
    )


def _without_host(text: str, run_name: str) -> str:
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        m = _HOST_LINE.match(line)
        if m:
            skipping = m.group(1) == run_name
        if not skipping:
            out.append(line)
    return "\n".join(out).strip("\n")


def write_host(run_name: str, project: str) -> Path:
    """Add (or replace) `Host run_name` in ~/.dstack/ssh/config; include that file from
    ~/.ssh/config once. Returns the dstack file's path."""
    config = ssh_dir() / "config"
    config.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = config.read_text() if config.exists() else ""
    kept = _without_host(old, run_name)
    config.write_text((kept + "\n\n" if kept else "") + host_entry(run_name, project))
    os.chmod(config, 0o600)
    _include(config)
    return config


def remove_host(run_name: str) -> None:
    config = ssh_dir() / "config"
    if config.exists():
        kept = _without_host(config.read_text(), run_name)
        config.write_text(kept + "\n" if kept else "")


def _include(config: Path) -> None:
    user_config = Path.home() / ".ssh" / "config"
    line = f"Include {config}"
    text = user_config.read_text() if user_config.exists() else ""
    if any(existing.strip() == line for existing in text.splitlines()):
        return
    user_config.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # at the top: an Include after a `Host` line would only apply inside that host's block
    user_config.write_text(f"{line}\n\n{text}" if text else f"{line}\n")
    os.chmod(user_config, 0o600)
