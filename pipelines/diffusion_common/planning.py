"""Planning pieces every diffusers family shares: reading a pipeline's config files into a bundle, and the VAE.

A diffusers model comes as a pipeline folder (model_index.json, then <component>/config.json) or as a bare
transformer (its config.json at the top); the family is told by the transformer's `_class_name`.
"""

from __future__ import annotations

from emloc.architecture import Component
from pipelines.runner.planning import Fetch, component, on_meta

VAE_LIVE_TENSORS = 6  # VAE decode working set: ~6 live tensors of block_out_channels[0] channels per output pixel


def read_pipeline(fetch: Fetch, name: str, transformer_class: str, components: tuple[str, ...]) -> dict | None:
    """A {"family": "flux", "components": {...}} bundle when the model's transformer is `transformer_class`
    (reading the `components` model_index.json lists, the transformer always), else None."""
    index = fetch("model_index.json")
    if index is None:
        transformer = fetch("config.json")  # a bare transformer folder / repository
        if transformer is None or transformer.get("_class_name") != transformer_class:
            return None
        return {"family": "flux", "components": {"transformer": transformer}}
    transformer = fetch("transformer/config.json")
    if transformer is None:
        raise ValueError(f"{name}: model_index.json but no transformer/config.json; is it a FLUX pipeline folder?")
    if transformer.get("_class_name", transformer_class) != transformer_class:
        return None
    found = {"transformer": transformer}
    for part in components:
        if part != "transformer" and part in index and (config := fetch(f"{part}/config.json")) is not None:
            found[part] = config
    return {"family": "flux", "components": found}


def transformer_class_of(bundle: dict) -> str | None:
    """The `_class_name` of a diffusers bundle's transformer (None: not a diffusers bundle, or not written)."""
    return bundle.get("components", {}).get("transformer", {}).get("_class_name")


def vae_component(cls: type, config: dict) -> Component:
    """A VAE of class `cls` built on meta from its config: its size and its decode working set per pixel."""
    values = {k: v for k, v in config.items() if not k.startswith("_")}
    vae = on_meta(lambda: cls.from_config(values))
    return component("vae", vae, transient_per_pixel=VAE_LIVE_TENSORS * values["block_out_channels"][0])
