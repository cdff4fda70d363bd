"""DreamBooth data of a diffusion backend: 3-50 photos of one subject, an instance prompt with a trigger word, and
optional same-name .txt captions; checked, copied into the run and read back. Also the PEFT -> diffusers LoRA keys.

`DreamBoothData` is a mixin for a `pipelines.runner.Backend` whose settings have `images`, `prompt`, `trigger`,
`resolution` and `weighting_scheme` (FLUX.1's FluxSettings, FLUX.2's Flux2Settings).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from PIL import ImageOps

from pipelines.runner.data import DataError, ImageLimits, check_images, copy_into, find_images

from .buckets import check_resolution, planned_side
from .flow import FlowObjective

MAX_PROMPT_CHARS = 1000
IMAGE_LIMITS = ImageLimits(min_count=3, max_count=50, min_side=32)
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
VALIDATION_FOLDER = "validation"  # data/validation/: the validation photos folder's copy
CLASS_FOLDER = "class"  # data/class/: the user's class images
CLASS_LATENTS = "latents.safetensors"  # beside the class images the base model drew (the run's class-images/)
CLASS_SEED = 1_000_000  # seeds of the drawn class images: apart from the preview seeds a user types
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
    # issue 29: several sizes and aspect-ratio buckets, validation, prior preservation
    resolutions: list[int] = field(default_factory=list, metadata={"label": "More image sizes",
        "help": "train at these image sizes too (multiples of 16; each photo at the bucket of its shape at every "
                "size); the previews use Image size", "flag": "--train-resolution"})
    aspect_buckets: bool = field(default=True, metadata={"label": "Keep each photo's shape",
        "help": "resize each photo to the aspect-ratio bucket nearest its shape (about Image size² pixels, sides "
                "multiples of 16) instead of cropping the centre square"})
    holdout: int = field(default=0, metadata={"label": "Held-out photos",
        "help": "photos kept out of training (the last ones by name) to measure a validation loss at each sample "
                "round"})
    validation_images: str = field(default="", metadata={"label": "Validation photos",
        "help": "a folder of other photos of the subject (captions beside them as usual) to measure the validation "
                "loss on, besides the held-out ones"})
    class_prompt: str = field(default="", metadata={"label": "Class prompt",
        "help": "prior preservation: your subject's class without the trigger word, e.g. 'a photo of a dog'; the "
                "base model draws class images from it before training unless you give your own (empty: off)"})
    class_images: str = field(default="", metadata={"label": "Class images",
        "help": "prior preservation: a folder of your own images of the class (used instead of generating them)"})
    class_count: int = field(default=0, metadata={"label": "Class images to generate",
        "help": "class images the base model draws from the class prompt (0: as many as your photos)"})
    prior_weight: float = field(default=1.0, metadata={"label": "Prior-loss weight",
        "help": "weight of the class images' loss beside your photos' (prior preservation)"})



class DreamBoothData(FlowObjective):
    """validate / copy_data / use_data of a DreamBooth image folder (mixed into a Backend), with its held-out
    photos and class images; the objective is FlowObjective's (flow.py)."""

    pipeline_name = "FluxPipeline"  # named in the message for a local folder that is no diffusers pipeline

    def __init__(self, run, settings, device: torch.device):
        super().__init__(run, settings, device)
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as diffusers' DreamBooth examples
        self.cache: dict = {}  # text embeddings, latent distributions, configs read once
        self._pipe = None  # everything but the transformer, loaded when needed
        self.images: list[Path] = []
        self.prompts: list[str] = []
        self.held_out: list[tuple[Path, str]] = []  # (photo, its prompt) measured, not trained on
        self.class_sources: list[Path] = []  # the user's class images (copied into the run)

    def validate(self) -> None:
        s = self.settings
        if not s.images:
            raise DataError("no image folder given; pass --images DIR with 3-50 photos of your subject")
        if not s.trigger.strip():
            raise DataError("the trigger word is empty; pass --trigger WORD (e.g. sks)")
        self._check_prompt(s.prompt, "the instance prompt (--prompt)")
        for value in [s.resolution, *s.resolutions]:
            check_resolution(value, "Image size (--resolution)" if value == s.resolution
                             else "More image sizes (--train-resolution):")
        if s.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"--weighting-scheme {s.weighting_scheme!r} is unknown; "
                             "use none, sigma_sqrt, logit_normal, mode or cosmap")
        local = Path(self.run.model)
        if local.exists() and not (local / "model_index.json").is_file():
            raise ValueError(f"{local} is not a diffusers pipeline folder (no model_index.json); "
                             f"pass the folder that {self.pipeline_name}.save_pretrained wrote, or a hub id")
        images = find_images(s.images)
        check_images(images, IMAGE_LIMITS, where=s.images)
        if not 0 <= s.holdout < len(images):
            raise DataError(f"Held-out photos (--holdout) is {s.holdout} but there are {len(images)} photos; hold out fewer "
                            "than your photos (at least one must stay for training), or 0 for none")
        if s.validation_images:
            check_images(find_images(s.validation_images), ImageLimits(1, IMAGE_LIMITS.max_count, 32),
                         where=f"the validation photos folder {s.validation_images}")
        for image in [*images, *(find_images(s.validation_images) if s.validation_images else [])]:
            caption = self._caption_file(image)
            if caption is not None:
                self._check_prompt(self._read_caption(caption), f"the caption {caption}")
        self._check_prior()

    def _check_prior(self) -> None:
        s = self.settings
        if s.class_images and not s.class_prompt.strip():
            raise DataError("Class images are given but the Class prompt is empty; describe the class they show "
                            "without the trigger word, e.g. 'a photo of a dog'")
        if s.class_prompt.strip():
            if len(s.class_prompt) > MAX_PROMPT_CHARS:
                raise DataError(f"the Class prompt is {len(s.class_prompt)} characters long; keep it under "
                                f"{MAX_PROMPT_CHARS}")
            if re.search(rf"(?<!\w){re.escape(s.trigger)}(?!\w)", s.class_prompt):
                raise DataError(f"the Class prompt {s.class_prompt!r} contains the trigger word {s.trigger!r}; the "
                                "class images show the class in general, so leave the trigger word out")
            if not (math.isfinite(s.prior_weight) and s.prior_weight >= 0):
                raise ValueError(f"Prior-loss weight must be a number >= 0; got {s.prior_weight}")
            if s.class_count < 0:
                raise ValueError(f"Class images to generate must be 0 (as many as your photos) or more; "
                                 f"got {s.class_count}")
        if s.class_images:
            found = find_images(s.class_images)
            if not found:
                raise DataError(f"the Class images folder {s.class_images} holds no JPEG, PNG or WebP images; add "
                                "some, or leave Class images empty to have the base model draw them")
            check_images(found, ImageLimits(1, 1000, 32), where=f"the Class images folder {s.class_images}")

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

    def _copy_photos(self, source: str, folder: Path) -> list[str]:
        images = find_images(source)
        copy_into(images, folder)
        copy_into([c for c in (self._caption_file(p) for p in images) if c is not None], folder)
        return [p.name for p in images]

    def copy_data(self, folder: Path) -> dict:
        s = self.settings
        images = find_images(s.images)
        summary = {"images": self._copy_photos(s.images, folder),
                   "captions": [c.name for c in (self._caption_file(p) for p in images) if c is not None]}
        if s.validation_images:
            summary["validation"] = self._copy_photos(s.validation_images, folder / VALIDATION_FOLDER)
        if s.class_images:
            summary["class"] = [p.name for p in copy_into(find_images(s.class_images), folder / CLASS_FOLDER)]
        return summary

    def use_data(self, folder: Path) -> None:
        folder = Path(folder)
        images = find_images(folder)
        prompts = [self._prompt_of(p) for p in images]
        cut = len(images) - self.settings.holdout
        self.images, self.prompts = images[:cut], prompts[:cut]
        extra = find_images(folder / VALIDATION_FOLDER) if (folder / VALIDATION_FOLDER).is_dir() else []
        self.held_out = list(zip(images[cut:], prompts[cut:])) + [(p, self._prompt_of(p)) for p in extra]
        self.class_sources = find_images(folder / CLASS_FOLDER) if (folder / CLASS_FOLDER).is_dir() else []

    def _prompt_of(self, image: Path) -> str:
        caption = self._caption_file(image)
        return self._read_caption(caption) if caption else self.settings.prompt

    def data_settings(self, folder: Path) -> dict[str, str]:
        # the photos and their same-name captions were copied in side by side; validation and class images apart
        out = {"images": str(folder)}
        if self.settings.validation_images:
            out["validation_images"] = str(Path(folder) / VALIDATION_FOLDER)
        if self.settings.class_images:
            out["class_images"] = str(Path(folder) / CLASS_FOLDER)
        return out

    # -- the cache's texts and latents ----------------------------------------------------------------------
    def _training_texts(self) -> set[str]:
        """Every text a step or a validation reads: the photos' prompts and the class prompt."""
        texts = set(self.prompts) | {p for _, p in self.held_out}
        return texts | ({self.settings.class_prompt} if self.settings.class_prompt.strip() else set())

    def _encode_data(self, pipe, texts: list[str], tensors: dict) -> dict:
        """The cache.json keys of the photos' latents (training, held-out and the user's class images), their
        distributions put into `tensors` (build_cache of both families)."""
        items = [(p, "train", texts.index(t)) for p, t in zip(self.images, self.prompts)]
        items += [(p, "validation", texts.index(t)) for p, t in self.held_out]
        entries = self._encode_entries(pipe, items, tensors)
        for e in entries:
            e["item"] -= len(self.images) if e["role"] == "validation" else 0  # items numbered per role, from 0
        if self.class_sources and self.settings.class_prompt.strip():
            text = texts.index(self.settings.class_prompt)
            entries += self._encode_entries(pipe, [(p, "class", text) for p in self.class_sources], tensors,
                                            first=len(entries))
        return {"entries": entries, "resolutions": self.resolutions(), "views": 2 if self.settings.random_flip else 1,
                "images": [p.name for p in self.images], "image_text": [texts.index(p) for p in self.prompts]}

    def memory_sizes(self) -> list[tuple[int, int]]:
        """Every (width, height) a forward may take (each photo's bucket at each size, validation and class images
        too; the square of each size for drawn class images and the previews), for the planner's largest bucket."""
        from PIL import Image

        sizes = [(r, r) for r in self.resolutions()]
        s = self.settings
        folders = [f for f in (s.images, s.validation_images, s.class_images) if f and Path(f).is_dir()]
        for folder in folders:  # validation photos and the user's class images are forwarded at their buckets too
            for path in find_images(folder):
                with Image.open(path) as image:
                    sizes += self._sizes(*ImageOps.exif_transpose(image).size)
        return sizes

    def validation_scores(self, model) -> dict[str, float]:
        """The validation loss on the held-out photos (FlowObjective.validation_loss); {} when none are held out."""
        loss = self.validation_loss(model)
        return {} if loss is None else {"validation_loss": loss}

    def memory_rows(self) -> dict:
        """The planner's image shape and rows per step: the square holding the largest bucket's tokens (buckets.
        planned_side: the previews' Image size included) and, with prior preservation, twice --batch-size (the
        class rows join each step's forward)."""
        shape = {"resolution": planned_side(self.memory_sizes())}
        if self.settings.class_prompt.strip():
            shape["batch_size"] = 2 * self.run.batch_size
        return shape

    def class_images_to_draw(self) -> int:
        """How many class images the base model must draw before training: 0 without prior preservation or when
        the user gave their own."""
        s = self.settings
        if not s.class_prompt.strip() or s.class_images or self.class_sources:
            return 0
        return s.class_count or len(self.images) or max(1, len(find_images(s.images)) - s.holdout)  # (before
        # use_data: the planner asks while the run is made)

    @torch.no_grad()
    def write_class_images(self, folder: Path, model) -> list[Path]:
        """Draw the class images with `model` (the base model, held as the preview holds it) from the cached class
        prompt at Image size, seeds CLASS_SEED + i; write them and their latents (class.json, latents.safetensors)
        into `folder`, so a resumed run reads them instead of drawing again."""
        from safetensors.torch import save_file

        prompt = self.settings.class_prompt
        requests = [(prompt, CLASS_SEED + i) for i in range(self.class_images_to_draw())]
        images = self._render(model, requests)
        paths = []
        for (_, seed), image in zip(requests, images):
            paths.append(Path(folder) / f"class-{seed - CLASS_SEED:03d}.png")
            image.save(paths[-1])
        tensors: dict = {}
        text = self.cache["meta"]["texts"].index(prompt)
        entries = self._encode_entries(self._pipeline(text=False), [(p, "class", text) for p in paths], tensors)
        save_file({k: v.float().cpu().contiguous() for k, v in tensors.items()}, str(Path(folder) / CLASS_LATENTS))
        (Path(folder) / "class.json").write_text(json.dumps({"prompt": prompt, "entries": entries}, indent=2))
        return paths

    def use_class_images(self, folder: Path) -> None:
        """Add the class images drawn before training (write_class_images) to the step's draws."""
        from safetensors.torch import load_file

        meta = json.loads((Path(folder) / "class.json").read_text())
        tensors = load_file(str(Path(folder) / CLASS_LATENTS), device="cpu")
        self.add_class_entries([{**e, "mean": tensors[f"{e['key']}.mean"], "std": tensors[f"{e['key']}.std"]}
                                for e in meta["entries"]])


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
