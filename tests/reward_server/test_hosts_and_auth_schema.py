"""The Host allow-list (DNS rebinding against a keyless loopback server) and the auth each route
declares in the OpenAPI document, checked against what the server does, over real HTTP."""

from __future__ import annotations

import httpx
import pytest

from shared.schemas import ErrorResponse


def status_with_host(base: str, host: str, path: str = "/healthz") -> tuple[int, str]:
    response = httpx.get(base + path, headers={"Host": host}, timeout=10)
    error = ErrorResponse.model_validate(response.json()).error if response.status_code >= 400 else ""
    return response.status_code, error


def test_a_loopback_server_answers_only_loopback_host_names(start_reward_server):
    base = start_reward_server()  # 127.0.0.1, no api_key
    port = base.rsplit(":", 1)[1]
    for host in [
        "127.0.0.1",
        f"127.0.0.1:{port}",
        "localhost",
        f"LOCALHOST:{port}",
        f"[::1]:{port}",
        "[::1]",
    ]:
        assert status_with_host(base, host) == (200, ""), host
    for host in ["evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "", "[::2]:80"]:
        assert status_with_host(base, host) == (400, "invalid_host"), host
        assert status_with_host(base, host, "/openapi.json") == (400, "invalid_host"), host
    response = httpx.post(base + "/score", json={}, headers={"Host": "evil.example"})
    assert response.status_code == 400 and "allowed_hosts" in response.json()["reason"]


def test_allowed_hosts_setting(start_reward_server):
    base = start_reward_server({"allowed_hosts": ["reward.internal", "10.0.0.5", "127.0.0.1"]})
    assert status_with_host(base, "reward.internal:8000") == (200, "")
    assert status_with_host(base, "10.0.0.5") == (200, "")
    assert status_with_host(base, "localhost") == (400, "invalid_host")  # the list replaces the default
    anything = start_reward_server({"allowed_hosts": ["*"]})
    assert status_with_host(anything, "whatever.example") == (200, "")


def test_a_remote_bind_accepts_any_host_by_default():
    from reward_server.settings import ServerSettings

    assert ServerSettings(host="0.0.0.0", api_key="k" * 16).host_allow_list() == ["*"]
    assert ServerSettings().host_allow_list() == ["127.0.0.1", "localhost", "::1"]


@pytest.mark.parametrize("api_key", [None, "s3cret-key-1234"])
def test_every_route_declares_its_auth_and_the_server_agrees(start_reward_server, api_key):
    base = start_reward_server({"api_key": api_key} if api_key else {})
    # The document itself needs the key when there is one (every route but the probes does).
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    spec = httpx.get(base + "/openapi.json", headers=headers).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    checked = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "security" in operation, f"{method.upper()} {path} declares no auth"
            declared = operation["security"] == [{"bearerAuth": []}]
            # What the server does without a token: 401 exactly where the document says a token is needed.
            response = httpx.request(method, base + path, json={}, timeout=10)
            assert (response.status_code == 401) == declared, (method, path, response.status_code, declared)
            checked += 1
    assert checked >= 5
    protected = {p for p, ops in spec["paths"].items() for op in ops.values() if op["security"]}
    assert protected == ({"/score", "/rewards", "/metrics"} if api_key else set())
