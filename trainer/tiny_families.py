"""Tiny SDXL and SD3 pipelines of the real diffusers/transformers classes, random weights, built here.

Like ``trainer.tiny`` (the tiny SD): nothing is downloaded; each is saved with ``save_pretrained``
and loaded back with ``from_pretrained`` by the real loading code, cached under the same folder.
- 'tiny-sdxl': ``StableDiffusionXLPipeline``: UNet2DConditionModel with SDXL's text-time added
  conditioning, CLIPTextModel + CLIPTextModelWithProjection (pooled), SDXL's Euler scheduler
  config (the trainer samples it with DDIM).
- 'tiny-sd3': ``StableDiffusion3Pipeline``: SD3Transformer2DModel (joint attention), two
  CLIPTextModelWithProjection + T5EncoderModel, AutoencoderKL with SD3's shift factor,
  FlowMatchEulerDiscreteScheduler (shift 3, as SD3).
They show the machinery, not image quality.
"""

from __future__ import annotations

import sys

import torch

from trainer.tiny import build_word_tokenizer, ensure_built, tiny_clip_text_encoder, tiny_vae

TINY_SDXL_NAME, TINY_SDXL_VERSION = "tiny-sdxl", "tiny-sdxl-v1"
TINY_SD3_NAME, TINY_SD3_VERSION = "tiny-sd3", "tiny-sd3-v1"


def build_tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 64):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from trainer.prompts import all_prompt_words

    words = all_prompt_words()
    tokenizer, vocab = build_word_tokenizer(words, model_max_length=77)
    tokenizer_2, vocab_2 = build_word_tokenizer(words, model_max_length=77)
    text_encoder = tiny_clip_text_encoder(vocab, 32, seed)
    text_encoder_2 = tiny_clip_text_encoder(vocab_2, 32, seed + 1, projection_dim=32)
    vae = tiny_vae(seed + 2, sample_size)
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled text (32)
        cross_attention_dim=64,  # the two encoders' hidden states side by side (32 + 32)
        norm_num_groups=16,
    )
    scheduler = EulerDiscreteScheduler(  # SDXL base's scheduler configuration
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_t5_tokenizer(words: list[str], model_max_length: int = 256):
    """A T5 (unigram) tokenizer whose vocabulary holds each of ``words`` as one piece."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in sorted(set(words))]
    pieces += [(c, -10.0) for c in sorted({c for w in words for c in w})]
    pieces += [("▁", -5.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def build_tiny_sd3_pipeline(seed: int = 0, sample_size: int = 64):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    from trainer.prompts import all_prompt_words

    words = all_prompt_words()
    tokenizer, vocab = build_word_tokenizer(words, model_max_length=77)
    tokenizer_2, vocab_2 = build_word_tokenizer(words, model_max_length=77)
    tokenizer_3 = build_t5_tokenizer(words)
    text_encoder = tiny_clip_text_encoder(vocab, 32, seed, projection_dim=32)
    text_encoder_2 = tiny_clip_text_encoder(vocab_2, 32, seed + 1, projection_dim=32)
    torch.manual_seed(seed + 2)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=64,
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id,
        )
    )
    vae = tiny_vae(seed + 3, sample_size, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
               use_post_quant_conv=False)  # fmt: skip
    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size // 4,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # T5's width; the CLIP states (32 + 32) are padded to it
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIP pooled projections side by side
        pos_embed_max_size=32,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


BUILDERS = {
    TINY_SDXL_NAME: (TINY_SDXL_VERSION, build_tiny_sdxl_pipeline),
    TINY_SD3_NAME: (TINY_SD3_VERSION, build_tiny_sd3_pipeline),
}


def ensure_tiny_family_model(name: str):
    """The cached folder of 'tiny-sdxl' or 'tiny-sd3', built on first use."""
    version, build = BUILDERS[name]
    return ensure_built(version, build, [sys.executable, "-m", "trainer.tiny_families", name])


if __name__ == "__main__":
    build_name, folder = sys.argv[1], sys.argv[2]
    BUILDERS[build_name][1]().save_pretrained(folder)
