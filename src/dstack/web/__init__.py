"""The web dashboard: server-rendered pages served by `dstack server` at `/` (see router.py)."""

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles


def mount_dashboard(app: FastAPI) -> None:
    """Add the dashboard's pages and its static files (shipped in the wheel) to the server's app."""
    from dstack.web.router import router

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
