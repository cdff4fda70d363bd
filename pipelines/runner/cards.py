"""What an exported adapter says about itself: the run's trigger word, instance prompt, training prompts, base model
and settings, in each file's metadata and in a model card beside each PEFT adapter.

Every safetensors file the correct stage writes under `lora/` carries a plain `emloc_*` set and the `modelspec.*`
keys of Stability AI's model spec (title, architecture, trigger phrase, usage hint); a kohya-format file (one whose
metadata already has `ss_network_module`, pipelines/flux/kohya.py) also kohya's `ss_*` keys (ss_tag_frequency holds
the trigger word, as kohya_ss and the sites that read it expect). Each PEFT adapter folder gets a README.md model
card (YAML front matter as the Hugging Face hub reads it); `readme` writes the one of an export zip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .models import Run

README = "README.md"
CARD_KEYS = ("ratio", "rank", "alpha", "lr", "lam", "seed", "batch_size", "emulator_kind")

# What each adapter folder under lora/ (or exports/step-N/) is, and how it is loaded; the backends name the
# folders by format, not by family
FOLDERS = {
    "corrected": ("the LoRA corrected for the full model, PEFT format (adapter_config.json + "
                  "adapter_model.safetensors)",
                  "PeftModel.from_pretrained(base_model, \"corrected\")  # base_model: {base} loaded with its library"),
    "uncorrected": ("the LoRA as trained on the emulator, not corrected (PEFT format), for comparison",
                    "PeftModel.from_pretrained(base_model, \"uncorrected\")"),
    "diffusers": ("the corrected LoRA in diffusers' format (keys `transformer.<module>.lora_A/B.weight`; the LoRA "
                  "scale folded into `lora_B`)",
                  "pipe.load_lora_weights(\"diffusers\", weight_name=\"pytorch_lora_weights.safetensors\")"),
    "diffusers-uncorrected": ("the uncorrected LoRA in diffusers' format",
                              "pipe.load_lora_weights(\"diffusers-uncorrected\", "
                              "weight_name=\"pytorch_lora_weights.safetensors\")"),
    "kohya": ("the corrected LoRA for ComfyUI, Forge and kohya_ss (keys `lora_unet_...`, `lora_down` / `lora_up` / `alpha`)",
              "copy the .safetensors file into ComfyUI's models/loras/ folder and pick it in a LoraLoader node"),
}


def card(run: Run, step: int | None = None, corrected: bool = True) -> dict[str, Any]:
    """What an export says about the run: its name and family, base model, trigger word, instance prompt, the
    prompts it trained on, the step of this adapter and the settings that shaped it (plain values)."""
    settings, backend = run.settings, run.backend
    prompts = list(dict.fromkeys(getattr(backend, "prompts", None) or []))  # each image's caption or the prompt
    values = {name: getattr(settings, name) for name in CARD_KEYS if hasattr(settings, name)}
    return {"name": run.dir.name, "family": backend.display_name, "backend": backend.name,
            "base_model": settings.model, "trigger": getattr(backend.settings, "trigger", "") or "",
            "instance_prompt": getattr(backend.settings, "prompt", "") or "", "training_prompts": prompts,
            "step": int(settings.steps if step is None else step), "steps": int(settings.steps),
            "corrected": corrected, "created": str(run.info.get("created", "")),
            "resolution": getattr(backend.settings, "resolution", None), "images": len(getattr(backend, "images", [])),
            "settings": values}


def _words(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def plain_metadata(info: dict) -> dict[str, str]:
    """The `emloc_*` and `modelspec.*` keys of every exported file (safetensors metadata: strings only)."""
    meta = {"emloc_run": info["name"], "emloc_base_model": info["base_model"], "emloc_family": info["family"],
            "emloc_trigger_word": info["trigger"], "emloc_instance_prompt": info["instance_prompt"],
            "emloc_training_prompts": json.dumps(info["training_prompts"], ensure_ascii=False),
            "emloc_step": str(info["step"]), "emloc_steps": str(info["steps"]),
            "emloc_corrected": "yes" if info["corrected"] else "no (the LoRA as trained on the emulator)",
            **{f"emloc_{'lambda' if k == 'lam' else k}": _words(v) for k, v in info["settings"].items()},
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "-".join(info["family"].lower().replace(".", "-").split()) + "/lora",
            "modelspec.implementation": "https://github.com/huggingface/peft",
            "modelspec.title": f"{info['name']} (step {info['step']})",
            "modelspec.description": (f"EMLoC LoRA for {info['base_model']}: trained on a low-rank emulator, "
                                      + ("corrected for the full model" if info["corrected"] else "not corrected")),
            "modelspec.date": info["created"]}
    if info["trigger"]:
        meta["modelspec.trigger_phrase"] = info["trigger"]
    if info["instance_prompt"]:
        meta["modelspec.usage_hint"] = info["instance_prompt"]
    if info["resolution"]:
        meta["modelspec.resolution"] = f"{info['resolution']}x{info['resolution']}"
    return {k: v for k, v in meta.items() if v != ""}


def kohya_metadata(info: dict) -> dict[str, str]:
    """kohya's `ss_*` training keys: what kohya_ss writes about a run, read by ComfyUI, Forge and LoRA sites.
    The trigger word is in ss_tag_frequency (the tags of the training captions and how many captions hold each)."""
    settings = info["settings"]
    prompts = info["training_prompts"] or [info["instance_prompt"]]
    tags: dict[str, int] = {}
    for prompt in prompts:
        for tag in dict.fromkeys(t.strip() for t in prompt.replace(",", " ").split() if t.strip()):
            tags[tag] = tags.get(tag, 0) + 1
    if info["trigger"]:  # the trigger word first, as the tag every caption has
        tags = {info["trigger"]: tags.pop(info["trigger"], len(prompts)), **tags}
    images = info["images"] or len(prompts)
    meta = {"ss_output_name": info["name"], "ss_sd_model_name": info["base_model"],
            "ss_network_dim": str(settings.get("rank", "")), "ss_network_alpha": str(settings.get("rank", "")),
            "ss_learning_rate": str(settings.get("lr", "")), "ss_unet_lr": str(settings.get("lr", "")),
            "ss_max_train_steps": str(info["step"]), "ss_seed": str(settings.get("seed", "")),
            "ss_batch_size_per_device": str(settings.get("batch_size", 1)), "ss_num_train_images": str(images),
            "ss_tag_frequency": json.dumps({"img": tags}, ensure_ascii=False),
            "ss_dataset_dirs": json.dumps({"img": {"n_repeats": 1, "img_count": images}}),
            "ss_training_comment": (f"trigger word: {info['trigger']}; EMLoC emulator ratio {settings.get('ratio')}, "
                                    f"correction clamp λ {settings.get('lam')}; scale folded into lora_up (alpha "
                                    "equals each key's rank)")}
    if info["resolution"]:
        meta["ss_resolution"] = f"({info['resolution']}, {info['resolution']})"
    return meta


def _restamp(path: Path, extra: dict[str, str], kohya: dict[str, str]) -> None:
    """Rewrite one safetensors file with `extra` (and, for a kohya-format file, `kohya`) added to its metadata;
    the tensors are unchanged; the file is replaced atomically."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    if "ss_network_module" in metadata:
        metadata.update(kohya)
    metadata.update(extra)
    staging = path.with_name(path.name + ".tmp")
    save_file(load_file(str(path)), str(staging), metadata=metadata)
    staging.replace(path)


