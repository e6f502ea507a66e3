"""The HTTP face of the reward server: thin FastAPI routes over a ``RewardService`` built at start-up.

Every error is a JSON ``ErrorResponse`` (shared/schemas.py) with a short code and a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from reward_server.budget import BODY_BYTES_FACTOR, Reservation
from reward_server.errors import ApiError, error_response
from reward_server.idempotency import binary_digest
from reward_server.metrics import ServerMetrics
from reward_server.service import RewardService
from reward_server.settings import ServerSettings
from reward_server.timeouts import METRICS_STATE_KEY, BodyDeadline
from shared import binary
from shared.binary import BinaryRequestError, BinaryScoreRequest
from shared.errors import status_meanings
from shared.schemas import ErrorResponse, RewardList, ScoreRequest, ScoreResponse
from shared.validation import format_validation_error

logger = logging.getLogger(__name__)

# What each status means on POST /score, with the codes it carries (shared/errors.py has the table).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "model": ErrorResponse,
        "description": f"{text} Codes: {', '.join(status_meanings().get(status, ['http_error']))}.",
    }
    for status, text in {
        400: "Unknown reward (the reason lists the valid names), or a binary body that is not "
        "well-formed safetensors or whose header disagrees with its length (truncated).",
        401: "Missing or wrong bearer token.",
        408: "The body did not arrive within body_timeout_s (the connection closes).",
        409: "request_id reused for a different request.",
        413: "Body, image count or image pixels over the limits, or over the whole memory budget.",
        415: "A CORS-simple Content-Type (text/plain, form, multipart).",
        422: "Malformed request or image (JSON), or a binary body with the wrong dtype, shape or fields.",
        429: "Overloaded (in-flight limits or memory budget); retry after Retry-After seconds.",
        500: "A scorer failed (reason given).",
        502: "The VLM judge failed (reason given).",
        503: "Not ready (models loading, load failed, or shutting down).",
    }.items()
}


# With an api_key, every route needs the bearer token (an app dependency: a route added later is
# protected too, /docs and /openapi.json included) except these probes: Kubernetes sends no token.
# Without the token they say only ok / not ready, never why (the reason may hold paths).
OPEN_PATHS = frozenset({"/healthz", "/readyz"})

# The documentation pages' assets, at exact versions (FastAPI's defaults are floating majors such as
# swagger-ui-dist@5, so a new release on the CDN would run in every reader's browser unreviewed);
# no Google Fonts for ReDoc and no favicon from fastapi.tiangolo.com. Bump deliberately, hashes too.
SWAGGER_UI_VERSION = "5.35.0"
REDOC_VERSION = "2.5.4"
SWAGGER_UI_CDN = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}"
SWAGGER_UI_JS_URL = f"{SWAGGER_UI_CDN}/swagger-ui-bundle.js"
SWAGGER_UI_CSS_URL = f"{SWAGGER_UI_CDN}/swagger-ui.css"
REDOC_JS_URL = f"https://cdn.jsdelivr.net/npm/redoc@{REDOC_VERSION}/bundles/redoc.standalone.js"
# Subresource Integrity of those files: the browser runs them only if they hash to this (a CDN or
# package compromise cannot swap them). Computed from the published npm tarballs, whose files
# jsDelivr's /npm/ serves unchanged: `npm pack swagger-ui-dist@5.35.0 redoc@2.5.4` (the versions
# above; npm checks each tarball against the registry's sha512), then
# `openssl dgst -sha384 -binary FILE | openssl base64 -A` of package/swagger-ui-bundle.js,
# package/swagger-ui.css and package/bundles/redoc.standalone.js. scripts/sri-hashes.sh does all of
# it for the versions above and compares with these.
SWAGGER_UI_JS_SRI = "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9"
SWAGGER_UI_CSS_SRI = "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I"
REDOC_JS_SRI = "sha384-w447zOpYfw/1Tv/5AK9NfHTlQIqE3RVR6KY62jCyy9zNDgO64cMwGGP1Fj0zJVf5"
SRI_HASHES = {
    SWAGGER_UI_JS_URL: SWAGGER_UI_JS_SRI,
    SWAGGER_UI_CSS_URL: SWAGGER_UI_CSS_SRI,
    REDOC_JS_URL: REDOC_JS_SRI,
}
# The favicon has no integrity: browsers ignore SRI on <link rel="icon"> (it applies to scripts and
# stylesheets only). An image, not code; from the same pinned package.
FAVICON_URL = f"{SWAGGER_UI_CDN}/favicon-32x32.png"

# Content types a browser sends cross-site without a CORS preflight: refused on POST /score.
CORS_SIMPLE_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})


class StartTags(HTMLParser):
    """The <script> and <link> start tags of a page: (name, attributes, exact source text)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None], str]] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "link"):
            self.tags.append((tag, dict(attrs), self.get_starttag_text() or ""))


