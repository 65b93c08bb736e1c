"""Gateway processes on this host, and publishing services to them.

A gateway is `python -m dstack.proxy.gateway` started in its own session, so it keeps serving
while the server restarts. At start the manager reuses every gateway that answers its
healthcheck (and was started for this server's URL) and restarts the others; a monitor does
the same every few seconds. As a ServiceManager publisher it keeps the last known ServiceInfo
and replica set of every service, so a gateway that is created or restarted gets all of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil
from sqlalchemy import select

from dstack.core.daemon import child_pythonpath, spawn_daemon
from dstack.core.http_client import bearer, internal_client
from dstack.core.private import private_dir, write_private
from dstack.proxy import Replica, ServiceInfo
from dstack.server import crypto
from dstack.server.db import Database
from dstack.server.gateways.models import GatewayModel
from dstack.server.models import ProjectModel
from dstack.server.settings import ServerSettings

if TYPE_CHECKING:
    from dstack.server.services.service_replicas import ServiceState

logger = logging.getLogger(__name__)

START_TIMEOUT = 20.0


class GatewayStartError(Exception):
    pass


@dataclass(frozen=True)
class Target:
    """What the publisher needs to reach one gateway."""

    id: str
    project: str
    name: str
    api_url: str
    token: str


@dataclass
class Published:
    info: ServiceInfo | None = None
    replicas: list[Replica] = field(default_factory=list)
    choice: bool | str | None = None  # the configuration's `gateway:`


def api_url(gw: GatewayModel) -> str:
    """How the server reaches the gateway's registration API (on this host)."""
    host = gw.host
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'https' if gw.tls else 'http'}://{host}:{gw.port}"


def _target(gw: GatewayModel) -> Target:
    return Target(gw.id, gw.project.name, gw.name, api_url(gw), crypto.decrypt(gw.token))