def model_card(info: dict, folder: str) -> str:
    """README.md of one PEFT adapter folder: front matter the hub reads, then what it is and how to load it."""
    front = ["---", f"base_model: {info['base_model']}", "library_name: peft", "tags:", "- emloc", "- lora"]
    if info["instance_prompt"]:
        front.append(f"instance_prompt: {json.dumps(info['instance_prompt'], ensure_ascii=False)}")
    what, load = FOLDERS.get(folder, (folder, ""))
    lines = front + ["---", "", f"# {info['name']}: {what}", "", *facts(info), "", "## Load it", "", "```python",
                     "from peft import PeftModel", load.format(base=info["base_model"]), "```", ""]
    return "\n".join(lines)


def facts(info: dict) -> list[str]:
    """The run's facts as markdown bullets: base model, trigger word, prompts, step and settings."""
    lines = [f"- Base model: `{info['base_model']}` ({info['family']})"]
    if info["trigger"]:
        lines.append(f"- Trigger word: **{info['trigger']}** (write it in your prompt to call the subject)")
    if info["instance_prompt"]:
        lines.append(f"- Instance prompt: \"{info['instance_prompt']}\"")
    others = [p for p in info["training_prompts"] if p != info["instance_prompt"]]
    if others:
        lines.append("- Training captions: " + "; ".join(f"\"{p}\"" for p in others[:10])
                     + (f" and {len(others) - 10} more" if len(others) > 10 else ""))
    lines.append(f"- Adapter of step {info['step']} of {info['steps']}"
                 + ("" if info["corrected"] else " (not corrected for the full model)"))
    settings = info["settings"]
    lines.append("- Settings: " + ", ".join(f"{'λ' if k == 'lam' else k.replace('_', ' ')} {v}"
                                            for k, v in settings.items()))
    return lines


