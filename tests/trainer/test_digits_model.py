"""The digits base model's builder: real classes, held-out pairs never shown, cache semantics.

These use a 2-step recipe (seconds); the real recipe's quality is measured by bench_learning and
by the learning test (tests/trainer/test_learning.py).
"""

import dataclasses
import json

import torch

from shared import digits
from trainer.digits_model import MARKER, DigitsData, DigitsRecipe, ensure_digits_model

QUICK = DigitsRecipe(vae_steps=2, unet_steps=2, batch_size=8)


def test_training_data_never_shows_heldout_pairs():
    data = DigitsData(QUICK)
    images, prompts = data.batch(512)
    assert images.shape == (512, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    specs = [digits.parse_prompt(p) for p in prompts]
    assert not any(s.heldout for s in specs)
    assert len({(s.stroke, s.background) for s in specs}) == 20 and {s.digit for s in specs} == set(range(10))


def test_builds_loadable_pipeline_and_reuses_cache(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = ensure_digits_model(tmp_path, QUICK, progress=False)
    info = json.loads((folder / MARKER).read_text())
    assert info["recipe"] == json.loads(json.dumps(dataclasses.asdict(QUICK)))
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert pipe.unet.config.sample_size == 4 and pipe.vae.config.scaling_factor != 0.18215
    ids = pipe.tokenizer(["a red seven on a blue background"], return_tensors="pt").input_ids
    assert ids.shape[1] == 9  # 7 words, one token each, + <bos>/<eos>: the vocabulary covers them
    stamp = (folder / "unet").stat().st_mtime_ns
    assert ensure_digits_model(tmp_path, QUICK, progress=False) == folder
    assert (folder / "unet").stat().st_mtime_ns == stamp  # reused, not rebuilt
    # A different recipe is a different folder.
    assert dataclasses.replace(QUICK, seed=1).digest() != QUICK.digest()


def test_partial_cache_folder_is_rebuilt(tmp_path, caplog):
    folder = tmp_path / f"digits-base-{QUICK.digest()}"
    (folder / "unet").mkdir(parents=True)  # a copy interrupted half-way: no marker, no weights
    with caplog.at_level("WARNING"):
        assert ensure_digits_model(tmp_path, QUICK, progress=False) == folder
    assert "incomplete" in caplog.text and str(folder) in caplog.text
    assert (folder / MARKER).exists() and any((folder / "unet").iterdir())


def test_build_is_seeded():
    from trainer.digits_model import build_digits_pipeline

    a, _ = build_digits_pipeline(QUICK, progress=False)
    b, _ = build_digits_pipeline(QUICK, progress=False)
    for (name, x), (_, y) in zip(a.unet.state_dict().items(), b.unet.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
