"""The Python a FLUX.2 run hands the user: its first preview made again with the corrected LoRA (diffusers format),
with the run plan's placement on a GPU smaller than the model."""

from __future__ import annotations

from pathlib import Path

SNIPPET = '''import tempfile

import torch
from diffusers import {pipeline}

# The run's first preview of the full model with the corrected LoRA, made again: the same model, LoRA, prompt,
# seed, size, denoising steps, guidance and text tokens (a [klein] Base model guides against the empty prompt).
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32  # what the run used on each
pipe = {pipeline}.from_pretrained({model!r}, torch_dtype=dtype, use_safetensors=True){to_device}
pipe.load_lora_weights({lora!r}, weight_name={weights!r})
{offload}image = pipe(prompt={prompt!r}, height={size}, width={size}, num_inference_steps={steps}, guidance_scale={guidance},
             max_sequence_length={tokens}, generator=torch.Generator("cpu").manual_seed({seed})).images[0]
image.save("sample.png")
'''
# A GPU smaller than the transformer: the pipeline-level group offloading keeps the transformer AND the text encoder
# (24 B for [dev], 45 GiB in bf16: it never goes to the GPU whole) off the GPU and moves one block at a time in, the
# next one copied while the current one runs (use_stream); only the VAE goes to the GPU whole.
OFFLOAD = '''if device == "cuda":  # the run's plan: the transformer does not fit this GPU whole
    pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                              offload_type="block_level", num_blocks_per_group=1, use_stream=True,{disk}
                              exclude_modules=["vae"])
else:
    pipe.to(device)
'''
# the run's plan streamed the model from its files (host RAM cannot hold it): each block waits in a file of a fresh
# folder here, not in RAM (remove the folder afterwards)
DISK = '''
                              offload_to_disk_path=tempfile.mkdtemp(prefix="offload-", dir="."),'''


def load_snippet(pipeline: str, model: str, lora: Path, weights: str, prompt: str, seed: int, size: int, steps: int,
                 guidance: float, tokens: int, mode: str = "whole") -> str:
    """Python that loads the LoRA into `pipeline` (Flux2Pipeline / Flux2KleinPipeline) and renders one preview
    again. `mode`: the run plan's preview placement: "whole" (`.to(device)`), "offload" (the transformer and the text
    encoder group-offloaded from RAM) or "files" (group-offloaded from files of a fresh folder)."""
    offload = OFFLOAD.format(disk=DISK if mode == "files" else "") if mode != "whole" else ""
    return SNIPPET.format(pipeline=pipeline, model=str(model), lora=str(lora), weights=weights, prompt=prompt,
                          size=int(size), steps=int(steps), guidance=float(guidance), tokens=int(tokens),
                          seed=int(seed), to_device="" if offload else ".to(device)", offload=offload)
