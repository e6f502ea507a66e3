"""Resume never unpickles arbitrary objects: training_state.pt is loaded with weights_only=True."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from trainer.checkpoint import TRAINING_STATE, capture_rng, load_training_state, restore_rng


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_training_state_with_rng_and_optimizer_loads(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    state = {
        "next_epoch": 3,
        "global_step": 7,
        "trainable": {"w": model.weight.detach().clone()},
        "optimizer": opt.state_dict(),
        "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0).state_dict(),
        "stat_tracker": {"buffer_size": 4, "min_count": 2, "buffers": {"a cat": [1.0, 2.0]}},
        "rng": capture_rng(),
    }
    torch.save(state, tmp_path / TRAINING_STATE)
    expected = (np.random.rand(), random.random(), torch.rand(1))
    loaded = load_training_state(tmp_path)
    assert loaded.next_epoch == 3 and loaded.global_step == 7
    restore_rng(loaded.rng)
    assert (np.random.rand(), random.random(), torch.rand(1)) == expected


def test_a_pickled_object_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"next_epoch": RunsCode()}, tmp_path / TRAINING_STATE)
    with pytest.raises(Exception, match=r"(?i)weights only|unpickl"):
        load_training_state(tmp_path)
    assert not (tmp_path / "PWNED").exists()
