"""The dashboard's pages and htmx partials, served by `dstack server` at `/`.

Pages are rendered on the server (Jinja2); htmx (vendored under static/vendor) refreshes parts of
them by polling, and a few lines of our own JavaScript follow logs over server-sent events and
stream the chat playground. Every route checks the session (`auth.py`); every POST checks CSRF.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.errors import DstackError
from dstack.server.db import get_database, get_session
from dstack.server.models import UserModel
from dstack.server.routers import projects as projects_router
from dstack.server.routers import users as users_router
from dstack.server.routers.projects import user_projects
from dstack.server.security import authenticate
from dstack.server.services import logs as logs_service
from dstack.server.services import runs as runs_service
from dstack.serverless.errors import ServerlessError
from dstack.web import queries, views
from dstack.web.auth import (
    check_post,
    csrf_token,
    current_user,
    require_web_project,
    require_web_user,
    same_origin,
    session_keys,
)
from dstack.web.sessions import COOKIE, MAX_AGE

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(include_in_schema=False)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_MAX_TOKEN = 200
_MAX_TEST_INPUT = 64 * 1024
SSE_BATCH = 2000  # log records per event


def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("csrf", csrf_token(request))
    return templates.TemplateResponse(request, name, context, status_code=status_code)


@router.get("/")
async def home(request: Request, session: AsyncSession = Depends(get_session)) -> Response:
    user = await current_user(request, session)
    return RedirectResponse("/runs" if user else "/signin", status_code=303)


@router.get("/signin")
async def signin_form(request: Request) -> HTMLResponse:
    return _page(request, "signin.html", user=None, error=None)


@router.post("/signin")
async def signin(request: Request, session: AsyncSession = Depends(get_session)) -> Response:
    form = await request.form()
    token = str(form.get("token") or "").strip()
    if not same_origin(request):
        raise HTTPException(403, "sign-in must come from this server's own page")
    user = await authenticate(session, token) if 0 < len(token) <= _MAX_TOKEN else None
    if user is None:
        return _page(
            request, "signin.html", status_code=401, user=None, error="That token is not valid (or was revoked)."
        )
    response = RedirectResponse("/runs", status_code=303)
    _set_session_cookie(request, response, session_keys(request).issue(user.id, user.token_hash))
    return response


def _set_session_cookie(request: Request, response: Response, cookie: str) -> None:
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=MAX_AGE,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


@router.post("/signout")
async def signout(request: Request) -> Response:
    form = await request.form()
    check_post(request, str(form.get("csrf") or ""))
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


# --- runs ---------------------------------------------------------------------------------------


def _filters(request: Request) -> dict[str, Any]:
    q = request.query_params
    status = q.get("status", "active")
    run_type = q.get("type") or ""
    offset = q.get("offset", "0")
    return {
        "project": (q.get("project") or "")[:100],
        "status": status if status in views.STATUS_FILTERS else "active",
        "type": run_type if run_type in views.RUN_TYPES else "",
        "name": (q.get("name") or "")[:100],
        "offset": min(int(offset), 10**9) if offset.isdigit() else 0,
    }


async def _runs_table(request: Request, session: AsyncSession) -> dict[str, Any]:
    user = await require_web_user(request, session)
    filters = _filters(request)
    projects = await user_projects(session, user)
    ids = [p.id for p in projects if not filters["project"] or p.name == filters["project"]]
    runs, more = await queries.runs_page(
        session, ids, filters["status"], filters["type"] or None, filters["name"] or None, filters["offset"]
    )
    wire = request.app.state.run_to_wire
    return {
        "user": user,
        "projects": [p.name for p in projects],
        "filters": filters,
        "rows": [views.run_row(wire(r)) for r in runs],
        "more": more,
        "page_size": queries.PAGE,
        "run_types": views.RUN_TYPES,
        "status_filters": views.STATUS_FILTERS,
    }


@router.get("/runs")
async def runs_page(request: Request, session: AsyncSession = Depends(get_session)) -> HTMLResponse:
    return _page(request, "runs.html", **await _runs_table(request, session))


@router.get("/runs/table")
async def runs_table(request: Request, session: AsyncSession = Depends(get_session)) -> HTMLResponse:
    return _page(request, "runs_table.html", **await _runs_table(request, session))


# --- projects and members -------------------------------------------------------------------------


async def _projects_context(
    request: Request, session: AsyncSession, message: str = "", user: UserModel | None = None
) -> dict[str, Any]:
    user = user or await require_web_user(request, session)
    rows = []
    for project in await user_projects(session, user):
        members = [{"name": m.user.name, "role": m.project_role} for m in project.members]
        can_manage = user.global_role == "admin" or any(
            m.user_id == user.id and m.project_role == "admin" for m in project.members
        )
        rows.append({"name": project.name, "members": members, "can_manage": can_manage})
    return {"user": user, "projects": rows, "message": message}


@router.get("/projects")
async def projects_page(request: Request, session: AsyncSession = Depends(get_session)) -> HTMLResponse:
    return _page(request, "projects.html", **await _projects_context(request, session))


@router.post("/projects/create")
async def project_create(request: Request, session: AsyncSession = Depends(get_session)) -> HTMLResponse:
    """The API's own create_project (name rules, uniqueness, the creator as the project's admin)."""
    form = await request.form()
    check_post(request, str(form.get("csrf") or ""))
    user = await require_web_user(request, session)
    name = str(form.get("project_name") or "").strip()[:100]
    try:
        await projects_router.create_project(projects_router.CreateProjectRequest(project_name=name), user, session)
        message = f"Created project {name}."
    except DstackError as e:
        await session.rollback()
        message = f"Not created: {getattr(e, 'msg', str(e))}"
    return _page(request, "projects.html", **await _projects_context(request, session, message))


@router.post("/projects/{project}/members/add")
async def member_add(request: Request, project: str, session: AsyncSession = Depends(get_session)) -> HTMLResponse:
    """The API's own add_members: only a project admin (or a global admin) may add or change roles."""
    form = await request.form()
    check_post(request, str(form.get("csrf") or ""))
    member = await require_web_project(request, session, project)
    username = str(form.get("username") or "").strip()[:100]
    role = str(form.get("project_role") or "user")
    try:
        body = projects_router.AddMembersRequest(members=[projects_router.Member(username=username, project_role=role)])
        await projects_router.add_members(body, member, session)
        message = f"{username} is now a {role} of {project}."
    except (DstackError, ValueError) as e:
        await session.rollback()
        message = f"Not added: {getattr(e, 'msg', None) or str(e).splitlines()[0]}"
    return _page(request, "projects.html", **await _projects_context(request, session, message))


