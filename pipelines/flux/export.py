"""What a FLUX run hands the user: the LoRA in diffusers' format, and preview images with a labelled grid.

diffusers' FLUX LoRA format has keys `transformer.<module>.lora_A.weight` / `.lora_B.weight` and no
`base_model`; a file without alpha metadata is loaded with scale 1, so the LoRA scaling `s = alpha / r`
is folded into `lora_B` (`s·B A = (s·B) A`) and the file means the same on any loader.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from .kohya import write_kohya_lora

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


def scaled_factors(state: dict[str, torch.Tensor], scaling: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT adapter keys -> `{module: (A, s·B)}` in float32 on the CPU: the update of each layer is `(s·B) A`."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = PEFT_KEY.match(key)
        if match is None:
            raise ValueError(f"adapter key {key!r} is not a LoRA weight; the adapter file is not a PEFT LoRA")
        tensor = tensor.detach().float().cpu()
        parts.setdefault(match["module"], {})[match["part"]] = tensor * scaling if match["part"] == "B" else tensor
    missing = sorted(module for module, ab in parts.items() if set(ab) != {"A", "B"})
    if missing:
        raise ValueError(f"the adapter lacks lora_A or lora_B of {', '.join(missing)}; it is incomplete")
    return {module: (ab["A"], ab["B"]) for module, ab in parts.items()}


def diffusers_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """PEFT adapter keys -> `<module>.lora_A/B.weight` (save_lora_weights adds `transformer.`), scaling in B."""
    out = {}
    for module, (a, b) in scaled_factors(state, scaling).items():
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a, b
    return out


def write_diffusers_lora(state: dict[str, torch.Tensor], config: Any, folder: Path) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors`, loadable by `FluxPipeline.load_lora_weights(folder)`."""
    from diffusers import FluxPipeline

    from emloc import lora_scaling

    FluxPipeline.save_lora_weights(str(folder), transformer_lora_layers=diffusers_lora_state(state, lora_scaling(config)),
                                   weight_name=LORA_FILE, safe_serialization=True)
    return folder / LORA_FILE


def write_kohya_export(state: dict[str, torch.Tensor], config: Any, folder: Path, out_features: dict[str, int],
                       base_model: str = "") -> Path | None:
    """Write the kohya-style file (kohya.py) of the adapter; None, with a warning, when one of its layers has no
    name in that format (a custom --lora-targets): the diffusers file is then the only export."""
    from emloc import lora_scaling

    try:
        return write_kohya_lora(scaled_factors(state, lora_scaling(config)), folder, out_features, base_model)
    except ValueError as err:
        log.warning("no kohya / ComfyUI file written: %s; use the diffusers file", err)
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def preview_file_name(label: str, prompt: str, seed: int) -> str:
    """The file of one preview image: `<variant>__<first 40 characters of the prompt>__seed<N>.png`."""
    return f"{_slug(label)}__{_slug(prompt)[:40]}__seed{seed}.png"


def write_preview_grid(folder: Path, outputs: dict[str, list[Image.Image]], requests: list[tuple[str, int]],
                       resolution: int) -> list[Path]:
    """Each image as a PNG, plus `grid.png`: one column per model variant, one row per (prompt, seed)."""
    files = []
    for label, images in outputs.items():
        for (prompt, seed), image in zip(requests, images):
            path = folder / preview_file_name(label, prompt, seed)
            image.save(path)
            files.append(path)
    cell = max(resolution, 160)
    header, caption = 28, 18
    font = ImageFont.load_default()
    grid = Image.new("RGB", (cell * len(outputs), header + (cell + caption) * len(requests)), "white")
    draw = ImageDraw.Draw(grid)
    for column, (label, images) in enumerate(outputs.items()):
        draw.text((column * cell + 6, 8), label, fill="black", font=font)
        for row, image in enumerate(images):
            top = header + row * (cell + caption)
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (column * cell, top))
            if column == 0:
                prompt, seed = requests[row]
                draw.text((6, top + cell + 3), f"{prompt}  (seed {seed})", fill="black", font=font)
    grid_path = folder / "grid.png"
    grid.save(grid_path)
    return files + [grid_path]


