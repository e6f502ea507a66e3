"""The one validation-error formatter (shared/validation.py), and that each place uses it."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from shared.validation import format_validation_error, validation_messages


class Inner(BaseModel):
    n: int


class Model(BaseModel):
    secret: str
    inner: Inner

    @field_validator("secret")
    @classmethod
    def _long(cls, value: str) -> str:
        if len(value) < 8:
            raise ValueError("at least 8 characters")
        return value


def error(data: dict) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Model.model_validate(data)
    return info.value


def test_one_line_per_error_without_inputs():
    err = error({"secret": "hunter2", "inner": {"n": "many"}})
    lines = validation_messages(err)
    assert lines == [
        "secret: at least 8 characters",
        "inner.n: Input should be a valid integer, unable to parse string as an integer",
    ]
    assert "hunter2" not in format_validation_error(err) and "many" not in format_validation_error(err)


def test_root_and_separator_and_limit():
    err = error([1, 2])  # not an object: a whole-model error with an empty location
    assert validation_messages(err, root="body")[0].startswith("body: ")
    assert not validation_messages(err)[0].startswith(":")
    err = error({})
    assert format_validation_error(err, sep="\n") == "secret: Field required\ninner: Field required"
    assert len(format_validation_error(error({"secret": "x" * 5000, "inner": {}}), limit=20)) == 20


def test_every_formatter_is_this_one():
    """The server's 422, the worker's dead letter, the server settings and the trainer config all
    format the same error the same way (there were five formatters)."""
    from reward_server.settings import ServerSettings, describe_settings_error
    from trainer.config import ConfigError, build_config

    with pytest.raises(ValidationError) as info:
        ServerSettings(max_batch_size=0, api_key="short")  # a validator's message: no "Value error, "
    described = describe_settings_error(info.value)
    assert described == "  " + format_validation_error(info.value, root="settings", sep="\n  ", limit=None)
    assert "  api_key: api_key must have at least" in described and "short" not in described
    with pytest.raises(ConfigError) as config_error:
        build_config("tiny", {"run": {"seed": "x"}})
    assert "run.seed: Input should be a valid integer" in str(config_error.value)
