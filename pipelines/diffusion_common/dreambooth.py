"""DreamBooth data of a diffusion backend: 3-50 photos of one subject, an instance prompt with a trigger word, and
optional same-name .txt captions; checked, copied into the run and read back. Also the PEFT -> diffusers LoRA keys.

`DreamBoothData` is a mixin for a `pipelines.runner.Backend` whose settings have `images`, `prompt`, `trigger`,
`resolution` and `weighting_scheme` (FLUX.1's FluxSettings, FLUX.2's Flux2Settings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.runner.data import DataError, ImageLimits, check_images, copy_into, find_images

MAX_PROMPT_CHARS = 1000
IMAGE_LIMITS = ImageLimits(min_count=3, max_count=50, min_side=32)
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class DreamBoothSettings:
    """The settings of a DreamBooth run on a FLUX-family transformer (FLUX.1's defaults; FLUX.2 overrides some)."""

    images: str = field(default="", metadata={"help": "folder with 3-50 JPEG/PNG/WebP photos of the subject"})
    prompt: str = field(default="", metadata={"label": "Prompt", "help": "instance prompt: the sentence that describes every training photo, with the trigger word standing for your subject, e.g. 'a photo of sks dog' (a photo's own caption, when it has one, replaces it)"})
    trigger: str = field(default="sks", metadata={"label": "Trigger word", "help": "the rare word that names your subject in the prompt"})
    resolution: int = field(default=512, metadata={"label": "Image size", "help": "training and preview size in pixels (multiple of 16)"})
    random_flip: bool = field(default=False, metadata={"help": "also train on horizontally flipped images"})
    guidance_scale: float = field(default=3.5, metadata={"help": "guidance embedding during training ([dev] only)"})
    weighting_scheme: str = field(default="none", metadata={
        "help": "timestep sampling / loss weighting: none, sigma_sqrt, logit_normal, mode, cosmap"})
    logit_mean: float = field(default=0.0, metadata={"help": "mean of the logit_normal scheme"})
    logit_std: float = field(default=1.0, metadata={"help": "std of the logit_normal scheme"})
    mode_scale: float = field(default=1.29, metadata={"help": "scale of the mode scheme"})
    max_sequence_length: int = field(default=0, metadata={"label": "Text tokens", "help": "T5 tokens (0: 512 for [dev], 256 for [schnell])"})
    preview_prompts: list[str] = field(default_factory=list, metadata={"label": "New prompt",
        "help": "preview prompts (default: the instance prompt)", "flag": "--preview-prompt", "preview": "--prompt"})
    preview_seeds: list[int] = field(default_factory=lambda: [0], metadata={"label": "Seeds",
        "help": "seeds of the previews", "flag": "--preview-seed", "preview": "--seed"})
    preview_steps: int = field(default=0, metadata={"label": "Preview denoising steps",
        "help": "denoising steps of the previews (0: 28 for [dev], 4 for [schnell])", "preview": "--preview-steps"})
    preview_guidance: float = field(default=3.5, metadata={"help": "guidance of the previews ([dev])",
                                                           "preview": "--preview-guidance"})



class DreamBoothData:
    """validate / copy_data / use_data of a DreamBooth image folder (mixed into a Backend)."""

    pipeline_name = "FluxPipeline"  # named in the message for a local folder that is no diffusers pipeline

    def __init__(self, run, settings, device: torch.device):
        super().__init__(run, settings, device)
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as diffusers' DreamBooth examples
        self.cache: dict = {}  # text embeddings, latent distributions, configs read once
        self._pipe = None  # everything but the transformer, loaded when needed

    def validate(self) -> None:
        s = self.settings
        if not s.images:
            raise DataError("no image folder given; pass --images DIR with 3-50 photos of your subject")
        if not s.trigger.strip():
            raise DataError("the trigger word is empty; pass --trigger WORD (e.g. sks)")
        self._check_prompt(s.prompt, "the instance prompt (--prompt)")
        if s.resolution < 16 or s.resolution % 16:
            raise ValueError(f"--resolution must be a positive multiple of 16; got {s.resolution}")
        if s.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"--weighting-scheme {s.weighting_scheme!r} is unknown; "
                             "use none, sigma_sqrt, logit_normal, mode or cosmap")
        local = Path(self.run.model)
        if local.exists() and not (local / "model_index.json").is_file():
            raise ValueError(f"{local} is not a diffusers pipeline folder (no model_index.json); "
                             f"pass the folder that {self.pipeline_name}.save_pretrained wrote, or a hub id")
        images = find_images(s.images)
        check_images(images, IMAGE_LIMITS, where=s.images)
        for image in images:
            caption = self._caption_file(image)
            if caption is not None:
                self._check_prompt(self._read_caption(caption), f"the caption {caption}")

    def _check_prompt(self, prompt: str, what: str) -> None:
        if len(prompt) > MAX_PROMPT_CHARS:  # the text encoders read a few hundred tokens, no more
            raise DataError(f"{what} is {len(prompt)} characters long ({prompt[:40]!r}...); keep it under "
                            f"{MAX_PROMPT_CHARS} characters, a sentence or two")
        if not prompt.strip():
            raise DataError(f"{what} is empty; describe your subject with the trigger word, e.g. "
                            f"'a photo of {self.settings.trigger} dog'")
        if not re.search(rf"(?<!\w){re.escape(self.settings.trigger)}(?!\w)", prompt):
            raise DataError(f"{what} {prompt[:80]!r} does not contain the trigger word {self.settings.trigger!r}; add it "
                            f"(e.g. 'a photo of {self.settings.trigger} dog') or set --trigger to the word you use")

    @staticmethod
    def _caption_file(image: Path) -> Path | None:
        caption = image.with_suffix(".txt")
        return caption if caption.is_file() else None

    @staticmethod
    def _read_caption(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text; save the caption as plain UTF-8 text") from None

    def copy_data(self, folder: Path) -> dict:
        images = find_images(self.settings.images)
        copy_into(images, folder)
        captions = [c for c in (self._caption_file(p) for p in images) if c is not None]
        copy_into(captions, folder)
        return {"images": [p.name for p in images], "captions": [c.name for c in captions]}

    def use_data(self, folder: Path) -> None:
        self.images = find_images(folder)
        self.prompts = [self._read_caption(c) if (c := self._caption_file(p)) else self.settings.prompt
                        for p in self.images]

    # -- the flow-matching objective both families train with ----------------------------------------------
    batched_inputs: tuple[str, ...] = ("hidden_states", "timestep", "guidance", "encoder_hidden_states")

    def calibration_batches(self):
        generator = torch.Generator().manual_seed(self.run.seed)
        for _ in range(self.run.calibration_samples):
            yield self._batch(generator, 1)["kwargs"]

    def calibration_forward(self, model, batch: dict):
        return model(**batch)

    def unpack_prediction(self, pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The transformer's output in the latents' layout (FLUX.1 packs 2x2 patches into tokens)."""
        return pred

    def training_loss(self, model, step: int, generator: torch.Generator) -> torch.Tensor:
        """`mean(w(σ) · (pred - (n - x0))²)` on the step's batch (`_batch`), this process's rows under several."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        rank, processes = self.shard
        per_process = self.run.batch_size
        batch = self._batch(generator, per_process * processes)  # the whole step's batch, drawn alike everywhere
        if processes > 1:
            rows = slice(rank * per_process, (rank + 1) * per_process)
            batch["kwargs"] = {k: v[rows] if k in self.batched_inputs and v is not None else v
                               for k, v in batch["kwargs"].items()}
            batch.update({k: batch[k][rows] for k in ("noise", "x0", "sigmas")})
        x0, sigmas = batch["x0"], batch["sigmas"]
        pred = self.unpack_prediction(model(**batch["kwargs"])[0], x0)
        weighting = compute_loss_weighting_for_sd3(self.settings.weighting_scheme, sigmas)
        target = batch["noise"] - x0
        return (weighting.float() * (pred.float() - target.float()) ** 2).reshape(x0.shape[0], -1).mean(1).mean()

    def load_cache(self, folder: Path) -> None:
        """The run's cache (build_cache), kept on the CPU: each text's embeddings (in the model's dtype), each
        image's latent distribution per view (float32), and whatever more the family keeps (`_load_more`)."""
        import json

        from diffusers import FlowMatchEulerDiscreteScheduler
        from safetensors.torch import load_file

        meta = json.loads((folder / "cache.json").read_text())
        # On the CPU for the whole run (FLUX.2-dev: 15 MiB per text in bf16): each step moves its own batch to the
        # device (`_batch`), so the device holds one batch of embeddings, not every caption's.
        tensors = load_file(str(folder / "cache.safetensors"), device="cpu")
        n, texts = len(meta["images"]), range(len(meta["texts"]))
        # the embeddings in the model's dtype, as the transformer reads them; the latent distributions stay float32
        # (noise is added to them in float32 before the step's batch is cast)
        self.cache.update(meta=meta, embeds=[tensors[f"text.{i}.embeds"].to(self.dtype) for i in texts],
                          mean=[[tensors[f"latent.{i}.{v}.mean"] for v in range(meta["views"])] for i in range(n)],
                          std=[[tensors[f"latent.{i}.{v}.std"] for v in range(meta["views"])] for i in range(n)])
        self._load_more(tensors, meta)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.run.model, subfolder="scheduler")

    def _load_more(self, tensors: dict, meta: dict) -> None:
        """Family-specific cached tensors (FLUX.1: pooled CLIP embeddings; FLUX.2: the VAE's batch-norm stats)."""

    def data_settings(self, folder: Path) -> dict[str, str]:
        return {"images": str(folder)}  # the photos and their same-name captions were copied in side by side


def diffusers_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """PEFT adapter keys -> `<module>.lora_A/B.weight` (save_lora_weights adds `transformer.`), scaling folded into B
    (`s·B A = (s·B) A`), so a file without alpha metadata means the same on any loader."""
    out = {}
    for key, tensor in state.items():
        match = PEFT_KEY.match(key)
        if match is None:
            raise ValueError(f"adapter key {key!r} is not a LoRA weight; the adapter file is not a PEFT LoRA")
        tensor = tensor.detach().float().cpu()
        out[f"{match['module']}.lora_{match['part']}.weight"] = tensor * scaling if match["part"] == "B" else tensor
    return out


def device_placement(device: torch.device | str) -> dict:
    """`from_pretrained` keywords that load a model straight onto `device`, one tensor at a time, so the host never
    holds it whole (diffusers and transformers both read `device_map={"": device}`); none for the CPU, where the
    plain load already is that."""
    device = torch.device(device)
    return {} if device.type == "cpu" else {"device_map": {"": str(device)}}


def pin_execution_device(pipe, device: torch.device):
    """`pipe`, making its intermediates (latents, ids, guidance) on `device` whatever its components hold.

    diffusers infers the execution device from its components' parameters; with the text encoders left out and the
    transformer streamed or offloaded (its parameters on `meta`), a CPU pipeline may pick `meta` (the components are
    read from a set, so it varies between processes). The pipeline becomes an instance of a subclass whose
    `_execution_device` is `device`; nothing else changes."""
    cls = type(pipe)
    if not getattr(cls, "pinned_device", False):
        pipe.__class__ = type(cls.__name__, (cls,), {"pinned_device": True,
                                                     "_execution_device": property(lambda self: self.emloc_device)})
    pipe.emloc_device = torch.device(device)
    return pipe
