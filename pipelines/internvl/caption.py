"""Captions for a FLUX run's photos, written by an InternVL model the user has (`launch.py caption`, the app's
"Caption my photos").

Each image gets the model's greedy answers to a short list of questions, put into a template, after the trigger
word: `"<trigger>, <caption>"`, e.g. "sks, a teal cross". A real InternVL is asked one question ("Describe this
image in one short sentence."). A model folder may name its own questions and template in its demo.json
(`"caption": {"questions": [...], "template": "..."}`): the demo InternVL, which answers shape and colour questions,
describes a shape as "a {colour} {shape}". A question may use earlier answers (`{0}` is the first answer).

    python launch.py caption --images DIR [--model ID_OR_FOLDER] [--trigger sks] [--overwrite]

writes `<image>.txt` beside each image and never replaces a caption that exists unless asked.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from pipelines.runner.data import DataError, find_images
from pipelines.runner.registry import DEMO_MODELS

from .data import QASample
from .inputs import ChatPacker, generate_answer, load_vlm, load_vlm_processing

log = logging.getLogger(__name__)

DESCRIBE = "Describe this image in one short sentence."
MAX_WORDS = 60  # a caption longer than this is cut: FLUX's CLIP encoder reads 77 tokens


@dataclass(frozen=True)
class CaptionRecipe:
    """The questions asked of each image and how their answers make a caption."""

    questions: tuple[str, ...] = (DESCRIBE,)
    template: str = "{0}"

    @classmethod
    def of_model(cls, model: str) -> "CaptionRecipe":
        """The recipe a model folder names in its demo.json ("caption"), else the plain description."""
        file = Path(model) / "demo.json"
        try:
            spec = json.loads(file.read_text()).get("caption") if file.is_file() else None
        except (OSError, json.JSONDecodeError):
            spec = None
        if not isinstance(spec, dict) or not spec.get("questions"):
            return cls()
        return cls(tuple(str(q) for q in spec["questions"]), str(spec.get("template", "{0}")))

    def caption(self, answer: Callable[[str], str]) -> str:
        """The caption made from `answer(question)` for each question in turn."""
        answers: list[str] = []
        for question in self.questions:
            answers.append(_clean(answer(question.format(*answers))))
        return _clean(self.template.format(*answers))


def _clean(text: str) -> str:
    words = " ".join(str(text).split()).strip().rstrip(".").split(" ")
    return " ".join(words[:MAX_WORDS])


QUESTION_TOKENS = 64  # the chat template and the question around the image's tokens


def captioner_bytes(model: str, image_seq_length: int, max_new_tokens: int, dtype_bytes: int = 2) -> int:
    """GPU bytes the captioner needs, whole in `dtype_bytes` per weight: the weights (counted on a meta build of the
    config, nothing read), the KV cache of one answer (2 · layers · kv width · tokens), one decoder layer's working
    set (tokens · (h + 3 · intermediate)) and the runtime overhead the planner counts (emloc.memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, InternVLForConditionalGeneration

    from emloc.memory import RUNTIME_OVERHEAD_BYTES

    config = AutoConfig.from_pretrained(model)
    with init_empty_weights():
        skeleton = InternVLForConditionalGeneration(config)
    params = sum(p.numel() for p in {id(p): p for p in skeleton.parameters()}.values())
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_width = getattr(text, "num_key_value_heads", text.num_attention_heads) * head_dim
    tokens = image_seq_length + QUESTION_TOKENS + max_new_tokens
    kv_cache = 2 * text.num_hidden_layers * kv_width * tokens * dtype_bytes
    working = tokens * (text.hidden_size + 3 * text.intermediate_size) * dtype_bytes
    return dtype_bytes * params + kv_cache + working + RUNTIME_OVERHEAD_BYTES


def check_captioner_fits(model: str, need: int, budget: int) -> None:
    """Raise, in words, when the captioner (`need` bytes, captioner_bytes) is larger than the GPU's `budget`."""
    if need > budget:
        gib = 1024 ** 3
        raise ValueError(f"the captioning model {model} needs about {need / gib:.1f} GiB on the GPU to caption (its "
                         f"weights whole, an answer's KV cache and the CUDA runtime) but the GPU has "
                         f"{budget / gib:.1f} GiB free; choose a smaller captioning model (e.g. InternVL3-1B or -2B), "
                         f"free the GPU, or caption on the CPU (launch.py caption --device cpu)")


class Captioner:
    """An InternVL model loaded once, captioning one image at a time."""

    def __init__(self, model: str = "", device: str | torch.device = "cpu", max_new_tokens: int = 40,
                 budget_gb: float | None = None):
        """`budget_gb`: GPU memory the captioner may use (default: what the GPU has free); a model that does not
        fit it whole is refused before anything is loaded (it is never streamed or offloaded here)."""
        self.model_id = model or str(DEMO_MODELS["vlm"])
        self.device = torch.device(device)
        parts = load_vlm_processing(self.model_id)
        self.packer = ChatPacker(parts.tokenizer, parts.image_processor, parts.image_seq_length)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if self.device.type == "cuda":
            budget = int(budget_gb * 1024 ** 3) if budget_gb else torch.cuda.mem_get_info(self.device)[0]
            check_captioner_fits(self.model_id, captioner_bytes(self.model_id, parts.image_seq_length,
                                                                max_new_tokens), budget)
        self.model = load_vlm(self.model_id, self.device, dtype)
        self.recipe = CaptionRecipe.of_model(self.model_id)
        self.max_new_tokens = max_new_tokens

    def __call__(self, image: str | Path, trigger: str = "") -> str:
        path = str(Path(image).resolve())

        def answer(question: str) -> str:
            sample = QASample(images=(path,), turns=((f"<image>\n{question}", ""),))
            with torch.no_grad():
                return generate_answer(self.model, self.packer, sample, self.max_new_tokens, self.device)

        text = self.recipe.caption(answer)
        return f"{trigger.strip()}, {text}" if trigger.strip() else text


def caption_folder(images: str | Path, model: str = "", trigger: str = "", overwrite: bool = False,
                   device: str = "cpu", progress: Callable[[int, int, str], None] | None = None) -> dict[str, str]:
    """Write `<image>.txt` for each image in `images` (skipping existing ones unless `overwrite`);
    returns {image file name: caption} of the captions written."""
    found = find_images(images)
    if not found:
        raise DataError(f"{images} holds no JPEG, PNG or WebP images to caption")
    todo = [p for p in found if overwrite or not p.with_suffix(".txt").exists()]
    written: dict[str, str] = {}
    if not todo:
        return written
    captioner = Captioner(model, device)
    for index, path in enumerate(todo):
        text = captioner(path, trigger)
        path.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        written[path.name] = text
        if progress is not None:
            progress(index + 1, len(todo), path.name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """`launch.py caption`: same-name .txt captions for a folder of photos; exit 1 on bad input."""
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(prog="launch.py caption", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of the photos to caption")
    parser.add_argument("--model", default="", help="InternVL hub id or folder (default: the demo InternVL)")
    parser.add_argument("--trigger", default="", help="the trigger word each caption starts with, e.g. sks")
    parser.add_argument("--overwrite", action="store_true", help="replace captions (.txt) that already exist")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    bar = tqdm(desc="Captioning your photos", unit="photo")

    def progress(done: int, total: int, name: str) -> None:
        bar.total = total
        bar.update(1)
        bar.set_postfix_str(name)

    try:
        written = caption_folder(args.images, args.model, args.trigger, args.overwrite, args.device, progress)
    except (ValueError, OSError) as err:
        bar.close()
        print(f"error: {err}", file=sys.stderr)
        return 1
    bar.close()
    kept = len(find_images(args.images)) - len(written)
    for name, text in written.items():
        print(f"{name}: {text}")
    print(f"wrote {len(written)} captions" + (f"; kept {kept} that already existed (--overwrite replaces them)"
                                              if kept else ""))
    return 0