def external_asset(tag: str, attributes: dict[str, str | None]) -> str | None:
    """The URL of an off-site script or stylesheet tag, else None (inline, same-site, favicon)."""
    if tag == "script":
        url = attributes.get("src")
    else:
        url = attributes.get("href") if "stylesheet" in (attributes.get("rel") or "").split() else None
    return url if url is not None and url.startswith(("https://", "http://", "//")) else None


def with_integrity(html: str, hashes: dict[str, str] = SRI_HASHES) -> str:
    """``html`` with ``integrity`` and ``crossorigin="anonymous"`` on every external script and
    stylesheet (FastAPI's get_swagger_ui_html / get_redoc_html cannot emit them). An external one
    without a hash in ``hashes``: RuntimeError (at start-up: the pages are built once), never a page
    that loads an unverified file."""
    added = 0
    for tag, attributes, text in StartTags(html).tags:
        url = external_asset(tag, attributes)
        if url is None:
            continue  # the favicon too: browsers apply no SRI to icons
        if url not in hashes:
            raise RuntimeError(f"no Subresource Integrity hash for {url} (reward_server/app.py)")
        if "integrity" in attributes or "crossorigin" in attributes:
            raise RuntimeError(f"{url} has an integrity or crossorigin attribute already")
        end = -2 if text.endswith("/>") else -1
        tagged = f'{text[:end].rstrip()} integrity="{hashes[url]}" crossorigin="anonymous"{text[end:]}'
        html = html.replace(text, tagged, 1)  # the first untagged copy (the same tag twice: both)
        added += 1
    if not added:
        raise RuntimeError("no external script or stylesheet found to add integrity to")
    return html


async def read_body(
    request: Request, limit: int, reservation: Reservation | None = None, hint: str = ""
) -> bytearray:
    """The request body, refusing (413) anything over ``limit`` bytes before it is all read or parsed
    (``hint`` ends the 413's reason).

    With a ``reservation``, ``BODY_BYTES_FACTOR`` x the body is reserved against the memory budget
    before it is read: all of it from Content-Length, or chunk by chunk for a chunked body (429 or
    413 from the budget, and nothing more is read).
    """
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    if size is not None and size > limit:
        raise ApiError(
            413, "body_too_large", f"request body of {declared} bytes is over the limit of {limit}{hint}"
        )
    if reservation is not None and size is not None:
        reservation.grow(BODY_BYTES_FACTOR * size, f"a body of {size} bytes")
    body = bytearray()
    async for chunk in request.stream():
        if size is None and reservation is not None:
            reservation.grow(BODY_BYTES_FACTOR * len(chunk), "the body")
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes{hint}")
        if size is not None and len(body) > size:
            raise ApiError(400, "bad_request", "request body longer than its Content-Length")
    return body


