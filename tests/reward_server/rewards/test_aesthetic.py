"""The aesthetic reward on a tiny random CLIP + LAION-layout MLP, checked against a hand computation."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from reward_server.rewards import build_scorer  # noqa: E402
from reward_server.rewards.aesthetic import AestheticScorer, build_aesthetic_mlp, load_aesthetic_mlp  # noqa: E402
from reward_server.settings import ServerSettings  # noqa: E402

IMAGE_SIZE = 32
PROJECTION_DIM = 16
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    """A tiny random CLIP saved with save_pretrained, and a random MLP saved as safetensors and .pth."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("tiny_aesthetic")
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        projection_dim=PROJECTION_DIM,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=MEAN.tolist(),
        image_std=STD.tolist(),
    ).save_pretrained(folder / "clip")
    state = {k: v.clone().contiguous() for k, v in build_aesthetic_mlp(PROJECTION_DIM).state_dict().items()}
    save_file(state, str(folder / "mlp.safetensors"))
    torch.save(state, folder / "mlp.pth")
    return folder, state


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) for _ in range(n)]


def by_hand(folder, state, imgs: list[np.ndarray]) -> np.ndarray:
    """Normalize pixels, run the vision tower, project, L2-normalize and apply the MLP in numpy."""
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(folder / "clip").eval()
    # 32x32 inputs: the processor's resize and centre crop are identities, so this is its whole job.
    pixels = np.stack([(img / 255.0 - MEAN) / STD for img in imgs]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=torch.tensor(pixels, dtype=torch.float32)).pooler_output
    embeds = pooled.numpy().astype(np.float64) @ model.visual_projection.weight.detach().numpy().T
    x = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    for index in (0, 2, 4, 6, 7):  # Linear layers; dropouts are identities at inference
        x = x @ state[f"layers.{index}.weight"].numpy().T + state[f"layers.{index}.bias"].numpy()
    return x[:, 0]


def test_layout_matches_the_laion_state_dict_keys():
    keys = set(build_aesthetic_mlp(768).state_dict())
    expected = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert keys == expected
    shapes = [
        tuple(build_aesthetic_mlp(768).state_dict()[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)
    ]
    assert shapes == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]


@pytest.mark.parametrize("weights", ["mlp.safetensors", "mlp.pth"])
def test_scores_match_a_hand_computation(tiny_aesthetic, weights):
    folder, state = tiny_aesthetic
    settings = ServerSettings(
        rewards=["aesthetic"],
        aesthetic_clip_model=str(folder / "clip"),
        aesthetic_mlp_path=str(folder / weights),
    )
    scorer = build_scorer("aesthetic", settings)
    imgs = images(3)
    outputs = scorer.score(imgs, ["a", "b", "c"], [{}, {}, {}])
    expected = by_hand(folder, state, imgs)
    got = np.array([o.reward for o in outputs])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert [o.details["aesthetic"] for o in outputs] == list(got)
    # A batch of one is a list of one (not a scalar), and batching does not change the values.
    single = scorer.score(imgs[1:2], ["b"], [{}])
    assert len(single) == 1
    np.testing.assert_allclose(single[0].reward, got[1], rtol=1e-5, atol=1e-6)


def test_missing_or_mismatched_weights_fail_at_start_up(tiny_aesthetic, tmp_path):
    from safetensors.torch import save_file

    folder, _ = tiny_aesthetic
    with pytest.raises(ValueError, match="aesthetic_mlp_path"):
        build_scorer("aesthetic", ServerSettings(rewards=["aesthetic"]))
    with pytest.raises(FileNotFoundError):
        AestheticScorer(str(folder / "clip"), tmp_path / "missing.safetensors")
    wrong = {k: v.contiguous() for k, v in build_aesthetic_mlp(PROJECTION_DIM + 1).state_dict().items()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="does not match the MLP input size"):
        AestheticScorer(str(folder / "clip"), tmp_path / "wrong.safetensors")


def test_pickled_code_in_weights_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"layers.0.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match=r"(?i)weights only|unsupported|not allowed"):
        load_aesthetic_mlp(tmp_path / "evil.pth")


def test_served_over_http(tiny_aesthetic, start_reward_server):
    import httpx

    from shared.codec import encode_png_b64

    folder, state = tiny_aesthetic
    base_url = start_reward_server(
        {
            "rewards": ["aesthetic", "jpeg_compressibility"],
            "aesthetic_clip_model": str(folder / "clip"),
            "aesthetic_mlp_path": str(folder / "mlp.safetensors"),
        }
    )
    imgs = images(2, seed=5)
    body = {
        "request_id": "aesthetic-1",
        "reward": "aesthetic",
        "images": [encode_png_b64(i) for i in imgs],
        "prompts": ["x", "y"],
    }
    response = httpx.post(base_url + "/score", json=body, timeout=30)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["rewards"], by_hand(folder, state, imgs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 16, 3), (3, 16, 3), (3, 3, 3), (40, 3, 3)])
def test_thin_images_are_read_channels_last(tiny_aesthetic, shape):
    """An image 1 or 3 pixels high (or wide) scores as the same pixels given as a PIL image.

    The CLIP processor guesses the channel axis of an array; (3, 16, 3) looks channels-first to it.
    """
    from PIL import Image

    folder, _ = tiny_aesthetic
    settings = ServerSettings(
        rewards=["aesthetic"],
        aesthetic_clip_model=str(folder / "clip"),
        aesthetic_mlp_path=str(folder / "mlp.safetensors"),
    )
    scorer = build_scorer("aesthetic", settings)
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    got = scorer.embed([image])
    pixels = scorer.processor(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = scorer.clip(pixel_values=pixels).image_embeds
    expected = expected / expected.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
