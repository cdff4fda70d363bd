"""A tiny FLUX pipeline built from configs, with tokenizers made offline, saved like a real checkpoint.

Transformer: 2 double + 2 single blocks, width 32; VAE with 4 latent channels and a 2x scale;
CLIP and T5 encoders of width 32; byte-level tokenizers. `save_tiny_flux(folder)` writes it with
`save_pretrained` (safetensors) so the code under test loads it through its real loading path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.demo.offline_tokenizers import byte_clip_tokenizer


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [("▁" + chr(c), -1.5) for c in range(ord("a"), ord("z") + 1)]
    return T5TokenizerFast(vocab=pieces, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512), len(pieces)


def build_tiny_flux(guidance: bool = False, scratch: Path | None = None):
    """A FluxPipeline with random weights (seeded); `guidance=True` makes it a [dev]-style model."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    scratch = Path(scratch or tempfile.mkdtemp())
    clip_tokenizer, clip_vocab = byte_clip_tokenizer(scratch / "clip-tokenizer")
    t5_tokenizer, t5_vocab = _t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab, hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
                                        bos_token_id=clip_tokenizer.bos_token_id,
                                        eos_token_id=clip_tokenizer.eos_token_id,
                                        pad_token_id=clip_tokenizer.pad_token_id, max_position_embeddings=77))
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)


def save_tiny_flux(folder: Path, guidance: bool = False) -> Path:
    """Write the tiny pipeline into `folder` with save_pretrained (safetensors); returns `folder`."""
    pipe = build_tiny_flux(guidance=guidance, scratch=folder.parent / (folder.name + "-scratch"))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_subject_images(folder: Path, count: int = 4, size: int = 64, seed: int = 0) -> list[Path]:
    """`count` small synthetic photos (a coloured disc on a gradient) as PNG and JPEG files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for index in range(count):
        cx, cy, radius = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        pixels = np.stack([xx, yy, 1 - xx], axis=-1) * 120
        pixels[(xx - cx) ** 2 + (yy - cy) ** 2 < radius**2] = (200, 120, 40)
        pixels += rng.normal(0, 8, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        path = folder / (f"dog_{index}.png" if index % 2 == 0 else f"dog_{index}.jpg")
        image.save(path)
        paths.append(path)
    return paths
