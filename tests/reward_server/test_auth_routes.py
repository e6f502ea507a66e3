"""Auth is an app dependency: with an api_key every route needs it, /docs and /openapi.json included,
except the probes (/healthz, /readyz: Kubernetes sends no token). Enumerates ``app.routes`` so a
route added later is checked too; in-process (TestClient), no lifespan: nothing is loaded."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from reward_server.app import OPEN_PATHS, create_app
from reward_server.settings import ServerSettings

KEY = "s3cret-key-1234"
GOOD = {"Authorization": f"Bearer {KEY}"}


def answers(app: FastAPI, headers: dict[str, str] | None = None) -> dict[tuple[str, str], int]:
    """(method, path) -> status, for every method of every route in ``app.routes``."""
    client = TestClient(app, base_url="http://127.0.0.1")  # a loopback Host (allowed_hosts)
    out = {}
    for route in app.routes:
        path = route.path.replace("{", "").replace("}", "")  # a path parameter: its own name
        for method in sorted((getattr(route, "methods", None) or {"GET"}) - {"HEAD"}):
            out[method, route.path] = client.request(method, path, headers=headers or {}).status_code
    return out


def open_without_key(app: FastAPI) -> set[str]:
    """The paths some method of which answers without the key with anything but 401."""
    return {path for (_method, path), status in answers(app).items() if status != 401}


def test_every_route_but_the_probes_needs_the_key():
    app = create_app(ServerSettings(api_key=KEY))
    seen = answers(app)
    paths = {path for _method, path in seen}
    # The documentation is a route like the others (FastAPI's own docs routes skip app dependencies).
    assert {"/score", "/rewards", "/metrics", "/docs", "/redoc", "/openapi.json"} <= paths
    assert OPEN_PATHS == {"/healthz", "/readyz"}
    assert open_without_key(app) == OPEN_PATHS
    # With the key nothing is refused for want of it.
    assert all(status != 401 for status in answers(app, GOOD).values())


def test_without_a_key_nothing_asks_for_one():
    app = create_app(ServerSettings())
    assert all(status != 401 for status in answers(app).values())


def test_a_route_added_later_is_protected_by_default():
    app = create_app(ServerSettings(api_key=KEY))

    @app.get("/added-later")
    async def added() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/added-later-post")
    async def added_post(body: dict) -> dict[str, str]:
        return {"status": "ok"}

    assert open_without_key(app) == OPEN_PATHS
    assert TestClient(app, base_url="http://127.0.0.1").get("/added-later", headers=GOOD).status_code == 200


def test_the_check_sees_a_route_that_bypasses_the_dependency():
    """The enumeration is not vacuous: a plain Starlette route (as FastAPI's own /docs was) is found."""
    app = create_app(ServerSettings(api_key=KEY))
    app.router.routes.append(Route("/sneaky", lambda request: PlainTextResponse("open")))
    assert open_without_key(app) == OPEN_PATHS | {"/sneaky"}


@pytest.mark.parametrize("path", sorted(OPEN_PATHS))
def test_probes_answer_without_the_key(path):
    app = create_app(ServerSettings(api_key=KEY))
    client = TestClient(app, base_url="http://127.0.0.1")
    # Not loaded (no lifespan): /readyz says 503; /healthz is alive.
    assert client.get(path).status_code == {"/healthz": 200, "/readyz": 503}[path]
