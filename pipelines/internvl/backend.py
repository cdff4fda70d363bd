"""The InternVL backend: teach a vision-language model your images and answers (a recipe of docs/method.md).

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

`VlmBackend` plugs this into the shared run machine (pipelines/runner/machine.py): the user's QA data is copied
into the run as InternVL-format JSONL and packed once into the run's cache; calibration runs 8-64 of
those samples, one per batch (no padding in the statistics); by default the language model's decoder
linears and the vision encoder's linears are compressed (each part at its own ratio) while projector,
embeddings and lm_head stay dense, and LoRA trains the language model's attention and MLP projections.
A run that streams (the default; `--keep-statistics` turns it off) reads the model block by block from its
safetensors files in every forward-only phase: vision layers, then decoder layers (streaming.py).
Previews are greedy answers of base, emulator + LoRA, full + corrected and full + uncorrected LoRA,
side by side, with exact match and token F1 where reference answers exist.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from emloc.blockwise import BlockwiseModel
from emloc.checkpoint import CheckpointReader, safetensors_files
from emloc.rules import check_ratio

from pipelines.runner.data import DataError
from pipelines.runner import Backend, RunSettings
from pipelines.runner.checks import check_model_source
from pipelines.runner.streaming import checkpoint_rename

from .streaming import internvl_blockwise
from .data import (IMAGE_MARKER, QASample, check_image, check_no_image_tokens, exact_match, read_qa_data, token_f1,
                   write_qa_jsonl)
from .export import load_snippet
from .validation import VALIDATION_ITEMS, held_out_scores

log = logging.getLogger(__name__)

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


from .inputs import (  # noqa: E402,F401  (re-exported: demo, catalogue and tests import them from here)
    IGNORE, IMAGE_TOKEN_ATTRS, ChatPacker, VlmParts, answer_loss, collate, generate_answer, image_seq_length_of,
    load_vlm, load_vlm_processing, to_device,
)


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
    holdout: int = field(default=0, metadata={"label": "Held-out questions",
        "help": "samples kept out of training (the last ones): validation loss, exact match and token F1 at each "
                "sample round, and the previews' questions"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow the checkpoint's own Python code (only for checkpoints you trust)"})
    max_new_tokens: int = field(default=32, metadata={"label": "Longest preview answer", "help": "longest preview answer in tokens",
                                                      "preview": "--max-new-tokens"})
    preview_questions: list[str] = field(default_factory=list, metadata={"label": "New question",
        "help": "questions for the previews (default: held-out or first training samples)",
        "flag": "--preview-question", "preview": "--question"})
    preview_images: list[str] = field(default_factory=list, metadata={"label": "Image for the question",
        "help": "an image for each preview question (one image is shared by all)",
        "flag": "--preview-image", "preview": "--image"})
    preview_samples: int = field(default=4, metadata={"help": "samples previewed when no question is given",
                                                      "preview": "--preview-samples"})
    validation_data: str = field(default="", metadata={"label": "Validation questions",
        "help": "a second file of questions and answers (the formats of --data) kept for validation only, besides "
                "the held-out ones"})


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
MEMORY_SAMPLES = 256  # samples packed to find the longest one for the planner (the data's first ones)
VALIDATION_FOLDER = "validation"  # data/validation/: the validation questions' copy
CALIBRATION_RANGE = (8, 64)  # calibration samples: enough for stable statistics, few enough to be quick


def _language_inputs_only(model: torch.nn.Module) -> None:
    """Make only the language model's input embeddings require grads, now and whenever PEFT asks again.

    transformers' enable_input_require_grads (called when checkpointing is enabled, and again by PEFT when the
    adapter is attached) hooks the input embeddings of every sub-model, the vision tower's included. That pulled
    the frozen tower into the autograd graph: each vision checkpoint kept its input and backward recomputed every
    vision layer (+12.7% saved bytes on InternVL3-1B shapes, benchmarks/README.md). No LoRA target lives in the
    vision tower by default; a user's target there still trains (non-reentrant checkpoints need no input grads).
    """
    def enable_input_require_grads() -> None:
        model.disable_input_require_grads()

        def require_grads(module, args, output):
            output.requires_grad_(True)

        model._require_grads_hooks = [model.get_input_embeddings().register_forward_hook(require_grads)]

    model.enable_input_require_grads = enable_input_require_grads  # the instance's, which PEFT calls
    enable_input_require_grads()


class VlmBackend(Backend):
    """InternVL: the whole model (vision tower, projector, language model) is calibrated and emulated."""

    name = "vlm"
    display_name, data_kind, preview_kind = "InternVL", "qa", "answers"
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
        self._held_out_encoded: list[dict[str, torch.Tensor]] | None = None  # packed once, at the first round

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
            raise DataError(f"Held-out questions (--holdout) is {s.holdout} but there are {len(report.samples)} questions; hold "
                            "out fewer than your questions (at least one must stay for training), or 0 for none")
        if s.validation_data:
            read_qa_data(s.validation_data)  # its own problems, said in its own words
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
        for question in s.preview_questions:
            check_no_image_tokens(question, "question", "--question")
        return [QASample((check_image(Path(images[i]), "--image"),) if images else (), ((question, "?"),))
                for i, question in enumerate(s.preview_questions)]

    def copy_data(self, folder: Path) -> dict:
        report = read_qa_data(self.settings.data)
        summary = {"source": str(self.settings.data), **write_qa_jsonl(report.samples, folder)}
        if self.settings.validation_data:
            summary["validation"] = write_qa_jsonl(read_qa_data(self.settings.validation_data).samples,
                                                   Path(folder) / VALIDATION_FOLDER)
        return summary

    def use_data(self, folder: Path) -> None:
        samples = read_qa_data(Path(folder) / "qa.jsonl").samples
        cut = len(samples) - self.settings.holdout
        self.samples, self.held_out = samples[:cut], samples[cut:]
        extra = Path(folder) / VALIDATION_FOLDER / "qa.jsonl"
        if extra.is_file():
            self.held_out += read_qa_data(extra).samples
        self._held_out_encoded = None

    def data_settings(self, folder: Path) -> dict[str, str]:
        out = {"data": str(Path(folder) / "qa.jsonl")}  # InternVL's format, its images in folder/images/
        if self.settings.validation_data:
            out["validation_data"] = str(Path(folder) / VALIDATION_FOLDER / "qa.jsonl")
        return out

    def validation_scores(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation loss, exact match and token F1 on the held-out questions (validation.py); {} without any."""
        items = self.held_out[:VALIDATION_ITEMS]
        if self._held_out_encoded is None:
            self._held_out_encoded = [self.packer.encode(sample) for sample in items]  # images decoded once a run
        return held_out_scores(model, self.packer, items, self._held_out_encoded, self.run.batch_size,
                               self.settings.max_new_tokens, self.device)

    def build_cache(self, folder: Path) -> None:
        """Token ids, labels and pixels of every training sample: images are decoded once per run."""
        tensors = {}
        for index, sample in enumerate(self.samples):
            for key, value in self.packer.encode(sample).items():
                tensors[f"{index}.{key}"] = value.contiguous()
        save_file(tensors, str(Path(folder) / "encoded.safetensors"))

    def load_cache(self, folder: Path) -> None:
        self.encoded = [{} for _ in self.samples]
        for key, tensor in load_file(str(Path(folder) / "encoded.safetensors")).items():
            index, name = key.split(".", 1)  # "<sample>.<input name>"
            self.encoded[int(index)][name] = tensor

    # -- model -----------------------------------------------------------------------------------------
    def load_model(self, device: torch.device) -> torch.nn.Module:
        return load_vlm(self.run.model, device, self.dtype, self.settings.trust_remote_code)

    def memory_shape(self) -> dict:
        """The longest sample the run will pack (tokens, image tokens included; at most --max-length), from the
        user's own data: the planner's activations and calibration hidden states scale with it."""
        samples = read_qa_data(self.settings.data).samples[:MEMORY_SAMPLES]
        if self.settings.validation_data:  # forwarded (no grad) at the sample rounds: as long a sample counts
            samples += read_qa_data(self.settings.validation_data).samples[:MEMORY_SAMPLES]
        longest = max((self.packer.encode(sample)["input_ids"].shape[-1] for sample in samples), default=0)
        tiles = self.settings.max_tiles + (1 if self.settings.max_tiles > 1 else 0)  # InternVL adds a thumbnail
        return {"seq_len": max(1, min(self.settings.max_length, longest)), "image_tiles": tiles}

    def check_model(self) -> None:
        check_model_source(self.run.model)

    def skeleton(self) -> torch.nn.Module:
        """The model's modules with parameters on the meta device, from its config alone (no weights are read);
        buffers are real (the rotary embedding's inverse frequencies are computed from the config, not read)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, InternVLForConditionalGeneration

        config = AutoConfig.from_pretrained(self.run.model, trust_remote_code=self.settings.trust_remote_code)
        with init_empty_weights():
            model = InternVLForConditionalGeneration(config)
        model.tie_weights()  # init_empty_weights re-registers every parameter, which undid the tie made in __init__
        return model.eval().requires_grad_(False)

    def _model_folder(self) -> Path:
        """The folder of the model's config and safetensors: local, or the hub snapshot in the cache."""
        local = Path(self.run.model)
        if local.is_dir():
            return local
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.run.model, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))

    def checkpoint(self) -> CheckpointReader:
        """The model's safetensors files, their keys renamed to module names as transformers renames them."""
        return CheckpointReader(safetensors_files(self._model_folder()), rename=checkpoint_rename(self.skeleton()))

    def blockwise(self, model: torch.nn.Module, reader: CheckpointReader) -> BlockwiseModel:
        """The vision encoder's layers then the language model's layers (pipelines/internvl/streaming.py)."""
        return internvl_blockwise(model, reader, self.device, self.dtype)

    def finish_loading(self, model: torch.nn.Module) -> None:
        """Tie lm_head to the input embeddings when the config says so (a tied weight is not in the files), and
        put the buffers, built on the CPU with the skeleton, beside the weights."""
        model.tie_weights()
        device = model.get_input_embeddings().weight.device
        if device.type != "meta":
            for owner in model.modules():
                for name, buffer in owner._buffers.items():
                    if buffer is not None and buffer.device != device:
                        owner._buffers[name] = buffer.to(device)

    def check_preview(self) -> None:
        self._typed_questions()
        if self.settings.preview_images and not self.settings.preview_questions:
            raise ValueError("--image needs a --question to ask about it")

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
        if hasattr(model, "enable_input_require_grads"):
            _language_inputs_only(model)

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

    def batch_indices(self, step: int) -> list[int]:
        """The samples of training step `step`: each epoch visits every sample once, in an order seeded by
        (seed, epoch), so a resumed run draws exactly what the uninterrupted one drew."""
        n, size = len(self.encoded), self.run.batch_size
        rank, processes = self.shard  # several processes: this one's rows of the step's batch_size x processes
        orders: dict[int, list[int]] = {}
        indices = []
        first = (step * processes + rank) * size
        for position in range(first, first + size):
            epoch = position // n
            if epoch not in orders:
                generator = torch.Generator().manual_seed(self.run.seed * 1_000_003 + epoch)
                orders[epoch] = torch.randperm(n, generator=generator).tolist()
            indices.append(orders[epoch][position % n])
        return indices

    def training_loss(self, model: torch.nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens of the step's batch (no noise: `generator` is unused)."""
        return model(**self._batch(self.batch_indices(step))).loss

    def export(self, folder: Path, corrected: dict, uncorrected: dict, config: Any) -> None:
        """A README beside the adapters with the few lines that load the corrected one (PEFT format)."""
        (Path(folder) / "README.md").write_text(LOAD_SNIPPET.format(model=self.run.model), encoding="utf-8")

    def export_snippet(self, lora: Path, plan: dict | None = None) -> str:
        """Python that answers the first preview question with the corrected adapter, without torchvision; where
        the run's plan did not preview the model whole, it is placed within the run's budgets by accelerate."""
        sample = self.preview_items()[0][0] if (self.samples or self.settings.preview_questions) else None
        image = sample.images[0] if sample is not None and sample.images else "your_image.jpg"
        question = sample.turns[-1][0].replace(IMAGE_MARKER, "").strip() if sample is not None else "What is this?"
        s = self.settings
        plan = plan or {}
        mode = (plan.get("phases", {}).get("preview") or {}).get("mode", "whole")
        offload = None
        if mode != "whole":
            offload = (plan.get("gpu_budget_gib") or 8, plan.get("ram_budget_gib") or 16)
        gpu_index = self.device.index if self.device.type == "cuda" and self.device.index is not None else 0
        return load_snippet(self.run.model, Path(lora) / "corrected", image, question, self.packer.image_seq_length,
                            s.max_tiles, s.max_new_tokens, s.system_prompt, offload, gpu_index)

    # -- previews --------------------------------------------------------------------------------------
    def preview_items(self) -> list[tuple[QASample, str | None, str]]:
        """(sample, reference answer or None, where it comes from) for each preview question."""
        if self.settings.preview_questions:
            return [(sample, None, "typed") for sample in self._typed_questions()]
        count = self.settings.preview_samples
        if self.held_out:
            return [(sample, sample.answer, "held out") for sample in self.held_out[:count]]
        return [(sample, sample.answer, "trained on") for sample in self.samples[:count]]

    def generate(self, model: torch.nn.Module, label: str, items: list | None = None) -> list:
        answers = []
        for sample, _, _ in items or self.preview_items():
            answers.append(generate_answer(model, self.packer, sample, self.settings.max_new_tokens, self.device))
            log.debug("%s: %r -> %r", label, sample.turns[-1][0], answers[-1])
            self.output_done()
        return answers

    def preview_count(self) -> int:
        return len(self.preview_items())

    def sample_items(self) -> list[tuple[QASample, str | None, str]]:
        """A sample round's questions: --sample-prompt asked about the first preview question's image (no reference
        answer), else the previews'."""
        if not self.run.sample_prompts:
            return self.preview_items()
        first = self.preview_items()[0][0] if (self.samples or self.settings.preview_questions) else None
        images = tuple(first.images[:1]) if first is not None else ()
        for question in self.run.sample_prompts:
            check_no_image_tokens(question, "question", "--sample-prompt")
        return [(QASample(images, ((question, "?"),)), None, "sample") for question in self.run.sample_prompts]

    def write_samples(self, folder: Path, model: torch.nn.Module) -> list[Path]:
        items = self.sample_items()
        return self.write_previews(folder, {"emulator + LoRA": self.generate(model, "emulator + LoRA", items)}, items)

    def write_previews(self, folder: Path, outputs: dict[str, list], items: list | None = None) -> list[Path]:
        """previews.json (every answer, exact match and token F1 per model) and previews.md (the table)."""
        items = items or self.preview_items()
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
        """Drop the packer and give the blocks a generate-based sample round reserved (KV cache, logits) back to
        the GPU, so the training step after it does not stand on a fragmented cache (as FLUX's release does)."""
        self._packer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
