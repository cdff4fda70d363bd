"""The InternVL backend (transformers): LoRA on the emulator of `InternVLForConditionalGeneration` from images
with questions and answers — reading QA data (`data`), packing chat inputs without torchvision (`inputs`), the
backend itself (`backend`).

May import: `emloc` and the run machine's interface (`pipelines.runner`); never another backend.
"""