def _service_json(info: ServiceInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


_METRIC_LABELS = re.compile(r'^dstack_proxy_requests_total\{project="([^"]*)",run="([^"]*)"\}', re.M)


class GatewayManager:
    def __init__(self, db: Database, settings: ServerSettings) -> None:
        self.db = db
        self.settings = settings
        self.home = settings.server_dir / "gateways"
        # The gateway's certificate is for its domain, not for 127.0.0.1: the registration API
        # is reached over loopback and authenticated by the gateway token.
        self._http = internal_client(verify=False)
        self._published: dict[tuple[str, str], Published] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._start_locks: dict[str, asyncio.Lock] = {}
        self._monitor: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        async with self.db.session() as session:
            for gw in (await session.execute(select(GatewayModel))).scalars().unique():
                gw.token = crypto.encrypt(gw.token)  # a row an older server stored in plain text
            await session.commit()
            ids = (await session.execute(select(GatewayModel.id))).scalars().all()
        for gid in ids:
            try:
                await self.ensure_running(gid)
            except Exception as e:
                logger.warning("gateway %s could not be started: %s", gid, e)
        self._monitor = asyncio.create_task(self._monitor_loop(), name="gateway-monitor")

    async def stop(self) -> None:
        """Stop watching; the gateway processes keep running (they outlive the server)."""
        if self._monitor:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        await self._http.aclose()

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.gateway_monitor_interval_seconds)
            try:
                async with self.db.session() as session:
                    ids = (await session.execute(select(GatewayModel.id))).scalars().all()
                for gid in ids:
                    try:
                        await self.ensure_running(gid, check_url=False)
                    except Exception as e:
                        logger.warning("gateway %s is down and could not be restarted: %s", gid, e)
            except Exception:
                logger.exception("gateway monitor failed")

    # --- processes -------------------------------------------------------------------------

    def _pid_file(self, gw: GatewayModel) -> Path:
        return self.home / f"{gw.id}.json"

    def _log_file(self, gw: GatewayModel) -> Path:
        return self.home / f"{gw.id}.log"

    def _is_ours(self, gw: GatewayModel) -> bool:
        """The recorded pid is a live gateway process started for this gateway."""
        if not gw.pid:
            return False
        try:
            proc = psutil.Process(gw.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            cmd = proc.cmdline()
        except psutil.Error:
            return False
        if "dstack.proxy.gateway" not in cmd:
            return False
        # (`--token=` on the command line: started by a server of before the token went by environment)
        return f"--gateway-id={gw.id}" in cmd or f"--token={crypto.decrypt(gw.token)}" in cmd

    async def _healthy(self, gw: GatewayModel) -> bool:
        try:
            r = await self._http.get(f"{api_url(gw)}/api/registry/healthcheck", timeout=3)
            return r.status_code == 200 and r.json().get("domain") == gw.domain
        except (httpx.HTTPError, ValueError):
            return False

    async def ensure_running(self, gateway_id: str, check_url: bool = True) -> bool:
        """Reuse a healthy gateway process or (re)start it. True when a process was started.

        `check_url` (at start and create) also restarts a healthy one that calls back a different
        server URL than ours; the monitor restarts only dead ones."""
        lock = self._start_locks.setdefault(gateway_id, asyncio.Lock())
        async with lock:
            async with self.db.session() as session:
                gw = (
                    await session.execute(select(GatewayModel).where(GatewayModel.id == gateway_id))
                ).scalar_one_or_none()
                if gw is None:
                    return False
                url_ok = gw.server_url == self.settings.url or not check_url
                if self._is_ours(gw) and url_ok and await self._healthy(gw):
                    if gw.status != "running":
                        gw.status, gw.status_message = "running", None
                        await session.commit()
                    return False
                await asyncio.to_thread(self._terminate, gw)
                try:
                    pid = await self._spawn(gw)
                except GatewayStartError as e:
                    gw.status, gw.status_message, gw.pid = "failed", str(e), None
                    await session.commit()
                    raise
                gw.pid, gw.server_url, gw.status, gw.status_message = pid, self.settings.url, "running", None
                await session.commit()
                target = _target(gw)
            logger.info("started gateway %s (pid %s) at %s for *.%s", target.name, pid, target.api_url, gw.domain)
            await self._push_all(target)
            return True

    async def _spawn(self, gw: GatewayModel) -> int:
        private_dir(self.home)
        base = self.settings.url
        # The token goes by environment: a command line is visible to every user in `ps`.
        cmd = [
            sys.executable,
            "-m",
            "dstack.proxy.gateway",
            "--domain",
            gw.domain,
            "--host",
            gw.host,
            "--port",
            str(gw.port),
            f"--gateway-id={gw.id}",
            "--project",
            gw.project.name,
            "--auth-url",
            f"{base}/api/proxy/authorize",
            "--wake-url",
            f"{base}/api/proxy/wake",
        ]
        if gw.tls_cert and gw.tls_key:
            cmd += ["--tls-cert", gw.tls_cert, "--tls-key", gw.tls_key]
        env = dict(os.environ, PYTHONPATH=child_pythonpath(), DSTACK_GATEWAY_TOKEN=crypto.decrypt(gw.token))
        log_path = self._log_file(gw)
        proc = spawn_daemon(cmd, env, log_path, self.home, "gateway")
        gw.pid = proc.pid
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise GatewayStartError(f"gateway exited with status {proc.returncode}: {_tail(log_path)}")
            if await self._healthy(gw):
                self._pid_file(gw).write_text(json.dumps({"pid": proc.pid, "port": gw.port, "name": gw.name}))
                return proc.pid
            await asyncio.sleep(0.1)
        _kill_group(proc.pid, signal.SIGKILL)
        raise GatewayStartError(f"gateway did not answer within {START_TIMEOUT:g} s: {_tail(log_path)}")

    def store_tls(self, gateway_id: str, cert_pem: bytes, key_pem: bytes) -> tuple[str, str]:
        """Write a gateway's certificate and key as 0600 files of its own; returns their paths."""
        d = private_dir(self.home / gateway_id)
        write_private(d / "cert.pem", cert_pem)
        write_private(d / "key.pem", key_pem)
        return str(d / "cert.pem"), str(d / "key.pem")

    def remove_tls(self, gateway_id: str) -> None:
        shutil.rmtree(self.home / gateway_id, ignore_errors=True)

    def _terminate(self, gw: GatewayModel) -> None:
        pid = gw.pid
        if pid is not None and self._is_ours(gw):
            _kill_group(pid, signal.SIGTERM)
            try:
                psutil.Process(pid).wait(5)
            except psutil.TimeoutExpired:
                _kill_group(pid, signal.SIGKILL)
            except psutil.Error:
                pass
        self._pid_file(gw).unlink(missing_ok=True)

    async def delete_gateway(self, gateway_id: str) -> None:
        """Stop the gateway's process and delete its row, under the lock the monitor takes, so a
        gateway being deleted is never restarted."""
        async with self._start_locks.setdefault(gateway_id, asyncio.Lock()):
            async with self.db.session() as session:
                gw = (
                    await session.execute(select(GatewayModel).where(GatewayModel.id == gateway_id))
                ).scalar_one_or_none()
                if gw is None:
                    return
                await asyncio.to_thread(self._terminate, gw)
                await session.delete(gw)
                await session.commit()
                self.remove_tls(gateway_id)
        self._start_locks.pop(gateway_id, None)

    # --- publishing ------------------------------------------------------------------------

    async def publish(self, state: ServiceState, info: ServiceInfo | None, replicas: list[Replica] | None) -> None:
        """ServiceManager publisher: push a service's info/replicas (or its removal) to gateways."""
        key = (state.project, state.run_name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if info is None and replicas is None:
                self._published.pop(key, None)
                self._locks.pop(key, None)
                for target in await self._targets(state.project, None):
                    await self._remove(target, *key)
                return
            entry = self._published.setdefault(key, Published())
            entry.choice = state.conf.gateway
            if info is not None:
                entry.info = info
            if replicas is not None:
                entry.replicas = list(replicas)
            if entry.info is None:
                return
            for target in await self._targets(state.project, entry.choice):
                await self._push(target, entry, upsert=info is not None)

    async def _targets(self, project: str, choice: bool | str | None) -> list[Target]:
        """The gateways a service of `project` goes to: `gateway: false` none, a name that one, else all."""
        if choice is False:
            return []
        query = (
            select(GatewayModel)
            .join(ProjectModel, GatewayModel.project_id == ProjectModel.id)
            .where(ProjectModel.name == project, GatewayModel.status == "running")
        )
        if isinstance(choice, str):
            query = query.where(GatewayModel.name == choice)
        async with self.db.session() as session:
            return [_target(gw) for gw in (await session.execute(query)).scalars().unique()]

    async def _push(self, target: Target, entry: Published, upsert: bool) -> None:
        headers = bearer(target.token)
        info = entry.info
        if info is None:
            return  # nothing registered yet: the service's first sync brings its info
        reps = {"replicas": [{"id": r.id, "url": r.url, "ready": r.ready} for r in entry.replicas]}
        path = f"{target.api_url}/api/registry/services/{info.project}/{info.run_name}/replicas"
        try:
            if upsert:
                r = await self._http.post(
                    f"{target.api_url}/api/registry/services", json=_service_json(info), headers=headers
                )
                r.raise_for_status()
            r = await self._http.put(path, json=reps, headers=headers)
            if r.status_code == 404:  # the gateway restarted and lost the service: register it again
                (
                    await self._http.post(
                        f"{target.api_url}/api/registry/services", json=_service_json(info), headers=headers
                    )
                ).raise_for_status()
                r = await self._http.put(path, json=reps, headers=headers)
            r.raise_for_status()
        except httpx.HTTPError as e:
            logger.warning("publishing %s/%s to gateway %s failed: %s", info.project, info.run_name, target.name, e)

    async def _remove(self, target: Target, project: str, run_name: str) -> None:
        try:
            r = await self._http.delete(
                f"{target.api_url}/api/registry/services/{project}/{run_name}",
                headers={"Authorization": f"Bearer {target.token}"},
            )
            if r.status_code not in (200, 404):
                r.raise_for_status()
        except httpx.HTTPError as e:
            logger.warning("removing %s/%s from gateway %s failed: %s", project, run_name, target.name, e)

    async def _push_all(self, target: Target) -> None:
        """Give a (re)started gateway every service of its project this server knows."""
        for (project, run_name), entry in list(self._published.items()):
            if project != target.project or entry.info is None or entry.choice is False:
                continue
            if isinstance(entry.choice, str) and entry.choice != target.name:
                continue
            async with self._locks.setdefault((project, run_name), asyncio.Lock()):
                if (project, run_name) in self._published:
                    await self._push(target, entry, upsert=True)

    async def reconcile(self) -> None:
        """After the services were synced at start: drop what gateways still serve but that ended
        while the server was down (their replicas are gone)."""
        async with self.db.session() as session:
            gws = (
                (await session.execute(select(GatewayModel).where(GatewayModel.status == "running")))
                .scalars()
                .unique()
                .all()
            )
            targets = [_target(gw) for gw in gws]
        for target in targets:
            try:
                r = await self._http.get(
                    f"{target.api_url}/api/registry/metrics", headers={"Authorization": f"Bearer {target.token}"}
                )
                r.raise_for_status()
            except httpx.HTTPError as e:
                logger.warning("gateway %s: cannot list its services: %s", target.name, e)
                continue
            for project, run_name in set(_METRIC_LABELS.findall(r.text)):
                if (project, run_name) not in self._published:
                    logger.info("gateway %s: removing stale service %s/%s", target.name, project, run_name)
                    await self._remove(target, project, run_name)


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # started with start_new_session: its group id is its pid
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace").strip() or "(empty log)"
    except OSError:
        return "(no log)"
