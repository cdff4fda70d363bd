"""The FLUX.1 backend (diffusers): DreamBooth LoRA on the emulator of `FluxTransformer2DModel`, its compression
rules and LoRA targets, previews, and export in the formats other tools load.

May import: `emloc` and the run machine's interface (`pipelines.runner`); never another backend.
"""
