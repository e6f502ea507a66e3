"""run.loggers: TensorBoard and W&B (offline) mirror metrics.jsonl, the eval grids and the config.

Each tracker's files are read back with its own format: TensorBoard's EventAccumulator, and the
.wandb file's records (LevelDB-style log of wandb's protobuf Records, the format `wandb sync` uploads).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch

from trainer.checkpoint import find_checkpoint
from trainer.config import ConfigError, RunConfig, build_config, parse_overrides
from trainer.loggers import LOGGERS, WandbLogger, make_loggers
from trainer.train import Trainer

pytest.importorskip("tensorboard", reason="needs tensorboard (pip install 'ddpo-stack[tracking]')")
pytest.importorskip("wandb", reason="needs wandb (pip install 'ddpo-stack[tracking]')")


@pytest.fixture(autouse=True)
def _wandb_sandbox(tmp_path, monkeypatch):
    """W&B with no account and nothing written outside the test's folder."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def wandb_records(path: Path):
    """The protobuf Records of one .wandb file (32 KiB blocks of chunks: crc32, length, kind, data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # the block's tail is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += room
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE.../LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_offline_runs(folder: Path) -> list[Path]:
    return sorted((folder / "wandb").glob("offline-run-*"))


def wandb_history(run_dir: Path) -> list[dict]:
    """The rows the run logged (without wandb's own _step/_runtime/_timestamp)."""
    (file,) = run_dir.glob("*.wandb")
    rows = []
    for record in wandb_records(file):
        if record.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in record.history.item:  # an image is one item per field: ["samples/eval", "path"]
                *parents, leaf = list(item.nested_key) or [item.key]
                node = row
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = json.loads(item.value_json)
            rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def wandb_run_record(run_dir: Path):
    (file,) = run_dir.glob("*.wandb")
    return next(r.run for r in wandb_records(file) if r.WhichOneof("record_type") == "run")


def numbers(line: dict) -> dict[str, float]:
    return {k: v for k, v in line.items() if isinstance(v, int | float)}


def test_the_registry_is_what_the_config_accepts():
    (choices,) = get_args(RunConfig.model_fields["loggers"].annotation)
    assert set(get_args(choices)) == set(LOGGERS)


def test_an_unknown_logger_is_a_config_error_naming_the_field_and_the_valid_names():
    with pytest.raises(ConfigError) as err:
        build_config("tiny", {"run": {"loggers": ["tensorboard", "mlflow"]}})
    message = str(err.value)
    assert "run.loggers" in message and "'tensorboard'" in message and "'wandb'" in message
    # The command-line form of the README.
    overrides = parse_overrides(["--run.loggers", '["tensorboard","wandb"]'])
    assert build_config("tiny", overrides).run.loggers == ["tensorboard", "wandb"]


@pytest.mark.parametrize("name, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_names_itself_and_the_extra(make_tiny_config, tmp_path, monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    with pytest.raises(ValueError, match=rf"needs the {package} package.*ddpo-stack\[tracking\]"):
        make_loggers(make_tiny_config(run={"loggers": [name]}), tmp_path)


def test_tensorboard_and_wandb_mirror_metrics_grids_and_config(make_tiny_config):
    trainer = Trainer(make_tiny_config(run={"num_epochs": 2, "loggers": ["tensorboard", "wandb"]}))
    trainer.run()
    folder = trainer.run_folder.path
    lines = trainer.run_folder.read_metrics()
    assert [m["epoch"] for m in lines] == [-1, 0, 1]

    # TensorBoard: every number of every line, same name, step = epoch (float32 in the event file).
    events = tensorboard_events(folder)
    tags = events.Tags()
    for line in lines:
        for key, value in numbers(line).items():
            assert key in tags["scalars"], key
            logged = {e.step: e.value for e in events.Scalars(key)}
            assert logged[line["epoch"]] == pytest.approx(value, rel=1e-6, abs=1e-30), (key, line["epoch"])
    assert [e.step for e in events.Scalars("reward_mean")] == [0, 1]
    assert [e.step for e in events.Scalars("eval_reward_mean")] == [-1, 0, 1]
    # The eval grids (base, then each epoch) as one image series, before_after.png at the last epoch.
    assert [e.step for e in events.Images("samples/eval")] == [-1, 0, 1]
    assert [e.step for e in events.Images("before_after")] == [1]
    assert "config/text_summary" in tags["tensors"]

    # W&B offline: one run in <run>/wandb with the same rows, the grids as images, the config.
    (run_dir,) = wandb_offline_runs(folder)
    state = json.loads((folder / "wandb" / WandbLogger.STATE).read_text())
    assert run_dir.name.endswith(state["run_id"]) and state["logged_through"] == 1
    run = wandb_run_record(run_dir)
    assert run.run_id == state["run_id"] and run.project == "ddpo"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["run"]["loggers"] == ["tensorboard", "wandb"]
    rows = wandb_history(run_dir)
    metric_rows = {row["epoch"]: row for row in rows if "eval_reward_mean" in row}
    assert sorted(metric_rows) == [-1, 0, 1]
    for line in lines:
        row = metric_rows[line["epoch"]]
        assert {k: row[k] for k in numbers(line)} == numbers(line)
        image = row["samples/eval"]
        assert image["_type"] == "image-file" and (run_dir / "files" / image["path"]).is_file()
    assert [row["epoch"] for row in rows if "before_after" in row] == [1]


def test_a_resumed_run_appends_to_the_same_folders_without_duplicate_steps(make_tiny_config):
    loggers = {"loggers": ["tensorboard", "wandb"], "eval_before_training": False}
    first = Trainer(make_tiny_config(run={"num_epochs": 3, "save_every": 2, **loggers}))
    first.run()
    folder = first.run_folder.path
    # Interrupted after epoch 2 was logged: resume from the checkpoint of epoch 1 (next epoch 2).
    checkpoint = find_checkpoint(folder / "checkpoints" / "epoch_0002")
    resumed = Trainer(make_tiny_config(run={"num_epochs": 3, "resume": str(checkpoint), **loggers}))
    assert resumed.next_epoch == 2 and resumed.run_folder.path == folder
    resumed.run()
    lines = resumed.run_folder.read_metrics()
    assert [m["epoch"] for m in lines] == [0, 1, 2]

    # TensorBoard: the same folder; the redone epoch replaces the first process's (one value per step).
    events = tensorboard_events(folder)
    for key in ("reward_mean", "loss", "time_training_s"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (m["epoch"], pytest.approx(m[key], rel=1e-6)) for m in lines
        ], key
    assert [e.step for e in events.Images("samples/eval")] == [0, 1, 2]

    # W&B: the same run id; epoch 2 is in the history once.
    runs = wandb_offline_runs(folder)
    assert len(runs) == 2 and len({wandb_run_record(r).run_id for r in runs}) == 1
    epochs = [row["epoch"] for r in runs for row in wandb_history(r) if "reward_mean" in row]
    assert epochs == [0, 1, 2]


def test_no_logger_by_default_and_loggers_change_no_weight_or_metric(make_tiny_config):
    cfg = make_tiny_config(run={"num_epochs": 1, "name": "plain"})
    assert cfg.run.loggers == []
    plain = Trainer(cfg)
    assert plain.run_folder.loggers.loggers == []
    plain.run()
    assert not (plain.run_folder.path / "tensorboard").exists()
    assert not (plain.run_folder.path / "wandb").exists()

    logged = Trainer(
        make_tiny_config(run={"num_epochs": 1, "name": "logged", "loggers": ["tensorboard", "wandb"]})
    )
    logged.run()
    state_a, state_b = plain.policy.trainable_state_dict(), logged.policy.trainable_state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    timing = ("samples_per_s", "peak_rss_mb")
    untimed = [
        [
            {k: v for k, v in m.items() if not k.startswith("time_") and k not in timing}
            for m in t.run_folder.read_metrics()
        ]
        for t in (plain, logged)
    ]
    assert untimed[0] == untimed[1]
