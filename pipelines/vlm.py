"""The InternVL backend: teach a vision-language model your images and answers (a recipe, DESIGN.md).

Model: a transformers-native `InternVLForConditionalGeneration` (hub ids ending in `-hf`, or a local
folder; safetensors only). Inputs are packed here from `AutoTokenizer` + `AutoImageProcessor`, because
`InternVLProcessor` cannot be built without torchvision. The packing is the processor's, step by step:

    prompt   = tokenizer.apply_chat_template(messages)            # each image renders as <IMG_CONTEXT>
    prompt   = prompt with every <IMG_CONTEXT> replaced by         # InternVLProcessor.replace_image_token
               <img> + <IMG_CONTEXT> * (image_seq_length * tiles) + </img>
    ids      = tokenizer(prompt)                                   # no BOS when the template wrote one
    pixels   = image_processor(images, crop_to_patches=True, max_patches=max_tiles)   # (tiles, 3, H, W)

Labels are -100 everywhere except on the answers (and the end-of-turn token after each), so the loss
`-(1/|answer tokens|) Σ log p(answer token | everything before)` trains answers only.

`VlmBackend` plugs this into the shared run machine (pipelines/run.py): the user's QA data is copied
into the run as InternVL-format JSONL and packed once into the run's cache; calibration runs 8-64 of
those samples, one per batch (no padding in the statistics); by default the language model's decoder
linears and the vision encoder's linears are compressed (each part at its own ratio) while projector,
embeddings and lm_head stay dense, and LoRA trains the language model's attention and MLP projections.
Previews are greedy answers of base, emulator + LoRA, full + corrected and full + uncorrected LoRA,
side by side, with exact match and token F1 where reference answers exist.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from emloc.rules import check_ratio

from .data import DataError, load_rgb
from .run import Backend, RunSettings
from .vlm_data import (IMAGE_MARKER, QASample, check_image, exact_match, read_qa_data, token_f1,
                       write_qa_jsonl)

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that carry no loss
IMAGE_TOKEN_ATTRS = ("start_image_token", "end_image_token", "context_image_token")
# Module names of InternVLForConditionalGeneration (transformers >= 4.52).
LANGUAGE_LINEARS = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+"
VISION_LINEARS = r"model\.vision_tower\.encoder\.layer\.\d+\.(attention|mlp)\.\w+"
LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def default_rules(language_ratio: float, vision_ratio: float) -> list[tuple[str, float]]:
    """Compress the language model's decoder linears and the vision encoder's linears, each at its ratio.

    Projector, embeddings and lm_head match no rule and stay dense.
    """
    return [(LANGUAGE_LINEARS, language_ratio), (VISION_LINEARS, vision_ratio)]


def default_lora_targets() -> list[str]:
    """LoRA on the language model's attention (q, k, v, o) and MLP (gate, up, down) projections."""
    return [LORA_TARGETS]


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
    try:
        model = InternVLForConditionalGeneration.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
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

    @property
    def image_token(self) -> str:
        return self.tokenizer.context_image_token

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
        """Replace the i-th image token by `<img>` + image_seq_length·tiles[i] context tokens + `</img>`.

        Returns the new text and `(position in the old text, characters added)` per replacement.
        """
        token = self.image_token
        found = [m.start() for m in re.finditer(re.escape(token), text)]
        if len(found) != len(tiles):
            raise ValueError(f"the prompt holds {len(found)} image placeholders for {len(tiles)} images")
        start, end = self.tokenizer.start_image_token, self.tokenizer.end_image_token
        parts, shifts, last = [], [], 0
        for position, count in zip(found, tiles):
            replacement = start + token * (self.image_seq_length * count) + end
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


# ---------------------------------------------------------------------------------------------- the backend


@dataclass
class VlmSettings:
    """Settings of an InternVL run (the shared ones are in run.RunSettings)."""

    data: str = field(default="", metadata={
        "help": "qa.jsonl / qa.csv (image, question, answer), a folder holding one, or InternVL's JSONL / meta JSON"})
    vision_ratio: float = field(default=0.0, metadata={
        "help": "fraction kept in the vision encoder's linears (0: the same as --ratio)"})
    max_tiles: int = field(default=1, metadata={"help": "448px tiles per image (more: finer detail, more memory)"})
    max_length: int = field(default=2048, metadata={"help": "longest training sample in tokens"})
    system_prompt: str = field(default="", metadata={"help": "system prompt for every conversation (default none)"})
    holdout: int = field(default=0, metadata={"help": "samples kept out of training to judge the previews"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow the checkpoint's own Python code (only for checkpoints you trust)"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest preview answer in tokens",
                                                      "preview": "--max-new-tokens"})
    preview_questions: list[str] = field(default_factory=list, metadata={
        "help": "questions for the previews (default: held-out or first training samples)",
        "flag": "--preview-question", "preview": "--question"})
    preview_images: list[str] = field(default_factory=list, metadata={
        "help": "an image for each preview question (one image is shared by all)",
        "flag": "--preview-image", "preview": "--image"})
    preview_samples: int = field(default=4, metadata={"help": "samples previewed when no question is given",
                                                      "preview": "--preview-samples"})