def stamp(run: Run, folder: Path, step: int | None = None) -> None:
    """Put the run's metadata into every safetensors file under `folder` (a lora/ or exports/step-N/ folder) and a
    model card into each PEFT adapter folder (one holding adapter_config.json)."""
    for path in sorted(Path(folder).rglob("*.safetensors")):
        corrected = "uncorrected" not in path.relative_to(folder).parts[0]
        info = card(run, step, corrected)
        _restamp(path, plain_metadata(info), kohya_metadata(info))
    for config in sorted(Path(folder).glob("*/adapter_config.json")):
        corrected = "uncorrected" not in config.parent.name
        (config.parent / README).write_text(model_card(card(run, step, corrected), config.parent.name),
                                            encoding="utf-8")


def readme(run: Run, folder: Path, step: int | None = None, snippet: str = "") -> str:
    """README.md of an export zip: what each file in `folder` is, the trigger word, and how to load each."""
    info = card(run, step)
    lines = [f"# {info['name']}: LoRA adapters of step {info['step']} (EMLoC Studio)", "",
             f"A LoRA for {info['base_model']}, trained with EMLoC on a low-rank emulator of the model and corrected "
             "for the full model.", "", *facts(info), "", "## The files", ""]
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        what, load = FOLDERS.get(sub.name, (f"{sub.name}/", ""))
        files = ", ".join(f"`{sub.name}/{f.name}`" for f in sorted(sub.iterdir()) if f.is_file())
        lines += [f"- **{sub.name}/**: {what}. Files: {files}.", f"  Load: `{load.format(base=info['base_model'])}`"
                  if load else ""]
    lines += ["", "Every .safetensors file carries the trigger word, the prompts, the base model and the settings in its "
              "metadata (`emloc_*`, `modelspec.*`; the kohya file also kohya's `ss_*` keys).", ""]
    if snippet:
        lines += ["## Python that loads it and makes the run's first preview again", "", "```python", snippet.rstrip(),
                  "```", ""]
    return "\n".join(line for line in lines if line is not None)


def stamped(folder: Path) -> bool:
    """Whether the corrected adapter under `folder` carries the run's metadata (runs corrected before this did not)."""
    from safetensors import safe_open

    path = Path(folder) / "corrected" / "adapter_model.safetensors"
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        return "emloc_run" in (handle.metadata() or {})
