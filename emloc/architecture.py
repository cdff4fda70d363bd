"""What the planner reads of a model: how its architecture spends memory, and its counts from a meta model.

`ArchitectureSpec` (with its `BlockStack`s and run-once `Component`s) is written per model family by the
pipelines' catalogue from a config; `summarize` counts the parameters, linears and blocks of a model built on
the `meta` device into a `ModelSummary`; `emulator_ranks` and `lora_targets` resolve compression rules and LoRA
patterns against it exactly as build_emulator and emloc.lora do. The formulas that use them: emloc/memory.py.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from .rules import factored_rank, normalise_rules


@dataclass(frozen=True)
class BlockStack:
    """A stack of identical residual blocks (an nn.ModuleList) that one token stream flows through."""

    name: str  # shown in notes, e.g. "double blocks"
    prefix: str  # module path of the ModuleList, e.g. "transformer_blocks"
    hidden: int  # h: width of the residual stream between blocks
    tokens: str  # which token stream flows through it: "all", "image", "text" or "vision"
    saved_per_token: int  # a: elements in the run's dtype one block saves per token for backward (frozen base)
    saved_fp32_per_token: int = 0  # a32: float32 elements it saves per token (upcast norms, attention log-sum-exp)
    streams: int = 1  # parallel token streams with their own layers (FLUX double blocks: image and text, 2)
    kv_per_token: int = 0  # KV-cache elements per token per block at generation (2 x kv heads x head dim)
    widest_per_token: int = 0  # w: elements per token of the widest tensor a block computes (MLP hidden)


@dataclass(frozen=True)
class Component:
    """A model run once around the trained one (text encoder, VAE): its weights are resident while it runs."""

    name: str
    params: int  # total parameters
    largest_piece: int  # parameters of its largest block or module (what is resident when streamed)
    transient_per_pixel: int = 0  # working elements per output pixel (VAE decode), 0: negligible
    # a prompt encoder runs once per run into the run's cache (its own "embeddings" phase, read block by block from
    # its files when the run streams) and is freed before calibration: later phases never hold it
    prompt_encoder: bool = False
    working_per_token: int = 0  # prompt encoder: elements per text token held while one block runs (hidden states)
    # prompt encoder read block by block: parameters held at once, everything outside its blocks (embeddings, LM
    # head: 1.38 B for FLUX.2-dev's Mistral3) + its largest block; 0: largest_piece
    streamed_params: int = 0


@dataclass(frozen=True)
class ArchitectureSpec:
    """How a family of models spends activation memory; built by the pipelines' catalogue from a config."""

    family: str  # "flux" (image tokens from a resolution) or "vlm" (a sequence length and image tiles)
    stacks: tuple[BlockStack, ...]  # in data-flow order (gradients reach a stack through every later one)
    default_compress: tuple[str, ...]  # regexes of the layers one --ratio compresses
    default_lora_targets: tuple[str, ...]  # regexes of the layers LoRA trains
    text_tokens: int = 0  # flux: T5 tokens per prompt (512 dev, 256 schnell)
    pixels_per_token: int = 16  # flux: VAE /8, then 2x2 patches
    vision_tokens_per_tile: int = 0  # vlm: vision-tower tokens per 448x448 tile ((448/14)^2 + CLS)
    image_tokens_per_tile: int = 0  # vlm: LLM tokens per tile after pixel shuffle (256)
    vocab_size: int = 0  # V: logits per token of the LM head, 0 for none
    quant_skip: tuple[str, ...] = ()  # regexes of linears QLoRA keeps in dtype (the LM head)
    components: tuple[Component, ...] = ()  # run-once models (text encoders, VAE): calibration and preview
    # float32 models only (PEFT's cast to the adapter's float32 is then a no-op, so each LoRA saves the base
    # layer's own input): regexes of LoRA targets, relative to their block, that read one tensor (q/k/v) and
    # count it once; and of targets whose input the block saves anyway (attention output: already in a)
    lora_input_groups: tuple[str, ...] = ()
    # tensors every block reads and, with gradient checkpointing, every checkpoint holds (rotary cos/sin): per
    # token of the "all" stream, once for the model, in the run's dtype and in float32
    shared_per_token: int = 0
    shared_fp32_per_token: int = 0
    lora_inputs_saved: tuple[str, ...] = ()
    # flux: elements per text token of the cached prompt embeddings the transformer reads (joint_attention_dim);
    # the cache stays on the host and each training step moves its batch of them to the device
    text_width: int = 0
    # the streamed calibration pass (emloc/blockwise.py) holds every calibration sample's batch on the device for
    # the whole pass: per token of a stream, (stream, elements in the run's dtype, bytes beside them) (FLUX: prompt
    # embeddings, packed latents, position ids; InternVL: pixel values in float32, token ids and attention mask)
    pass_inputs: tuple[tuple[str, float, float], ...] = ()
    # parameters of the modules outside the blocks the pass reads as the samples enter (embedders, projector), and
    # whether it keeps them for the pass (FLUX's, small) or frees them when the first block runs (InternVL's)
    entry_params: int = 0
    entry_kept: bool = False


