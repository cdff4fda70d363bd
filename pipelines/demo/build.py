"""Build the two demo models the app and the headless commands start with (`python -m pipelines.demo build`).

Both are pretrained here, on this CPU, from synthetic data (pipelines/demo/data.py), deterministically
from `--seed`, and saved in the same formats as real checkpoints so the same loading code reads them:

- assets/models/demo-flux/: a FluxPipeline folder (FluxTransformer2DModel, AutoencoderKL, CLIP and T5
  encoders, offline tokenizers) trained on 64x64 coloured shapes captioned "a red circle on a white
  background" (and data.CAPTION_TEMPLATES' variants), every shape in every colour but the subject's pair
  (data.FLUX_PAIRS). The VAE is trained first (reconstruction + a small KL term), its latents are standardised
  (shift_factor / scaling_factor), then the transformer learns flow matching as in pipelines/flux/backend.py
  (`x_σ = (1-σ) x0 + σ n`, target `n - x0`). The text encoders stay random but fixed: the T5 has no
  layers (per-token embeddings of a word-level vocabulary, so padding never changes a word's vector; FLUX
  gives text tokens no positions, so a prompt is a bag of words) and the transformer learns to read them.
  Each batch is padded to a random length between 16 and 512 T5 tokens (half of them to the demo's 32), so
  the identical padding tokens do not drown the words under plain diffusers defaults (512). (A CLIP whose
  pooled vector was always zero was tried: shapes came out no better, so the CLIP stays as it was.)
  The transformer trains in five schedules: 3000 steps, then 2 x 1500 gentler ones, on shapes placed widely
  (data.PLACEMENTS["wide"]), then 2 x 800 on the focused placement of the evaluation. On the wide placement alone
  it never drew a cross (0 of 18 "a <colour> cross" prompts, 3 seeds each); after the first focused round 12 of 18,
  after the second 17 of 18 (and 63 of 63 circles, squares and triangles). A sixth round of 800 steps on the varied
  placement of a user's photos (side 35-65%, centre within 15%; `flux_varied_rounds`, off) was tried so that a LoRA
  taught from varied photos would find every size and place drawable: it lowered the teach rate on varied photos
  (3 and 3 of 16 on photo seeds 2029 and 2030, against 6 and 1 without it, 600 steps) and the held-out shape score
  (0.70 from 1.0). `--continue-from FOLDER` runs only a demo's last rounds on one built without them (the same
  weights as a full build: every round starts its own optimiser and draws from its own seed).
- assets/models/demo-internvl/: an InternVLForConditionalGeneration folder (ViT + Qwen2, byte-level BPE
  tokenizer with InternVL's image tokens and a ChatML template, PIL image processor) trained with
  answer-only loss on "What shape is this?", "What colour is the square?" (every shape in every colour at the
  varied placement, the FLUX subject's teal cross included: it captions the user's photos), "What is this?" (a mug)
  and a text-only "Repeat after me: Ana's" (so the LM can say names, as a real one can), packed by pipelines/internvl/backend.py's ChatPacker exactly as a fine-tuning run packs.

Both builds end with a held-out evaluation (pipelines/demo/evaluate.py) that is printed and saved as
`demo.json` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import (FLUX_DIR, FLUX_MAX_SEQUENCE_LENGTH, FLUX_SEQUENCE_LENGTH, FLUX_SUGGESTED_SETTINGS, VLM_DIR,
               VLM_IMAGE_SIZE, VLM_PATCH, VLM_SUGGESTED_SETTINGS, data)
from .offline_tokenizers import (byte_clip_tokenizer, internvl_chat_tokenizer, internvl_image_processor, save_internvl,
                                 small_internvl)

log = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """How long each demo trains; the defaults take ~55 (FLUX) and ~20 (InternVL) minutes on one CPU thread."""

    seed: int = 0
    vae_steps: int = 600  # VAE reconstruction steps (batch 8)
    flux_steps: int = 3000  # transformer flow-matching steps
    flux_refine_steps: int = 1500  # then this many more, on a schedule of their own, `flux_refine_rounds` times
    flux_refine_rounds: int = 2
    flux_refine_lr: float = 3e-4
    flux_focus_steps: int = 800  # then this many on shapes of data.PLACEMENTS["focused"], `flux_focus_rounds` times
    flux_focus_rounds: int = 2
    flux_focus_lr: float = 3e-4
    flux_varied_steps: int = 800  # then this many on shapes of data.PLACEMENTS["varied"], `flux_varied_rounds` times
    flux_varied_rounds: int = 0  # off: one round (tried) lowered the teach rate on varied photos, see the docstring
    flux_varied_lr: float = 3e-4
    flux_images: int = 4000  # shapes drawn for the transformer's pretraining (balanced over data.FLUX_PAIRS)
    flux_batch: int = 24
    flux_lr: float = 6e-4
    vlm_steps: int = 2000  # InternVL steps (1000 named 80% of held-out shapes once it saw four at varied places)
    vlm_batch: int = 32
    vlm_lr: float = 1e-3
    vlm_refine_steps: int = 400  # then this many on fresh images
    vlm_refine_lr: float = 3e-4
    threads: int = 1  # torch threads: the machine is shared


def _cosine(step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))) * 0.9 + 0.1


def _scheduled(optimizer: torch.optim.Optimizer, lr: float, steps: int, desc: str):
    """Yield `(step, bar)` for `steps` steps, the optimiser's learning rate set on the warm-up + cosine schedule."""
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * _cosine(step, steps)
        yield step, bar


