"""Configuration: presets validate, bad values and unknown fields are errors that name the field."""

import json

import pytest

from trainer.cli import build_parser, main
from trainer.config import PRESETS, ConfigError, build_config, parse_overrides


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_valid(preset):
    cfg = build_config(preset)
    assert cfg.sample.eta > 0


def test_paper_presets_use_paper_hyperparameters():
    cfg = build_config("compressibility")
    assert cfg.model.pretrained == "CompVis/stable-diffusion-v1-4" and cfg.model.dtype == "fp16"
    assert (cfg.sample.num_steps, cfg.sample.eta, cfg.sample.guidance_scale) == (50, 1.0, 5.0)
    assert cfg.train.learning_rate == 3e-4 and cfg.train.clip_range == 1e-4 and cfg.train.adv_clip_max == 5
    assert cfg.sample.batch_size * cfg.sample.num_batches_per_epoch * 8 == 256  # 8 GPUs
    assert build_config("aesthetic").advantage.buffer_size == 32
    assert build_config("alignment").prompts.set == "animal_activities"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--train.learning_rate", "-1"], "train.learning_rate"),
        (["--sample.eta", "0"], "sample.eta"),
        (["--sample.nonsense", "1"], "sample.nonsense"),
        (["--model.dtype", "fp8"], "model.dtype"),
        (["--train.batch_size", "3"], "train.batch_size"),
        (["--prompts.set", "file"], "prompts.path"),
        (["--advantage.min_count", "99"], "advantage.min_count"),
        (["--train.algorithm", "ddpo_sf", "--train.num_inner_epochs", "2"], "train.num_inner_epochs"),
    ],
)
def test_bad_values_name_the_field(args, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config("tiny", parse_overrides(args))


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"valid presets: .*tiny"):
        build_config("nope")


def test_overrides_parse_json_values_and_equals_form():
    overrides = parse_overrides(
        [
            "--train.learning_rate=1e-3",
            "--model.lora_target_modules",
            '["to_q"]',
            "--sample.negative_prompt",
            "blurry",
        ]
    )
    cfg = build_config("tiny", overrides)
    assert cfg.train.learning_rate == 1e-3
    assert cfg.model.lora_target_modules == ["to_q"]
    assert cfg.sample.negative_prompt == "blurry"
    with pytest.raises(ConfigError, match=r"--train\.learning_rate: expected one argument"):
        parse_overrides(["--train.learning_rate"])


def test_every_field_is_documented():
    from trainer.config import Config

    for section in Config.model_fields.values():
        for name, field in section.annotation.model_fields.items():
            assert field.description, f"{section.annotation.__name__}.{name} has no description"
    text = build_parser()[0].format_help()  # ddpo-train --help
    assert "--train.clip_range" in text and "--reward.name" in text


def test_cli_errors_exit_2_with_the_field(capsys):
    assert main(["--preset", "tiny", "--train.learning_rate", "abc"]) == 2
    assert "train.learning_rate" in capsys.readouterr().err


def test_cli_print_config(capsys, tmp_path):
    extra = tmp_path / "c.json"
    extra.write_text(json.dumps({"run": {"num_epochs": 3}}))
    assert (
        main(["--preset", "tiny", "--config", str(extra), "--sample.num_steps", "7", "--print-config"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["run"]["num_epochs"] == 3 and printed["sample"]["num_steps"] == 7


def test_cli_help_lists_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--sample.guidance_scale" in out and "tiny" in out


def test_resume_uses_the_runs_own_config(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints/epoch_0003").mkdir(parents=True)
    (run / "checkpoints/epoch_0003/training_state.pt").write_bytes(b"")
    (run / "checkpoints/latest").write_text("epoch_0003\n")
    stored = build_config("tiny", {"sample": {"num_steps": 7}, "model": {"lora_rank": 2}}).model_dump()
    (run / "config.json").write_text(json.dumps(stored))
    # No preset: the stored config is the base; the command line still overrides it.
    assert main(["--run.resume", str(run), "--run.num_epochs", "9", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sample"]["num_steps"] == 7 and printed["model"]["lora_rank"] == 2
    assert printed["run"]["num_epochs"] == 9 and printed["run"]["resume"] == str(run)
    assert main(["--run.resume", str(tmp_path / "nothing"), "--print-config"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_eta_above_one_and_negative_seed_are_refused():
    with pytest.raises(ConfigError, match=r"sample\.eta"):
        build_config("tiny", {"sample": {"eta": 1.5}})
    with pytest.raises(ConfigError, match=r"run\.seed"):
        build_config("tiny", {"run": {"seed": -1}})


@pytest.mark.parametrize(
    ("heldout", "match"),
    [
        (["a purple seven on a blue background"], r"prompts\.heldout.*unknown word 'purple'"),
        (["a red seven on a green background"], r"prompts\.heldout.*is a training prompt"),
    ],
)
def test_heldout_digits_prompts_are_checked(heldout, match):
    with pytest.raises(ConfigError, match=match):
        build_config("digits-alignment", {"prompts": {"heldout": heldout}})
    assert build_config("digits-alignment", {"prompts": {"heldout": ["a red seven on a blue background"]}})


@pytest.mark.parametrize(
    ("sample", "match"),
    [
        ({"window_size": 11}, r"sample: window_size \(11\) is larger than num_steps \(10\)"),
        ({"window_size": 2, "window_start": 9}, r"sample: a window of 2 steps starting at step 9"),
        ({"window_size": 2, "window_start": 3, "window_start_max": 1}, r"sample: window_start_max"),
        ({"window_start": 2}, r"sample: window_start/window_start_max need window_size"),
        ({"window_size": 2, "eta": 0}, r"sample\.eta"),
    ],
)
def test_bad_windows_name_the_field(sample, match):
    with pytest.raises(ConfigError, match=match):
        build_config("tiny", {"sample": sample})


def test_window_sets_the_trained_steps():
    cfg = build_config("tiny", {"sample": {"window_size": 4}, "train": {"timestep_fraction": 0.5}})
    assert cfg.num_train_timesteps() == 2
