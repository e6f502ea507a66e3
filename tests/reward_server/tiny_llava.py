"""A tiny random LLaVA-1.5-style model of the real transformers classes, built here, for tests.

No weights can be downloaded on our CI machines, so the VLM tests use this: a
``LlavaForConditionalGeneration`` with a CLIP vision tower (336 px, patch 14, like LLaVA-1.5's
ViT-L/14-336, but hidden 64 and 2 layers) and a Llama language model (hidden 64, 2 layers, head size
32: vLLM's CPU attention rejects 16), a small byte-level BPE tokenizer with an ``<image>`` token, a
LLaVA-1.5 chat template and a ``LlavaProcessor`` whose image processor is the PIL one (torchvision
is not importable next to our CPU torch).

The folder loads with transformers' ``from_pretrained`` and with vLLM. Its safetensors use the
published llava-hf layout (``language_model.model.*``, ``language_model.lm_head.*``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``), which both accept; transformers 5.x
saves the vision tower as ``vision_tower.*`` without ``vision_model``, which vLLM does not map, so the
keys are rewritten after saving.
The answers are gibberish, but deterministic: good for comparing backends, not for judging images.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TINY_LLAVA_VERSION = "tiny-llava-v1"  # bump when anything below changes what is saved
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# LLaVA-1.5's conversation format ("USER: <image>\n{question} ASSISTANT:"). Image parts come first
# whatever their order in the message, so an OpenAI-style message (vLLM) and a transformers one give
# the same prompt. The BOS is written here and the tokenizer adds none itself, so the ids are the
# same whether a caller tokenizes with special tokens or without (vLLM's chat path).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string"
    " else message['content'] | map(attribute='text') | join(' ') }}{{ ' ' }}"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] in ['image', 'image_url'] %}"
    "{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}{{ ' ' }}"
    "{% else %}ASSISTANT: "
    "{{ message['content'] if message['content'] is string"
    " else message['content'] | map(attribute='text') | join(' ') }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Text the BPE merges are learned from: LLaVA's question and answers like the alignment reward's.
_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox "
    "wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog "
    "chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()
_ACTIVITIES = ["riding a bike", "playing chess", "washing the dishes"]


def _training_corpus() -> list[str]:
    lines = ["USER: <image>\nwhat is going on in this image? ASSISTANT:"]
    for animal in _ANIMALS:
        for activity in _ACTIVITIES:
            lines.append(
                f"The image contains a {animal} {activity}. In this picture, a {animal} is {activity}."
            )
    return lines


def default_cache_dir() -> Path:
    return Path(os.environ.get("DDPO_CACHE", Path.home() / ".cache" / "ddpo-stack"))


def _ascii_byte_alphabet() -> dict[int, str]:
    """The GPT-2 byte-level characters of tab, newline, CR and printable ASCII only.

    Leaving bytes >= 128 out (they become <unk>) means every token decodes to valid UTF-8, so an
    incremental detokenizer (vLLM) and a one-shot decode (transformers) give the same text.
    """
    alphabet = {}
    for b in [9, 10, 13, *range(32, 127)]:
        # GPT-2's map: printable bytes stand for themselves, the others shift up past 255.
        alphabet[b] = chr(b) if 33 <= b <= 126 else chr(256 + [*range(0, 33), 127].index(b))
    return alphabet


def build_tiny_llava_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained here on a small corpus, with LLaVA's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,  # ids 0..4, in this order
        initial_alphabet=list(_ascii_byte_alphabet().values()),
        show_progress=False,
    )
    backend.train_from_iterator(_training_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llava(seed: int = 0):
    """Build (in memory) ``(model, processor)``: a tiny LLaVA-1.5-style model with seeded random weights."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tiny_llava_tokenizer()
    vocab_size = len(tokenizer)
    image_size, patch_size = 336, 14
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    num_image_tokens = (image_size // patch_size) ** 2  # CLS dropped ("default" strategy): 576
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=num_image_tokens,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    # LLaVA-1.5's CLIP preprocessing: shortest edge to 336 (bicubic), center crop 336, CLIP mean/std.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def _llava_hf_key(key: str) -> str:
    """A saved state-dict key (either transformers-5 layout) -> the published llava-hf checkpoint key."""
    key = key.removeprefix("model.")
    head, _, rest = key.partition(".")
    if head == "lm_head":
        return "language_model." + key
    if head == "language_model" and not rest.startswith(("model.", "lm_head.")):
        return "language_model.model." + rest
    if head == "vision_tower" and not rest.startswith("vision_model."):
        return "vision_tower.vision_model." + rest
    return key


def save_tiny_llava(folder: Path, seed: int = 0) -> None:
    """Save model, tokenizer, processor and chat template to ``folder`` in the llava-hf layout."""
    from safetensors.torch import load_file, save_file

    model, processor = build_tiny_llava(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    weight_files = sorted(folder.glob("*.safetensors"))
    if len(weight_files) != 1:
        raise RuntimeError(f"expected one safetensors file, got {weight_files}")
    tensors = load_file(weight_files[0])
    renamed = {_llava_hf_key(k): v.contiguous() for k, v in tensors.items()}
    save_file(renamed, weight_files[0], metadata={"format": "pt"})


def ensure_tiny_llava(cache_dir: Path | None = None) -> Path:
    """Return the folder of the cached tiny LLaVA, building and saving it on first use."""
    folder = (cache_dir or default_cache_dir()) / TINY_LLAVA_VERSION
    marker = folder / "ddpo_tiny.json"
    if marker.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_tiny_llava(tmp)
    (tmp / "ddpo_tiny.json").write_text(json.dumps({"version": TINY_LLAVA_VERSION}))
    try:
        tmp.rename(folder)  # atomic: concurrent builders race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
