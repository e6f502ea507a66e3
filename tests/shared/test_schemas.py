"""The wire schemas keep their contract: counts match, NaN/inf never leaves the server."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from shared.schemas import ScoreRequest, ScoreResponse


def test_counts_must_match():
    with pytest.raises(ValidationError, match="same length"):
        ScoreRequest(request_id="r", reward="x", images=["a", "b"], prompts=["p"])
    with pytest.raises(ValidationError, match="metadata"):
        ScoreRequest(request_id="r", reward="x", images=["a"], prompts=["p"], metadata=[{}, {}])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards_are_rejected(bad):
    with pytest.raises(ValidationError, match="non-finite"):
        ScoreResponse(request_id="r", reward="x", rewards=[1.0, bad], details=[{}, {}])


def test_json_round_trip():
    response = ScoreResponse(request_id="r", reward="x", rewards=[0.5], details=[{"answer": "a cat"}])
    assert ScoreResponse.model_validate_json(response.model_dump_json()) == response
