"""FLUX.1 [dev] / [schnell] through diffusers: DreamBooth LoRA on the EMLoC emulator of the transformer.

Data: 3-50 photos of one subject and an instance prompt with a trigger word ("a photo of sks dog");
a same-name .txt beside an image replaces the prompt for that image. Images are resized and
centre-cropped with PIL. Text embeddings and VAE latent distributions are computed once into the
run's cache/, after which the text encoders and the VAE are freed: training and calibration only
ever hold the transformer.

Loss (diffusers' train_dreambooth_lora_flux): with `x0` the scaled latents, noise `n` and `σ` from
FlowMatchEulerDiscreteScheduler's schedule at a timestep drawn by the weighting scheme,
`x_σ = (1 - σ) x0 + σ n`, the transformer predicts the velocity and
`loss = mean(w(σ) · (pred - (n - x0))²)`; [dev] models also get the guidance embedding.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emloc.blockwise import BlockwiseModel
from emloc.checkpoint import CheckpointReader, safetensors_files
from pipelines.runner import Backend
from pipelines.runner.checks import check_model_source
from pipelines.diffusion_common.dreambooth import IMAGE_LIMITS, MAX_PROMPT_CHARS, DreamBoothData, DreamBoothSettings  # noqa: F401 (re-exported: app)
from pipelines.diffusion_common.dreambooth import device_placement, pin_execution_device
from pipelines.runner.streaming import streamed_transformers_model

from .export import (load_snippet, offload_settings, preview_file_name, write_diffusers_lora,
                     write_kohya_export, write_preview_grid)

log = logging.getLogger(__name__)

DOUBLE_LORA = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)"
SINGLE_LORA = r"attn\.(to_q|to_k|to_v)|proj_mlp|proj_out"
PASS_ENTRY = ("x_embedder", "time_text_embed", "context_embedder")  # read as the samples enter the streamed pass


@dataclass
class FluxSettings(DreamBoothSettings):
    """Settings of a FLUX.1 DreamBooth run (the shared ones are in run.RunSettings; the DreamBooth ones in
    pipelines/diffusion_common/dreambooth.py)."""

BATCHED_INPUTS = ("hidden_states", "timestep", "guidance", "pooled_projections", "encoder_hidden_states")


class FluxBackend(DreamBoothData, Backend):
    """The FLUX transformer is the model that is calibrated, emulated, trained and corrected."""

    name = "flux"
    display_name, data_kind, preview_kind = "FLUX.1", "images", "images"
    settings_class = FluxSettings

    # -- the cache: text embeddings and latent distributions, computed once -------------------------------
    def _guidance(self) -> bool:
        from diffusers import FluxTransformer2DModel

        if "guidance" not in self.cache:
            config = FluxTransformer2DModel.load_config(self.run.model, subfolder="transformer")
            self.cache["guidance"] = bool(config.get("guidance_embeds", False))
        return self.cache["guidance"]

    def _sequence_length(self) -> int:
        """T5 tokens: the setting, else 512 ([dev]) / 256 ([schnell]) capped by the T5 tokenizer's own limit
        (small models, like the demo, are trained on shorter prompts and fail on 256 padded tokens)."""
        if self.settings.max_sequence_length:
            return self.settings.max_sequence_length
        default = 512 if self._guidance() else 256
        limit = _tokenizer_limit(self.run.model)
        return min(default, limit) if limit else default

    def _pipeline(self, text: bool = True):
        """Everything but the transformer: the VAE, and with `text` the text encoders: CLIP whole, T5-XXL (8.9 GiB
        for [dev]) read block by block from its files while it encodes (pipelines.runner.streaming), so the device
        holds its embeddings and one block, never the whole encoder. Without `text` (every prompt's embeddings are
        cached) no encoder is built."""
        from diffusers import FluxPipeline

        if self._pipe is None:
            self._pipe = pin_execution_device(FluxPipeline.from_pretrained(
                self.run.model, transformer=None, text_encoder=None, text_encoder_2=None, dtype=self.dtype,
                use_safetensors=True).to(self.device), self.device)
            self._pipe.set_progress_bar_config(disable=True)
        if text and self._pipe.text_encoder_2 is None:
            from transformers import CLIPTextModel, T5EncoderModel

            self._pipe.text_encoder = CLIPTextModel.from_pretrained(
                self.run.model, subfolder="text_encoder", dtype=self.dtype, use_safetensors=True,
                **device_placement(self.device)).to(self.device).eval()
            self._pipe.text_encoder_2 = streamed_transformers_model(self._folder("text_encoder_2"), T5EncoderModel,
                                                                    self.device, self.dtype)
        return self._pipe

    def _drop_text_encoders(self) -> None:
        """Free the text encoders once the texts are embedded, before a transformer denoises beside them."""
        if self._pipe is not None and self._pipe.text_encoder_2 is not None:
            self._pipe.text_encoder = self._pipe.text_encoder_2 = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{text: (T5 embeddings (tokens, 4096), pooled CLIP embedding (768,))} through the text encoders."""
        pipe, out = self._pipeline(text=True), {}
        for text in texts:
            embeds, pooled, _ = pipe.encode_prompt(text, text, device=self.device,
                                                   max_sequence_length=self._sequence_length())
            out[text] = (embeds[0], pooled[0])
        return out

    def build_cache(self, folder: Path) -> None:
        from safetensors.torch import save_file

        pipe = self._pipeline(text=True)
        texts = sorted(self._training_texts() | {p for p, _ in self._requests()})  # the previews' prompts too
        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for index, (embeds, pooled) in enumerate(self._embed(texts).values()):
                tensors[f"text.{index}.embeds"], tensors[f"text.{index}.pooled"] = embeds, pooled
            self._drop_text_encoders()
            meta = {"texts": texts, **self._encode_data(pipe, texts, tensors)}
        save_file({k: v.float().cpu().contiguous() for k, v in tensors.items()}, str(folder / "cache.safetensors"))
        vae = pipe.vae.config
        meta.update(shift_factor=vae.shift_factor, scaling_factor=vae.scaling_factor,
                    vae_scale_factor=pipe.vae_scale_factor)
        (folder / "cache.json").write_text(json.dumps(meta, indent=2))
        self.release()  # text encoders and VAE leave memory before training

    def _load_more(self, tensors: dict, meta: dict) -> None:
        self.cache["pooled"] = [tensors[f"text.{i}.pooled"].to(self.dtype) for i in range(len(meta["texts"]))]

    # -- the model ----------------------------------------------------------------------------------------
    def load_model(self, device: torch.device) -> nn.Module:
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel.from_pretrained(self.run.model, subfolder="transformer", dtype=self.dtype,
                                                       use_safetensors=True, **device_placement(device))
        return model.to(device).eval().requires_grad_(False)

    def _transformer_folder(self) -> Path:
        return self._folder("transformer")

    def _folder(self, part: str) -> Path:
        """The pipeline's `part` folder (config and safetensors): local, or the hub snapshot in the cache."""
        local = Path(self.run.model) / part
        if local.is_dir():
            return local
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.run.model, allow_patterns=[f"{part}/*"], local_files_only=True)) / part

    def skeleton(self) -> nn.Module:
        from accelerate import init_empty_weights
        from diffusers import FluxTransformer2DModel

        config = FluxTransformer2DModel.load_config(str(self._transformer_folder()))
        with init_empty_weights():
            model = FluxTransformer2DModel.from_config(config)
        return model.eval().requires_grad_(False)

    def checkpoint(self) -> CheckpointReader:
        return CheckpointReader(safetensors_files(self._transformer_folder()))

    def blockwise(self, model: nn.Module, reader: CheckpointReader) -> BlockwiseModel:
        """The transformer as its double blocks then its single blocks; the state is (image, text) hidden states
        with the time embedding and the rotary embedding every block reads."""
        def enter(streamed: BlockwiseModel, batch: dict) -> dict:
            for name in PASS_ENTRY:
                if any(p.device.type == "meta" for p in model.get_submodule(name).parameters()):
                    streamed.load(name)  # small: read once, kept for the pass
            hidden = model.x_embedder(batch["hidden_states"])
            timestep = batch["timestep"].to(hidden.dtype) * 1000
            guidance = batch.get("guidance")
            temb = model.time_text_embed(timestep, batch["pooled_projections"]) if guidance is None else \
                model.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, batch["pooled_projections"])
            rotary = model.pos_embed(torch.cat((batch["txt_ids"], batch["img_ids"]), dim=0))
            return {"image": hidden, "text": model.context_embedder(batch["encoder_hidden_states"]), "temb": temb,
                    "rotary": rotary}

        def step(streamed: BlockwiseModel, name: str, state: dict) -> dict:
            text, image = model.get_submodule(name)(hidden_states=state["image"], encoder_hidden_states=state["text"],
                                                    temb=state["temb"], image_rotary_emb=state["rotary"])
            return {**state, "image": image, "text": text}

        blocks = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
        blocks += [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))]
        return BlockwiseModel(model, reader, blocks, enter, step, device=self.device, dtype=self.dtype)
    def memory_shape(self) -> dict:
        return {**self.memory_rows(), "text_tokens": self._sequence_length()}

    def check_model(self) -> None:
        check_model_source(self.run.model)


    def default_rules(self, ratio: float) -> list[tuple[str, float]]:
        return [(r"(transformer_blocks|single_transformer_blocks)\.\d+\..+", ratio)]

    def default_lora_targets(self) -> list[str]:
        return [rf"transformer_blocks\.\d+\.({DOUBLE_LORA})", rf"single_transformer_blocks\.\d+\.({SINGLE_LORA})"]

    # -- batches ------------------------------------------------------------------------------------------
    def _x0(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the scaled latents the transformer denoises: (z - shift) · scale, (b, c, h, w)."""
        meta = self.cache["meta"]
        return (z - meta["shift_factor"]) * meta["scaling_factor"]

    def _kwargs(self, noisy: torch.Tensor, timesteps: torch.Tensor, texts: list[int], latent_hw: tuple) -> dict:
        """The transformer's inputs for noised latents (b, c, h, w) and the rows' text indices."""
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        embeds = torch.stack([self.cache["embeds"][t] for t in texts]).to(self.device)
        return {
            "hidden_states": FluxPipeline._pack_latents(noisy, b, c, h, w).to(self.dtype),  # (b, h/2·w/2, 4c)
            "timestep": (timesteps / 1000).to(self.dtype),
            "guidance": torch.full((b,), self.settings.guidance_scale, device=self.device) if self._guidance() else None,
            "pooled_projections": torch.stack([self.cache["pooled"][t] for t in texts]).to(self.device, self.dtype),
            "encoder_hidden_states": embeds.to(self.dtype),
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype),
            "img_ids": FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype),
            "return_dict": False,
        }

    batched_inputs = BATCHED_INPUTS

    def unpack_prediction(self, pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        scale = self.cache["meta"]["vae_scale_factor"]  # a bucket may be wider than tall, or taller
        return FluxPipeline._unpack_latents(pred, x0.shape[-2] * scale, x0.shape[-1] * scale, scale)

    # -- export and previews ------------------------------------------------------------------------------
    def export(self, folder: Path, corrected: dict, uncorrected: dict, config: Any) -> None:
        write_diffusers_lora(corrected, config, folder / "diffusers")
        write_diffusers_lora(uncorrected, config, folder / "diffusers-uncorrected")
        rows = {name: module.out_features for name, module in self.skeleton().named_modules()
                if isinstance(module, nn.Linear)}  # sizes a joined layer's untrained parts
        write_kohya_export(corrected, config, folder / "kohya", rows, self.run.model)

    def _requests(self) -> list[tuple[str, int]]:
        """The previews' (prompt, seed) pairs: every preview prompt (default: the instance prompt) at every seed."""
        prompts = self.settings.preview_prompts or [self.settings.prompt]
        return [(prompt, seed) for prompt in prompts for seed in self.settings.preview_seeds]

    def _sampling(self) -> dict:
        """How previews are sampled: denoising steps, guidance and T5 tokens (the defaults resolved)."""
        guidance = self._guidance()
        return {"steps": self.settings.preview_steps or (28 if guidance else 4),
                "guidance": self.settings.preview_guidance if guidance else 0.0,
                "sequence_length": self._sequence_length()}

    SAMPLE_PROMPTS = 4  # the instance prompt and up to three of the user's own captions

    def write_samples(self, folder: Path, model: nn.Module) -> list[Path]:
        """A round of training samples from the prompt embeddings (--sample-prompt, else the instance prompt and up
        to three of the captions; at the preview seeds), embedded before training: no text encoder is loaded beside
        the training model, only the VAE."""
        from diffusers import FluxPipeline

        meta = self.cache["meta"]
        texts = list(self.run.sample_prompts) or sorted(meta["texts"], key=lambda t: t != self.settings.prompt
                                                        )[:self.SAMPLE_PROMPTS]
        pipe = FluxPipeline.from_pretrained(self.run.model, transformer=None, text_encoder=None, text_encoder_2=None,
                                            tokenizer=None, tokenizer_2=None, dtype=self.dtype,
                                            use_safetensors=True).to(self.device)
        pipe = pin_execution_device(pipe, self.device)
        pipe.set_progress_bar_config(disable=True)
        requests = [(t, seed) for t in texts for seed in self.settings.preview_seeds]
        try:
            images = self._sample(pipe, model, requests, self._prompt_embeds(texts))
        finally:
            del pipe
        return write_preview_grid(folder, {"emulator + LoRA": images}, requests, self.settings.resolution)

    def _prompt_embeds(self, texts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{text: (embeddings, pooled)} from the cache (on the CPU, in the model's dtype); texts it lacks (preview
        prompts typed after the run) are encoded once, kept beside it, and the encoders freed."""
        meta = self.cache.get("meta", {"texts": []})
        typed = self.cache.setdefault("typed", {})
        known = {t: (self.cache["embeds"][i], self.cache["pooled"][i]) for i, t in enumerate(meta["texts"])
                 if t in texts}
        known.update({t: typed[t] for t in texts if t in typed})
        missing = [t for t in texts if t not in known]
        if missing:
            embedded = {t: tuple(x.to("cpu", self.dtype) for x in pair) for t, pair in self._embed(missing).items()}
            self._drop_text_encoders()
            typed.update(embedded)
            known.update(embedded)
        return known

    def load_cache(self, folder: Path) -> None:
        """The run's cache, then the embeddings of preview prompts typed after the run (launch.py preview --prompt):
        encoded here, before any transformer is on the device, and the encoders freed again."""
        super().load_cache(folder)
        self._prompt_embeds(sorted({p for p, _ in self._requests()} | set(self.run.sample_prompts)))

    def _sample(self, pipe, model: nn.Module, requests: list[tuple[str, int]], embeds: dict) -> list:
        """One image per (prompt, seed) through `model` (a transformer, maybe PEFT-wrapped) in `pipe`, from the
        prompts' embeddings (no text encoder runs)."""
        how = self._sampling()
        pipe.transformer = model.get_base_model() if hasattr(model, "get_base_model") else model
        images = []
        try:
            for text, seed in requests:
                prompt, pooled = embeds[text]
                result = pipe(prompt_embeds=prompt[None].to(self.device, self.dtype),
                              pooled_prompt_embeds=pooled[None].to(self.device, self.dtype),
                              height=self.settings.resolution, width=self.settings.resolution,
                              num_inference_steps=how["steps"], guidance_scale=how["guidance"],
                              generator=torch.Generator("cpu").manual_seed(seed))
                images.append(result.images[0])
                self.output_done()
        finally:
            pipe.transformer = None
        return images

    def preview_count(self) -> int:
        return len(self._requests())

    def generate(self, model: nn.Module, label: str) -> list:
        return self._render(model, self._requests())

    def _render(self, model: nn.Module, requests: list[tuple[str, int]]) -> list:
        """One image per (prompt, seed) at Image size through `model`, from the prompts' embeddings."""
        embeds = self._prompt_embeds(sorted({p for p, _ in requests}))
        return self._sample(self._pipeline(text=False), model, requests, embeds)

    def export_snippet(self, lora: Path, plan: dict | None = None) -> str:
        """Python that renders the first preview of the corrected LoRA again (diffusers format), offloading the
        transformer where the run's plan did not preview it whole."""
        prompt, seed = self._requests()[0]
        preview = preview_file_name("full + corrected LoRA", prompt, seed)
        return load_snippet(self.run.model, Path(lora) / "diffusers", prompt, seed, self.settings.resolution,
                            preview=preview, **offload_settings(plan, self._t5_gib()), **self._sampling())

    def _t5_gib(self) -> float:
        """GiB of T5-XXL (text_encoder_2) in bf16, as a snippet holds it on a GPU: counted on its meta build."""
        from accelerate import init_empty_weights
        from transformers import T5Config, T5EncoderModel

        with init_empty_weights():
            model = T5EncoderModel(T5Config.from_pretrained(str(self._folder("text_encoder_2"))))
        return 2 * sum(p.numel() for p in model.parameters()) / 1024 ** 3

    def write_previews(self, folder: Path, outputs: dict[str, list]) -> list[Path]:
        return write_preview_grid(folder, outputs, self._requests(), self.settings.resolution)

    def release(self) -> None:
        self._pipe = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _tokenizer_limit(model: str) -> int | None:
    """`model_max_length` of the model's T5 tokenizer (tokenizer_2), or None when it cannot be read."""
    local = Path(model) / "tokenizer_2" / "tokenizer_config.json"
    try:
        if local.is_file():
            path = local
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "tokenizer_2/tokenizer_config.json"))
        value = json.loads(path.read_text()).get("model_max_length")
    except (OSError, ValueError):  # an unreadable config only means "no cap"; loading reports real errors
        return None
    return int(value) if isinstance(value, (int, float)) and 0 < value < 100_000 else None
