"""What a model family gives the planner: how to recognise its config files and build the model weightless.

The planner (pipelines/planner) plans models it has never loaded: a catalogue id (a config bundle in
assets/models/<name>.json), a local folder or a hub id. It knows no family by name. Each family registers a
`Planning` in pipelines/runner/registry.py (PLANNING, under its backend's name), written in its own package
(pipelines/<family>/planning.py), and the planner asks each registered one in turn.

A config bundle is the JSON of assets/models/*.json: {"family": ArchitectureSpec family ("flux": image tokens
from a resolution, "vlm": a token sequence and image tiles), then the family's own keys ("components":
{name: config.json} of a diffusers pipeline, or "config": a transformers config.json), "max_sequence_length",
...}. The helpers below build the pieces every family needs on the `meta` device (nothing allocated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from emloc.architecture import ArchitectureSpec, Component

# fetch(path inside the model, e.g. "config.json" or "transformer/config.json") -> the parsed JSON, or None when
# the model has no such file. The planner passes one over a local folder or over the hub (network errors are its).
Fetch = Callable[[str], "dict | None"]


@dataclass(frozen=True)
class Planning:
    """A family's planning knowledge, registered under its backend's name (registry.PLANNING).

    read(fetch, name): the config bundle of the model whose files `fetch` reads (`name`: its folder or hub id, for
        messages and name-based defaults), or None when the files are another family's. Raise ValueError only
        for files that are clearly this family's but unusable.
    claims(bundle): True when this family builds `bundle` (a catalogue bundle, or one `read` returned).
    build(bundle): (the model on the meta device, its ArchitectureSpec: how its blocks spend memory).
    reads: what it recognises, for the message when nothing does ("FLUX.1 (diffusers FluxTransformer2DModel)").
    """

    read: Callable[[Fetch, str], dict | None]
    claims: Callable[[dict], bool]
    build: Callable[[dict], tuple[nn.Module, ArchitectureSpec]]
    reads: str


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with every parameter on the meta device: shapes without memory."""
    with torch.device("meta"):
        return build()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def largest_piece(model: nn.Module) -> int:
    """Parameters of the largest unit streamed at once: a child of a ModuleList, or one module's own weights."""
    best = 0
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, nn.ModuleList):
            own = max([own, *(sum(p.numel() for p in c.parameters()) for c in module.children())])
        best = max(best, own)
    return best


def streamed_params(model: nn.Module) -> int:
    """Parameters a text encoder streamed as the run streams it (pipelines.runner.streaming) holds at once: its
    blocks are read one at a time, everything outside them (embeddings, LM head) is held throughout."""
    from .streaming import block_names

    blocks = [sum(p.numel() for p in model.get_submodule(name).parameters()) for name in block_names(model)]
    return param_count(model) - sum(blocks) + max(blocks, default=0)


def component(name: str, model: nn.Module, **fields) -> Component:
    """A run-once model (text encoder, VAE) built on meta, as the planner counts it (`fields`: Component's)."""
    return Component(name, param_count(model), largest_piece(model), **fields)
