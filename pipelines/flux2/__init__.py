"""FLUX.2 [dev] / [klein] through diffusers (Flux2Pipeline / Flux2KleinPipeline): DreamBooth LoRA on the EMLoC emulator.

A backend (registered as "flux2" in pipelines/runner/registry.py): it may import only emloc and pipelines.runner.
"""
