"""Two CPU processes under gloo, the same code path torchrun uses with NCCL on GPUs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.trainer.conftest import tiny_config
from trainer.stat_tracking import PerPromptStatTracker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, overrides: dict) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from trainer.distributed import init_distributed, shutdown_distributed
    from trainer.train import Trainer

    info = init_distributed()
    trainer = Trainer(tiny_config(Path(out_dir), **overrides), dist_info=info)
    history = trainer.run()
    torch.save(
        {"trainable": trainer.policy.trainable_state_dict(), "history": history},
        Path(out_dir) / f"rank{rank}.pt",
    )
    shutdown_distributed()


def _one_process(tmp_path: Path, train: dict, num_epochs: int) -> tuple[list[dict], dict, dict]:
    """The 2-rank runs' global batch in one process (sampling batches of 8, training minibatches of
    8): its history, and its trainable weights before and after."""
    from trainer.train import Trainer

    single = Trainer(
        tiny_config(
            tmp_path,
            sample={"batch_size": 8},
            train={**train, "batch_size": 8},
            run={"num_epochs": num_epochs, "name": "one", "save_every": 100},
        )
    )
    initial = {k: v.clone() for k, v in single.policy.trainable_state_dict().items()}
    history = single.run()
    return history, initial, single.policy.trainable_state_dict()


def _distance(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def _read_samples(run_dir: Path, epoch: int) -> list[dict]:
    return [
        json.loads(line) for line in (run_dir / f"samples/epoch_{epoch:04d}.jsonl").read_text().splitlines()
    ]


@pytest.mark.slow
def test_two_ranks_train_one_policy(tmp_path):
    # 2 ranks x 2 sampling batches of 4 = a global batch of 16 per epoch; each rank's 8 samples make
    # 2 minibatches accumulated into one optimizer step, whose gradient DDP averages over the ranks:
    # one step per epoch on the mean gradient of all 16 samples.
    train = {"clip_range": 0.1, "learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 2}
    overrides = {"train": train, "run": {"num_epochs": 2, "name": "ddp", "save_every": 2}}
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path), overrides), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    # DDP averaged the LoRA gradients: both ranks hold identical weights, and they moved.
    assert rank0["trainable"].keys() == rank1["trainable"].keys()
    for key in rank0["trainable"]:
        assert torch.equal(rank0["trainable"][key], rank1["trainable"][key]), key
    assert [m["optimizer_steps"] for m in rank0["history"]] == [1, 1]
    assert rank0["history"][-1]["world_size"] == 2

    # Rank 0's log holds the global batch; advantages equal one tracker fed the same global rewards.
    run_dir = tmp_path / "ddp"
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    tracker = PerPromptStatTracker(buffer_size=8, min_count=4)
    for epoch in range(2):
        rows = _read_samples(run_dir, epoch)
        assert len(rows) == 2 * 8  # 2 ranks x 2 batches x 4
        expected = tracker.update([r["prompt"] for r in rows], np.array([r["reward"] for r in rows]))
        np.testing.assert_allclose([r["advantage"] for r in rows], expected, rtol=1e-12)
        assert rank0["history"][epoch]["reward_mean"] == pytest.approx(np.mean([r["reward"] for r in rows]))
    # Ranks sampled different images (own seed streams), not copies of each other.
    rows = _read_samples(run_dir, 0)
    assert [r["reward"] for r in rows[:4]] != [r["reward"] for r in rows[4:8]]

    # One process with the same global batch: sampling batches of 8, and one optimizer step per epoch
    # over all 16 samples (2 minibatches of 8, accumulated). The same samples, and the same weights.
    single_history, initial, single_state = _one_process(tmp_path, train, num_epochs=2)
    assert [m["optimizer_steps"] for m in single_history] == [1, 1]
    single_rows = _read_samples(tmp_path / "one", 0)
    assert [r["prompt"] for r in single_rows] == [r["prompt"] for r in rows]
    # Same seeds and weights; only float batch effects may move a JPEG by a few bytes.
    np.testing.assert_allclose([r["reward"] for r in single_rows], [r["reward"] for r in rows], atol=0.02)

    # After two updates the 2-rank weights are the 1-process weights: their distance is a small
    # fraction of how far training moved them (float batch effects and JPEG bytes, nothing more).
    assert single_state.keys() == rank0["trainable"].keys()

    moved = _distance(single_state, initial)
    apart = _distance(rank0["trainable"], single_state)
    assert moved > 0
    assert apart < 0.05 * moved, (apart, moved)


@pytest.mark.slow
def test_two_ranks_pipelined_epochs_match_one_process(tmp_path):
    """max_staleness 1 under DDP: each epoch's update uses samples of the policy one update old, on
    both ranks alike, and it samples and lands where one process with the same global batch does."""
    train = {
        "clip_range": 0.1,
        "learning_rate": 1e-2,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_staleness": 1,
    }
    overrides = {"train": train, "run": {"num_epochs": 3, "name": "ddp", "save_every": 100}}
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path), overrides), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for key in rank0["trainable"]:
        assert torch.equal(rank0["trainable"][key], rank1["trainable"][key]), key
    assert [m["staleness"] for m in rank0["history"]] == [0, 1, 1]
    assert [m["staleness"] for m in rank1["history"]] == [0, 1, 1]

    single_history, initial, single_state = _one_process(tmp_path, train, num_epochs=3)
    assert [m["staleness"] for m in single_history] == [0, 1, 1]
    # The epochs sampled ahead (during the previous epoch's reward wait) are the same on 2 ranks as
    # on one process: same prompts, and the same images up to float batch effects on a JPEG's bytes.
    for epoch in range(3):
        ddp, one = _read_samples(tmp_path / "ddp", epoch), _read_samples(tmp_path / "one", epoch)
        assert [r["prompt"] for r in ddp] == [r["prompt"] for r in one]
        np.testing.assert_allclose([r["reward"] for r in ddp], [r["reward"] for r in one], atol=0.02)

    # Measured 0.10: one JPEG a byte apart in a group of 4 shifts the advantages by up to 0.17 here,
    # and that compounds over 3 updates (on-policy, 3 epochs without such a flip: 0.03).
    moved = _distance(single_state, initial)
    apart = _distance(rank0["trainable"], single_state)
    assert moved > 0
    assert apart < 0.25 * moved, (apart, moved)


@pytest.mark.slow
def test_torchrun_two_ranks_then_resume_with_one(tmp_path):
    """The real launcher: torchrun -m trainer with 2 gloo ranks; the checkpoint resumes on 1 process."""
    common = [
        "--preset", "tiny", "--run.output_dir", str(tmp_path), "--run.name", "tr", "--run.progress", "false",
        "--sample.num_steps", "3", "--sample.resolution", "32", "--sample.batch_size", "4",
        "--train.batch_size", "4", "--run.eval_num_images", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(_free_port()), "-m", "trainer"]  # fmt: skip
    first = subprocess.run(
        [*torchrun, *common, "--run.num_epochs", "1", "--run.save_every", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "tr"
    assert (run_dir / "checkpoints/epoch_0001/lora/pytorch_lora_weights.safetensors").exists()
    second = subprocess.run(
        [sys.executable, "-m", "trainer", *common, "--run.num_epochs", "2", "--run.resume", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["world_size"]) for m in metrics] == [(-1, 2), (0, 2), (1, 1)]  # -1: base eval
