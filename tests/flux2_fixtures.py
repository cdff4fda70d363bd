"""A tiny FLUX.2 [klein] pipeline built from configs: a byte-level BPE Qwen2 tokenizer with a chat template, a
28-layer Qwen3 text encoder of width 32 (the pipeline stacks hidden states 9, 18, 27), a 1 + 2 block
Flux2Transformer2DModel and a 2-level AutoencoderKLFlux2 with 4 latent channels; saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["a photo of sks dog in the snow on a beach"] * 4, trainer)
    return Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              chat_template=CHAT_TEMPLATE, model_max_length=512)


def _transformer_and_vae(guidance: bool):
    """A 1 + 2 block Flux2Transformer2DModel (text width 3 x 32) and a 2-level AutoencoderKLFlux2 of 4 channels."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                          num_attention_heads=2, joint_attention_dim=3 * 32, axes_dims_rope=(4, 4, 4, 4),
                                          timestep_guidance_channels=32, guidance_embeds=guidance)
    vae = AutoencoderKLFlux2(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                             block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             sample_size=32, patch_size=(2, 2))
    return transformer, vae


def render(pipe, prompt: str) -> torch.Tensor:
    """Two denoising steps at 32 px, seed 0, as tensors: what the export tests compare."""
    return pipe(prompt=prompt, height=32, width=32, num_inference_steps=2, guidance_scale=4.0, max_sequence_length=32,
                generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images


def build_tiny_klein(distilled: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    text = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    transformer, vae = _transformer_and_vae(guidance=False)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=distilled)


def save_tiny_klein(folder: Path, distilled: bool = True) -> Path:
    build_tiny_klein(distilled).save_pretrained(str(folder), safe_serialization=True)
    return folder


# [dev]: Mistral3's processor renders a system and a user message whose contents are lists of text parts.
DEV_CHAT_TEMPLATE = ("{% for m in messages %}{{ '[' + m['role'] + ']' }}{% if m['content'] is string %}"
                     "{{ m['content'] }}{% else %}{% for part in m['content'] %}{% if part['type'] == 'text' %}"
                     "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '[/' + m['role'] + ']' }}{% endfor %}")


def build_tiny_dev():
    """A tiny FLUX.2 [dev]: a 31-layer Mistral3 text encoder of width 32 (hidden states 10, 20, 30 are stacked),
    guidance embeddings in the transformer. The published [dev] tokenizes with a PixtralProcessor, which cannot be
    built without torchvision; for the text prompts the pipeline encodes, its tokenizer's chat template is what
    counts, so a plain tokenizer with a Mistral-style template stands in for it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    tokenizer.chat_template = DEV_CHAT_TEMPLATE
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 48,
                     "num_hidden_layers": 31, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                     "max_position_embeddings": 1024, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 1, "head_dim": 16, "image_size": 16, "patch_size": 4},
        image_token_index=len(tokenizer) - 1, spatial_merge_size=2)
    text = Mistral3ForConditionalGeneration(config)
    transformer, vae = _transformer_and_vae(guidance=True)
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text, tokenizer=tokenizer,
                         transformer=transformer)


def save_tiny_dev(folder: Path) -> Path:
    build_tiny_dev().save_pretrained(str(folder), safe_serialization=True)
    return folder
