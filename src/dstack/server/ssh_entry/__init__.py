"""SSH access for dstack's official client: attached runs, `dstack attach`, `ssh RUN`.

On by default: `install(app)` starts the entry (`server.Entry`) on the API's host, at
`DSTACK_SERVER_SSH_PORT` or a free port when that is unset (`off` turns it off), keeps its keys on `app.state.ssh_entry_keys`, and the wire shapes
(`routers/dstack_wire.py`) advertise it to that client. See `server.py` for the two hops.
"""

from __future__ import annotations

from fastapi import FastAPI

from dstack.server.ssh_entry.keys import EntryKeys


def install(app: FastAPI) -> None:
    settings = app.state.settings
    if settings.ssh_port is None:
        app.state.ssh_entry_keys = None
        return
    keys = EntryKeys(settings.server_dir)
    app.state.ssh_entry_keys = keys

    async def _start(app: FastAPI) -> None:
        from dstack.server.ssh_entry.server import Entry

        entry = Entry(app.state.db, app.state.log_notifier, keys)
        await entry.start(settings.host, settings.ssh_port)
        app.state.ssh_entry = entry

    async def _stop(app: FastAPI) -> None:
        entry = getattr(app.state, "ssh_entry", None)
        if entry is not None:
            await entry.stop()

    app.state.startup_hooks.append(_start)
    app.state.shutdown_hooks.insert(0, _stop)
