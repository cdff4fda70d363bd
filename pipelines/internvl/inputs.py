"""InternVL inputs without InternVLProcessor: loading, chat packing, collation, answer loss, greedy answers.

See pipelines/internvl/backend.py's docstring for the packing, step by step; the backend there uses these.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from pipelines.runner.data import load_rgb
from .data import IMAGE_MARKER, QASample


log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that carry no loss
IMAGE_TOKEN_ATTRS = ("start_image_token", "end_image_token", "context_image_token")
FAKE_IMAGE_TOKEN = "<image>"  # the other image placeholder published templates write (processor's fake_image_token)

# ---------------------------------------------------------------------------------------------- loading


@dataclass
class VlmParts:
    """What `load_vlm_processing` reads from a checkpoint besides the weights."""

    tokenizer: Any
    image_processor: Any
    image_seq_length: int  # <IMG_CONTEXT> tokens per image tile


def _not_found(source: str, err: Exception) -> OSError:
    return OSError(f"could not load {source!r}: {err}. Pass a local folder holding config.json and "
                   "*.safetensors, or a hub id that is downloaded (this machine may be offline)")


def _check_internvl(source: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _not_found(source, err) from None
    if config.model_type != "internvl":
        raise ValueError(f"{source!r} is a {config.model_type!r} checkpoint; this backend needs a "
                         "transformers-native InternVL (ids ending in -hf, e.g. OpenGVLab/InternVL3-1B-hf)")
    return config


def image_seq_length_of(source: str, config: Any) -> int:
    """`image_seq_length` from processor_config.json, checked against the model's own geometry.

    `(image_size / patch_size)² · downsample_ratio²` tokens per tile; used alone when the file is missing.
    """
    from transformers.utils import cached_file

    vision = config.vision_config
    size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    expected = int((size // patch) ** 2 * config.downsample_ratio ** 2)
    path = cached_file(source, "processor_config.json", _raise_exceptions_for_missing_entries=False)
    if path is None:
        return expected
    found = json.loads(Path(path).read_text()).get("image_seq_length", expected)
    if found != expected:
        raise ValueError(f"{source!r}: processor_config.json says image_seq_length={found} but the vision tower "
                         f"gives {expected} tokens per tile; the checkpoint's files do not belong together")
    return int(found)


def load_vlm_processing(source: str, trust_remote_code: bool = False) -> VlmParts:
    """Tokenizer (with InternVL's image tokens), image processor and tokens per tile of a checkpoint."""
    from transformers import AutoImageProcessor, AutoTokenizer

    config = _check_internvl(source, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _not_found(source, err) from None
    missing = [a for a in IMAGE_TOKEN_ATTRS if getattr(tokenizer, a, None) is None]
    if missing:
        raise ValueError(f"the tokenizer of {source!r} lacks {', '.join(missing)}; use a transformers-native "
                         "InternVL checkpoint (its tokenizer_config.json lists the image tokens)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {source!r} has no chat template; use an instruction-tuned checkpoint")
    if tokenizer.context_image_token_id != config.image_token_id:
        raise ValueError(f"{source!r}: the tokenizer's {tokenizer.context_image_token} is id "
                         f"{tokenizer.context_image_token_id} but the model expects image_token_id "
                         f"{config.image_token_id}; the tokenizer does not belong to this model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return VlmParts(tokenizer, image_processor, image_seq_length_of(source, config))


def load_vlm(source: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             trust_remote_code: bool = False):
    """InternVLForConditionalGeneration from a hub id or folder (safetensors only), frozen, in eval mode."""
    from transformers import InternVLForConditionalGeneration

    _check_internvl(source, trust_remote_code)
    device = torch.device(device)
    # straight onto an accelerator, tensor by tensor: the host never holds the whole model (a 38 B model is 71 GiB)
    placement = {} if device.type == "cpu" else {"device_map": {"": str(device)}}
    try:
        model = InternVLForConditionalGeneration.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **placement)
    except OSError as err:
        raise _not_found(source, err) from None
    model.requires_grad_(False)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- packing


@dataclass
class ChatPacker:
    """Builds model inputs (ids, labels, pixel values) for QASamples, as InternVLProcessor would."""

    tokenizer: Any
    image_processor: Any
    image_seq_length: int
    max_tiles: int = 1  # tiles per image (plus a thumbnail when > 1); 1 keeps memory predictable
    max_length: int = 2048  # longest sequence in tokens; longer samples are cut after their last image
    system_prompt: str = ""
    _placeholder: str | None = field(default=None, init=False, repr=False)  # found by `placeholder`

    @property
    def image_token(self) -> str:
        return self.tokenizer.context_image_token

    @property
    def placeholder(self) -> str:
        """What the chat template writes for one image: `<IMG_CONTEXT>` (transformers' conversion) or `<image>`
        (InternVL3.5-HF and other published templates); found once by rendering a one-image message."""
        if self._placeholder is None:
            rendered = self.render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}])
            for candidate in (self.image_token, FAKE_IMAGE_TOKEN):
                if candidate in rendered:
                    self._placeholder = candidate
                    break
            else:
                raise ValueError(f"the chat template writes neither {self.image_token} nor {FAKE_IMAGE_TOKEN} for an "
                                 f"image part (it rendered {rendered[:120]!r}); use the checkpoint's own "
                                 "tokenizer_config.json / chat_template.jinja")
        return self._placeholder

    # -- text --------------------------------------------------------------------------------------
    def _user_content(self, question: str, leading_images: int) -> list[dict]:
        content = [{"type": "image"} for _ in range(leading_images)]
        for index, part in enumerate(question.split(IMAGE_MARKER)):
            if index:
                content.append({"type": "image"})
                part = part.lstrip("\n")  # the template puts a newline after each image
            if part:
                content.append({"type": "text", "text": part})
        return content

    def messages(self, sample: QASample, turns: int | None = None, last_answer: bool = True) -> list[dict]:
        """Chat messages of the first `turns` turns; the last one's answer left out if not `last_answer`."""
        turns = len(sample.turns) if turns is None else turns
        has_markers = any(IMAGE_MARKER in q for q, _ in sample.turns)
        system = sample.system or self.system_prompt
        messages = [{"role": "system", "content": system}] if system else []
        for index, (question, answer) in enumerate(sample.turns[:turns]):
            leading = len(sample.images) if index == 0 and not has_markers else 0
            messages.append({"role": "user", "content": self._user_content(question, leading)})
            if index < turns - 1 or last_answer:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def answer_spans(self, sample: QASample) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendered conversation and the character spans that carry loss (answer + end of turn)."""
        full = self.render(self.messages(sample))
        spans = []
        for turn in range(1, len(sample.turns) + 1):
            prefix = self.render(self.messages(sample, turn, last_answer=False), add_generation_prompt=True)
            upto = self.render(self.messages(sample, turn))
            if not (full.startswith(upto) and upto.startswith(prefix)):
                raise ValueError("the chat template does not render a conversation as a prefix of its continuation; "
                                 "answer-only labels need a standard (ChatML-like) template")
            # The assistant's turn as the template wrote it: the answer and its end-of-turn token (learn to
            # stop), without the whitespace that separates it from the next turn.
            spans.append((len(prefix), len(upto.rstrip())))
        return full, spans

    def expand_images(self, text: str, tiles: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
        """Replace the i-th image placeholder by `<img>` + image_seq_length·tiles[i] context tokens + `</img>`.

        Returns the new text and `(position in the old text, characters added)` per replacement.
        """
        token = self.placeholder
        found = [m.start() for m in re.finditer(re.escape(token), text)]
        if len(found) != len(tiles):
            raise ValueError(f"the prompt holds {len(found)} image placeholders ({token}) for {len(tiles)} images")
        start, end = self.tokenizer.start_image_token, self.tokenizer.end_image_token
        parts, shifts, last = [], [], 0
        for position, count in zip(found, tiles):
            replacement = start + self.image_token * (self.image_seq_length * count) + end
            parts += [text[last:position], replacement]
            shifts.append((position, len(replacement) - len(token)))
            last = position + len(token)
        parts.append(text[last:])
        return "".join(parts), shifts

    # -- images ------------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Any]) -> tuple[torch.Tensor | None, list[int]]:
        """(tiles, 3, H, W) float32 pixels of all images and the tile count of each."""
        if not images:
            return None, []
        rgb = [load_rgb(i) if isinstance(i, (str, Path)) else i.convert("RGB") for i in images]
        out = self.image_processor(images=rgb, crop_to_patches=True, max_patches=self.max_tiles, return_tensors="pt")
        tiles = out["num_patches"]
        return out["pixel_values"].float(), [int(t) for t in (tiles.tolist() if hasattr(tiles, "tolist") else tiles)]

    def tokenize(self, text: str) -> Any:
        """Tokenize as the processor does: no added BOS when the template already wrote one."""
        bos = self.tokenizer.bos_token
        add_special = not (bos is not None and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)

    # -- whole samples -----------------------------------------------------------------------------
    def encode(self, sample: QASample, images: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        """Training inputs of one sample: input_ids, labels (answers only), pixel_values.

        `images` (paths or PIL images) replace the sample's own images when given.
        """
        sample = sample if images is None else replace(sample, images=tuple(images))
        pixels, tiles = self.pixel_values(sample.images)
        text, spans = self.answer_spans(sample)
        text, shifts = self.expand_images(text, tiles)

        def moved(position: int) -> int:
            return position + sum(added for at, added in shifts if at < position)

        spans = [(moved(a), moved(b)) for a, b in spans]
        encoded = self.tokenize(text)
        ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        for index, (begin, _) in enumerate(encoded["offset_mapping"]):
            if any(a <= begin < b for a, b in spans):
                labels[index] = ids[index]
        return self._finish(sample, ids, labels, pixels)

    def encode_prompt(self, sample: QASample, images: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        """Generation inputs: the conversation up to the last question, then the assistant's turn opener."""
        sample = sample if images is None else replace(sample, images=tuple(images))
        pixels, tiles = self.pixel_values(sample.images)
        text = self.render(self.messages(sample, last_answer=False), add_generation_prompt=True)
        text, _ = self.expand_images(text, tiles)
        ids = torch.tensor(self.tokenize(text)["input_ids"], dtype=torch.long)
        return self._finish(sample, ids, None, pixels)

    def _finish(self, sample: QASample, ids: torch.Tensor, labels: torch.Tensor | None,
                pixels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if ids.numel() > self.max_length:
            image_ids = (ids == self.tokenizer.convert_tokens_to_ids(self.tokenizer.end_image_token)).nonzero()
            if len(image_ids) and int(image_ids[-1]) >= self.max_length:
                raise ValueError(f"a sample ({sample.question[:40]!r}...) needs {ids.numel()} tokens and its images "
                                 f"do not fit in --max-length {self.max_length}; raise it or lower --max-tiles")
            log.warning("a sample has %d tokens; cut to --max-length %d", ids.numel(), self.max_length)
            ids = ids[: self.max_length]
            labels = labels[: self.max_length] if labels is not None else None
        out = {"input_ids": ids}
        if labels is not None:
            out["labels"] = labels
        if pixels is not None:
            out["pixel_values"] = pixels
        return out


def collate(encoded: Sequence[dict[str, torch.Tensor]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad a list of encoded samples into a batch (left padding for generation); pixels are concatenated
    in batch order, which is the order the model fills the image tokens in."""
    longest = max(e["input_ids"].numel() for e in encoded)
    batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in encoded:
        ids, pad = e["input_ids"], longest - e["input_ids"].numel()
        fill = torch.full((pad,), pad_id, dtype=torch.long)
        mask = torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones_like(ids)] if left
                         else [torch.ones_like(ids), torch.zeros(pad, dtype=torch.long)])
        batch["input_ids"].append(torch.cat([fill, ids] if left else [ids, fill]))
        batch["attention_mask"].append(mask)
        if "labels" in e:
            ignore = torch.full((pad,), IGNORE, dtype=torch.long)
            batch["labels"].append(torch.cat([ignore, e["labels"]] if left else [e["labels"], ignore]))
    out = {k: torch.stack(v) for k, v in batch.items() if v}
    pixels = [e["pixel_values"] for e in encoded if "pixel_values" in e]
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
    return out


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def answer_loss(model: torch.nn.Module, encoded: Sequence[dict[str, torch.Tensor]], pad_id: int,
                device: torch.device | str = "cpu") -> float:
    """Mean cross-entropy over all answer tokens of `encoded` (one sample per forward)."""
    total, tokens = 0.0, 0
    for sample in encoded:
        batch = to_device(collate([sample], pad_id), device)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    return total / max(tokens, 1)


@torch.no_grad()
def generate_answer(model: torch.nn.Module, packer: ChatPacker, sample: QASample, max_new_tokens: int = 32,
                    device: torch.device | str = "cpu", images: Sequence[Any] | None = None) -> str:
    """Greedy answer to the last question of `sample`."""
    batch = to_device(collate([packer.encode_prompt(sample, images)], packer.tokenizer.pad_token_id, left=True), device)
    tokenizer = packer.tokenizer
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stops))
    new = output[0, batch["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip()