LOAD_SNIPPET = """# Your personalised InternVL

`corrected/` is a PEFT LoRA adapter for `{model}` (EMLoC-corrected for the full model);
`uncorrected/` is the adapter as trained on the emulator, kept for comparison.

```python
from peft import PeftModel
from transformers import AutoTokenizer, InternVLForConditionalGeneration

model = InternVLForConditionalGeneration.from_pretrained("{model}", dtype="auto")
model = PeftModel.from_pretrained(model, "corrected")  # or .merge_and_unload() for plain transformers
tokenizer = AutoTokenizer.from_pretrained("{model}")
```
"""
CALIBRATION_RANGE = (8, 64)  # calibration samples: enough for stable statistics, few enough to be quick


class VlmBackend(Backend):
    """InternVL: the whole model (vision tower, projector, language model) is calibrated and emulated."""

    name = "vlm"
    settings_class = VlmSettings

    def __init__(self, run: RunSettings, settings: VlmSettings, device: torch.device):
        super().__init__(run, settings, device)
        precision = run.mixed_precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "no"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self._packer: ChatPacker | None = None
        self.samples: list[QASample] = []
        self.held_out: list[QASample] = []
        self.encoded: list[dict[str, torch.Tensor]] = []

    @property
    def packer(self) -> ChatPacker:
        if self._packer is None:
            parts = load_vlm_processing(self.run.model, self.settings.trust_remote_code)
            s = self.settings
            self._packer = ChatPacker(parts.tokenizer, parts.image_processor, parts.image_seq_length,
                                      s.max_tiles, s.max_length, s.system_prompt)
        return self._packer

    # -- data ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        s = self.settings
        if not s.data:
            raise DataError("no data given; pass --data with qa.jsonl, qa.csv (image, question, answer), "
                            "a folder holding one, or InternVL's JSONL / meta JSON")
        if s.vision_ratio:
            check_ratio(s.vision_ratio, "--vision-ratio")
        for name in ("max_tiles", "max_length", "max_new_tokens", "preview_samples"):
            if getattr(s, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(s, name)}")
        low, high = CALIBRATION_RANGE
        if not low <= self.run.calibration_samples <= high:
            raise ValueError(f"--calibration-samples must be between {low} and {high} for InternVL; "
                             f"got {self.run.calibration_samples}")
        report = read_qa_data(s.data)
        if not 0 <= s.holdout < len(report.samples):
            raise ValueError(f"--holdout {s.holdout} leaves nothing to train on ({len(report.samples)} samples)")
        self._typed_questions()
        self.packer  # noqa: B018 - the model's files must be readable before a run folder is made
        log.info("data: %s", report.summary())

    def _typed_questions(self) -> list[QASample]:
        """The questions typed for the previews (--question, --image), checked."""
        s = self.settings
        if s.preview_images and not s.preview_questions:
            raise ValueError("--image needs a --question to ask about it")
        if s.preview_images and len(s.preview_images) not in (1, len(s.preview_questions)):
            raise ValueError(f"{len(s.preview_images)} preview images for {len(s.preview_questions)} questions; "
                             "pass one image for all questions or one per question")
        images = s.preview_images * len(s.preview_questions) if len(s.preview_images) == 1 else s.preview_images
        return [QASample((check_image(Path(images[i]), "--image"),) if images else (), ((question, "?"),))
                for i, question in enumerate(s.preview_questions)]

    def copy_data(self, folder: Path) -> dict:
        report = read_qa_data(self.settings.data)
        return {"source": str(self.settings.data), **write_qa_jsonl(report.samples, folder)}

    def use_data(self, folder: Path) -> None:
        samples = read_qa_data(Path(folder) / "qa.jsonl").samples
        cut = len(samples) - self.settings.holdout
        self.samples, self.held_out = samples[:cut], samples[cut:]

    def build_cache(self, folder: Path) -> None:
        """Token ids, labels and pixels of every training sample: images are decoded once per run."""
        tensors = {}
        for index, sample in enumerate(self.samples):
            for key, value in self.packer.encode(sample).items():
                tensors[f"{index}.{key}"] = value.contiguous()
        save_file(tensors, str(Path(folder) / "encoded.safetensors"))

    def load_cache(self, folder: Path) -> None:
        tensors = load_file(str(Path(folder) / "encoded.safetensors"))
        self.encoded = [{key.split(".", 1)[1]: t for key, t in tensors.items() if key.split(".", 1)[0] == str(i)}
                        for i in range(len(self.samples))]

    # -- model -----------------------------------------------------------------------------------------
    def load_model(self, device: torch.device) -> torch.nn.Module:
        return load_vlm(self.run.model, device, self.dtype, self.settings.trust_remote_code)

    def default_rules(self, ratio: float) -> list[tuple[str, float]]:
        return default_rules(ratio, self.settings.vision_ratio or ratio)

    def default_lora_targets(self) -> list[str]:
        return default_lora_targets()

    def enable_gradient_checkpointing(self, model: torch.nn.Module) -> None:
        # Non-reentrant: gradients reach the LoRA weights although the frozen model's inputs need none.
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = collate([self.encoded[i] for i in indices], self.packer.tokenizer.pad_token_id)
        return to_device(batch, self.device)

    def calibration_batches(self):
        """One sample per batch (no padding in the statistics), a seeded subset of at most 64 samples."""
        order = torch.randperm(len(self.encoded), generator=torch.Generator().manual_seed(self.run.seed)).tolist()
        for index in order[: CALIBRATION_RANGE[1]]:
            batch = self._batch([index])
            batch.pop("labels")
            yield batch

    def calibration_forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        return model(**batch)

    def training_loss(self, model: torch.nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
        """Answer-token cross-entropy of the step's batch; every epoch visits each sample once, in a seeded order."""
        n, size = len(self.encoded), self.run.batch_size
        first = step * size
        epoch_orders: dict[int, list[int]] = {}
        indices = []
        for position in range(first, first + size):
            epoch = position // n
            if epoch not in epoch_orders:
                seed = self.run.seed * 1_000_003 + epoch
                epoch_orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
            indices.append(epoch_orders[epoch][position % n])
        return model(**self._batch(indices)).loss

    def export(self, folder: Path, corrected: dict, uncorrected: dict, config: Any) -> None:
        """A README beside the adapters with the few lines that load the corrected one (PEFT format)."""
        (Path(folder) / "README.md").write_text(LOAD_SNIPPET.format(model=self.run.model), encoding="utf-8")

    # -- previews --------------------------------------------------------------------------------------
    def preview_items(self) -> list[tuple[QASample, str | None, str]]:
        """(sample, reference answer or None, where it comes from) for each preview question."""
        if self.settings.preview_questions:
            return [(sample, None, "typed") for sample in self._typed_questions()]
        count = self.settings.preview_samples
        if self.held_out:
            return [(sample, sample.answer, "held out") for sample in self.held_out[:count]]
        return [(sample, sample.answer, "trained on") for sample in self.samples[:count]]

    def generate(self, model: torch.nn.Module, label: str) -> list:
        answers = []
        for sample, _, _ in self.preview_items():
            answers.append(generate_answer(model, self.packer, sample, self.settings.max_new_tokens, self.device))
            log.debug("%s: %r -> %r", label, sample.turns[-1][0], answers[-1])
        return answers

    def write_previews(self, folder: Path, outputs: dict[str, list]) -> list[Path]:
        """previews.json (every answer, exact match and token F1 per model) and previews.md (the table)."""
        items = self.preview_items()
        rows, scores = [], {}
        for index, (sample, reference, source) in enumerate(items):
            rows.append({"question": sample.turns[-1][0], "image": sample.images[0] if sample.images else None,
                         "reference": reference, "source": source,
                         "answers": {label: answers[index] for label, answers in outputs.items()}})
        for label, answers in outputs.items():
            pairs = [(a, ref) for a, (_, ref, _) in zip(answers, items) if ref is not None]
            if pairs:
                scores[label] = {"exact_match": sum(exact_match(a, r) for a, r in pairs) / len(pairs),
                                 "token_f1": sum(token_f1(a, r) for a, r in pairs) / len(pairs), "n": len(pairs)}
        folder = Path(folder)
        (folder / "previews.json").write_text(json.dumps({"items": rows, "scores": scores}, indent=2,
                                                         ensure_ascii=False))
        table = preview_table(rows, scores)
        (folder / "previews.md").write_text(table + "\n", encoding="utf-8")
        log.info("previews:\n%s", table)
        return [folder / "previews.md", folder / "previews.json"]

    def release(self) -> None:
        self._packer = None


def _cell(text: Any) -> str:
    if text is None:
        return "–"
    return str(text).replace("|", "\\|").replace("\n", " ") or "(no text)"


def preview_table(rows: list[dict], scores: dict[str, dict]) -> str:
    """A markdown table: one row per question, one answer column per model, then EM / F1 per model."""
    labels = list(rows[0]["answers"]) if rows else list(scores)
    lines = ["| question | image | reference | " + " | ".join(labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    for row in rows:
        image = Path(row["image"]).name if row["image"] else "–"
        lines.append(f"| {_cell(row['question'])} | {image} | {_cell(row['reference'])} | "
                     + " | ".join(_cell(row["answers"][label]) for label in labels) + " |")
    if scores:
        lines.append("| **exact match / token F1** | | | " + " | ".join(
            f"{scores[label]['exact_match']:.2f} / {scores[label]['token_f1']:.2f}" if label in scores else "–"
            for label in labels) + " |")
    return "\n".join(lines)
