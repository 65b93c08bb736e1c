"""The queue's seams with the server: it imports nothing of `dstack.server`, the server hands it its
ports, and the proxy and `/v2` share one auth cache."""

import asyncio
import subprocess
import sys

from starlette.routing import Mount

from dstack.proxy.auth import Access, AuthCache


def test_serverless_needs_nothing_of_the_server():
    code = (
        "import sys\n"
        "import dstack.serverless.router, dstack.serverless.service, dstack.serverless.executor\n"
        "print(sorted(m for m in sys.modules if m == 'dstack.server' or m.startswith('dstack.server.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_proxy_and_v2_share_the_apps_auth_cache():
    from dstack.server.app import create_app

    app = create_app()  # builds the app only: nothing is opened before its lifespan starts
    proxy_app = next(r.app for r in app.routes if isinstance(r, Mount) and r.path == "/proxy")
    assert isinstance(app.state.auth_cache, AuthCache)
    assert proxy_app.proxy.auth is app.state.auth_cache


def test_one_answer_serves_both_and_keeps_its_kind():
    calls = []

    async def hook(project: str, token: str | None) -> Access:
        calls.append((project, token))
        if token == "stranger":
            return Access.UNKNOWN_TOKEN
        return Access.ALLOWED if project == "main" else Access.DENIED

    async def main() -> None:
        cache = AuthCache(hook)
        # the proxy asks a yes/no question, /v2 the kind of answer: one call to the hook for both
        assert await cache.allowed("main", "alice") is True
        assert await cache.check("main", "alice") is Access.ALLOWED
        assert calls == [("main", "alice")]
        assert await cache.check("other", "alice") is Access.DENIED
        assert await cache.check("", "stranger") is Access.UNKNOWN_TOKEN
        assert await cache.allowed("main", "stranger") is False
        # concurrent checks of one pair share one call
        calls.clear()
        got = await asyncio.gather(*(cache.check("x", "bob") for _ in range(5)))
        assert got == [Access.DENIED] * 5 and calls == [("x", "bob")]

    asyncio.run(main())


def test_a_yes_no_authorizer_still_fits():
    async def gateway_hook(project: str, token: str | None) -> bool:
        return token == "good"

    async def main() -> None:
        cache = AuthCache(gateway_hook)
        assert await cache.check("p", "good") is Access.ALLOWED
        assert await cache.check("p", "bad") is Access.DENIED

    asyncio.run(main())
