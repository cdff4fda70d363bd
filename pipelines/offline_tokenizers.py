"""Tokenizers and image processors built offline, for the demo models and the tests' tiny models.

Nothing here downloads: a byte-level CLIPTokenizer that FluxPipeline accepts (the 256 byte symbols,
the same with `</w>`, start/end tokens, a merges.txt holding only its header), a ChatML byte-level BPE
with InternVL's image tokens as attributes (what transformers' InternVL conversion writes), and the
PIL image processor InternVL checkpoints use when there is no torchvision.
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
