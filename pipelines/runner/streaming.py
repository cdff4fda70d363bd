"""Transformers models read from their safetensors files block by block: shared by every backend that streams one.

`checkpoint_rename(model)` maps a checkpoint key to the module name as `from_pretrained` would (transformers'
own conversion mapping for the model's classes). `streamed_transformers_model(folder)` builds a transformers
model as a skeleton whose blocks (the children of its large `nn.ModuleList`s: decoder layers, vision layers)
are read from the files just before each runs and freed after it (`emloc.checkpoint.StreamedForward`), the rest
(embeddings, final norm, LM head) read once: a run-once model such as FLUX.2's 24 B text encoder then needs one
block of memory, not the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from emloc.checkpoint import CheckpointReader, StreamedForward, safetensors_files

BLOCK_SHARE = 0.01  # a ModuleList whose children hold at least this share of the parameters is streamed


def checkpoint_rename(model: nn.Module) -> Callable[[str], str]:
    """checkpoint key -> module name, as `from_pretrained` renames it (transformers' conversion mapping for
    `model`'s classes, then the base-model prefix added or dropped); raises for keys that need more than a
    renaming (tensors merged or split on load), which a reader of single tensors cannot do."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = model.state_dict()  # meta tensors: only the names are read
    prefix = model.base_model_prefix

    def rename(key: str) -> str:
        renamed, converted = rename_source_key(key, renamings, converters, prefix, names)
        if renamed not in names and key in names:  # as from_pretrained: a key that should have stayed as it was
            renamed, converted = rename_source_key(key, [], [], prefix, names)
        if converted is not None:
            raise ValueError(f"the checkpoint key {key!r} is converted on load ({converted!r}), not renamed; "
                             "this checkpoint cannot be read block by block: pass --keep-statistics to load it whole")
        return renamed

    return rename


def block_names(model: nn.Module) -> list[str]:
    """The children of every `nn.ModuleList` holding at least BLOCK_SHARE of `model`'s parameters, in order."""
    total = sum(p.numel() for p in model.parameters()) or 1
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and sum(p.numel() for p in module.parameters()) >= BLOCK_SHARE * total:
            if any(name.startswith(outer + ".") for outer in names):
                continue
            names.append(name)
    return [f"{name}.{child}" for name in names for child, _ in model.get_submodule(name).named_children()]


def streamed_transformers_model(folder: str | Path, cls: type, device: torch.device | str = "cpu",
                                dtype: torch.dtype | None = None) -> nn.Module:
    """`cls` (a transformers model class) from `folder` as a skeleton streaming its blocks from the files."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights():
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
    model.tie_weights()  # a tied LM head is not in the files: it must share the embeddings' parameter first
    reader = CheckpointReader(safetensors_files(folder), rename=checkpoint_rename(model))
    blocks = [name for name in block_names(model)
              if any(f"{name}.{p}" in reader for p, _ in model.get_submodule(name).named_parameters())]
    model.emloc_stream = StreamedForward(model, reader, blocks, device, dtype)
    model.tie_weights()  # a tied LM head shares the embeddings that were just read
    for name, buffer in list(model.named_buffers()):  # rotary frequencies and the like: made on the CPU
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer.to(device)
    return model.eval()