# The binary body, as the OpenAPI document describes it (shared/binary.py has the details).
BINARY_BODY_SCHEMA: dict[str, Any] = {
    "type": "string",
    "format": "binary",
    "description": (
        "A safetensors file: 8-byte little-endian header length L, an L-byte JSON header "
        '{"__metadata__": {"request_id": str, "reward": str, "prompts": "<JSON list of str>", '
        '"metadata": "<JSON list of objects>" (optional)}, "images": {"dtype": "U8", '
        '"shape": [N, H, W, 3], "data_offsets": [0, N*H*W*3]}}, then the N RGB uint8 images, C order. '
        "Header checked against the limits before the pixels are read: 413 over a limit, 400 when "
        "not well-formed or its sizes disagree with the body, 422 for another dtype or shape."
    ),
}


async def read_binary_request(
    request: Request, service: RewardService, reservation: Reservation
) -> tuple[BinaryScoreRequest, str | None]:
    """Stream a binary body; returns the request and its idempotency fingerprint (None if disabled).

    Its header is checked against the limits (and Content-Length) as soon as its bytes are in,
    before the pixels are read; the pixels land in one buffer of the exact size, which the scorers
    then read in place, and are hashed chunk by chunk as they arrive (while still in the CPU cache:
    cheaper than a second pass over the whole body, and the fingerprint is ready with the body).
    """
    limits = service.binary_limits
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    if size is not None and size > limits.max_body_bytes:
        raise ApiError(
            413,
            "body_too_large",
            f"request body of {declared} bytes is over the limit of {limits.max_body_bytes}",
        )
    if size is not None:
        reservation.grow(BODY_BYTES_FACTOR * size, f"a body of {size} bytes")
    head = bytearray()  # the first 8 + L bytes, until the header is checked
    header: binary.Header | None = None
    fields = None
    buffer: np.ndarray | None = None
    digest = None
    received = 0
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            if header is None:
                if size is None:
                    reservation.grow(BODY_BYTES_FACTOR * len(chunk), "the body")
                head += chunk
                if len(head) < binary.PREFIX_BYTES:
                    continue
                needed = binary.PREFIX_BYTES + binary.header_length(head, limits)
                if len(head) < needed:
                    continue
                header = await parse_header(head[:needed], limits)
                fields = binary.request_fields(header)  # 422 before the pixels are read
                if size is not None:
                    binary.check_length(header, size, "Content-Length")
                else:  # chunked: the header says how long the body is
                    reservation.grow(BODY_BYTES_FACTOR * header.total_bytes - reservation.held, "the body")
                buffer = np.empty(header.total_bytes, dtype=np.uint8)
                if service.idempotency.enabled:
                    digest = binary_digest(fields, header.shape)
                chunk = bytes(head)
                del head[:]
            assert buffer is not None
            end = received + len(chunk)
            if end > buffer.size:
                raise binary.MalformedBodyError(
                    f"body is longer than the {buffer.size} bytes its header describes"
                )
            buffer[received:end] = np.frombuffer(chunk, dtype=np.uint8)
            if digest is not None:
                digest.update(buffer[max(received, header.data_start) : end])
            received = end
        if header is None:  # ended before its header did
            binary.parse_header(head, limits)
            raise binary.MalformedBodyError(f"body of {len(head)} bytes ends inside its header (truncated)")
        binary.check_length(header, received)
        assert buffer is not None
        parsed = service.parse_binary(buffer, header, fields)
        return parsed, digest.hexdigest()[:32] if digest is not None else None
    except BinaryRequestError as err:
        raise ApiError(err.status, err.error, str(err)[:1000]) from None


async def parse_header(data: bytearray, limits: binary.Limits) -> binary.Header:
    """``binary.parse_header``, in a thread when the header is large (prompts and metadata are JSON)."""
    if len(data) > 256 * 1024:
        return await asyncio.to_thread(binary.parse_header, bytes(data), limits)
    return binary.parse_header(data, limits)


def request_host(headers: list[tuple[bytes, bytes]]) -> str:
    """The Host header without its port, lower-cased ('[::1]:8000' -> '::1')."""
    value = next((v for k, v in headers if k == b"host"), b"").decode("latin-1").strip().lower()
    if value.startswith("["):  # an IPv6 literal
        return value[1:].partition("]")[0]
    return value.partition(":")[0]


