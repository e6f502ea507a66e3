from __future__ import annotations

import pytest

from trainer.config import Config, build_config


def tiny_config(tmp_path, **sections) -> Config:
    """The tiny preset, shrunk for tests: 4 steps, 32 px, 2 batches of 4."""
    overrides = {
        "sample": {"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 2, "resolution": 32},
        "train": {"batch_size": 4, "gradient_accumulation_steps": 1},
        "advantage": {"buffer_size": 8, "min_count": 4},
        "run": {"output_dir": str(tmp_path), "progress": False, "num_epochs": 2, "eval_num_images": 4},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return build_config("tiny", overrides)


@pytest.fixture
def make_tiny_config(tmp_path):
    return lambda **sections: tiny_config(tmp_path, **sections)