@dataclass(frozen=True)
class LinearShape:
    """One nn.Linear of the model: its name, shape and the block it lives in."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    stack: str | None  # name of the BlockStack it belongs to, None outside the stacks
    block: str | None  # module name of its block


@dataclass(eq=False)  # hashed by identity, so the per-summary caches below can key on it
class ModelSummary:
    """What the planner needs of a model, counted once on the meta device (cache this, not the model)."""

    params: int  # P: every parameter, tied ones once
    linears: tuple[LinearShape, ...]
    blocks: dict[str, int]  # block module name -> its parameters
    block_stack: dict[str, str]  # block module name -> stack name
    largest_piece: int  # parameters of the largest block or module outside the blocks

    def blocks_in(self, stack: str) -> int:
        return sum(1 for s in self.block_stack.values() if s == stack)


def summarize(model: nn.Module, arch: ArchitectureSpec) -> ModelSummary:
    """Count parameters, linears and blocks of `model` (any device; meta is the point)."""
    blocks: dict[str, int] = {}
    block_stack: dict[str, str] = {}
    for stack in arch.stacks:
        try:
            container = model.get_submodule(stack.prefix)
        except AttributeError:
            raise ValueError(f"block stack {stack.name!r}: the model has no module {stack.prefix!r}; "
                             "the architecture description does not fit this model") from None
        for child, module in container.named_children():
            blocks[f"{stack.prefix}.{child}"] = sum(p.numel() for p in module.parameters())
            block_stack[f"{stack.prefix}.{child}"] = stack.name
        if not any(s == stack.name for s in block_stack.values()):
            raise ValueError(f"block stack {stack.name!r} ({stack.prefix}) holds no blocks")
    prefixes = [(s.prefix + ".", s.name) for s in arch.stacks]
    linears, outside = [], 0
    for name, module in model.named_modules():
        home = next(((p, s) for p, s in prefixes if name.startswith(p)), None)
        block = home[0] + name[len(home[0]):].split(".")[0] if home else None
        if home is None:
            outside = max(outside, sum(p.numel() for p in module.parameters(recurse=False)))
        if isinstance(module, nn.Linear):
            linears.append(LinearShape(name, module.in_features, module.out_features, module.bias is not None,
                                       home[1] if home else None, block))
    return ModelSummary(params=sum(p.numel() for p in model.parameters()), linears=tuple(linears), blocks=blocks,
                        block_stack=block_stack, largest_piece=max([outside, *blocks.values()]))


@functools.lru_cache(maxsize=64)
def first_match(summary: ModelSummary, patterns: tuple[str, ...]) -> tuple[int | None, ...]:
    """Per linear, the index of the first pattern that fullmatches its name (None: no match)."""
    compiled = [re.compile(p) for p in patterns]
    return tuple(next((i for i, p in enumerate(compiled) if p.fullmatch(lin.name)), None) for lin in summary.linears)


def emulator_ranks(summary: ModelSummary, rules: Sequence) -> dict[str, int]:
    """`{name: k}` for every linear governed by `rules`; k = 0 where the layer stays dense: at ratio 1 and where
    factors would not be smaller (rules.factored_rank, as build_emulator)."""
    rules = normalise_rules(rules)
    ranks = {}
    for lin, index in zip(summary.linears, first_match(summary, tuple(p for p, _ in rules))):
        if index is None:
            continue
        ranks[lin.name] = factored_rank(lin.in_features, lin.out_features, rules[index][1])
    if not ranks:
        raise ValueError(f"no linear layer matches the compression rules {[p for p, _ in rules]}; "
                         "patterns must fullmatch module names")
    return ranks


def lora_targets(summary: ModelSummary, patterns: Sequence[str]) -> list[LinearShape]:
    """The linears LoRA trains: those whose name fullmatches a pattern (as emloc.lora_target_names)."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"LoRA target pattern {pattern!r} is not a valid regex: {err}") from None
    matches = first_match(summary, tuple(patterns))
    found = [lin for lin, index in zip(summary.linears, matches) if index is not None]
    if not found:
        raise ValueError(f"no linear layer matches the LoRA targets {list(patterns)}; patterns must fullmatch module names")
    return found
