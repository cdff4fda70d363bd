"""A tiny InternVL checkpoint built offline: random weights, a byte-level BPE tokenizer, a PIL image processor.

`save_tiny_internvl(folder)` writes what a transformers-native InternVL repository holds (config.json,
model.safetensors, tokenizer files with the image tokens and a ChatML template, preprocessor_config.json,
processor_config.json), so the backend's real loading code reads it like a hub checkpoint.
`write_colour_images(folder)` makes small solid-colour PNGs and the 8 QA pairs the tests train on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from pipelines.demo.offline_tokenizers import (INTERNVL_CHAT_TEMPLATE, internvl_chat_tokenizer, internvl_image_processor,
                                               save_internvl, small_internvl)

IMAGE_SIZE, PATCH = 32, 8  # (32/8)² = 16 patches -> pixel shuffle 0.5 -> 4 image tokens per tile
IMAGE_SEQ_LENGTH = 4
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "white": (250, 250, 250), "black": (5, 5, 5), "purple": (140, 30, 160), "orange": (250, 140, 20)}
CORPUS = ["What colour is the square? " + " ".join(COLOURS) + " answer the question about the picture"] * 4


def build_tokenizer():
    """A PreTrainedTokenizerFast over a small byte-level BPE, with InternVL's image tokens as attributes."""
    return internvl_chat_tokenizer(CORPUS, vocab_size=320)


def build_image_processor():
    return internvl_image_processor(IMAGE_SIZE)


def build_tiny_internvl(tokenizer, seed: int = 0):
    """InternVLForConditionalGeneration: 2-layer ViT (hidden 32) + 2-layer Qwen2 (hidden 64), random weights."""
    model = small_internvl(tokenizer, seed, text=(64, 128, 2), vision=(32, 64, 2), image_size=IMAGE_SIZE, patch=PATCH,
                           max_positions=1024).eval()
    with torch.no_grad():  # at std 0.02 the tied head's logits span ~1 nat: nothing could be learned in a test
        model.get_input_embeddings().weight.normal_(0.0, 0.2)
    return model


def save_tiny_internvl(folder: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny InternVL checkpoint folder (safetensors) and return its path."""
    tokenizer = build_tokenizer()
    return save_internvl(build_tiny_internvl(tokenizer, seed), tokenizer, build_image_processor(), folder,
                         IMAGE_SEQ_LENGTH)


def write_colour_images(folder: str | Path) -> list[tuple[str, str, str]]:
    """8 solid-colour PNGs in `folder/images` and their (image, question, answer) rows, paths relative to `folder`."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 36), rgb).save(folder / "images" / f"{name}.png")
        rows.append((f"images/{name}.png", "What colour is the square?", name))
    return rows


def write_colour_csv(folder: str | Path) -> list[tuple[str, str, str]]:
    """`write_colour_images` plus `folder/qa.csv` (image, question, answer) holding its rows; returns the rows."""
    import csv

    rows = write_colour_images(folder)
    with open(Path(folder) / "qa.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "question", "answer"])
        writer.writerows(rows)
    return rows


# InternVL3.5-HF: a Qwen3 language model (head_dim set apart from hidden/heads, q/k RMSNorms) and a chat template
# that writes `<image>` for an image part, as published InternVL templates do.
INTERNVL35_CHAT_TEMPLATE = INTERNVL_CHAT_TEMPLATE.replace("<IMG_CONTEXT>", "<image>")


def build_tiny_internvl35(tokenizer, seed: int = 0):
    """InternVLForConditionalGeneration: 2-layer ViT (hidden 32) + 2-layer Qwen3 (hidden 64, 4 heads of 32)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        text_config={"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 1024, "tie_word_embeddings": True,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": [IMAGE_SIZE, IMAGE_SIZE], "patch_size": [PATCH, PATCH]},
        image_token_id=tokenizer.context_image_token_id, downsample_ratio=0.5)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.2)
    return model


def save_tiny_internvl35(folder: str | Path, seed: int = 0) -> Path:
    """A complete tiny InternVL3.5-style checkpoint folder (Qwen3 text model, `<image>` template)."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = INTERNVL35_CHAT_TEMPLATE
    return save_internvl(build_tiny_internvl35(tokenizer, seed), tokenizer, build_image_processor(), folder,
                         IMAGE_SEQ_LENGTH)