@router.post("/account/token")
async def replace_token(request: Request, session: AsyncSession = Depends(get_session)) -> HTMLResponse:
    """The API's own refresh_token for the signed-in user: the new token is shown once, the old one
    (and every session made with it) stops working, and this browser gets a session for the new one."""
    form = await request.form()
    check_post(request, str(form.get("csrf") or ""))
    user = await require_web_user(request, session)
    answer = await users_router.refresh_token(users_router.UsernameRequest(username=user.name), user, session)
    cookie = session_keys(request).issue(user.id, user.token_hash)
    # the request's cookie is for the old token now: the page is for the user already checked
    context = await _projects_context(request, session, "Your new token is below: it is shown only once.", user)
    csrf = session_keys(request).csrf(cookie)  # the page's forms belong to the new session
    response = _page(request, "projects.html", csrf=csrf, new_token=answer["creds"]["token"], **context)
    response.headers["Cache-Control"] = "no-store"
    _set_session_cookie(request, response, cookie)
    return response


@router.get("/instances")
async def instances_page(request: Request, session: AsyncSession = Depends(get_session)) -> HTMLResponse:
    """Hosts, their state and what runs where: instances serve every project, so admins only."""
    user = await require_web_user(request, session)
    if user.global_role != "admin":
        return _page(request, "instances.html", status_code=403, user=user, instances=None)
    return _page(request, "instances.html", user=user, instances=await queries.instances_with_jobs(session))


