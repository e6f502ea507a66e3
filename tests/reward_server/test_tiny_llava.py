"""The tiny LLaVA builder: a folder the real loaders read, in the layout vLLM also reads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.reward_server.tiny_llava import IMAGE_TOKEN, build_tiny_llava, ensure_tiny_llava


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return ensure_tiny_llava(tmp_path_factory.mktemp("cache"))


def test_saved_weights_use_the_llava_hf_layout(tiny_folder):
    with safe_open(str(tiny_folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in keys}
    # vLLM maps these names; a bare "vision_tower.embeddings..." (transformers 5 default) it does not.
    assert prefixes == {
        "language_model.model",
        "language_model.lm_head",
        "vision_tower.vision_model",
        "multi_modal_projector.linear_1",
        "multi_modal_projector.linear_2",
    }


def test_transformers_loads_every_weight_unchanged(tiny_folder):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(tiny_folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference, _ = build_tiny_llava()
    expected = reference.state_dict()
    loaded = model.state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)
    config = model.config
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    assert config.text_config.head_dim == 32  # vLLM's CPU attention rejects 16


def test_processor_tokenizer_and_chat_template(tiny_folder):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_folder)
    tokenizer = processor.tokenizer
    # The PIL image processor: torchvision is not importable next to our CPU torch.
    assert "Pil" in type(processor.image_processor).__name__
    assert processor.image_processor.crop_size == {"height": 336, "width": 336}
    image_id = json.loads((tiny_folder / "config.json").read_text())["image_token_index"]
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == image_id
    # The template writes BOS; the tokenizer adds none (vLLM tokenizes chat prompts without specials).
    assert tokenizer("a cat").input_ids[0] != tokenizer.bos_token_id
    message = {"role": "user", "content": [{"type": "text", "text": "what?"}, {"type": "image"}]}
    prompt = processor.apply_chat_template([message], add_generation_prompt=True)
    assert prompt == "<s>USER: <image>\nwhat? ASSISTANT:"
    # Words of our prompts are single tokens, and decoding gives the text back.
    ids = tokenizer(" cat riding a bike", add_special_tokens=False).input_ids
    assert len(ids) == 4
    assert tokenizer.decode(ids) == " cat riding a bike"


def test_ensure_reuses_the_cached_folder(tiny_folder):
    stamp = (tiny_folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_llava(tiny_folder.parent) == tiny_folder
    assert (tiny_folder / "model.safetensors").stat().st_mtime_ns == stamp