def _update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, bar, clip=None) -> None:
    """One optimiser step on `loss` (gradients of `clip` clipped to norm 1 when given); the loss on the bar."""
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    bar.set_postfix(loss=f"{loss.item():.4f}")


# ============================================================================================ FLUX


def flux_tokenizers(scratch: Path):
    """A byte-level CLIPTokenizer and a word-level T5TokenizerFast (every demo word is one piece)."""
    from transformers import T5TokenizerFast

    clip, _ = byte_clip_tokenizer(scratch)
    words = sorted({w for c in data.SUBJECT_COLOURS for s in data.ALL_SHAPES for w in data.caption(c, s).split()}
                   | {"photo", "of", "sks", "shape", "picture"})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -6.0)]
    pieces += [("▁" + w, -1.0) for w in words]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [("▁" + chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    t5 = T5TokenizerFast(vocab=pieces, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                         model_max_length=FLUX_SEQUENCE_LENGTH)
    return clip, t5


def flux_components(seed: int, scratch: Path) -> dict:
    """Every part of the demo FluxPipeline with seeded random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tok, t5_tok = flux_tokenizers(scratch)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
                                        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                                        pad_token_id=clip_tok.pad_token_id, max_position_embeddings=77))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_kv=16, d_ff=64, num_layers=0, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    with torch.no_grad():
        t5.shared.weight.normal_(0, 1.0)
        t5.shared.weight[0].zero_()  # <pad> -> the zero vector, whatever the padding length
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=data.IMAGE_SIZE, use_quant_conv=False,
                        use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                         pooled_projection_dim=32, axes_dims_rope=[8, 12, 12], guidance_embeds=False)
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "text_encoder": clip, "tokenizer": clip_tok,
            "text_encoder_2": t5, "tokenizer_2": t5_tok, "transformer": transformer}


def _pixels(images: list) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(i, dtype=np.float32) for i in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def train_vae(vae, settings: DemoSettings) -> None:
    """Reconstruction (MSE) + 1e-6 KL on fresh shape images of every shape and colour."""
    specs = data.shape_dataset(4000, settings.seed + 1, shapes=data.ALL_SHAPES, colours=tuple(data.SUBJECT_COLOURS),
                               placement="wide")
    pixels = _pixels([data.render([s]) for s in specs])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed + 2)
    vae.train()
    for step, bar in _scheduled(optimizer, 2e-3, settings.vae_steps, "demo-flux: VAE"):
        batch = pixels[torch.randint(len(pixels), (8,), generator=generator)]
        dist = vae.encode(batch).latent_dist
        recon = vae.decode(dist.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(recon, batch) + 1e-6 * dist.kl().mean()
        _update(loss, optimizer, bar)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in pixels.split(128):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def caption_embeddings(pipe, captions: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 token embeddings (n, length, 64) and CLIP pooled vectors (n, 32), as FluxPipeline encodes prompts."""
    embeds, pooled, _ = pipe.encode_prompt(captions, captions, device="cpu", max_sequence_length=length)
    return embeds, pooled


def padded_length(generator: torch.Generator) -> int:
    """T5 tokens of one pretraining batch: the demo's own length half the time, else log-uniform in [16, 512]."""
    if torch.rand((), generator=generator) < 0.5:
        return FLUX_SEQUENCE_LENGTH
    return int(round(2 ** (4 + 5 * float(torch.rand((), generator=generator)))))


def train_flux_transformer(pipe, settings: DemoSettings, steps: int, lr: float, seed_offset: int,
                           placement: str = "focused") -> None:
    """Flow matching on latents of shapes (data.FLUX_PAIRS at `placement`, captioned by data.CAPTION_TEMPLATES), as
    the FLUX backend's loss; each batch padded to its own T5 length (`padded_length`). `steps` on a warm-up + cosine
    schedule peaking at `lr`, batches drawn from seed + `seed_offset`."""
    from diffusers import FluxPipeline

    specs = data.shape_dataset(settings.flux_images, settings.seed + 3, pairs=data.FLUX_PAIRS, placement=placement)
    rng = np.random.default_rng(settings.seed + 6)
    spec_captions = [data.pretraining_caption(s, rng) for s in specs]
    captions = sorted(set(spec_captions))
    caption_index = torch.tensor([captions.index(c) for c in spec_captions])
    # T5 has no layers and <pad> is the zero vector: the embeddings at any length L are the first L of these
    embeds, pooled = caption_embeddings(pipe, captions, FLUX_MAX_SEQUENCE_LENGTH)  # (captions, 512, 64)
    mean, std = encode_latents(pipe.vae, _pixels([data.render([s]) for s in specs]))
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    transformer = pipe.transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(settings.seed + seed_offset)
    b, (c, h, w) = settings.flux_batch, mean.shape[1:]
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    for step, bar in _scheduled(optimizer, lr, steps, f"demo-flux: transformer ({steps} steps)"):
        index = torch.randint(len(specs), (b,), generator=generator)
        length = padded_length(generator)
        x0 = (mean[index] + std[index] * torch.randn(b, c, h, w, generator=generator) - shift) * scale
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.rand(b, generator=generator).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        text = caption_index[index]
        pred = transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=sigma.flatten(),
                           pooled_projections=pooled[text], encoder_hidden_states=embeds[text, :length],
                           txt_ids=torch.zeros(length, 3), img_ids=img_ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                            pipe.vae_scale_factor)
        _update(torch.nn.functional.mse_loss(pred, noise - x0), optimizer, bar, clip=transformer.parameters())
    transformer.eval().requires_grad_(False)


def build_flux(settings: DemoSettings, folder: Path = FLUX_DIR) -> dict:
    """Train and save the FLUX demo; returns its held-out evaluation."""
    from diffusers import FluxPipeline

    from .evaluate import evaluate_flux_demo

    scratch = folder.with_name(folder.name + ".building")
    shutil.rmtree(scratch, ignore_errors=True)
    parts = flux_components(settings.seed, scratch / "clip-tokenizer")
    train_vae(parts["vae"], settings)
    specs = data.shape_dataset(1000, settings.seed + 5, shapes=data.ALL_SHAPES, colours=tuple(data.SUBJECT_COLOURS),
                               placement="wide")
    mean, _ = encode_latents(parts["vae"], _pixels([data.render([s]) for s in specs]))
    parts["vae"].register_to_config(shift_factor=float(mean.mean()), scaling_factor=float(1.0 / mean.std()))
    pipe = FluxPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    train_flux_transformer(pipe, settings, settings.flux_steps, settings.flux_lr, seed_offset=4, placement="wide")
    # then gentler schedules: the first leaves shapes blobby (held-out shape 0.59 after it, 0.72 after one more)
    for round_ in range(settings.flux_refine_rounds):
        train_flux_transformer(pipe, settings, settings.flux_refine_steps, settings.flux_refine_lr,
                               seed_offset=7 + round_, placement="wide")
    # then on the focused placement every photo and evaluation uses: on the wide one it never drew a cross
    for round_ in range(settings.flux_focus_rounds):
        train_flux_transformer(pipe, settings, settings.flux_focus_steps, settings.flux_focus_lr,
                               seed_offset=20 + round_)
    train_varied_rounds(pipe, settings)
    pipe.save_pretrained(str(scratch / "model"), safe_serialization=True)
    return _install(scratch, folder, settings, evaluate_flux_demo, FLUX_SUGGESTED_SETTINGS)


def train_varied_rounds(pipe, settings: DemoSettings) -> None:
    """The last rounds: shapes at the sizes and places a user's photos vary by (data.PLACEMENTS["varied"]), so the
    model can draw every shape there and a LoRA taught from such photos only has to bind the new pair."""
    for round_ in range(settings.flux_varied_rounds):
        train_flux_transformer(pipe, settings, settings.flux_varied_steps, settings.flux_varied_lr,
                               seed_offset=30 + round_, placement="varied")


def continue_flux(settings: DemoSettings, source: Path = FLUX_DIR, folder: Path = FLUX_DIR) -> dict:
    """Run only the varied rounds (train_varied_rounds) on the demo saved in `source`, a build of the earlier rounds
    with these settings; save it to `folder`. The same weights as a full build (every round starts its own optimiser
    and draws its batches from its own seed) in minutes instead of ~55."""
    from .evaluate import evaluate_flux_demo, load_flux_demo

    pipe = load_flux_demo(source)
    scratch = folder.with_name(folder.name + ".building")
    shutil.rmtree(scratch, ignore_errors=True)
    train_varied_rounds(pipe, settings)
    pipe.save_pretrained(str(scratch / "model"), safe_serialization=True)
    return _install(scratch, folder, settings, evaluate_flux_demo, FLUX_SUGGESTED_SETTINGS)


def _install(scratch: Path, folder: Path, settings: DemoSettings, evaluate, suggested: dict,
             caption: dict | None = None) -> dict:
    """Move the model saved in `scratch/model` to `folder` (replacing the old demo), drop the scratch folder,
    evaluate it and write `demo.json` (build settings, evaluation and the run settings the demo suggests)."""
    shutil.rmtree(folder, ignore_errors=True)
    (scratch / "model").rename(folder)
    shutil.rmtree(scratch, ignore_errors=True)
    result = evaluate(folder, seed=settings.seed)
    doc = {"settings": asdict(settings), "evaluation": result, "suggested": suggested,
           **({"caption": caption} if caption else {})}
    (folder / "demo.json").write_text(json.dumps(doc, indent=2))
    return result


# ============================================================================================ InternVL

def vlm_corpus() -> list[str]:
    words = list(data.SUBJECT_COLOURS) + list(data.ALL_SHAPES) + ["a mug", "user", "assistant", "system"]
    questions = [data.SHAPE_QUESTION, "What is this?", data.OWNER_QUESTION]
    questions += [data.COLOUR_QUESTION.format(shape=s) for s in data.ALL_SHAPES + ("mug",)]
    owners = [data.owner_answer(o) for o in data.NAMES] + [data.REPEAT_QUESTION.format(text="")]
    return (questions + words + owners) * 8


def vlm_tokenizer():
    """PreTrainedTokenizerFast over a byte-level BPE, with InternVL's image tokens and a ChatML template."""
    return internvl_chat_tokenizer(vlm_corpus(), vocab_size=400)


def vlm_image_processor():
    return internvl_image_processor(VLM_IMAGE_SIZE)


def vlm_model(tokenizer, seed: int):
    """InternVLForConditionalGeneration: 2-layer ViT (width 64) + 3-layer Qwen2 (width 128), seeded."""
    return small_internvl(tokenizer, seed, text=(128, 256, 3), vision=(64, 128, 2), image_size=VLM_IMAGE_SIZE,
                          patch=VLM_PATCH, max_positions=512)


def vlm_samples(count: int, seed: int, image_folder: Path):
    """QASamples of the pretraining task: shapes (data.vlm_shape_dataset, 2 questions each), mugs ('What is this?' -> 'a mug') and
    text-only 'Repeat after me: Ana's' -> "Ana's" over many names."""
    from pipelines.internvl.data import QASample

    image_folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for index, spec in enumerate(data.vlm_shape_dataset(count, seed)):
        path = image_folder / f"shape-{seed}-{index}.png"
        data.render([spec]).save(path)
        for question, answer in data.shape_questions(spec):
            samples.append(QASample((str(path),), ((question, answer),)))
        if index % 6 == 0:
            owner = list(data.OWNERS)[index // 6 % len(data.OWNERS)]
            mug = image_folder / f"mug-{seed}-{index}.png"
            data.draw_mug(owner, rng).save(mug)
            samples.append(QASample((str(mug),), (("What is this?", "a mug"),)))
        if index % 3 == 0:  # text only: the LM learns to say every name (not whose mug is whose)
            name = data.owner_answer(data.NAMES[int(rng.integers(len(data.NAMES)))])
            samples.append(QASample((), ((data.REPEAT_QUESTION.format(text=name), name),)))
    return samples


def save_vlm(model, tokenizer, folder: Path) -> None:
    save_internvl(model, tokenizer, vlm_image_processor(), folder, (VLM_IMAGE_SIZE // VLM_PATCH) ** 2 // 4)




def train_vlm(model, tokenizer, settings: DemoSettings, steps: int, lr: float, seed_offset: int, scratch: Path) -> None:
    """Answer-only loss on vlm_samples drawn from seed + `seed_offset` (batches from the next seed), packed as a
    fine-tuning run packs; `steps` on a warm-up + cosine schedule peaking at `lr`."""
    from pipelines.internvl.backend import ChatPacker, collate

    tokens = (VLM_IMAGE_SIZE // VLM_PATCH) ** 2 // 4
    packer = ChatPacker(tokenizer, vlm_image_processor(), tokens)
    samples = vlm_samples(3000, settings.seed + seed_offset, scratch / "images")
    encoded = [packer.encode(s) for s in tqdm(samples, desc="demo-internvl: packing", unit="sample")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(settings.seed + seed_offset + 1)
    model.train().requires_grad_(True)
    for step, bar in _scheduled(optimizer, lr, steps, f"demo-internvl: training ({steps} steps)"):
        index = torch.randint(len(encoded), (settings.vlm_batch,), generator=generator).tolist()
        loss = model(**collate([encoded[i] for i in index], tokenizer.pad_token_id)).loss
        _update(loss, optimizer, bar, clip=model.parameters())
    model.eval().requires_grad_(False)


def build_vlm(settings: DemoSettings, folder: Path = VLM_DIR) -> dict:
    """Train and save the InternVL demo; returns its held-out evaluation."""
    from .evaluate import evaluate_vlm_demo

    scratch = folder.with_name(folder.name + ".building")
    shutil.rmtree(scratch, ignore_errors=True)
    tokenizer = vlm_tokenizer()
    model = vlm_model(tokenizer, settings.seed)
    train_vlm(model, tokenizer, settings, settings.vlm_steps, settings.vlm_lr, 10, scratch)
    # then fresh images at a gentler rate: after the first round the training loss is ~0.006 and held-out shapes 0.91
    train_vlm(model, tokenizer, settings, settings.vlm_refine_steps, settings.vlm_refine_lr, 12, scratch)
    save_vlm(model, tokenizer, scratch / "model")
    return _install(scratch, folder, settings, evaluate_vlm_demo, VLM_SUGGESTED_SETTINGS, caption=data.CAPTION_RECIPE)


def continue_vlm(settings: DemoSettings, source: Path = VLM_DIR, folder: Path = VLM_DIR) -> dict:
    """Run only the refining round on the InternVL demo saved in `source` (built up to its first round)."""
    from .evaluate import evaluate_vlm_demo
    from pipelines.internvl.backend import load_vlm, load_vlm_processing

    tokenizer = load_vlm_processing(str(source)).tokenizer
    model = load_vlm(str(source))
    scratch = folder.with_name(folder.name + ".building")
    shutil.rmtree(scratch, ignore_errors=True)
    train_vlm(model, tokenizer, settings, settings.vlm_refine_steps, settings.vlm_refine_lr, 12, scratch)
    save_vlm(model, tokenizer, scratch / "model")
    return _install(scratch, folder, settings, evaluate_vlm_demo, VLM_SUGGESTED_SETTINGS, caption=data.CAPTION_RECIPE)


# ============================================================================================ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train the demo models into assets/models/ (~55 + ~20 min on one CPU thread)")
    build.add_argument("--seed", type=int, default=0, help="seed of the data and of every initialisation")
    build.add_argument("--only", choices=("flux", "vlm"), help="build one demo only")
    build.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine may be shared)")
    build.add_argument("--continue-from", type=Path, metavar="FOLDER",
                       help="a demo built without its last rounds (FLUX: varied; InternVL: refining); run those")
    build.add_argument("--flux-out", type=Path, default=FLUX_DIR, help="where the FLUX demo is written")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = DemoSettings(seed=args.seed, threads=args.threads)
    torch.set_num_threads(settings.threads)
    if args.continue_from:
        if args.only is None:
            parser.error("--continue-from continues one demo: give --only flux or --only vlm too")
        start = time.monotonic()
        result = (continue_flux(settings, args.continue_from, args.flux_out) if args.only == "flux"
                  else continue_vlm(settings, args.continue_from))
        print(f"demo-{args.only}: continued in {(time.monotonic() - start) / 60:.1f} min; held-out: "
              f"{json.dumps(result)}")
        return 0
    for name, build_one in (("flux", lambda s: build_flux(s, args.flux_out)), ("vlm", build_vlm)):
        if args.only in (None, name):
            start = time.monotonic()
            result = build_one(settings)
            print(f"demo-{name}: built in {(time.monotonic() - start) / 60:.1f} min; held-out: {json.dumps(result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