async def _run_context(request: Request, session: AsyncSession, project: str, name: str) -> dict[str, Any]:
    user, project_model = await require_web_project(request, session, project)
    model = await runs_service.find_run(session, project_model, name)
    if model is None:
        raise HTTPException(404, f"run '{name}' not found in project '{project}'")
    run = request.app.state.run_to_wire(model)
    row = views.run_row(run)
    context: dict[str, Any] = {
        "user": user,
        "run": row,
        "run_id": model.id,
        "reason": run.termination_reason.value if run.termination_reason else "",
        "jobs": views.job_rows(run),
        "history": views.status_history(run),
        "configuration": views.configuration_text(run),
        "service": None,
        "endpoint": None,
    }
    if row["type"] == "service":
        context["service"] = _service_info(request, project, name, run)
    if row["type"] == "serverless":
        context["endpoint"] = await _endpoint_info(request, session, model.id, run.run_name)
    context["metrics"], context["charts"] = _chart_points(context["service"], context["endpoint"])
    return context


def _chart_points(
    service: dict[str, Any] | None, endpoint: dict[str, Any] | None
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """This refresh's values for the page's charts, and which charts it has (key, title)."""
    if service is not None:
        points = {k: service[k] for k in ("rps", "p50", "p95", "ready")}
        return points, [("rps", "Requests/s"), ("p50", "Latency p50 (ms)"), ("ready", "Ready replicas")]
    if endpoint is not None:
        workers = endpoint["workers"]
        points = {
            "queue": endpoint["queue"].get("inQueue", 0),
            "in_progress": endpoint["queue"].get("inProgress", 0),
            "jobs_per_s": endpoint["jobs_per_s"],
            "delay_p50": endpoint["delay_ms"]["p50"],
            "exec_p50": endpoint["execution_ms"]["p50"],
            "workers": sum(n for state, n in workers.items() if state in ("idle", "running", "initializing")),
        }
        charts = [
            ("queue", "Queue depth"),
            ("jobs_per_s", "Jobs/s"),
            ("delay_p50", "Delay p50 (ms)"),
            ("exec_p50", "Execution p50 (ms)"),
            ("workers", "Workers"),
        ]
        return points, charts
    return {}, []


def _service_info(request: Request, project: str, name: str, run: Any) -> dict[str, Any]:
    state = request.app.state.registry.services.get((project, name))
    info: dict[str, Any] = {
        "url": run.service.url if run.service else "-",
        "model": run.service.model.name if run.service and run.service.model else None,
        "model_url": run.service.model.base_url if run.service and run.service.model else None,
        "model_path": urlsplit(run.service.model.base_url).path.rstrip("/")
        if run.service and run.service.model
        else None,
        "auth_required": state is None or state.info.auth,
        "auth": "bearer token (project members)" if state is None or state.info.auth else "none (public)",
        "replicas": 0,
        "ready": 0,
        "rps": 0.0,
        "p50": None,
        "p95": None,
        "in_flight": 0,
    }
    if state is not None:
        p50, p95, _ = state.metrics.percentiles(60)
        info.update(
            replicas=len(state.replicas),
            ready=len(state.ready),
            rps=round(state.metrics.requests_in(60) / 60, 2),
            p50=round(p50) if p50 is not None else None,
            p95=round(p95) if p95 is not None else None,
            in_flight=state.metrics.in_flight,
        )
    return info


async def _endpoint_info(request: Request, session: AsyncSession, run_id: str, name: str) -> dict[str, Any] | None:
    stats = await queries.endpoint_stats(session, run_id)
    if stats is None:
        return None
    live = await request.app.state.serverless_bridge.status(name) or {}
    stats["queue"] = live.get("jobs", {})
    stats["workers"] = live.get("workers", {})
    stats["url"] = f"{request.app.state.settings.url}/v2/{name}"
    return stats


@router.get("/runs/{project}/{name}")
async def run_page(
    request: Request, project: str, name: str, session: AsyncSession = Depends(get_session)
) -> HTMLResponse:
    return _page(request, "run.html", **await _run_context(request, session, project, name))


@router.get("/runs/{project}/{name}/summary")
async def run_summary(
    request: Request, project: str, name: str, session: AsyncSession = Depends(get_session)
) -> HTMLResponse:
    return _page(request, "run_summary.html", **await _run_context(request, session, project, name))


def _job_key(request: Request) -> tuple[int, int]:
    q = request.query_params
    replica, job = q.get("replica", "0"), q.get("job", "0")
    if not (replica.isdigit() and job.isdigit()) or len(replica) > 6 or len(job) > 6:
        raise HTTPException(400, "replica and job must be small non-negative integers")
    return int(replica), int(job)


@router.get("/runs/{project}/{name}/logs/events")
async def log_events(
    request: Request, project: str, name: str, session: AsyncSession = Depends(get_session)
) -> StreamingResponse:
    """Logs as server-sent events, from the stored log rows; `Last-Event-ID` resumes after a drop."""
    _, project_model = await require_web_project(request, session, project)
    run = await runs_service.get_run(session, project_model, name)
    run_id = run.id
    replica, job = _job_key(request)
    last = request.headers.get("last-event-id", "")
    start = int(last) if last.isdigit() and len(last) < 19 else 0
    await session.close()  # the stream below opens short sessions of its own

    async def events() -> AsyncIterator[bytes]:
        cursor = start
        notifier = request.app.state.log_notifier
        while not await request.is_disconnected():
            async with get_database().session() as s:
                current = await runs_service.reload_run(s, run_id)
                page = await logs_service.poll_logs(s, notifier, current, job, replica, cursor, SSE_BATCH, 10)
            text = "".join(base64.b64decode(item["message"]).decode(errors="replace") for item in page["logs"])
            if page["logs"]:
                cursor = page["next_token"]
                yield f"id: {cursor}\ndata: {json.dumps({'text': _ANSI.sub('', text)})}\n\n".encode()
            elif page["finished"]:
                yield b"event: end\ndata: {}\n\n"
                return
            else:
                yield b": keep-alive\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.get("/runs/{project}/{name}/logs.txt")
async def log_download(
    request: Request, project: str, name: str, session: AsyncSession = Depends(get_session)
) -> StreamingResponse:
    _, project_model = await require_web_project(request, session, project)
    run = await runs_service.get_run(session, project_model, name)
    replica, job = _job_key(request)
    job_ids = await logs_service._job_ids(session, run.id, job, replica)

    async def body() -> AsyncIterator[bytes]:
        cursor = 0
        while True:
            async with get_database().session() as s:
                rows = await logs_service._fetch(s, job_ids, cursor, 5000)
            if not rows:
                return
            cursor = rows[-1].id
            yield b"".join(r.data for r in rows)

    filename = f"{name}-replica{replica}-job{job}.log"
    return StreamingResponse(
        body(), media_type="text/plain", headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


@router.get("/runs/{project}/{name}/stop")
async def stop_confirm(
    request: Request, project: str, name: str, session: AsyncSession = Depends(get_session)
) -> HTMLResponse:
    context = await _run_context(request, session, project, name)
    return _page(request, "stop.html", abort=request.query_params.get("abort") == "1", **context)


@router.post("/runs/{project}/{name}/stop")
async def stop(request: Request, project: str, name: str, session: AsyncSession = Depends(get_session)) -> Response:
    form = await request.form()
    check_post(request, str(form.get("csrf") or ""))
    _, project_model = await require_web_project(request, session, project)
    await runs_service.stop_runs(get_database(), project_model, [name], form.get("abort") == "1")
    request.app.state.pipeline.wake()
    return RedirectResponse(f"/runs/{project}/{name}", status_code=303)


@router.post("/runs/{project}/{name}/test-job")
async def test_job(
    request: Request, project: str, name: str, session: AsyncSession = Depends(get_session)
) -> HTMLResponse:
    form = await request.form()
    check_post(request, str(form.get("csrf") or ""))
    _, project_model = await require_web_project(request, session, project)
    # endpoint ids are run names, unique across projects: only this project's run's endpoint
    run = await runs_service.get_run(session, project_model, name)
    endpoint_id = await queries.endpoint_of_run(session, run.id)
    if endpoint_id is None:
        raise HTTPException(404, f"run '{name}' has no serverless endpoint")
    raw = str(form.get("input") or "")
    message: str
    if len(raw) > _MAX_TEST_INPUT:
        return _status(f"Not sent: the input is over {_MAX_TEST_INPUT // 1024} KiB.")
    try:
        value = json.loads(raw or "{}")
    except ValueError as e:
        return _status(f"Not sent: the input is not valid JSON ({e}).")
    try:
        job_id = await request.app.state.serverless.client.submit(endpoint_id, {"input": value})
        message = f"Sent job {job_id}."
    except ServerlessError as e:
        message = f"Not sent: {e.msg}"
    return _status(message)


def _status(message: str) -> HTMLResponse:
    return HTMLResponse(f'<p role="status">{_escape(message)}</p>')


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# --- fleets and their hosts -----------------------------------------------------------------------
# Reads and deletes go through the fleets API's own FleetManager (request.app.state.fleets), with
# the project checked by `require_web_project` as the API's `require_project_member` does.


def _fleet_manager(request: Request) -> Any:
    return request.app.state.fleets


async def _with_jobs(session: AsyncSession, fleets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fleets service's answers, each host given its active jobs (run links) and their latest usage."""
    names = [i["name"] for f in fleets for i in f["instances"]]
    jobs = await queries.jobs_on_instances(session, names)
    for f in fleets:
        for i in f["instances"]:
            i["running"] = jobs.get(i["name"], [])
    return fleets


async def _fleets_context(request: Request, session: AsyncSession, message: str = "") -> dict[str, Any]:
    user = await require_web_user(request, session)
    fleets: list[dict[str, Any]] = []
    for project in await user_projects(session, user):
        fleets.extend(await _fleet_manager(request).list_fleets(session, project))
    return {"user": user, "fleets": await _with_jobs(session, fleets), "message": message}


async def _fleet_context(
    request: Request, session: AsyncSession, project: str, name: str, message: str = ""
) -> dict[str, Any]:
    user, project_model = await require_web_project(request, session, project)
    if len(name) > 100:
        raise HTTPException(404, "fleet names are at most 100 characters")
    try:
        fleet = await _fleet_manager(request).get(session, project_model, name)
    except DstackError as e:
        raise HTTPException(404, getattr(e, "msg", None) or str(e)) from e
    return {"user": user, "fleet": (await _with_jobs(session, [fleet]))[0], "message": message}


@router.get("/fleets")
async def fleets_page(request: Request, session: AsyncSession = Depends(get_session)) -> HTMLResponse:
    """The fleets of the user's projects, their hosts, state, what runs there and its usage."""
    return _page(request, "fleets.html", **await _fleets_context(request, session))


@router.get("/fleets/{project}/{name}")
async def fleet_page(
    request: Request, project: str, name: str, session: AsyncSession = Depends(get_session)
) -> HTMLResponse:
    return _page(request, "fleet.html", **await _fleet_context(request, session, project, name))


def _instance_num(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 6:
        raise HTTPException(400, "instance must be a small non-negative integer")
    return int(raw)


@router.get("/fleets/{project}/{name}/delete")
async def fleet_delete_confirm(
    request: Request, project: str, name: str, session: AsyncSession = Depends(get_session)
) -> HTMLResponse:
    """Asks first: deleting stops the hosts' agents (the hosts themselves stay as they are)."""
    context = await _fleet_context(request, session, project, name)
    num = _instance_num(request.query_params.get("instance"))
    host = None
    if num is not None:
        host = next((i for i in context["fleet"]["instances"] if i["instance_num"] == num), None)
        if host is None:
            raise HTTPException(404, f"fleet '{name}' has no instance {num}")
    return _page(request, "fleet_delete.html", host=host, **context)


@router.post("/fleets/{project}/{name}/delete")
async def fleet_delete(
    request: Request, project: str, name: str, session: AsyncSession = Depends(get_session)
) -> Response:
    """FleetManager.delete (or delete_instances for one host): a host with active jobs is refused."""
    form = await request.form()
    check_post(request, str(form.get("csrf") or ""))
    _, project_model = await require_web_project(request, session, project)
    num = _instance_num(str(form.get("instance") or ""))
    manager = _fleet_manager(request)
    try:
        if num is None:
            await manager.delete(session, project_model, [name])
        else:
            await manager.delete_instances(session, project_model, name, [num])
    except DstackError as e:
        await session.rollback()
        message = f"Not deleted: {getattr(e, 'msg', None) or str(e)}"
        return _page(request, "fleet.html", **await _fleet_context(request, session, project, name, message))
    if num is None:
        return RedirectResponse("/fleets", status_code=303)
    return RedirectResponse(f"/fleets/{project}/{name}", status_code=303)
