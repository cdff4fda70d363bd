"""What the FLUX.1 and FLUX.2 backends share (DreamBooth data, diffusers LoRA keys), family-neutral.

May import: `emloc` and the run machine's interface (`pipelines.runner`); never a backend (backends import it).
"""
