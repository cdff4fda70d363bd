"""Tokenizers and image processors built offline, for the demo models and the tests' tiny models.

Nothing here downloads: a byte-level CLIPTokenizer that FluxPipeline accepts (the 256 byte symbols,
the same with `</w>`, start/end tokens, a merges.txt holding only its header), a ChatML byte-level BPE
with InternVL's image tokens as attributes (what transformers' InternVL conversion writes), the
PIL image processor InternVL checkpoints use when there is no torchvision, and the small seeded
InternVL (ViT + Qwen2) these go with, saved as a complete checkpoint folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

INTERNVL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                           "<video>"]
INTERNVL_CHAT_TEMPLATE = (  # transformers' InternVL conversion template (ChatML; each image renders as <IMG_CONTEXT>)
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def byte_clip_tokenizer(folder: Path):
    """`(CLIPTokenizer, vocabulary size)`: byte-level, no merges; its files are written into `folder`."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77), len(vocab)


def internvl_chat_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A PreTrainedTokenizerFast over a byte-level BPE trained on `corpus`, with InternVL's image tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=INTERNVL_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=INTERNVL_CHAT_TEMPLATE,
        model_max_length=4096,
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})


def internvl_image_processor(size: int):
    """InternVL's image processor (PIL backend) at `size` x `size` per tile, without tiling by default."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=False,
                                    min_patches=1, max_patches=12)


def small_internvl(tokenizer, seed: int, text: tuple[int, int, int], vision: tuple[int, int, int], image_size: int,
                   patch: int, max_positions: int):
    """A seeded InternVLForConditionalGeneration with a tied-head Qwen2 and a ViT; `text` and `vision` are
    (hidden size, intermediate size, layers); 4 text heads (2 KV), 2 vision heads, pixel shuffle 0.5."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    (h, i, layers), (hv, iv, vision_layers) = text, vision
    config = InternVLConfig(
        text_config={"model_type": "qwen2", "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "max_position_embeddings": max_positions, "tie_word_embeddings": True,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": hv, "intermediate_size": iv, "num_hidden_layers": vision_layers,
                       "num_attention_heads": 2, "image_size": [image_size, image_size], "patch_size": [patch, patch]},
        image_token_id=tokenizer.context_image_token_id, downsample_ratio=0.5)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_internvl(model, tokenizer, image_processor, folder: Path, image_seq_length: int) -> Path:
    """Write `model` as a complete InternVL checkpoint folder (safetensors, tokenizer, image processor)."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": image_seq_length, "processor_class": "InternVLProcessor"}, indent=2))
    return folder
