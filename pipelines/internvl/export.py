"""What an InternVL run hands the user besides its PEFT adapters: Python that answers a question with them.

InternVLProcessor needs torchvision (its video processor), which many machines lack (not a dependency here), so the
snippet builds the model's inputs as pipelines/internvl/inputs.py does: the chat template's image token is
expanded into `<img>` + image_seq_length·tiles context tokens + `</img>`, and the pixels come from the image
processor alone.
"""

from __future__ import annotations

from pathlib import Path

SNIPPET = '''import torch
from PIL import Image
from peft import PeftModel
from transformers import AutoImageProcessor, AutoTokenizer, InternVLForConditionalGeneration

device = "{cuda}" if torch.cuda.is_available() else "cpu"  # the run's GPU
dtype = torch.bfloat16 if device != "cpu" else torch.float32
{load}# The tokenizer and the image processor, not AutoProcessor: that one needs torchvision.
tokenizer = AutoTokenizer.from_pretrained({model!r})
image_processor = AutoImageProcessor.from_pretrained({model!r})


def ask(image_path, question, max_new_tokens={max_new_tokens}):
    """The fine-tuned model's (greedy) answer to `question` about the image at `image_path`."""
    pixels = image_processor(images=[Image.open(image_path).convert("RGB")], crop_to_patches=True,
                             max_patches={max_tiles}, return_tensors="pt")
    messages = {system}[{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": question}}]}}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tokens = {image_seq_length} * int(pixels["num_patches"][0])  # context tokens per tile x tiles
    image = tokenizer.start_image_token + tokenizer.context_image_token * tokens + tokenizer.end_image_token
    text = text.replace(tokenizer.context_image_token, image, 1)
    bos = tokenizer.bos_token
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos))).to(device)
    stops = sorted({{tokenizer.eos_token_id, *(model.generation_config.eos_token_id
                    if isinstance(model.generation_config.eos_token_id, list)
                    else [model.generation_config.eos_token_id])}} - {{None}})
    with torch.no_grad():
        out = model.generate(**inputs, pixel_values=pixels["pixel_values"].to(device, dtype), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


print(ask({image!r}, {question!r}))
'''


LOAD = '''model = InternVLForConditionalGeneration.from_pretrained({model!r}, dtype=dtype, use_safetensors=True)
model = PeftModel.from_pretrained(model, {lora!r}).merge_and_unload().to(device).eval()
'''
# A GPU smaller than the model (the run's plan did not preview it whole): accelerate places what fits on the GPU and
# keeps the rest in RAM (or, past the RAM budget, in files of a fresh folder), moving it in as it runs; the adapter
# stays unmerged on top. The GPU's share leaves headroom for what is not weights: the CUDA context and allocator and
# the generation's activations and KV cache.
LOAD_OFFLOADED = '''if device != "cpu":  # the run's plan: the model does not fit this GPU whole
    import tempfile

    # weights on the GPU: the run's budget of {budget_gib} GiB less {headroom_gib} GiB of headroom
    model = InternVLForConditionalGeneration.from_pretrained(
        {model!r}, dtype=dtype, use_safetensors=True, device_map="auto",
        max_memory={{{gpu_index}: "{gpu_gib}GiB", "cpu": "{ram_gib}GiB"}},
        offload_folder=tempfile.mkdtemp(prefix="offload-", dir="."))
    model = PeftModel.from_pretrained(model, {lora!r}).eval()
else:
    model = InternVLForConditionalGeneration.from_pretrained({model!r}, dtype=dtype, use_safetensors=True)
    model = PeftModel.from_pretrained(model, {lora!r}).merge_and_unload().to(device).eval()
'''
HEADROOM_GIB = 2.0  # at least: the planner's 1 GiB for the CUDA context and allocator, plus a generation's working set
HEADROOM_SHARE = 0.2  # and at least this share of the budget (a larger model's KV cache and activations grow with it)


def gpu_headroom(budget_gib: float) -> float:
    """GiB of a GPU budget left free of weights in the offloaded snippet: max(2 GiB, 20% of the budget)."""
    return max(HEADROOM_GIB, HEADROOM_SHARE * budget_gib)


def load_snippet(model: str, lora: Path, image: str, question: str, image_seq_length: int, max_tiles: int = 1,
                 max_new_tokens: int = 32, system_prompt: str = "", offload: tuple[float, float] | None = None,
                 gpu_index: int = 0) -> str:
    """Python that loads the corrected adapter on the full model and answers `question` about `image` on GPU
    `gpu_index` (the run's), or the CPU where there is none.

    `offload` (GPU GiB, RAM GiB): the full model did not fit the run's GPU budget whole; the snippet lets accelerate
    place it within those budgets (`device_map="auto"`, `max_memory`), the GPU's less `gpu_headroom`."""
    system = f'[{{"role": "system", "content": {system_prompt!r}}}] + ' if system_prompt else ""
    if offload:
        budget, headroom = float(offload[0]), gpu_headroom(float(offload[0]))
        load = LOAD_OFFLOADED.format(model=str(model), lora=str(lora), gpu_index=int(gpu_index),
                                     gpu_gib=round(max(1.0, budget - headroom), 2), budget_gib=round(budget, 2),
                                     headroom_gib=round(headroom, 2), ram_gib=max(1, int(offload[1])))
    else:
        load = LOAD.format(model=str(model), lora=str(lora))
    return SNIPPET.format(model=str(model), lora=str(lora), image=str(image), question=question, cuda=f"cuda:{int(gpu_index)}",
                          image_seq_length=int(image_seq_length), max_tiles=int(max_tiles),
                          max_new_tokens=int(max_new_tokens), system=system, load=load)