class HostAllowList:
    """Refuse requests whose Host header is not allowed (400 ``invalid_host``, our error schema).

    DNS rebinding: a web page on evil.example re-resolves its name to 127.0.0.1 and scripts a
    browser against a keyless loopback server; the browser still sends ``Host: evil.example``.
    (Starlette's TrustedHostMiddleware does the same check but answers in plain text and cuts an
    IPv6 literal at its first colon.)
    """

    def __init__(self, app: Any, allowed: list[str]):
        self.app = app
        self.any = "*" in allowed
        self.allowed = frozenset(allowed)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.any or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = request_host(scope["headers"])
        if host in self.allowed:
            await self.app(scope, receive, send)
            return
        err = ApiError(400, "invalid_host", f"Host {host[:100]!r} is not served here (allowed_hosts)")
        await error_response(err)(scope, receive, send)


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """Build the app; scorers and batchers are created by its lifespan, once."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    service = RewardService(settings, metrics)
    api_key = settings.api_key.encode() if settings.api_key else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # Load in the background so /healthz answers (and /readyz says 503) while big models load.
        loading = asyncio.create_task(service.load())
        try:
            # The lifespan state reaches uvicorn's connections too: the protocol counts the
            # connections it cuts (reward_server/timeouts.py) in this app's metrics.
            yield {METRICS_STATE_KEY: metrics}
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await service.close()

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "missing bearer token", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), api_key):
            raise ApiError(401, "unauthorized", "invalid bearer token", {"WWW-Authenticate": "Bearer"})

    async def require_token(request: Request) -> None:
        """The app-wide dependency: runs before every route's body is read (401 first); async, so it
        stays on the event loop (a sync dependency would cost a thread hop per request)."""
        path = getattr(request.scope.get("route"), "path", None)
        if path in OPEN_PATHS:
            return
        try:
            check_auth(request)
        except ApiError:
            if path == "/score":  # counted like every other answer of POST /score
                metrics.requests.labels("unknown", "401").inc()
            raise

    app = FastAPI(
        title="ddpo-stack reward server",
        summary="Scores images for DDPO training: JSON in and out, never pickle.",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(require_token)],
        # FastAPI serves its own docs as plain routes, which app dependencies do not cover: ours
        # below are ordinary routes, so the token protects them like the rest.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = service
    app.add_middleware(HostAllowList, allowed=settings.host_allow_list())
    # The body's deadline (408 request_timeout from receive(); reward_server/timeouts.py).
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        metrics.errors.labels(err.error).inc()
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        metrics.errors.labels("invalid_request").inc()
        return error_response(ApiError(422, "invalid_request", format_validation_error(err, root="body")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(ApiError(err.status_code, code, str(err.detail), dict(err.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        metrics.errors.labels("internal_error").inc()
        return error_response(ApiError(500, "internal_error", f"internal error ({type(err).__name__})"))

    @app.post(
        "/score",
        response_model=ScoreResponse,
        responses=ERROR_RESPONSES,
        summary="Score a batch of images with one reward.",
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "JSON with base64 PNG images, or the same request as a binary "
                f"safetensors body (Content-Type: {binary.MEDIA_TYPE}): raw uint8 pixels, no encoding.",
                "content": {
                    "application/json": {"schema": ScoreRequest.model_json_schema()},
                    binary.MEDIA_TYPE: {"schema": BINARY_BODY_SCHEMA},
                },
            }
        },
    )
    async def score(request: Request) -> Response:
        started = time.perf_counter()
        label = "unknown"
        status = 500
        reservation = service.budget.reservation()
        try:
            if not service.ready:
                raise service.not_ready_error()
            media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type in CORS_SIMPLE_TYPES:
                # A web page can make a browser POST these cross-site without a preflight (CSRF).
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    f"POST /score needs Content-Type: application/json or {binary.MEDIA_TYPE}",
                )
            parsed: ScoreRequest | BinaryScoreRequest
            fp: str | None = None
            if media_type == binary.MEDIA_TYPE:
                # The pixels stay in the body's buffer (held by the reservation's 2 x body): the
                # second share covers the scorers' per-image working copies.
                parsed, fp = await read_binary_request(request, service, reservation)
                metrics.body_bytes.labels("binary").inc(parsed.body_bytes)
            else:
                limit = min(settings.max_body_bytes, settings.max_json_body_bytes)
                hint = f" for JSON; send large batches as a binary body (Content-Type: {binary.MEDIA_TYPE})"
                body = await read_body(request, limit, reservation, hint)
                metrics.body_bytes.labels("json").inc(len(body))
                parsed = await service.aparse(body)
                # The parsed request holds the strings now (the fingerprint copies one image at a
                # time while hashing it: within the share of the body reserved for parsing).
                del body
            if parsed.reward in service.batchers:
                label = parsed.reward
            response, replayed = await service.score(parsed, fp, reservation)
            status = 200
            if replayed:
                metrics.replays.labels(label).inc()
            headers = {"Idempotent-Replay": "true"} if replayed else {}
            return JSONResponse(response.model_dump(), headers=headers)
        except ApiError as err:
            status = err.status
            raise
        except ClientDisconnect:  # hung up before its body ended: nobody to answer, nothing broken
            status = 499
            raise ApiError(400, "client_disconnected", "the client hung up before its body ended") from None
        finally:
            reservation.release()
            metrics.requests.labels(label, str(status)).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - started)

    @app.get("/rewards", response_model=RewardList, responses={401: ERROR_RESPONSES[401]})
    async def rewards() -> RewardList:
        """The reward names this server computes (enabled at start-up)."""
        return RewardList(rewards=service.reward_names)

    def authorized(request: Request) -> bool:
        try:
            check_auth(request)
        except ApiError:
            return False
        return True

    @app.get("/healthz", responses={503: ERROR_RESPONSES[503]})
    async def healthz(request: Request) -> dict[str, str]:
        """Alive (the process answers). 503 only if loading the models failed (details with the key)."""
        if service.load_error is not None:
            raise service.not_ready_error(detailed=authorized(request))
        return {"status": "ok"}

    @app.get("/readyz", responses={503: ERROR_RESPONSES[503]})
    async def readyz(request: Request) -> dict[str, Any]:
        """Ready to score: every enabled reward is loaded. 503 (with Retry-After) until then."""
        if not service.ready:
            raise service.not_ready_error(detailed=authorized(request))
        return {"status": "ready", "rewards": service.reward_names}

    @app.get("/metrics", response_class=Response, responses={401: ERROR_RESPONSES[401]})
    async def prometheus() -> Response:
        """Prometheus metrics of this worker process."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus every operation's auth: bearer on the token-protected routes when
        an api_key is set, none (``security: []``) elsewhere; a fuzzer reads it from here."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The server's api_key (DDPO_REWARD_API_KEY), when it has one.",
                }
            }
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    needs_token = api_key is not None and path not in OPEN_PATHS
                    operation["security"] = [{"bearerAuth": []}] if needs_token else []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    # The pages are static: built once (with their SRI attributes), served as they are.
    swagger_ui_page = with_integrity(
        bytes(
            get_swagger_ui_html(
                openapi_url="/openapi.json",
                title=f"{app.title} - Swagger UI",
                swagger_js_url=SWAGGER_UI_JS_URL,
                swagger_css_url=SWAGGER_UI_CSS_URL,
                swagger_favicon_url=FAVICON_URL,
            ).body
        ).decode()
    )
    redoc_page = with_integrity(
        bytes(
            get_redoc_html(
                openapi_url="/openapi.json",
                title=f"{app.title} - ReDoc",
                redoc_js_url=REDOC_JS_URL,
                redoc_favicon_url=FAVICON_URL,
                with_google_fonts=False,
            ).body
        ).decode()
    )

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return HTMLResponse(swagger_ui_page)

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return HTMLResponse(redoc_page)

    return app


def app_from_env() -> FastAPI:
    """uvicorn factory (``--factory``) for multi-worker runs: settings come from the environment."""
    return create_app(ServerSettings())
