"""The flow-matching objective FLUX.1 and FLUX.2 train with, on the run's cached latents: batches grouped by
aspect-ratio bucket, the prior-preservation loss, and a validation loss with fixed noise per held-out photo.

Loss (diffusers' train_dreambooth_lora_flux / _flux2): with `x0` the scaled latents, noise `n` and `σ` from
FlowMatchEulerDiscreteScheduler's schedule at a timestep drawn by the weighting scheme, `x_σ = (1 - σ) x0 + σ n`,
the transformer predicts the velocity and `ℓ = mean(w(σ) · (pred - (n - x0))²)` per row. With prior preservation
(DreamBooth) every step also draws as many class images (the class prompt, no trigger word) and the loss is
`ℓ_instance + prior_weight · ℓ_class` (the class rows join the instance rows in one forward when their bucket
matches, else they take a second forward of the same size).

The cache holds one latent distribution per *entry*: a photo (or class image) at one resolution's bucket, one view
(flipped or not), with a role: "train", "validation" (held out) or "class". Validation loss: every validation entry
at the fixed σ of VALIDATION_FRACTIONS, its noise from a generator seeded by (seed, entry), so two sample rounds
differ only by the LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipelines.runner.data import load_rgb, resize_and_crop_to

from .buckets import nearest_bucket

VALIDATION_FRACTIONS = (0.125, 0.375, 0.625, 0.875)  # of the schedule's timesteps: one fixed σ each per item
VALIDATION_SEED = 7919  # offsets the validation draws from the training steps' (which seed with (seed, step))


class FlowObjective:
    """Batches, losses and the latent cache of a FLUX-family backend (mixed into DreamBoothData).

    A family provides `_x0(z)` (VAE latents -> the transformer's target space), `_kwargs(noisy, timesteps, texts,
    latent_hw)` (the transformer's inputs) and `unpack_prediction`; the rest is here."""

    batched_inputs: tuple[str, ...] = ("hidden_states", "timestep", "guidance", "encoder_hidden_states")

    # -- the cache ------------------------------------------------------------------------------------------
    def _sizes(self, width: int, height: int) -> list[tuple[int, int]]:
        """The (width, height) a photo is trained at, one per resolution: its bucket, or the centre square."""
        s = self.settings
        return [nearest_bucket(width, height, r) if s.aspect_buckets else (r, r) for r in self.resolutions()]

    def resolutions(self) -> list[int]:
        """The run's training resolutions: Image size, then the extra ones (in the order given, no repeats)."""
        return list(dict.fromkeys([self.settings.resolution, *self.settings.resolutions]))

    @torch.no_grad()
    def _encode_entries(self, pipe, items: list[tuple[object, str, int]], tensors: dict, first: int = 0) -> list[dict]:
        """VAE latent distributions of `items` (path or PIL image, role, text index) at each resolution's size
        and view; fills `tensors` (keys entry.K.mean/std, K from `first`) and returns the entries' descriptions."""
        entries = []
        for index, (source, role, text) in enumerate(items):
            image = load_rgb(source) if isinstance(source, (str, Path)) else source.convert("RGB")
            for res, size in enumerate(self._sizes(*image.size)):
                pixels = np.asarray(resize_and_crop_to(image, *size), dtype=np.float32) / 127.5 - 1.0
                pixels = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (1, 3, H, W) in [-1, 1]
                views = [pixels, pixels.flip(-1)] if self.settings.random_flip and role != "validation" else [pixels]
                for view, batch in enumerate(views):
                    key = f"entry.{first + len(entries)}"
                    dist = pipe.vae.encode(batch.to(self.device, self.dtype)).latent_dist
                    tensors[f"{key}.mean"], tensors[f"{key}.std"] = dist.mean[0], dist.std[0]
                    entries.append({"key": key, "item": index, "view": view, "res": res, "size": list(size),
                                    "role": role, "text": text})
        return entries

    def load_cache(self, folder: Path) -> None:
        """The run's cache (build_cache), kept on the CPU: each text's embeddings (in the model's dtype), each
        entry's latent distribution (float32), and whatever more the family keeps (`_load_more`)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from safetensors.torch import load_file

        meta = json.loads((folder / "cache.json").read_text())
        # On the CPU for the whole run (FLUX.2-dev: 15 MiB per text in bf16): each step moves its own batch to the
        # device (`_batch`), so the device holds one batch of embeddings, not every caption's.
        tensors = load_file(str(folder / "cache.safetensors"), device="cpu")
        texts = range(len(meta["texts"]))
        self.cache.update(meta=meta, embeds=[tensors[f"text.{i}.embeds"].to(self.dtype) for i in texts])
        if "entries" in meta:
            self.cache["latents"] = [{**e, "mean": tensors[f"{e['key']}.mean"], "std": tensors[f"{e['key']}.std"]}
                                     for e in meta["entries"]]
        else:  # a cache written before entries (one square size, every image trained on)
            n = len(meta["images"])
            self.cache.update(mean=[[tensors[f"latent.{i}.{v}.mean"] for v in range(meta["views"])] for i in range(n)],
                              std=[[tensors[f"latent.{i}.{v}.std"] for v in range(meta["views"])] for i in range(n)])
        self._load_more(tensors, meta)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.run.model, subfolder="scheduler")

    def _load_more(self, tensors: dict, meta: dict) -> None:
        """Family-specific cached tensors (FLUX.1: pooled CLIP embeddings; FLUX.2: the VAE's batch-norm stats)."""

    def _latents(self) -> list[dict]:
        """Every cached entry; a cache without entries (older runs, the dry run's stand-in) read as training
        entries of one size."""
        if "latents" not in self.cache:
            meta = self.cache["meta"]
            self.cache["latents"] = [
                {"item": i, "view": v, "res": 0, "role": "train", "text": meta["image_text"][i],
                 "size": [self.cache["mean"][i][v].shape[-1] * 8, self.cache["mean"][i][v].shape[-2] * 8],
                 "mean": self.cache["mean"][i][v], "std": self.cache["std"][i][v]}
                for i in range(len(meta["images"])) for v in range(meta["views"])]
        return self.cache["latents"]

    def _role(self, role: str) -> dict[tuple[int, int, int], int]:
        """{(item, view, resolution): entry index} of the entries of `role`."""
        return {(e["item"], e["view"], e["res"]): k for k, e in enumerate(self._latents()) if e["role"] == role}

    def add_class_entries(self, entries: list[dict]) -> None:
        """Class-image entries (latents beside them in each dict) made after the cache (generated images)."""
        self._latents().extend({**e, "role": "class"} for e in entries)

    # -- drawing a step's rows ------------------------------------------------------------------------------
    def _draw(self, generator: torch.Generator, size: int, role: str = "train") -> list[int]:
        """Entries for one step: `size` rows of `role`, all of one bucket. Items and views are drawn as they always
        were (one square size gives the very same draws); a resolution is drawn when there are several, and the
        rows after the first are drawn again among the items that share the first row's bucket when the items'
        shapes differ."""
        found = self._role(role)
        items = sorted({i for i, _, _ in found})
        views = 1 + max(v for _, v, _ in found)
        resolutions = 1 + max(r for _, _, r in found)
        picked = [items[i] for i in torch.randint(len(items), (size,), generator=generator).tolist()]
        flips = torch.randint(views, (size,), generator=generator).tolist()
        res = torch.randint(resolutions, (1,), generator=generator).item() if resolutions > 1 else 0
        latents = self._latents()

        def bucket(item: int) -> list[int]:
            return latents[found[(item, 0, res)]]["size"]

        same = [i for i in items if bucket(i) == bucket(picked[0])]
        if size > 1 and len(same) < len(items):
            picked[1:] = [same[i] for i in torch.randint(len(same), (size - 1,), generator=generator).tolist()]
        return [found[(item, min(view, self._views(found, item)), res)] for item, view in zip(picked, flips)]

    @staticmethod
    def _views(found: dict, item: int) -> int:
        return max(v for i, v, _ in found if i == item)

    def _batch(self, generator: torch.Generator, size: int) -> dict:
        """Transformer inputs for `size` noised training latents of one bucket: the model kwargs plus `noise`,
        `x0` and `sigmas`; with prior preservation also `prior`: as many class rows."""
        batch = self._noised(self._draw(generator, size), generator)
        if self._prior_on():
            batch["prior"] = self._noised(self._draw(generator, size, role="class"), generator)
        return batch

    def _noised(self, entries: list[int], generator: torch.Generator, indices: torch.Tensor | None = None) -> dict:
        """The rows `entries` noised: z drawn from each latent distribution, `x0 = _x0(z)`, noise, and σ at the
        scheduler's timestep `indices` (drawn by the weighting scheme when None)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        s, latents = self.settings, self._latents()
        # the cache stays on the CPU (load_cache): only this step's rows move to the device
        mean = torch.stack([latents[k]["mean"] for k in entries]).to(self.device)  # (b, c, h, w)
        std = torch.stack([latents[k]["std"] for k in entries]).to(self.device)
        sample = torch.randn(mean.shape, generator=generator).to(mean.device)
        z = mean + std * sample
        x0 = self._x0(z)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        if indices is None:
            u = compute_density_for_timestep_sampling(s.weighting_scheme, len(entries), s.logit_mean, s.logit_std,
                                                      s.mode_scale, generator=generator)
            indices = (u * self.scheduler.config.num_train_timesteps).long()
        timesteps = self.scheduler.timesteps[indices].to(self.device)
        sigmas = self.scheduler.sigmas[indices].to(self.device, torch.float32).view(-1, *[1] * (x0.dim() - 1))
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        texts = [latents[k]["text"] for k in entries]
        return {"kwargs": self._kwargs(noisy, timesteps, texts, tuple(z.shape[-2:])), "noise": noise, "x0": x0,
                "sigmas": sigmas}

    # -- losses ---------------------------------------------------------------------------------------------
    def unpack_prediction(self, pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The transformer's output in the latents' layout (FLUX.1 packs 2x2 patches into tokens)."""
        return pred

    def _row_losses(self, model, batch: dict) -> torch.Tensor:
        """`mean(w(σ) · (pred - (n - x0))²)` of each row: (b,)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        x0, sigmas = batch["x0"], batch["sigmas"]
        pred = self.unpack_prediction(model(**batch["kwargs"])[0], x0)
        weighting = compute_loss_weighting_for_sd3(self.settings.weighting_scheme, sigmas)
        target = batch["noise"] - x0
        return (weighting.float() * (pred.float() - target.float()) ** 2).reshape(x0.shape[0], -1).mean(1)

    def _rows(self, batch: dict, rows: slice) -> dict:
        out = {k: batch[k][rows] for k in ("noise", "x0", "sigmas")}
        out["kwargs"] = {k: v[rows] if k in self.batched_inputs and v is not None else v
                         for k, v in batch["kwargs"].items()}
        return out

    def training_loss(self, model, step: int, generator: torch.Generator) -> torch.Tensor:
        """The mean row loss of the step's batch (`_batch`), this process's rows under several; with prior
        preservation plus prior_weight x that of the class rows."""
        rank, processes = self.shard
        per_process = self.run.batch_size
        batch = self._batch(generator, per_process * processes)  # the whole step's batch, drawn alike everywhere
        prior = batch.pop("prior", None)
        if processes > 1:
            rows = slice(rank * per_process, (rank + 1) * per_process)
            batch = self._rows(batch, rows)
            prior = self._rows(prior, rows) if prior is not None else None
        if prior is None:
            return self._row_losses(model, batch).mean()
        b = batch["x0"].shape[0]
        if batch["x0"].shape == prior["x0"].shape:  # one forward of 2b rows, as diffusers' DreamBooth does
            both = {k: torch.cat([batch[k], prior[k]]) for k in ("noise", "x0", "sigmas")}
            both["kwargs"] = {k: torch.cat([v, prior["kwargs"][k]]) if k in self.batched_inputs and v is not None
                              else v for k, v in batch["kwargs"].items()}
            losses = self._row_losses(model, both)
            instance, prior_loss = losses[:b].mean(), losses[b:].mean()
        else:
            instance, prior_loss = self._row_losses(model, batch).mean(), self._row_losses(model, prior).mean()
        return instance + self.settings.prior_weight * prior_loss

    @torch.no_grad()
    def validation_loss(self, model) -> float | None:
        """The mean row loss over the held-out photos (each at every training size, unflipped) at the fixed σ of
        VALIDATION_FRACTIONS, with noise fixed per photo: comparable between sample rounds. None without any.
        Forwards hold at most --batch-size rows, as a training step does (without its gradients)."""
        entries = [k for k, e in enumerate(self._latents()) if e["role"] == "validation"]
        if not entries:
            return None
        steps = self.scheduler.config.num_train_timesteps
        fixed = torch.tensor([int(f * steps) for f in VALIDATION_FRACTIONS])
        losses = []
        for k in entries:
            generator = torch.Generator().manual_seed(self.run.seed * 1_000_003 + VALIDATION_SEED + k)
            for start in range(0, len(fixed), self.run.batch_size):
                chunk = fixed[start:start + self.run.batch_size]
                losses.append(self._row_losses(model, self._noised([k] * len(chunk), generator, chunk)).float().cpu())
        return float(torch.cat(losses).mean())

    def _prior_on(self) -> bool:
        return any(e["role"] == "class" for e in self._latents())

    def calibration_batches(self):
        generator = torch.Generator().manual_seed(self.run.seed)
        for _ in range(self.run.calibration_samples):
            yield self._noised(self._draw(generator, 1), generator)["kwargs"]

    def calibration_forward(self, model, batch: dict):
        return model(**batch)
