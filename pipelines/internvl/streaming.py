"""InternVL read block by block from its checkpoint files (docs/method.md "Memory"): what the run machine streams with.

The blocks are the vision encoder's layers up to the feature layer, then the language model's decoder layers.
A batch becomes the state entering the first block, and each block's input its output, exactly as
transformers' `InternVLModel.forward` (with `get_image_features`) and the language model's forward compute them:

    vision   = vision_tower.embeddings(pixel_values)                  # (tiles, 1 + patches, hv)
    vision   = layer_{k-1}(... layer_0(vision))                       # vision blocks; k: the feature layer
    features = vision_tower.layernorm(vision) if vision_feature_layer == -1 else vision
    features = features[:, 1:]                                         # strategy "default": drop CLS
    features = projector(pixel_shuffle(features))                      # (tiles, image_seq_length, h)
    hidden   = embed_tokens(input_ids), image tokens <- features       # (batch, seq, h)
    hidden   = decoder_layer_i(hidden, causal mask, rotary(positions)) # language blocks

The mask and the rotary embedding are recomputed for each block from the state's attention mask (the
language model's own helpers), so the state kept for every calibration sample is its hidden states only.
Embeddings and projector are read when a batch enters and freed when the first block runs.

Checkpoint keys are mapped to module names by `pipelines.runner.streaming.checkpoint_rename` (files written by
`save_pretrained` hold `language_model.model.` / `vision_tower.` keys, transformers-native hub repositories
`model.language_model.` ones; both load).
"""

from __future__ import annotations

import torch
from torch import nn

from emloc.blockwise import BlockwiseModel
from emloc.checkpoint import CheckpointReader

VISION_LAYERS = "model.vision_tower.encoder.layer"
LANGUAGE_LAYERS = "model.language_model.layers"
EMBEDDERS = ("model.vision_tower.embeddings", "model.language_model.embed_tokens")
MERGERS = ("model.vision_tower.layernorm", "model.multi_modal_projector")


def feature_layers(model: nn.Module) -> int:
    """How many vision layers the image features pass through (`vision_feature_layer` selects hidden state k
    of the vision tower's layers + 1; -1 is the last layer's output, after the tower's layernorm)."""
    chosen, count = model.config.vision_feature_layer, len(model.model.vision_tower.encoder.layer)
    if not isinstance(chosen, int) or not -(count + 1) <= chosen <= count:
        raise ValueError(f"vision_feature_layer {chosen!r} in the model's config is not one layer of its {count} "
                         "vision layers; only a single feature layer can be streamed")
    return chosen % (count + 1)


def internvl_blockwise(model: nn.Module, reader: CheckpointReader, device: torch.device,
                       dtype: torch.dtype | None) -> BlockwiseModel:
    """`model` (an InternVLForConditionalGeneration skeleton) as blocks read from `reader` one at a time."""
    config, inner = model.config, model.model
    language = inner.language_model
    vision_blocks = [f"{VISION_LAYERS}.{i}" for i in range(feature_layers(model))]
    language_blocks = [f"{LANGUAGE_LAYERS}.{i}" for i in range(language.config.num_hidden_layers)]
    layer_types = getattr(language.config, "layer_types", None) or ["full_attention"] * len(language_blocks)
    blocks = vision_blocks + language_blocks

    def loaded(streamed: BlockwiseModel, name: str) -> nn.Module:
        module = model.get_submodule(name)
        if any(p.device.type == "meta" for p in module.parameters()):
            streamed.load(name)
        return module

    def to_language(streamed: BlockwiseModel, state: dict) -> dict:
        """Image features merged into the text embeddings at the image tokens (InternVLModel.forward)."""
        embeds, ids = state["embeds"], state["input_ids"]
        if state["vision"] is not None:
            features = state["vision"]
            if config.vision_feature_layer == -1:
                features = loaded(streamed, MERGERS[0])(features)
            if config.vision_feature_select_strategy == "default":
                features = features[:, 1:, :]  # the CLS token
            tiles, patches = features.shape[:2]
            side = int(patches ** 0.5)
            features = inner.pixel_shuffle(features.reshape(tiles, side, side, -1), scale_factor=config.downsample_ratio)
            features = features.reshape(tiles, -1, features.shape[-1])  # (tiles, image_seq_length, hv / ratio²)
            features = loaded(streamed, MERGERS[1])(features).to(embeds.device, embeds.dtype)
            image_tokens = inner.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
            embeds = embeds.masked_scatter(image_tokens, features)
        return {"input_ids": ids, "attention_mask": state["attention_mask"], "vision": None, "embeds": None,
                "hidden": embeds}

    def enter(streamed: BlockwiseModel, batch: dict) -> dict:
        vision_embeddings, embed_tokens = (loaded(streamed, name) for name in EMBEDDERS)
        ids = batch["input_ids"].to(streamed.device)
        mask = batch.get("attention_mask")
        pixels = batch.get("pixel_values")
        state = {"input_ids": ids, "attention_mask": None if mask is None else mask.to(streamed.device),
                 "embeds": embed_tokens(ids), "hidden": None, "vision": None}
        if pixels is not None:
            weight = vision_embeddings.patch_embeddings.projection.weight
            state["vision"] = vision_embeddings(pixels.to(weight.device, weight.dtype))
        if pixels is None or not vision_blocks:
            state = to_language(streamed, state)
        return state

    def language_inputs(state: dict, kind: str) -> dict:
        """The language model's causal mask and rotary embedding for this state, from its own helpers."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        hidden = state["hidden"]
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # (1, seq), as the model's default
        make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        mask = make(config=language.config, inputs_embeds=hidden, attention_mask=state["attention_mask"],
                    past_key_values=None, position_ids=positions)
        return {"attention_mask": mask, "position_ids": positions,
                "position_embeddings": language.rotary_emb(hidden, positions)}

    def step(streamed: BlockwiseModel, name: str, state: dict) -> dict:
        if name == blocks[0]:  # every batch has entered: the embeddings are not needed again this pass
            for embedder in EMBEDDERS:
                streamed.unload(embedder)
        block = model.get_submodule(name)
        if name in vision_blocks:
            if state["vision"] is not None:  # a text-only sample passes the vision blocks unchanged
                state = {**state, "vision": block(state["vision"])}
            if name == vision_blocks[-1] and state["hidden"] is None:
                state = to_language(streamed, state)
            return state
        if name == language_blocks[0]:
            for merger in MERGERS:
                streamed.unload(merger)
        kind = layer_types[language_blocks.index(name)]
        hidden = block(state["hidden"], **language_inputs(state, kind), past_key_values=None, use_cache=False)
        return {**state, "hidden": hidden}

    def token_mask(state: dict) -> torch.Tensor | None:
        """Language layers: the attention mask (padding never counts); vision layers: every patch (None)."""
        if state["hidden"] is None or state["attention_mask"] is None:
            return None
        return state["attention_mask"].bool()

    return BlockwiseModel(model, reader, blocks, enter, step, token_mask, device=device, dtype=dtype)
