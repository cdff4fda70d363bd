"""FLUX.2 [dev] / [klein] through diffusers: DreamBooth LoRA on the EMLoC emulator of Flux2Transformer2DModel.

Data as FLUX.1's (pipelines/diffusion_common/dreambooth.py). The prompts' embeddings (the text encoder's hidden
states of three layers, stacked: Mistral3 for [dev], Qwen3 for [klein]) and the images' VAE latent distributions
are computed once into the run's cache/, then the text encoder and the VAE are freed.

Latents (Flux2Pipeline): the VAE's 32-channel latent z is patchified 2x2 into 128 channels at (H/16, W/16),
normalised by the VAE's batch-norm statistics, x0 = (patchify(z) - μ_bn) / σ_bn, and packed into (H/16)(W/16)
tokens of 128 channels. Loss (flow matching, as train_dreambooth_lora_flux2): with noise n and σ drawn by the
weighting scheme, x_σ = (1 - σ) x0 + σ n, the transformer predicts the velocity and
`loss = mean(w(σ) · (pred - (n - x0))²)`; [dev] also gets the guidance embedding. Previews: [dev] and distilled
[klein] sample without CFG; the [klein] Base variants run real CFG (an empty negative prompt).
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emloc.blockwise import BlockwiseModel
from emloc.checkpoint import CheckpointReader, safetensors_files
from pipelines.diffusion_common.dreambooth import (DreamBoothData, DreamBoothSettings, device_placement,
                                                   diffusers_lora_state, pin_execution_device)
from pipelines.runner import Backend
from pipelines.runner.checks import check_model_source
from pipelines.runner.streaming import streamed_transformers_model

from .export import load_snippet
from .layout import COMPRESS, LORA_TARGETS, PASS_ENTRY

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline")


@dataclass
class Flux2Settings(DreamBoothSettings):
    """Settings of a FLUX.2 DreamBooth run: FLUX.1's (pipelines/diffusion_common/dreambooth.py), with FLUX.2's
    own guidance, text length and preview defaults."""

    guidance_scale: float = field(default=4.0, metadata={"help": "guidance embedding during training ([dev] only)"})
    max_sequence_length: int = field(default=512, metadata={"help": "text tokens per prompt (the pipelines pad to 512)"})
    preview_steps: int = field(default=0, metadata={
        "help": "denoising steps of the previews (0: 50, or 4 for a distilled [klein])", "preview": "--preview-steps"})
    preview_guidance: float = field(default=4.0, metadata={
        "help": "guidance of the previews ([dev]: embedded; [klein] Base: real CFG)", "preview": "--preview-guidance"})

class Flux2Backend(DreamBoothData, Backend):
    """The FLUX.2 transformer is the model that is calibrated, emulated, trained and corrected."""

    name = "flux2"
    display_name, data_kind, preview_kind = "FLUX.2", "images", "images"
    settings_class = Flux2Settings
    pipeline_name = "Flux2Pipeline / Flux2KleinPipeline"

    # -- what kind of FLUX.2 ---------------------------------------------------------------------------------
    def _index(self) -> dict:
        from diffusers import DiffusionPipeline

        if "index" not in self.cache:
            index = DiffusionPipeline.load_config(self.run.model)
            if index.get("_class_name") not in PIPELINES:
                raise ValueError(f"{self.run.model} is a {index.get('_class_name')!r} pipeline; the flux2 backend "
                                 f"needs {' or '.join(PIPELINES)} (FLUX.1 models train with --backend flux)")
            self.cache["index"] = dict(index)
        return self.cache["index"]

    def _pipeline_class(self):
        import diffusers

        return getattr(diffusers, self._index()["_class_name"])

    def _transformer_config(self) -> dict:
        from diffusers import Flux2Transformer2DModel

        if "transformer" not in self.cache:
            self.cache["transformer"] = dict(Flux2Transformer2DModel.load_config(str(self._transformer_folder())))
        return self.cache["transformer"]

    def _guidance(self) -> bool:
        return bool(self._transformer_config().get("guidance_embeds", False))

    def _real_cfg(self) -> bool:
        """[klein] Base variants: not distilled, so the previews run real classifier-free guidance."""
        index = self._index()
        return index["_class_name"] == "Flux2KleinPipeline" and not index.get("is_distilled", False)

    # -- the cache: prompt embeddings and latent distributions, computed once --------------------------------
    def _pipeline(self, text: bool = True):
        """Everything but the transformer; with `text`, also the text encoder (24 B for [dev]), read block by block
        from its files while it encodes (pipelines.runner.streaming), so it never needs its whole size in memory.
        Without `text` (every prompt's embedding is cached) no part of the encoder is built: even streamed it holds
        its embeddings and LM head on the device (2.57 GiB for [dev]), which a sample round beside the training model
        cannot afford."""
        if self._pipe is None:
            parts = dict(transformer=None, text_encoder=None, dtype=self.dtype, use_safetensors=True)
            try:
                pipe = self._pipeline_class().from_pretrained(self.run.model, **parts)
            except ImportError as err:  # [dev]'s PixtralProcessor needs torchvision; its tokenizer alone does not
                if "orchvision" not in str(err):
                    raise
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(self._folder("tokenizer")))
                pipe = self._pipeline_class().from_pretrained(self.run.model, tokenizer=tokenizer, **parts)
                log.info("the text prompts are tokenized by the tokenizer alone (its processor needs torchvision)")
            pipe = pin_execution_device(pipe.to(self.device), self.device)
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe
        if text and self._pipe.text_encoder is None:
            import transformers

            _, class_name = self._index()["text_encoder"]
            self._pipe.text_encoder = streamed_transformers_model(
                self._folder("text_encoder"), getattr(transformers, class_name), self.device, self.dtype)
        return self._pipe

    def _drop_text_encoder(self) -> None:
        """Free the text encoder once the texts are embedded, before the transformer denoises beside it."""
        if self._pipe is not None and self._pipe.text_encoder is not None:
            self._pipe.text_encoder = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @torch.no_grad()
    def _embed(self, pipe, texts: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for text in texts:
            embeds, _ = pipe.encode_prompt(prompt=text, device=self.device,
                                           max_sequence_length=self.settings.max_sequence_length)
            out[text] = embeds[0]
        return out

    def _preview_texts(self) -> list[str]:
        texts = {p for p, _ in self._requests()}
        return sorted(texts | ({""} if self._real_cfg() else set()))

    def build_cache(self, folder: Path) -> None:
        from safetensors.torch import save_file

        pipe = self._pipeline()
        texts = sorted(self._training_texts() | set(self._preview_texts()))
        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for index, (text, embeds) in enumerate(self._embed(pipe, texts).items()):
                tensors[f"text.{index}.embeds"] = embeds
            meta = {"texts": texts, **self._encode_data(pipe, texts, tensors)}
            bn = pipe.vae.bn
            tensors["bn.mean"] = bn.running_mean.float()
            tensors["bn.std"] = torch.sqrt(bn.running_var.float() + pipe.vae.config.batch_norm_eps)
        save_file({k: v.float().cpu().contiguous() for k, v in tensors.items()}, str(folder / "cache.safetensors"))
        (folder / "cache.json").write_text(json.dumps(meta, indent=2))
        self.release()  # the text encoder and the VAE leave memory before calibration

    def _load_more(self, tensors: dict, meta: dict) -> None:
        self.cache["bn"] = (tensors["bn.mean"].view(1, -1, 1, 1), tensors["bn.std"].view(1, -1, 1, 1))

    # -- the model -------------------------------------------------------------------------------------------
    def load_model(self, device: torch.device) -> nn.Module:
        from diffusers import Flux2Transformer2DModel

        model = Flux2Transformer2DModel.from_pretrained(self.run.model, subfolder="transformer", dtype=self.dtype,
                                                        use_safetensors=True, **device_placement(device))
        return model.to(device).eval().requires_grad_(False)

    def _transformer_folder(self) -> Path:
        return self._folder("transformer")

    def _folder(self, part: str) -> Path:
        """The pipeline's `part` folder: in the local model folder, or in the hub cache (never downloaded here)."""
        local = Path(self.run.model) / part
        if local.is_dir():
            return local
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.run.model, allow_patterns=[f"{part}/*"], local_files_only=True)) / part

    def skeleton(self) -> nn.Module:
        from accelerate import init_empty_weights
        from diffusers import Flux2Transformer2DModel

        with init_empty_weights():
            model = Flux2Transformer2DModel.from_config(self._transformer_config())
        return model.eval().requires_grad_(False)

    def checkpoint(self) -> CheckpointReader:
        return CheckpointReader(safetensors_files(self._transformer_folder()))

    def blockwise(self, model: nn.Module, reader: CheckpointReader) -> BlockwiseModel:
        """The modulations, the double blocks, then the single blocks (Flux2Transformer2DModel.forward, step by
        step): the state is
        the (image, text) streams, or one concatenated stream after the last double block, with the modulations
        (computed once per batch) and the rotary embedding every block reads."""
        doubles = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
        singles = [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))]
        # the shared modulations are compressed too, so they stream as the first three blocks (each reads temb)
        modulations = {"double_stream_modulation_img": "mod_img", "double_stream_modulation_txt": "mod_txt",
                       "single_stream_modulation": "mod_single"}
        entry = PASS_ENTRY  # the planner counts them (planning.py)

        def enter(streamed: BlockwiseModel, batch: dict) -> dict:
            for name in entry:
                if any(p.device.type == "meta" for p in model.get_submodule(name).parameters()):
                    streamed.load(name)  # read once, kept for the pass
            hidden = model.x_embedder(batch["hidden_states"])
            timestep = batch["timestep"].to(hidden.dtype) * 1000
            guidance = batch.get("guidance")
            temb = model.time_guidance_embed(timestep, None if guidance is None else guidance.to(hidden.dtype) * 1000)
            text_rotary, image_rotary = model.pos_embed(batch["txt_ids"]), model.pos_embed(batch["img_ids"])
            rotary = tuple(torch.cat([t, i], dim=0) for t, i in zip(text_rotary, image_rotary))
            return {"image": hidden, "text": model.context_embedder(batch["encoder_hidden_states"]), "joint": None,
                    "temb": temb, "rotary": rotary}

        def step(streamed: BlockwiseModel, name: str, state: dict) -> dict:
            block = model.get_submodule(name)
            if name in modulations:
                return {**state, modulations[name]: block(state["temb"])}
            if name in doubles:
                text, image = block(hidden_states=state["image"], encoder_hidden_states=state["text"],
                                    temb_mod_img=state["mod_img"], temb_mod_txt=state["mod_txt"],
                                    image_rotary_emb=state["rotary"], joint_attention_kwargs=None)
                return {**state, "image": image, "text": text}
            joint = state["joint"] if state["joint"] is not None else torch.cat([state["text"], state["image"]], dim=1)
            joint = block(hidden_states=joint, encoder_hidden_states=None, temb_mod=state["mod_single"],
                          image_rotary_emb=state["rotary"], joint_attention_kwargs=None)
            # the two streams are in the joint one now: keeping them too held S·n·h for nothing through the singles
            return {**state, "joint": joint, "image": None, "text": None}

        return BlockwiseModel(model, reader, [*modulations, *doubles, *singles], enter, step, device=self.device,
                              dtype=self.dtype)

    def memory_shape(self) -> dict:
        return {**self.memory_rows(), "text_tokens": self.settings.max_sequence_length}

    def check_model(self) -> None:
        check_model_source(self.run.model)

    def default_rules(self, ratio: float) -> list[tuple[str, float]]:
        """Every linear of the double and single blocks, and the three shared modulation layers."""
        return [(pattern, ratio) for pattern in COMPRESS]

    def default_lora_targets(self) -> list[str]:
        return list(LORA_TARGETS)

    # -- batches ---------------------------------------------------------------------------------------------
    def _x0(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents (b, 32, H/8, W/8) -> packed normalised tokens (b, (H/16)(W/16), 128)."""
        from diffusers import Flux2Pipeline

        bn_mean, bn_std = (t.to(z.device) for t in self.cache["bn"])
        return Flux2Pipeline._pack_latents((Flux2Pipeline._patchify_latents(z) - bn_mean) / bn_std)

    def _kwargs(self, noisy: torch.Tensor, timesteps: torch.Tensor, texts: list[int], latent_hw: tuple) -> dict:
        """The transformer's inputs for noised tokens and the rows' text indices (`latent_hw`: the VAE latent's
        height and width, halved by the 2x2 patches into the token grid)."""
        from diffusers import Flux2Pipeline

        size = noisy.shape[0]
        embeds = torch.stack([self.cache["embeds"][t] for t in texts]).to(self.device)
        grid = torch.empty(size, 1, latent_hw[0] // 2, latent_hw[1] // 2, device="meta")  # only its shape is read
        return {
            "hidden_states": noisy.to(self.dtype),
            "timestep": (timesteps / 1000).to(self.dtype),
            "guidance": torch.full((size,), self.settings.guidance_scale, device=self.device) if self._guidance() else None,
            "encoder_hidden_states": embeds.to(self.dtype),
            "txt_ids": Flux2Pipeline._prepare_text_ids(embeds)[0].to(self.device),
            "img_ids": Flux2Pipeline._prepare_latent_ids(grid)[0].to(self.device),
            "return_dict": False,
        }

    # -- export and previews ---------------------------------------------------------------------------------
    def export(self, folder: Path, corrected: dict, uncorrected: dict, config: Any) -> None:
        """diffusers' LoRA format, which Flux2Pipeline / Flux2KleinPipeline.load_lora_weights read."""
        from emloc import lora_scaling

        for name, state in (("diffusers", corrected), ("diffusers-uncorrected", uncorrected)):
            self._pipeline_class().save_lora_weights(
                str(Path(folder) / name), transformer_lora_layers=diffusers_lora_state(state, lora_scaling(config)),
                weight_name=LORA_FILE, safe_serialization=True)

    def export_snippet(self, lora: Path, plan: dict | None = None) -> str:
        """Python that renders the first preview of the full model with the corrected LoRA again (diffusers
        format); on a GPU where the run's plan did not preview it whole, the transformer and the text encoder are
        group-offloaded (to files where the plan streamed the model from its files)."""
        prompt, seed = self._requests()[0]
        how = self._sampling()
        mode = ((plan or {}).get("phases", {}).get("preview") or {}).get("mode", "whole")
        return load_snippet(self._index()["_class_name"], str(self.run.model), Path(lora) / "diffusers", LORA_FILE,
                            prompt, seed, int(self.settings.resolution), int(how["steps"]), float(how["guidance"]),
                            int(self.settings.max_sequence_length), mode)

    def _requests(self) -> list[tuple[str, int]]:
        prompts = self.settings.preview_prompts or [self.settings.prompt]
        return [(prompt, seed) for prompt in prompts for seed in self.settings.preview_seeds]

    def _sampling(self) -> dict:
        distilled = self._index()["_class_name"] == "Flux2KleinPipeline" and not self._real_cfg()
        return {"steps": self.settings.preview_steps or (4 if distilled else 50),
                "guidance": self.settings.preview_guidance if (self._guidance() or self._real_cfg()) else 1.0}

    def load_cache(self, folder: Path) -> None:
        """The run's cache, then the embeddings of preview prompts typed after the run (launch.py preview --prompt):
        encoded here, before any transformer is on the device, and the encoder freed again."""
        super().load_cache(folder)
        self._prompt_embeds(sorted(set(self._preview_texts()) | set(self.run.sample_prompts)))

    def _prompt_embeds(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Cached embeddings (on the CPU, in the model's dtype); texts the cache lacks are encoded once, kept beside
        it, and the encoder freed: it never shares the device with a transformer that denoises."""
        meta = self.cache.get("meta", {"texts": []})
        typed = self.cache.setdefault("typed", {})
        known = {t: self.cache["embeds"][i] for i, t in enumerate(meta["texts"]) if t in texts}
        known.update({t: typed[t] for t in texts if t in typed})
        missing = [t for t in texts if t not in known]
        if missing:
            embedded = {t: e.to("cpu", self.dtype) for t, e in self._embed(self._pipeline(text=True), missing).items()}
            self._drop_text_encoder()
            typed.update(embedded)
            known.update(embedded)
        return known

    def generate(self, model: nn.Module, label: str, requests: list[tuple[str, int]] | None = None) -> list:
        return self._render(model, requests or self._requests())

    def _render(self, model: nn.Module, requests: list[tuple[str, int]]) -> list:
        """One image per (prompt, seed) at Image size through `model`, from the prompts' embeddings."""
        how = self._sampling()
        embeds = self._prompt_embeds(sorted({p for p, _ in requests} | ({""} if self._real_cfg() else set())))
        pipe = self._pipeline(text=False)  # from the embeddings: sample rounds and previews never build the encoder
        pipe.transformer = model.get_base_model() if hasattr(model, "get_base_model") else model
        images = []
        try:
            for prompt, seed in requests:
                extra = {"negative_prompt_embeds": embeds[""][None].to(self.device, self.dtype)} if self._real_cfg() else {}
                result = pipe(prompt_embeds=embeds[prompt][None].to(self.device, self.dtype),
                              height=self.settings.resolution,
                              width=self.settings.resolution, num_inference_steps=how["steps"],
                              guidance_scale=how["guidance"], generator=torch.Generator("cpu").manual_seed(seed),
                              max_sequence_length=self.settings.max_sequence_length, **extra)
                images.append(result.images[0])
                self.output_done()
        finally:
            pipe.transformer = None
        return images

    def preview_count(self) -> int:
        return len(self._requests())

    def write_samples(self, folder: Path, model: nn.Module) -> list[Path]:
        """A round of training samples: the --sample-prompt prompts (else the previews') at the preview seeds."""
        requests = [(p, seed) for p in self.run.sample_prompts for seed in self.settings.preview_seeds] or None
        return self.write_previews(folder, {"emulator + LoRA": self.generate(model, "emulator + LoRA", requests)},
                                   requests)

    def write_previews(self, folder: Path, outputs: dict[str, list],
                       requests: list[tuple[str, int]] | None = None) -> list[Path]:
        files = []
        for label, images in outputs.items():
            for (prompt, seed), image in zip(requests or self._requests(), images):
                slug = "-".join("".join(c if c.isalnum() else " " for c in f"{label} {prompt}").lower().split())[:60]
                path = Path(folder) / f"{slug}__seed{seed}.png"
                image.save(path)
                files.append(path)
        return files

    def release(self) -> None:
        self._pipe = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