SNIPPET = '''import tempfile

import torch
from diffusers import FluxPipeline

# The preview {preview} of this run, made again: the same model, LoRA, prompt, seed, size, denoising steps,
# guidance and text tokens. On the machine that trained it (same dtype) the image matches the preview.
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32  # what the run used on each
pipe = FluxPipeline.from_pretrained({model!r}, torch_dtype=dtype, use_safetensors=True){to_device}
pipe.load_lora_weights({lora!r}, weight_name={weights!r})
{offload}image = pipe({prompt!r}, height={size}, width={size}, num_inference_steps={steps}, guidance_scale={guidance},
             max_sequence_length={tokens}, generator=torch.Generator("cpu").manual_seed({seed})).images[0]
image.save("sample.png")
'''


# A GPU smaller than the transformer (the run's plan did not preview it whole): diffusers' group offloading keeps
# the pipeline's models off the GPU and moves one block at a time in, the next one copied while the current one runs
# (use_stream); the models named in exclude_modules go to the GPU whole.
OFFLOAD = '''if device == "cuda":  # the run's plan: the transformer does not fit this GPU whole
    # {why}
    pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                              offload_type="block_level", num_blocks_per_group=1, use_stream=True,{disk}
                              exclude_modules={resident!r})
else:
    pipe.to(device)
'''
# the run's plan streamed the model from its files (host RAM cannot hold it): each block waits in a file of a fresh
# folder here, not in RAM (remove the folder afterwards)
DISK = '''
                              offload_to_disk_path=tempfile.mkdtemp(prefix="offload-", dir="."),'''


def offload_settings(plan: dict | None, t5_gib: float) -> dict:
    """How a snippet offloads the full model on the GPU, from the run's plan (run.json "plan"): "offload" (the
    model is not previewed whole), "disk" (the plan streamed it from the files because host RAM cannot hold it),
    and "t5_fits": T5-XXL whole (`t5_gib`) beside the plan's preview (which the run ran without T5, from its cached
    embeddings) is within the plan's GPU budget; unknown budgets offload T5 too."""
    plan = plan or {}
    preview = (plan.get("phases") or {}).get("preview") or {}
    mode = preview.get("mode", "whole")
    budget, need = plan.get("gpu_budget_gib"), preview.get("device_gib")
    return {"offload": mode != "whole", "disk": mode == "files",
            "t5_fits": budget is not None and need is not None and need + t5_gib <= budget}


def load_snippet(model: str, lora_folder: Path, prompt: str, seed: int, size: int, steps: int, guidance: float,
                 sequence_length: int, preview: str = "", offload: bool = False, disk: bool = False,
                 t5_fits: bool = False) -> str:
    """Python that loads the diffusers-format LoRA and renders one preview again, with every setting it used.

    `offload`: the full model did not fit the run's GPU budget whole, so the snippet group-offloads it; `disk`: the
    offloaded blocks wait in files, not RAM; `t5_fits`: T5-XXL (8.9 GiB for [dev]) goes to the GPU whole, else it is
    group-offloaded like the transformer."""
    resident = ["text_encoder", "text_encoder_2", "vae"] if t5_fits else ["text_encoder", "vae"]
    why = ("T5, CLIP and the VAE fit the run's budget whole" if t5_fits
           else "T5-XXL does not fit the run's budget beside the rest: it is offloaded block by block too")
    code = OFFLOAD.format(why=why, disk=DISK if disk else "", resident=resident) if offload else ""
    return SNIPPET.format(model=str(model), lora=str(lora_folder), weights=LORA_FILE, prompt=prompt, seed=int(seed),
                          size=int(size), steps=int(steps), guidance=float(guidance), tokens=int(sequence_length),
                          preview=preview or "image", to_device="" if offload else ".to(device)", offload=code)
