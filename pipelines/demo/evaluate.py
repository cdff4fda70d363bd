"""Held-out evaluation of the demo models, through the same loading code as real models.

FLUX: generate each prompt from fixed seeds with `FluxPipeline.from_pretrained(folder)` and read shape and
colour back with the template matcher of demo_data (validated on ground truth in tests/test_demo.py).
InternVL: greedy answers of `load_vlm(folder)` to questions about images never trained on, exact match
(pipelines/vlm_data.exact_match).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from . import data
from . import FLUX_MAX_SEQUENCE_LENGTH, FLUX_SAMPLE_STEPS, FLUX_SEQUENCE_LENGTH


def load_flux_demo(folder: str | Path):
    """The demo FluxPipeline as any FLUX checkpoint is loaded (safetensors only), progress bars off."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(folder), use_safetensors=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: Iterable[str], seeds: Iterable[int], steps: int = FLUX_SAMPLE_STEPS,
             sequence_length: int = FLUX_SEQUENCE_LENGTH) -> list:
    """One 64x64 image per (prompt, seed), prompt-major."""
    images = []
    for prompt in prompts:
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            images.append(pipe(prompt, height=data.IMAGE_SIZE, width=data.IMAGE_SIZE, num_inference_steps=steps,
                               guidance_scale=0.0, max_sequence_length=sequence_length,
                               generator=generator).images[0])
    return images


def evaluate_flux_demo(folder: str | Path, seed: int = 0, seeds_per_prompt: int = 2, pipe=None) -> dict:
    """Fraction of generations whose colour / shape / both match the prompt, over every pretraining pair, at the
    demo's T5 length (32) and at diffusers' default (512: `*_512`)."""
    pipe = pipe or load_flux_demo(folder)
    pairs = [(c, s) for s, c in data.FLUX_PAIRS]
    seeds = [1000 + seed * 100 + i for i in range(seeds_per_prompt)]
    expected = [pair for pair in pairs for _ in seeds]
    result = {}
    for length, suffix in ((FLUX_SEQUENCE_LENGTH, ""), (FLUX_MAX_SEQUENCE_LENGTH, "_512")):
        images = generate(pipe, [data.caption(c, s) for c, s in pairs], seeds, sequence_length=length)
        readings = [data.read_image(image) for image in images]
        result["colour" + suffix] = float(np.mean([r.colour == c for r, (c, _) in zip(readings, expected)]))
        result["shape" + suffix] = float(np.mean([r.shape == s for r, (_, s) in zip(readings, expected)]))
        result["both" + suffix] = float(np.mean([r.colour == c and r.shape == s
                                                 for r, (c, s) in zip(readings, expected)]))
    result["n"] = len(expected)
    return result


def subject_rate(pipe, prompt: str, seeds: Iterable[int], steps: int = FLUX_SAMPLE_STEPS) -> float:
    """How often generations of `prompt` show the personalisation subject (a teal cross)."""
    readings = [data.read_image(i) for i in generate(pipe, [prompt], seeds, steps)]
    return float(np.mean([r.shape == data.SUBJECT_SHAPE and r.colour == "teal" for r in readings]))


# ---------------------------------------------------------------------------------------------- InternVL


def load_vlm_demo(folder: str | Path):
    """(model, ChatPacker) of the InternVL demo through pipelines/internvl/backend.py's loaders."""
    from pipelines.internvl.backend import ChatPacker, load_vlm, load_vlm_processing

    parts = load_vlm_processing(str(folder))
    model = load_vlm(str(folder))
    return model, ChatPacker(parts.tokenizer, parts.image_processor, parts.image_seq_length)


def heldout_shape_samples(count: int, seed: int, folder: Path):
    """QASamples on shapes never trained on (a seed range the build does not use)."""
    return data_samples(count, 10_000 + seed, folder)


def data_samples(count: int, seed: int, folder: Path):
    """Shape and colour questions on `count` freshly drawn single-shape images (written into `folder`)."""
    from pipelines.internvl.data import QASample

    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index, spec in enumerate(data.vlm_shape_dataset(count, seed)):
        path = folder / f"heldout-{seed}-{index}.png"
        data.render([spec]).save(path)
        samples += [QASample((str(path),), (qa,)) for qa in data.shape_questions(spec)]
    return samples


@torch.no_grad()
def answer_accuracy(model, packer, samples) -> float:
    """Exact-match accuracy of greedy answers."""
    from pipelines.internvl.backend import generate_answer
    from pipelines.internvl.data import exact_match

    model.eval()
    scores = [exact_match(generate_answer(model, packer, s, max_new_tokens=8), s.answer) for s in samples]
    return float(np.mean(scores)) if scores else 0.0


def evaluate_vlm_demo(folder: str | Path, seed: int = 0, count: int = 100) -> dict:
    """Exact match on held-out images, per question type and overall."""
    model, packer = load_vlm_demo(folder)
    with tempfile.TemporaryDirectory() as tmp:
        samples = heldout_shape_samples(count, seed, Path(tmp))
        kinds = {"shape": [s for s in samples if s.question == data.SHAPE_QUESTION],
                 "colour": [s for s in samples if s.question.startswith("What colour")]}
        result = {kind: answer_accuracy(model, packer, group) for kind, group in kinds.items()}
    result["overall"] = float(np.mean([result[k] for k in kinds]))
    result["n"] = len(samples)
    return result
