"""Malformed bodies never get a 5xx: fuzzed bytes, JSON values and near-valid requests, over real HTTP."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.codec import encode_png_b64
from shared.schemas import ErrorResponse
from tests.reward_server.server_utils import start_reward_server_thread

VALID_IMAGE = encode_png_b64(np.zeros((8, 8, 3), np.uint8))
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
field_values = st.one_of(
    json_values,
    st.lists(st.text(max_size=30), max_size=4),
    st.lists(
        st.sampled_from([VALID_IMAGE, "", "====", base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()]),
        max_size=4,
    ),
)


@pytest.fixture(scope="module")
def client():
    running = start_reward_server_thread({"max_body_bytes": 100_000, "max_image_pixels": 64 * 64})
    with httpx.Client(base_url=running.base_url, timeout=30) as http:
        yield http
    running.stop()


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        ErrorResponse.model_validate(response.json())


@FUZZ
@given(raw=st.binary(max_size=2000))
def test_random_bytes(client, raw):
    check(client.post("/score", content=raw, headers={"content-type": "application/json"}))


@FUZZ
@given(value=json_values)
def test_random_json(client, value):
    check(client.post("/score", content=json.dumps(value)))  # NaN/Infinity tokens included


@FUZZ
@given(
    fields=st.dictionaries(
        st.sampled_from(["request_id", "reward", "images", "prompts", "metadata", "other"]), field_values
    )
)
def test_random_fields(client, fields):
    check(client.post("/score", content=json.dumps(fields)))


@FUZZ
@given(
    n=st.integers(1, 3),
    reward=st.sampled_from(["jpeg_compressibility", "jpeg_incompressibility", "aesthetic", "", "x" * 300]),
    image_bytes=st.lists(st.binary(max_size=300), min_size=1, max_size=3),
    prompts=st.lists(st.text(max_size=50), max_size=4),
    request_id=st.text(max_size=250),
)
def test_near_valid_requests(client, n, reward, image_bytes, prompts, request_id):
    images = [VALID_IMAGE] * n + [base64.b64encode(b).decode() for b in image_bytes]
    body = {"request_id": request_id, "reward": reward, "images": images, "prompts": prompts}
    check(client.post("/score", content=json.dumps(body)))
