"""Schemathesis against the OpenAPI document the server publishes, over real HTTP on loopback.

Every operation of ``/openapi.json`` is fuzzed (schema-valid and, where it has inputs, schema-invalid
cases) and every response checked: never a 5xx, the status code and content type documented, the
body valid against the documented schema, invalid input refused with a 4xx. Three ways: with an
api_key and the token, with the api_key and no token (401 everywhere but the probes), without any
key. Schema-generated images are never valid PNGs, so a share of the ``POST /score`` cases carry a
valid request instead (every served reward, unusual 8-bit RGB PNGs), and the test checks every
reward was scored at least once. Reproducible: derandomized, no example database.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi import checks as openapi_checks

from reward_server import app as app_module
from shared.codec import encode_png_b64
from tests.reward_server.fuzz_helpers import SERVED_REWARDS, b64, make_png, tiny_reward_settings
from tests.reward_server.rewards.test_aesthetic import tiny_aesthetic  # noqa: F401
from tests.reward_server.server_utils import RunningServer, start_reward_server_thread

KEY = "s3cret-key-for-fuzzing"
KEY_HEADERS = {"Authorization": f"Bearer {KEY}"}
PROBES = {"/healthz", "/readyz"}
EXAMPLES = 100  # per operation and generation mode
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    suppress_health_check=list(HealthCheck),
)
CHECKS = [
    not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.ignored_auth,  # with a key: the same request without the token must get 401
    openapi_checks.unsupported_method,
]
# Not checked: positive_data_acceptance. The schema cannot say that prompts and images have the
# same length or that images are PNGs, so schema-valid requests are rightly refused with 422.

RNG = np.random.default_rng(14)
VALID_IMAGES = [
    encode_png_b64(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
    b64(make_png(RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8), 2, interlace=True)),
    b64(make_png(RNG.integers(0, 256, (1, 16, 3), dtype=np.uint8), 2)),
    b64(make_png(RNG.integers(0, 256, (16, 1, 3), dtype=np.uint8), 2, interlace=True)),
]


@st.composite
def valid_requests(draw: Any) -> dict[str, Any]:
    """A request the server scores: a served reward, valid PNGs, one prompt each."""
    n = draw(st.integers(1, 3))
    body = {
        # Unique ids: a reused id with other content is a (documented) 409, not a score.
        "request_id": f"valid-{draw(st.uuids())}",
        "reward": draw(st.sampled_from(SERVED_REWARDS)),
        "images": draw(st.lists(st.sampled_from(VALID_IMAGES), min_size=n, max_size=n)),
        "prompts": draw(st.lists(st.text(max_size=30), min_size=n, max_size=n)),
    }
    if draw(st.booleans()):
        body["metadata"] = [{} for _ in range(n)]
    return body


@pytest.fixture(scope="module")
def tiny_settings(tiny_aesthetic):  # noqa: F811
    folder, _state = tiny_aesthetic
    return tiny_reward_settings(folder)


@pytest.fixture(scope="module")
def keyed_server(tiny_settings):
    running = start_reward_server_thread({**tiny_settings, "api_key": KEY})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def open_server(tiny_settings):
    running = start_reward_server_thread(tiny_settings)
    yield running
    running.stop()


def published_schema(running: RunningServer, headers: dict[str, str]) -> tuple[Any, list[Any]]:
    schema = schemathesis.openapi.from_url(running.base_url + "/openapi.json", headers=headers, timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == {
        "POST /score",
        "GET /rewards",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    }
    return schema, operations


def has_inputs(operation: Any) -> bool:
    return bool(operation.body) or any(True for _ in operation.iter_parameters())


def fuzz(
    running: RunningServer,
    headers: dict[str, str],
    on_response: Callable[[Any, Any], None],
    checks: list = CHECKS,
) -> Counter:
    """Fuzz every operation of the published document (read with the token when the server has a key),
    sending ``headers`` with each case; returns the (operation, status) counts."""
    keyed = running.app.state.settings.api_key is not None
    _schema, operations = published_schema(running, KEY_HEADERS if keyed else {})
    seen: Counter = Counter()
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_inputs(operation) else [])
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=mode)
            if operation.label == "POST /score" and mode is GenerationMode.POSITIVE:
                scored = valid_requests().flatmap(
                    lambda body, op=operation: op.as_strategy(body=body, media_type="application/json")
                )
                strategy = st.one_of(strategy, scored)

            @FUZZ
            @given(case=strategy)
            def run(case: Any) -> None:
                response = case.call(base_url=running.base_url, headers=headers, timeout=60)
                seen[case.operation.label, response.status_code] += 1
                on_response(case, response)
                case.validate_response(response, checks=checks, headers=headers)

            run()
    return seen


def count_scored(scored: Counter) -> Callable[[Any, Any], None]:
    def on_response(case: Any, response: Any) -> None:
        if case.operation.label == "POST /score" and response.status_code == 200:
            scored[json.loads(response.content)["reward"]] += 1

    return on_response


def assert_every_reward_scored(scored: Counter) -> None:
    assert set(scored) == set(SERVED_REWARDS), scored


def test_fuzz_with_the_key_and_the_token(keyed_server):
    scored: Counter = Counter()
    count = count_scored(scored)

    def on_response(case: Any, response: Any) -> None:
        count(case, response)
        # Generated cases may carry their own (wrong) Authorization: 401 then, and only then.
        sent = response.request.headers.get("authorization")
        if case.operation.path not in PROBES:
            assert (response.status_code == 401) == (sent != KEY_HEADERS["Authorization"]), (sent, response)

    seen = fuzz(keyed_server, KEY_HEADERS, on_response)
    assert not any(status >= 500 for _label, status in seen), seen
    assert_every_reward_scored(scored)


def test_fuzz_without_any_key(open_server):
    scored: Counter = Counter()
    seen = fuzz(open_server, {}, count_scored(scored))
    assert not any(status >= 500 or status == 401 for _label, status in seen), seen
    assert_every_reward_scored(scored)


def test_fuzz_with_the_key_but_no_token_is_401_but_the_probes(keyed_server):
    def on_response(case: Any, response: Any) -> None:
        expected = 200 if case.operation.path in PROBES else 401
        assert response.status_code == expected, (case.operation.label, response.status_code, response.text)
        if expected == 401:
            assert response.headers["www-authenticate"] == ["Bearer"]

    # The document is read with the token; the cases are sent without it.
    checks = [not_a_server_error, openapi_checks.status_code_conformance]
    seen = fuzz(keyed_server, {}, on_response, checks=checks)
    assert len({label for label, _status in seen}) == 5, seen


def test_every_operation_declares_bearer_auth_but_the_probes(keyed_server, open_server):
    keyed = httpx.get(keyed_server.base_url + "/openapi.json", headers=KEY_HEADERS, timeout=10).json()
    assert keyed["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    operations = [(path, method, op) for path, ops in keyed["paths"].items() for method, op in ops.items()]
    assert len(operations) >= 5
    for path, method, operation in operations:
        expected = [] if path in PROBES else [{"bearerAuth": []}]
        assert operation.get("security") == expected, (method, path, operation.get("security"))
        if path not in PROBES:
            assert "401" in operation["responses"], (method, path)
    # Without a key nothing asks for a token, and the document says so.
    keyless = httpx.get(open_server.base_url + "/openapi.json", timeout=10).json()
    assert all(op.get("security") == [] for ops in keyless["paths"].values() for op in ops.values())
    # The document needs the token when there is a key (it is a route like the others).
    assert httpx.get(keyed_server.base_url + "/openapi.json", timeout=10).status_code == 401


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_exact_version_assets(keyed_server, page):
    """/docs and /redoc: every external URL is an npm package at an exact version (x.y.z) on jsDelivr,
    never a floating major (FastAPI's default swagger-ui-dist@5) or another host (fonts, favicon)."""
    html = httpx.get(keyed_server.base_url + page, headers=KEY_HEADERS, timeout=10).text
    urls = re.findall(r"https?://[^\s\"'<>)]+", html)
    assert any(url.endswith(".js") for url in urls), urls
    for url in urls:
        assert re.fullmatch(r"https://cdn\.jsdelivr\.net/npm/[a-z-]+@\d+\.\d+\.\d+/[\w./-]+", url), url


class Tags(HTMLParser):
    """Every start tag of a page with its attributes."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/docs", {app_module.SWAGGER_UI_JS_URL, app_module.SWAGGER_UI_CSS_URL}),
        ("/redoc", {app_module.REDOC_JS_URL}),
    ],
)
def test_docs_pages_pin_their_scripts_and_stylesheets_with_sri(keyed_server, page, assets):
    """Every off-site <script src> and <link rel=stylesheet> carries integrity= (the constant of its
    URL, computed from the npm tarballs: scripts/sri-hashes.sh) and crossorigin="anonymous"; the
    only other off-site URL is the favicon (browsers apply no SRI to icons). Nothing downloaded."""
    assert httpx.get(keyed_server.base_url + page, timeout=10).status_code == 401  # still keyed
    html = httpx.get(keyed_server.base_url + page, headers=KEY_HEADERS, timeout=10).text
    pinned, other = set(), set()
    for tag, attrs in Tags(html).tags:
        for name in ("src", "href"):
            url = attrs.get(name) or ""
            if not url.startswith(("http://", "https://", "//")):
                continue
            rel = (attrs.get("rel") or "").split()
            if tag == "script" or (tag == "link" and "stylesheet" in rel):
                assert attrs.get("integrity") == app_module.SRI_HASHES[url], (tag, attrs)
                assert attrs.get("crossorigin") == "anonymous", (tag, attrs)
                pinned.add(url)
            else:
                assert tag == "link" and "icon" in rel and url == app_module.FAVICON_URL, (tag, attrs)
                other.add(url)
    assert pinned == assets and other == {app_module.FAVICON_URL}, (pinned, other)
    for digest in app_module.SRI_HASHES.values():  # 48 bytes of SHA-384 in base64
        assert re.fullmatch(r"sha384-[A-Za-z0-9+/]{64}", digest), digest


def test_a_page_loading_an_external_asset_without_a_hash_is_refused():
    with_integrity = app_module.with_integrity
    hashes = {"https://cdn.example/a.js": "sha384-x"}
    tagged = with_integrity('<script src="https://cdn.example/a.js"></script><script>x()</script>', hashes)
    assert tagged == (
        '<script src="https://cdn.example/a.js" integrity="sha384-x" crossorigin="anonymous"></script>'
        "<script>x()</script>"
    )
    for page in (
        "<script src='https://cdn.example/b.js'></script>",  # any quoting
        '<link rel="stylesheet" href="//cdn.example/b.css"/>',
        '<script src="https://cdn.example/a.js" integrity="sha384-y"></script>',
        '<script src="/local.js"></script>',  # nothing external: the page is not what we expect
    ):
        with pytest.raises(RuntimeError):
            with_integrity(page, hashes)
