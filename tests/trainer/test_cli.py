"""``ddpo-train``'s command line: one flag per config field (pydantic-settings), documented in
--help, YAML/JSON config files between the preset and the flags, errors that name the field."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from trainer.cli import main
from trainer.config import Config, ConfigError, parse_overrides


def squeezed(text: str) -> str:
    """Help text without whitespace: argparse wraps lines (and breaks words at hyphens)."""
    return re.sub(r"\s+", "", text)


def printed_config(capsys, *args: str) -> dict:
    assert main([*args, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    text = squeezed(out)
    for option in ["--preset", "--config", "--print-config"]:
        assert option in out
    for section, section_field in Config.model_fields.items():
        assert f"{section} options:" in out
        for name, field in section_field.annotation.model_fields.items():
            flag = f"--{section}.{name}"
            assert re.search(rf"{re.escape(flag)}\s", out), f"{flag} missing from --help"
            assert squeezed(field.description) in text, f"{flag}: description missing"


def test_yaml_config_file_sits_between_preset_and_flags(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent(
            """
            # a YAML config: sections as keys, like config.json
            run: {num_epochs: 3, name: from-yaml}
            sample:
              num_steps: 9
              negative_prompt: blurry
            model:
              lora_target_modules: [to_q, to_v]
            """
        )
    )
    cfg = printed_config(capsys, "--preset", "tiny", "--config", str(config), "--sample.num_steps", "7")
    assert cfg["run"]["num_epochs"] == 3 and cfg["run"]["name"] == "from-yaml"
    assert cfg["sample"]["num_steps"] == 7  # the flag beats the file
    assert cfg["sample"]["negative_prompt"] == "blurry"
    assert cfg["model"]["lora_target_modules"] == ["to_q", "to_v"]
    assert cfg["model"]["lora_rank"] == 16  # the preset is the base


def test_flag_values(capsys):
    cfg = printed_config(
        capsys,
        "--preset",
        "tiny",
        "--run.name",
        "123",  # a string field stays a string
        "--model.use_lora=false",
        "--model.lora_target_modules",
        "to_q,to_k",
        "--reward.urls",
        '["http://a:8000", "http://b:8000"]',
        "--sample.resolution",
        "null",
    )
    assert cfg["run"]["name"] == "123" and cfg["model"]["use_lora"] is False
    assert cfg["model"]["lora_target_modules"] == ["to_q", "to_k"]
    assert cfg["reward"]["urls"] == ["http://a:8000", "http://b:8000"]
    assert cfg["sample"]["resolution"] is None


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--train.learning_rate", "abc"], "train.learning_rate"),
        (["--model.dtype", "fp8"], "model.dtype"),
        (["--sample.nonsense", "1"], "--sample.nonsense"),
        (["--run.num", "3"], "--run.num"),  # no abbreviations of --run.num_epochs
        (["--train.learning_rate"], "--train.learning_rate"),
        (["--preset", "nope"], "--preset"),
    ],
)
def test_bad_flags_exit_2_naming_the_field(capsys, args, field):
    assert main(["--preset", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert field in err


def test_bad_value_in_a_config_file_names_the_field(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  learning_rate: -1\n")
    assert main(["--preset", "tiny", "--config", str(config), "--print-config"]) == 2
    assert "train.learning_rate" in capsys.readouterr().err
    config.write_text("train: [unclosed\n")
    assert main(["--preset", "tiny", "--config", str(config), "--print-config"]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_parse_overrides_is_the_command_line_parser():
    assert parse_overrides(["--train.learning_rate=1e-3", "--run.resume", "/runs/x"]) == {
        "train": {"learning_rate": "1e-3"},
        "run": {"resume": "/runs/x"},
    }
    with pytest.raises(ConfigError, match="--print-config"):
        parse_overrides(["--print-config"])  # an option of ddpo-train, not a config field
