"""VRAM planner (docs/method.md "Memory"): the peak GPU memory of every phase of an EMLoC run, before any download.

Input: a model built on the `meta` device (exact parameter counts, no weights) and an ArchitectureSpec
(how tokens flow through its block stacks), both read through emloc/architecture.py. Each phase's peak is a sum of named parts, each one formula
(b = bytes per element of the run's dtype, B = batch size, n = tokens per sample, h = width of the
residual stream, L = blocks in a stack, a = activation elements one block saves per token, r = LoRA rank):

  weights      b·P (full model); b·P_E for the emulator, P_E = P - Σ in·out + Σ k(in+out) over factored
               layers (k = rank_for_ratio; a layer stays dense at ratio 1 and when k(in+out) >= in·out, as
               build_emulator: rules.factored_rank);
               QLoRA: NF4_BYTES per element of each quantised linear weight, b for every other parameter;
               streamed: b·(largest block, or largest module outside the blocks), the rest on the CPU
  lora, grads  ADAPTER_BYTES·r(in+out) per LoRA target each (PEFT keeps adapters in float32)
  optimizer    adamw 8 per element; adamw8bit 2 + 8/256 (tensors under 4096 elements: 8); adafactor
               4·(rows + cols) per matrix; its step: adamw's foreach temporaries 4·P_lora
  activations  per block and token s = a·b + 4·a32 + ADAPTER_BYTES·Σ(in + r)/streams over the block's LoRA
               targets (PEFT casts each LoRA input to float32 and saves it and x·Aᵀ; a float32 model's LoRA
               saves the base layer's own input: targets reading one tensor count it once, see lora_input_groups);
               no checkpointing: Σ B·n·L·s; checkpointing: Σ B·n·L·h·b (block inputs) + max B·n·s (one block
               recomputed) + B·n·(rotary cos/sin every checkpoint holds, once); backward (one block): the
               gradients of a block's widest tensor, 2·B·n·w·b (w: its elements per token, the MLP hidden)
  logits       B·n·V·LOSS_BYTES_PER_LOGIT for a model with an LM head (V = vocabulary)
  overhead     runtime_overhead: CUDA context + caching-allocator slack (5% of the rest, >= 0.5 GiB), in every total

Phases (EMLoC): calibration = weights + one block's forward B·n·((a + h)·b + 4·a32) + the LM head's logits B·n·V·b
+ a layer's Gram 4·(in² + B·n·in) (with stats_on_gpu every layer's 4·in² and the largest Gram); emulator = the worst factored layer (float32, its eighs float64: _construction);
training = weights (emulator) + lora + grads + optimizer + max(activations + logits, optimizer step);
correction = the worst LoRA target, full and emulator layer with float32 copies, + the adapter twice;
preview = weights + adapter + one block's working set n·((a + h)·b + 4·a32) + KV cache + last token's logits;
streamed (files or offload), every variant, the emulator too, holds one block at a time (the run reads the
next one ahead, and keeps blocks between forwards, only in what the budget leaves beyond this plan).
FLUX's prompt encoders run in their own phase (embeddings: the cache, and preview prompts typed later), streamed,
beside the VAE, before any transformer is on the device; the preview keeps the VAE beside the transformer and adds
its decode's working set b·6·c·H·W (c: the VAE's first channels), as a training sample round does. Training also
holds one step's batch of cached prompt embeddings.
Emulator kinds (MemorySettings.emulator_kind, emloc/quantized.py): every term above that holds the emulator's
layers counts each stand-in as stored (stand_in_bytes): "lowrank" b·k(in+out); "nf4" the whole weight in 4 bits,
in·out/2 + b·in·out/64 (codes + one absmax per 64, in the model's dtype); "lowrank-nf4" both factors in 4 bits. The
4-bit kinds add the dequantised working set of one layer (dequant_bytes: its weight in the compute dtype, b·in·out on
a GPU with bitsandbytes' kernel; on the CPU the float32 values and their scaled copy, 8·in·out), held while that one
layer runs forward or backward (the weight is dequantised again in backward, never saved). Their construction
quantises (float32 copies, 4·in·out each) after the same statistics; nf4 needs no factorisation.
Alternatives: LoRA and QLoRA training on the full model, plain inference (preview without adapter, whole).
`allocated` (total minus overhead) is what torch.cuda.max_memory_allocated measures.
device="cpu" plans the RAM peak of a run on the CPU (benchmarks/memory.py checks it): one memory holds what a GPU
run splits between GPU and host (no offload; calibration sums as with stats_on_gpu; emulator construction also
holds the loaded statistics and the factors built so far), and there is no CUDA overhead.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .factorize import GRAM_CHUNK
from .quantized import check_kind, nf4_bytes
from .rules import check_ratio, factored_rank, normalise_rules
from .architecture import (ArchitectureSpec, BlockStack, LinearShape, ModelSummary, emulator_ranks, first_match,
                           lora_targets, summarize)

GiB = 1024 ** 3
# The runtime overhead of a GPU phase: what the process holds on the device beyond max_memory_allocated. Set from
# published figures, NOT measured (no GPU was lent to this project when it was set); benchmarks/gpu_check.py
# prints the held-vs-planned figures where a GPU is available, and these constants are what to correct from it.
# - CUDA context: 287 MB with lazy module loading vs 667 MB eager for torch's kernels alone (pytorch/pytorch
#   PR #86509, which made LAZY torch's default); ~0.7-0.8 GiB on the first CUDA call on older stacks (PyTorch
#   forum, "High gpu memory overhead" / "pytorch's GPU memory floor": 723-800 MiB); cuBLAS / cuDNN kernel images
#   load into it as they are first used. 0.75 GiB covers the eager figure and the libraries a training step loads.
# - Caching-allocator slack (reserved but unallocated): a published OOM report shows 1.22 GiB reserved-unallocated
#   beside 33.29 GiB allocated (3.7%); the review of the GPU path (reviews/gpu-path.md F9) estimates 0.3-2 GiB for a
#   checkpointed training loop. Planned as 5% of the phase's allocated peak, at least 0.5 GiB; the run turns on
#   expandable_segments, which lowers it.
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
ALLOCATOR_SLACK_FRACTION = 0.05
ALLOCATOR_SLACK_MIN_BYTES = GiB // 2
RUNTIME_OVERHEAD_BYTES = CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK_MIN_BYTES  # the least any GPU phase adds
ADAPTER_BYTES = 4  # PEFT's autocast_adapter_dtype keeps LoRA weights (and so grads) in float32
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + float32 per 256 absmax (double quant)
# transformers' loss upcasts the logits to float32; at the peak (backward through log-softmax) the float32
# log-softmax output it saved, the grad of that output and the grad of its input exist at once, each 4 bytes.
# The logits themselves (b) are gone by then: the training loss keeps only `.loss` of the model's output, and
# neither the upcast nor the head saves them. Measured (malloc in-use, CPU, V = 151 674): 12.2 bytes per logit
# in float32, 12.0 in bfloat16.
LOSS_BYTES_PER_LOGIT = 12
ADAM8BIT_MIN_ELEMENTS = 4096  # bitsandbytes keeps 32-bit state for smaller tensors
ADAM8BIT_BLOCK = 256  # bitsandbytes 8-bit state: one float32 absmax per 256 elements, per state
FACTOR_BYTES = 4  # emulator construction and correction compute in float32
# a float64 n x n matrix and its eigh (eigenvectors + LAPACK workspace), in float32 elements per n²: measured
# 12.8 on the CPU (torch 2.13, malloc in use, output_gram_factors on 4096 -> 1024 and 2048 -> 2048 layers)
EIGH64 = 13
# Host memory of the process itself (Python, torch, diffusers / transformers imported, no model): measured 0.39 GiB
# on this CPU (benchmarks/streaming.py, "a process that only imports the stack"). A CUDA process also maps the
# CUDA libraries and keeps pinned staging buffers; that part is an assumption, not measured here (no GPU lent).
HOST_RUNTIME_CPU = int(0.40 * 1024 ** 3)
# What the process's RSS holds beyond the live allocations of a phase that is not streamed (training, a whole
# preview): glibc keeps freed heap memory for reuse (and per-thread arenas), and these phases never trim it (the
# streamed ones call malloc_trim after each block). Measured on this CPU (benchmarks/streaming.py and a 20 ms
# RSS/mallinfo2 sampler around `launch.py train --stages X`, FLUX width 1024): at the training peak the heap held
# 146 MiB freed beside 722 MiB in use (4+8 blocks), 43 beside 325 (1+2); RSS exceeded the runtime + the plan's
# live parts by 16-34% of those parts in training and 20-21% in previews, whole or streamed (benchmarks/README.md,
# "Host budget"). A fraction of the phase's other host parts; the streamed calibration, emulator construction and
# correction trim after each block and stay under their plan without it.
HOST_HEAP_SLACK = 0.35
HOST_RUNTIME_CUDA = int(1.5 * 1024 ** 3)
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
PHASES = ("embeddings", "calibration", "emulator", "training", "correction", "preview")  # embeddings: prompt encoders
METHODS = ("emloc", "lora", "qlora", "inference")
DEVICES = ("cuda", "cpu")


def _setting(default, help_text: str):
    """A settings field whose help text the CLI and the app show."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class MemorySettings:
    """The shape of a run, as far as memory is concerned."""

    dtype: str = _setting("bfloat16", "dtype of the weights: bfloat16, float16 or float32")
    ratio: float = _setting(0.45, "fraction of parameters kept in the compressed layers, in (0, 1]; 1 keeps them dense")
    rules: tuple = _setting((), "explicit (regex, ratio) rules; empty: the model's default layers at --ratio")
    lora_rank: int = _setting(16, "LoRA rank r")
    lora_targets: tuple = _setting((), "regexes of the layers LoRA trains; empty: the model's default")
    optimizer: str = _setting("adamw", "adamw, adamw8bit or adafactor")
    batch_size: int = _setting(1, "training samples per step")
    seq_len: int = _setting(2048, "VLM: tokens per sample, image tokens included")
    image_tiles: int = _setting(7, "VLM: 448x448 tiles per sample (256 LLM tokens each)")
    resolution: int = _setting(512, "FLUX: training and preview image side in pixels")
    text_tokens: int = _setting(0, "FLUX: T5 tokens per prompt (0: the model's own, 512 for [dev])")
    gradient_checkpointing: bool = _setting(True, "recompute each block in backward")
    offload: bool = _setting(True, "full-model phases read one block at a time from the checkpoint's files "
                                   "(the run machine's streaming); False: they hold the whole model")
    calibration_samples: int = _setting(16, "calibration batches; a streamed pass keeps all their hidden states")
    keep_statistics: bool = _setting(False, "the run folder keeps every layer's Σxᵀx (the two-step path)")
    keep_checkpoints: int = _setting(2, "training checkpoints kept in the run folder")
    samples: bool = _setting(True, "training samples from the emulator + LoRA between steps (--sample-every)")
    calibration_batch_size: int = _setting(1, "samples per calibration batch")
    stats_on_gpu: bool = _setting(False, "keep calibration sums (4·in² bytes per layer) on the GPU")
    generate_tokens: int = _setting(256, "VLM preview: new tokens generated per answer")
    device: str = _setting("cuda", "cuda: the GPU's peak; cpu: the process's RAM peak (one memory holds everything)")
    emulator_kind: str = _setting("lowrank", "lowrank, nf4 or lowrank-nf4: how the emulator stores the compressed "
                                             "layers (emloc/quantized.py)")


@dataclass
class ParamCounts:
    full: int  # P
    emulator: int  # P_E
    lora: int  # P_lora = Σ r(in + out) over LoRA targets
    factored_layers: int  # target layers replaced by factors
    dense_layers: int  # target layers kept dense (ratio 1, or factors would not be smaller)
    quantised: int  # elements QLoRA stores in NF4
    emulator_bytes: int = 0  # the emulator's weights as its kind stores them (stand_in_bytes; the rest at b)
    dequantised: int = 0  # the largest one-layer dequantised working set of a 4-bit kind (0 for lowrank)


@dataclass
class PhaseEstimate:
    """The predicted peak of one phase of one method, as named parts in bytes."""

    phase: str
    method: str
    parts: dict[str, int]
    streamed: bool = False  # the full model is read from its files one block at a time
    note: str = ""
    host: dict[str, int] = field(default_factory=dict)  # host RAM (the process's resident memory), named parts
    offloaded: bool = False  # (streamed) the whole model waits in host RAM, each block moved to the GPU as it runs

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated would show: the total without the runtime overhead."""
        return self.total - self.parts.get("overhead", 0)

    @property
    def host_total(self) -> int:
        """The process's peak resident host memory (on a CPU run: the same memory as `total`, plus the runtime)."""
        return sum(self.host.values())


@dataclass
class MemoryPlan:
    settings: MemorySettings
    counts: ParamCounts
    estimates: list[PhaseEstimate]
    cpu_stats_bytes: int  # calibration sums Σ 4·in² held on the CPU at once (the two-step path only)
    run_folder: dict[str, int] = field(default_factory=dict)  # what the run folder holds on disk, named parts
    preview_offloaded: PhaseEstimate | None = None  # a GPU run's third preview choice (None on a CPU, or whole)

    @property
    def run_folder_bytes(self) -> int:
        return sum(self.run_folder.values())

    def get(self, phase: str, method: str) -> PhaseEstimate | None:
        return next((e for e in self.estimates if e.phase == phase and e.method == method), None)

    def peak(self, method: str) -> PhaseEstimate:
        return max((e for e in self.estimates if e.method == method), key=lambda e: e.total)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a floating dtype given by name ("bfloat16")."""
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as bfloat16, float16 or float32; got {dtype!r}")
    return torch.finfo(value).bits // 8


def optimizer_state_bytes(rows: int, cols: int, optimizer: str) -> int:
    """Optimiser state of one (rows x cols) float32 trainable tensor."""
    n = rows * cols
    if optimizer == "adamw":
        return 8 * n  # exp_avg + exp_avg_sq in float32
    if optimizer == "adamw8bit":
        return 8 * n if n < ADAM8BIT_MIN_ELEMENTS else 2 * n + 2 * 4 * math.ceil(n / ADAM8BIT_BLOCK)
    if optimizer == "adafactor":
        return 4 * (rows + cols) if min(rows, cols) > 1 else 4 * n  # factored second moment, no momentum
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")


def stream_tokens(arch: ArchitectureSpec, s: MemorySettings) -> dict[str, int]:
    """Tokens per sample of each stream: flux (H/16)(W/16) image + text; vlm seq_len text, tiles x tile vision."""
    if arch.family == "flux":
        side = math.ceil(s.resolution / arch.pixels_per_token)
        image = side * side
        text = s.text_tokens or arch.text_tokens
        return {"image": image, "text": text, "all": image + text}
    if s.seq_len < s.image_tiles * arch.image_tokens_per_tile:
        raise ValueError(f"seq_len {s.seq_len} cannot hold {s.image_tiles} image tiles of {arch.image_tokens_per_tile} "
                         f"tokens; raise --seq-len or lower --image-tiles")
    return {"text": s.seq_len, "all": s.seq_len, "vision": s.image_tiles * arch.vision_tokens_per_tile}


def check_settings(s: MemorySettings) -> None:
    """Raise a ValueError naming the first bad setting."""
    check_ratio(s.ratio, "--ratio")
    dtype_bytes(s.dtype)
    optimizer_state_bytes(1, 1, s.optimizer)
    for name in ("lora_rank", "batch_size", "seq_len", "resolution", "calibration_batch_size"):
        if not isinstance(getattr(s, name), int) or getattr(s, name) < 1:
            raise ValueError(f"{name} must be a positive integer; got {getattr(s, name)!r}")
    if s.calibration_samples < 1 or s.keep_checkpoints < 0:
        raise ValueError("calibration_samples must be >= 1 and keep_checkpoints >= 0")
    if s.image_tiles < 0 or s.generate_tokens < 0:
        raise ValueError("image_tiles and generate_tokens must be >= 0")
    if s.device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {s.device!r}")
    check_kind(s.emulator_kind, "emulator_kind")


@dataclass
class _Run:
    """Quantities every phase formula of one plan shares."""

    summary: ModelSummary
    arch: ArchitectureSpec
    s: MemorySettings
    b: int  # bytes per element of the run's dtype
    tokens: dict[str, int]
    ranks: dict[str, int]  # compression targets -> k (0: kept dense)
    targets: list[LinearShape]  # LoRA targets
    counts: ParamCounts
    stand_ins: dict[str, int] = field(default_factory=dict)  # compression targets -> bytes of their stand-in

    def tokens_of(self, lin: LinearShape) -> int:
        stack = next((st for st in self.arch.stacks if st.name == lin.stack), None)
        return self.tokens[stack.tokens] if stack else self.tokens["all"]


def runtime_overhead(allocated: float) -> int:
    """What a GPU phase holds beyond `allocated` (max_memory_allocated): the CUDA context and the caching
    allocator's reserved-but-unallocated slack, max(ALLOCATOR_SLACK_MIN_BYTES, ALLOCATOR_SLACK_FRACTION·allocated)."""
    return CUDA_CONTEXT_BYTES + max(ALLOCATOR_SLACK_MIN_BYTES, int(math.ceil(ALLOCATOR_SLACK_FRACTION * allocated)))


def _estimate(phase: str, method: str, parts: dict[str, float], streamed: bool = False, note: str = "") -> PhaseEstimate:
    clean = {k: int(math.ceil(v)) for k, v in parts.items() if v}
    return PhaseEstimate(phase, method, {**clean, "overhead": runtime_overhead(sum(clean.values()))}, streamed, note)


def _full_weights(run: _Run, offload: bool) -> dict[str, float]:
    """b·P whole, or b·(largest block or module) when the model streams from the CPU."""
    return {"weights (one block)": run.b * run.summary.largest_piece} if offload else {"weights": run.b * run.summary.params}


def _resident_components(run: _Run) -> list:
    """Run-once models the calibration and preview phases load (VAE, FLUX.1's encoders): not the prompt encoders,
    whose embeddings the run computed once into its cache."""
    return [c for c in run.arch.components if not c.prompt_encoder]


def _prompt_embeddings(run: _Run, method: str) -> PhaseEstimate | None:
    """The prompt encoder's one pass over the run's prompts (text_tokens each): EMLoC reads it block by block from
    its files when the run streams (b·largest block), the others hold it whole (QLoRA in NF4, as a 4-bit text
    encoder); plus one block's working set, w·tokens. None: the model has no prompt encoder."""
    encoders = [c for c in run.arch.components if c.prompt_encoder]
    if not encoders:
        return None
    c = max(encoders, key=lambda e: e.params)
    streamed = run.s.offload and method == "emloc"
    if method == "qlora":
        weights = {f"weights ({c.name}, NF4)": NF4_BYTES * c.params}
    elif streamed:  # the streamed model keeps what is outside its blocks (embeddings, LM head) loaded throughout
        weights = {f"weights ({c.name}, outside the blocks + one block)": run.b * (c.streamed_params or c.largest_piece)}
    else:
        weights = {f"weights ({c.name})": run.b * c.params}
    # the smaller encoders (FLUX.1's CLIP) whole beside it; the VAE encodes the photos in the same stage
    weights.update({f"weights ({o.name})": run.b * o.params for o in encoders if o is not c})
    weights.update({f"weights ({o.name})": run.b * o.params for o in _resident_components(run)})
    tokens = run.s.batch_size * (run.s.text_tokens or run.arch.text_tokens)
    activations = {f"activations ({c.name})": run.b * c.working_per_token * tokens,
                   "working set (VAE encode)": _decode_working_set(run)}
    return _estimate("embeddings", method, {**weights, **activations}, streamed,
                     "prompt embeddings computed once into the run's cache; the encoders are then freed")


def _component_peak(run: _Run, offload: bool, pixels: int) -> dict[str, float]:
    """The largest run-once model (text encoder, VAE) resident on its own, with its decode working set."""
    best: dict[str, float] = {}
    for c in _resident_components(run):
        parts = {f"weights ({c.name}{', one block' if offload else ''})": run.b * (c.largest_piece if offload else c.params),
                 f"working set ({c.name})": run.b * c.transient_per_pixel * pixels}
        if sum(parts.values()) > sum(best.values()):
            best = parts
    return best


def _decode_working_set(run: _Run) -> float:
    """The VAE decode's working set at the run's resolution (b · live elements per pixel · pixels); 0 without one."""
    if run.arch.family != "flux":
        return 0
    return max((run.b * c.transient_per_pixel * run.s.resolution ** 2 for c in _resident_components(run)), default=0)


def _step_inputs(run: _Run) -> float:
    """One training step's batch of cached prompt embeddings on the device, b·B·text tokens·width (the cache itself
    stays on the host)."""
    return run.b * run.s.batch_size * run.tokens.get("text", 0) * run.arch.text_width


def _lora_terms(run: _Run) -> tuple[int, int, int]:
    """(adapter bytes, optimiser state bytes, optimiser-step temporaries) of the LoRA targets."""
    shapes = tuple((t.in_features, t.out_features) for t in run.targets)
    state, step = _optimizer_terms(shapes, run.s.lora_rank, run.s.optimizer)
    return ADAPTER_BYTES * run.counts.lora, state, step


@functools.lru_cache(maxsize=64)
def _optimizer_terms(shapes: tuple[tuple[int, int], ...], r: int, optimizer: str) -> tuple[int, int]:
    tensors = [(r, i) for i, _ in shapes] + [(o, r) for _, o in shapes]  # A: r x in, B: out x r
    state = sum(optimizer_state_bytes(rows, cols, optimizer) for rows, cols in tensors)
    step = {"adamw": 4 * sum(a * b for a, b in tensors), "adafactor": 2 * 4 * max(a * b for a, b in tensors)}
    return state, step.get(optimizer, 0)


def activation_bytes_per_token(stack: BlockStack, b: int, lora_bytes: int = 0) -> float:
    """s = a·b + 4·a32 + lora_bytes/streams: what one block saves per token for backward, where lora_bytes =
    ADAPTER_BYTES·Σ(in + r) over the block's LoRA targets."""
    return stack.saved_per_token * b + 4 * stack.saved_fp32_per_token + lora_bytes / stack.streams


def _shared_lora_inputs(run: _Run) -> set[str]:
    """Float32 models: LoRA targets whose input is already counted (measured with saved-tensor hooks, a float32
    FLUX or Qwen2 block saves 20-30% less than Σ(in + r) per target would say: q/k/v read one tensor, and the
    attention output that o_proj reads is the one SDPA saved)."""
    groups = [re.compile(p) for p in run.arch.lora_input_groups]
    saved = [re.compile(p) for p in run.arch.lora_inputs_saved]
    seen, shared = set(), set()
    for t in run.targets:
        if not t.block:
            continue
        tail = t.name[len(t.block) + 1:]
        if any(p.fullmatch(tail) for p in saved):
            shared.add(t.name)
            continue
        group = next((i for i, p in enumerate(groups) if p.fullmatch(tail)), None)
        if group is not None:
            if (t.block, group) in seen:
                shared.add(t.name)
            seen.add((t.block, group))
    return shared


def _training_activations(run: _Run) -> dict[str, float]:
    """Activations of forward + backward; a stack saves them when it or an earlier stack holds LoRA targets."""
    s, b, arch = run.s, run.b, run.arch
    per_block: dict[str, int] = {}  # block -> ADAPTER_BYTES·Σ(in + r) over its LoRA targets
    shared = _shared_lora_inputs(run) if b == ADAPTER_BYTES else set()
    for t in run.targets:
        if t.block:
            inputs = 0 if t.name in shared else t.in_features
            per_block[t.block] = per_block.get(t.block, 0) + ADAPTER_BYTES * (inputs + s.lora_rank)
    lora: dict[str, int] = {}
    for block, size in per_block.items():
        stack = run.summary.block_stack[block]
        lora[stack] = max(lora.get(stack, 0), size)
    outside = any(t.stack is None for t in run.targets)
    first = 0 if outside else next((i for i, st in enumerate(arch.stacks) if st.name in lora), len(arch.stacks))
    stored = recompute = frozen = backward = 0
    for i, st in enumerate(arch.stacks):
        n, blocks = s.batch_size * run.tokens[st.tokens], run.summary.blocks_in(st.name)
        per_token = activation_bytes_per_token(st, b, lora.get(st.name, 0))
        if i < first:
            frozen = max(frozen, n * per_token)  # no grad: one block's working set at a time
            continue
        if s.gradient_checkpointing:
            stored += n * blocks * st.hidden * b
            recompute = max(recompute, n * per_token)
        else:
            stored += n * blocks * per_token
        # backward through a block holds the gradient of its widest tensor and the one it is turned into (FLUX
        # single block: d(attention ‖ MLP hidden), then d(MLP pre-activation)) while the block's saved tensors
        # still live. Measured (malloc in-use, float32, 1 + 1 FLUX blocks): the step peaks there, 0.11 / 0.20 GiB
        # above the other terms at 256 / 512 px; this term is 0.06 / 0.15 of it (the rest does not grow with n)
        backward = max(backward, 2 * n * st.widest_per_token * b)
    if s.gradient_checkpointing and stored:  # measured: 10% of the checkpoints' inputs in a 2-layer Qwen2 of width 64
        stored += s.batch_size * run.tokens["all"] * (arch.shared_per_token * b + 4 * arch.shared_fp32_per_token)
    logits = s.batch_size * run.tokens["all"] * arch.vocab_size * LOSS_BYTES_PER_LOGIT
    if frozen > stored + recompute + logits:
        return {"activations (frozen forward)": frozen}
    # The loss's backward through the logits ends before the first block is recomputed and back-propagated, so the
    # two transients never coexist: the larger counts (traced on InternVL3-8B/38B, tests/test_trace.py: the sum was
    # 1.2-2.5 GiB above the run's peak)
    transient = {"recompute one block": recompute, "backward (one block)": backward}
    if logits > recompute + backward:
        transient = {"logits": logits}
    return {"activations": stored, **transient}


def _training(run: _Run, method: str, weights: dict[str, float]) -> PhaseEstimate:
    """Weights, LoRA, grads and optimizer state, plus the largest of: the step's activations, the optimizer step,
    and (EMLoC, with samples) a sampling round between steps: the text encoders and VAE loaded beside the model
    and one inference forward (the grads are freed by then, set_to_none)."""
    adapter, state, step = _lora_terms(run)
    activations = _training_activations(run)
    parts = {**weights, "lora": adapter, "grads": adapter, "optimizer": state, "inputs (the step's batch)": _step_inputs(run)}
    sampling: dict[str, float] = {}
    if method == "emloc" and run.s.samples:
        # FLUX.1 and FLUX.2 sample from the cached prompt embeddings: of their run-once models only the VAE is built
        # (the prompt encoders never share the device with the transformer: _resident_components).
        # Its decode runs after the last denoising step, but the blocks the transformer's forward freed stay in the
        # caching allocator, sized for it, so both count (as in the preview, _with_components)
        sampling = {f"sampling: weights ({c.name})": run.b * c.params for c in _resident_components(run)}
        sampling["sampling: activations"] = sum(_inference_activations(run, lora=False).values())
        sampling["sampling: VAE decode"] = _decode_working_set(run)
    if sum(sampling.values()) - adapter > max(sum(activations.values()), step):
        parts.pop("grads")  # a round runs after zero_grad(set_to_none=True): no grads then
        parts.update(sampling)
    else:
        parts.update(activations if sum(activations.values()) >= step else {"optimizer step": step})
    return _estimate("training", method, parts)


def _inference_activations(run: _Run, lora: bool) -> dict[str, float]:
    """One sample forward without grad: the largest block's working set (bounded by a), the hidden state,
    the KV cache of a generated answer and the last token's logits."""
    b, s = run.b, run.s
    working = max(run.tokens[st.tokens] * ((st.saved_per_token + st.hidden) * b + 4 * st.saved_fp32_per_token)
                  for st in run.arch.stacks)
    kv = sum(st.kv_per_token * run.summary.blocks_in(st.name) * (run.tokens[st.tokens] + s.generate_tokens)
             for st in run.arch.stacks) * b
    return {"activations": working, "kv cache": kv, "logits": run.arch.vocab_size * (b + 4),
            "lora": ADAPTER_BYTES * run.counts.lora if lora else 0}


def _with_components(run: _Run, phase: str, method: str, model: dict[str, float], offload: bool) -> PhaseEstimate:
    """The larger of the trained model's peak and any run-once model's alone. A preview pipeline decodes with every
    model in `model` still resident (FluxPipeline keeps its encoders and the transformer's rest on the GPU), so the
    VAE decode's working set is added to them: a sum, not the larger of the two. It is added to the transformer's
    inference activations too: those are freed after the last denoising step, but the caching allocator keeps
    their blocks, sized for them, reserved."""
    if phase == "preview":
        model = {**model, "working set (VAE decode)": _decode_working_set(run)}
    encoders = _component_peak(run, offload, run.s.resolution ** 2 if run.arch.family == "flux" else 0)
    if sum(encoders.values()) > sum(model.values()):
        return _estimate(phase, method, encoders, offload, "peak while a text encoder or the VAE runs")
    return _estimate(phase, method, model, offload)


def _calibration(run: _Run) -> PhaseEstimate:
    s, b = run.s, run.b
    bc = s.calibration_batch_size
    forward = max(bc * run.tokens[st.tokens] * ((st.saved_per_token + st.hidden) * b + 4 * st.saved_fp32_per_token)
                  for st in run.arch.stacks)
    layers = [lin for lin in run.summary.linears if run.ranks.get(lin.name)]  # kept layers get no statistics
    if not layers:  # every layer kept (ratio 1): calibration never runs a batch
        stats = {}
    elif s.stats_on_gpu:  # measured on the CPU (one memory): the sums, plus the gram of the layer being added
        # (collect_input_stats keeps the last gram for q/k/v, so it outlives its addition to the sum)
        stats = {"statistics (all layers)": sum(4 * lin.in_features ** 2 for lin in layers),
                 "gram (one layer)": max(4 * lin.in_features ** 2 for lin in layers)}
    else:  # one layer's gram xᵀx (in x in) and the float32 copy of its input (tokens x in), then moved to the CPU
        stats = {"statistics (one layer)": max(4 * (lin.in_features ** 2 + bc * run.tokens_of(lin) * lin.in_features)
                                               for lin in layers)}
    # a plain forward (the backends' calibration_forward) computes the LM head's logits for every token: measured
    # 0.29 GiB of a 3.5 GiB InternVL peak at 512 tokens (float32), 0.58 GiB in bf16 at 2048 tokens
    logits = bc * run.tokens["all"] * run.arch.vocab_size * b
    model = {**_full_weights(run, s.offload), "activations": forward, "logits": logits, **stats}
    return _with_components(run, "calibration", "emloc", model, s.offload)


def _construction(run: _Run) -> PhaseEstimate:
    """Per factored layer, with the default "gram" solver (float32 elements; every eigh is float64, see
    emloc/factorize.py): a float64 n x n matrix and its eigh hold EIGH64·n². A layer with out > in is whitened
    (float64 C and its eigh, EIGH64·in²), then factored: S (in²), W S (2·in·out while it is formed; 3 on a GPU, whose
    "split" Gram holds W S with unit-norm columns too), the float64
    Mᵀ M and its eigh, k(in+out); a layer with out <= in is never whitened (factorize.output_gram_factors): the
    float64 W C Wᵀ formed in GRAM_CHUNK blocks, then its eigh, EIGH64·out² + k(in+out).
    The error check holds W_E, W - W_E, (W - W_E)·C and its product with W - W_E: 4·in·out. On a GPU both also hold
    the statistics moved from the host (in²) and the layer's own weight, b·in·out; on the CPU those are the ones
    already counted. ("full" and "randomized" whiten every layer: up to EIGH64·in² for wide layers.)"""
    cpu = run.s.device == "cpu"
    worst = factors = 0
    for lin in run.summary.linears:
        k = run.ranks.get(lin.name, 0)
        if not k:
            continue
        i, o = lin.in_features, lin.out_features
        sq, io = i * i, i * o
        own = 0 if cpu else run.b * io  # on the CPU the layer's weight is the one already counted in "weights"
        moved = 0 if cpu else sq  # the statistics, moved from the host for the factorisation and the error check
        if run.s.emulator_kind == "nf4":  # no factorisation: the quantisation's float32 copies, then the error check
            factoring = moved + 4 * io
        elif o > i:  # whitening's EIGH64·in² is always below what follows it; on a GPU with slow float64 the
            # "split" Gram (factorize._gram) also holds W S with unit-norm columns: one more in·out
            factoring = sq + (2 if cpu else 3) * io + EIGH64 * sq + k * (i + o)
        else:
            chunk = min(GRAM_CHUNK, i)
            forming = 2 * o * o + 4 * o * chunk + 2 * chunk * chunk  # float64 W C Wᵀ, (W C) block, W and C blocks
            factoring = moved + max(forming, EIGH64 * o * o) + k * (i + o)
        worst = max(worst, FACTOR_BYTES * max(factoring, moved + 4 * io) + own)
        factors += run.stand_ins.get(lin.name, run.b * k * (i + o))
    model = {} if run.s.offload else {"weights": run.b * run.summary.params}
    if cpu:  # what a GPU run keeps in host RAM shares the one memory: the loaded statistics and the factors so far
        model.update({"statistics (all layers)": sum(4 * (lin.in_features ** 2) for lin in run.summary.linears
                                                     if run.ranks.get(lin.name)),
                      "factors built": factors})
    return _estimate("emulator", "emloc", {**model, "factorisation (one layer)": worst}, run.s.offload)


def _correction(run: _Run) -> PhaseEstimate:
    """Per LoRA target: the full layer and the emulator layer, and the float32 copy of the larger of the two (each
    model's layer is applied in turn, its copy freed before the other's: correction._apply_without_bias). Streamed,
    the adapter and its corrected copy stay on the host (read_adapter reads them there; only one layer's pair moves);
    the whole-model path counts them on the device. Checked by tests/test_trace.py against the traced code."""
    b, worst, copies = run.b, 0, 0
    for t in run.targets:
        io, k = t.in_features * t.out_features, run.ranks.get(t.name, 0)
        emu = k * (t.in_features + t.out_features) if k else io
        # float32 layers on the compute device: .to(float32) returns them as they are (measured on the CPU: no copies)
        copy = 0 if b == FACTOR_BYTES else FACTOR_BYTES * max(io, emu)
        if t.name in run.stand_ins and run.s.emulator_kind != "lowrank":  # a 4-bit stand-in: its dequantised copy
            copy = max(copy, dequant_bytes(emu if k and run.s.emulator_kind == "lowrank-nf4" else io, 4, run.s.device))
        stored = run.stand_ins.get(t.name, b * emu)
        worst = max(worst, b * io + stored + copy)
        copies = max(copies, copy)
    adapter = {"adapter + corrected copy": 2 * ADAPTER_BYTES * run.counts.lora}
    if run.s.offload:
        return _estimate("correction", "emloc", {"layers (one of each model)": worst}, True)
    both = {"weights (full + emulator)": b * run.counts.full + run.counts.emulator_bytes, "float32 layer copies": copies}
    return _estimate("correction", "emloc", {**both, **adapter})


def _block_terms(run: _Run) -> dict[str, dict[str, float]]:
    """Per block: weights b·P_block, its layers' statistics Σ 4·in² (factored layers only: kept ones are never
    measured), the factors it is replaced by, and its largest weight (what one read holds)."""
    terms: dict[str, dict[str, float]] = {name: {"weights": run.b * params, "statistics": 0, "factors": 0, "tensor": 0}
                                          for name, params in run.summary.blocks.items()}
    for lin in run.summary.linears:
        if lin.block not in terms:
            continue
        t, k = terms[lin.block], run.ranks.get(lin.name, 0)
        t["tensor"] = max(t["tensor"], run.b * lin.in_features * lin.out_features)
        if k:
            t["statistics"] += 4 * lin.in_features ** 2
        if k or lin.name in run.stand_ins:  # what the block is replaced by, as the kind stores it
            t["factors"] += run.stand_ins.get(lin.name, run.b * k * (lin.in_features + lin.out_features))
    return terms


def _outside_blocks(run: _Run) -> int:
    """b·(parameters outside every block): embeddings, final norm, LM head; what a streamed forward keeps loaded."""
    return run.b * (run.summary.params - sum(run.summary.blocks.values()))


def _streamed_pass(run: _Run) -> tuple[PhaseEstimate, PhaseEstimate]:
    """Calibration and emulator construction in one pass, block by block from the files (emloc/blockwise.py).

    Held throughout: one block's weights, the hidden states entering and leaving it for every calibration sample
    (2·S·n·h·b), the Σxᵀx of that block's layers; then either one sample's forward through the block (its working
    set and one layer's gram, 4·(in² + n·in)) or the factorisation of one of its layers with the block's factors
    collected so far. Both peaks are of the same process (the calibrate stage itself only writes a note)."""
    s, b = run.s, run.b
    blocks = _block_terms(run)
    worst_block = max(blocks.values(), key=lambda t: t["weights"] + t["statistics"] + t["factors"])
    hidden = max(2 * s.calibration_samples * run.tokens[st.tokens] * st.hidden * b for st in run.arch.stacks)
    forward = max(run.tokens[st.tokens] * ((st.saved_per_token + st.hidden) * b + 4 * st.saved_fp32_per_token)
                  for st in run.arch.stacks)
    layers = [lin for lin in run.summary.linears if run.ranks.get(lin.name)]
    gram = max((4 * (lin.in_features ** 2 + run.tokens_of(lin) * lin.in_features) for lin in layers), default=0)
    held = {"weights (one block)": worst_block["weights"], "hidden states (all samples)": hidden,
            "statistics (one block)": worst_block["statistics"]}
    calibration = _estimate("calibration", "emloc", {**held, "activations": forward, "gram (one layer)": gram}, True,
                            "calibrated while the emulator is built, block by block")
    construction = _construction(run)
    factoring = construction.parts.get("factorisation (one layer)", 0)
    emulator = _estimate("emulator", "emloc", {**held, "factorisation (one layer)": factoring,
                                               "factors (one block)": worst_block["factors"]}, True)
    return calibration, emulator


def _host(run: _Run, e: PhaseEstimate) -> dict[str, float]:
    """Host RAM of one phase's process. On a CPU run the host is the device: the device parts, the runtime, and
    the file pages of the block being read (safetensors maps the file while a block is read; the pages stay
    resident until it is closed). On a GPU run: what passes through or stays on the host."""
    b, s = run.b, run.s
    blocks = _block_terms(run)
    block = max(t["weights"] for t in blocks.values())
    tensor = max((t["tensor"] for t in blocks.values()), default=0)
    streamed = e.streamed
    if s.device == "cpu":
        host = {k: v for k, v in e.parts.items() if k != "overhead"}
        if e.phase == "embeddings" and streamed:  # the prompt encoder's blocks, read from its own files
            host["file pages (one block)"] = b * max(c.largest_piece for c in run.arch.components if c.prompt_encoder)
        elif e.method == "emloc" and streamed:  # correction reads one layer at a time, the others one block
            host["file pages (one tensor)" if e.phase == "correction" else "file pages (one block)"] = \
                tensor if e.phase == "correction" else block
        if e.method == "emloc" and e.phase == "correction" and streamed:  # the adapter and its corrected copy stay
            # on the host (the device parts of a streamed correction leave them out), which is this memory here
            host["adapters"] = 3 * ADAPTER_BYTES * run.counts.lora
        if e.method == "emloc" and e.phase == "training":  # the emulator is read into the skeleton one tensor at a time
            host["file pages (one tensor)"] = tensor
        if not streamed or e.phase == "preview":  # freed and allocated again without a trim (a streamed preview
            # trims after each block, but its pipeline's encoders and VAE come and go): glibc keeps part of it
            host["allocator slack (freed heap kept)"] = HOST_HEAP_SLACK * sum(host.values())
        return {"runtime": HOST_RUNTIME_CPU, **host}
    host: dict[str, float] = {"runtime": HOST_RUNTIME_CUDA}
    if e.method != "emloc":  # loaded straight onto the GPU, one file at a time
        host["file pages (one tensor)"] = tensor
        return host
    if e.phase in ("calibration", "emulator"):
        if streamed:
            host["file pages (one block)"] = block
            host["factors (one block)"] = max(t["factors"] for t in blocks.values())
        elif e.phase == "calibration":  # the two-step path: every layer's sums on the host
            host["statistics (all layers)"] = sum(t["statistics"] for t in blocks.values())
            if s.offload:
                host["weights (whole model, offloaded)"] = b * run.summary.params
        else:
            host["weights (whole model)"] = b * run.summary.params
            host["statistics (all layers)"] = sum(t["statistics"] for t in blocks.values())
            host["factors built"] = sum(t["factors"] for t in blocks.values())
    elif e.phase == "training":
        host["file pages (one tensor)"] = tensor
    elif e.phase == "correction":
        host["layers (one of each model)"] = e.parts.get("layers (one of each model)", 0) or \
            b * run.counts.full + run.counts.emulator_bytes
        host["adapters"] = 3 * ADAPTER_BYTES * run.counts.lora
    elif e.phase == "preview":
        host["file pages (one block)" if streamed else "file pages (one tensor)"] = block if streamed else tensor
    elif e.phase == "embeddings":
        host["file pages (one block)" if streamed else "file pages (one tensor)"] = \
            max(c.largest_piece for c in run.arch.components if c.prompt_encoder) * b
    if e.phase in ("calibration", "preview") and _resident_components(run):  # loaded on the host, then moved
        host["text encoders and VAE (loading)"] = max(b * c.params for c in _resident_components(run))
    return host


def _run_folder(run: _Run) -> dict[str, float]:
    """The run folder on disk: the emulator's factors (and kept layers), adapters, checkpoints, statistics on request."""
    s, b = run.s, run.b
    shapes = {lin.name: lin for lin in run.summary.linears}
    emulator = sum(run.stand_ins.get(n, b * (k * (shapes[n].in_features + shapes[n].out_features) if k
                                              else shapes[n].in_features * shapes[n].out_features))
                   for n, k in run.ranks.items())
    adapter = ADAPTER_BYTES * run.counts.lora
    state, _ = _lora_terms(run)[1:]
    folder = {"emulator": emulator, "adapters (trained, corrected, uncorrected, exports)": 5 * adapter,
              "training checkpoints": s.keep_checkpoints * (adapter + state)}
    if s.keep_statistics:
        folder["calibration statistics"] = sum(4 * shapes[n].in_features ** 2 for n, k in run.ranks.items() if k)
    return folder


def plan_memory(summary: ModelSummary, arch: ArchitectureSpec, settings: MemorySettings) -> MemoryPlan:
    """Predicted peaks of every phase of EMLoC (at `settings`) and of LoRA, QLoRA and plain inference."""
    s = settings
    check_settings(s)
    if s.device == "cpu":  # one memory: the sums "on the CPU" are in it (streaming still reads from the files)
        s = replace(s, stats_on_gpu=True)
    b = dtype_bytes(s.dtype)
    tokens = stream_tokens(arch, s)
    rules = list(s.rules) if s.rules else [(p, s.ratio) for p in arch.default_compress]
    ranks = emulator_ranks(summary, rules)
    targets = lora_targets(summary, list(s.lora_targets) or list(arch.default_lora_targets))
    shapes = {lin.name: lin for lin in summary.linears}
    removed = sum(shapes[n].in_features * shapes[n].out_features - k * (shapes[n].in_features + shapes[n].out_features)
                  for n, k in ranks.items() if k)
    skipped = first_match(summary, arch.quant_skip)
    quantised = [lin for lin, index in zip(summary.linears, skipped) if index is None]
    counts = ParamCounts(full=summary.params, emulator=summary.params - removed,
                         lora=sum(s.lora_rank * (t.in_features + t.out_features) for t in targets),
                         factored_layers=sum(1 for k in ranks.values() if k),
                         dense_layers=sum(1 for k in ranks.values() if not k),
                         quantised=sum(lin.in_features * lin.out_features for lin in quantised))
    stand_ins = stand_in_sizes(summary, rules, s.emulator_kind, b)
    if s.emulator_kind == "nf4":  # full rank: every parameter kept (in 4 bits)
        counts.emulator = summary.params
    counts.emulator_bytes = b * summary.params - sum(b * shapes[n].in_features * shapes[n].out_features
                                                     for n in stand_ins) + sum(stand_ins.values())
    counts.dequantised = max((dequant_bytes(size, b, s.device) for size in
                              dequantised_sizes(summary, rules, s.emulator_kind)), default=0)
    run = _Run(summary, arch, s, b, tokens, ranks, targets, counts, stand_ins)
    nf4 = {"weights (NF4 linears)": NF4_BYTES * counts.quantised, "weights (rest)": b * (counts.full - counts.quantised),
           "dequantised layer": b * max((lin.in_features * lin.out_features for lin in quantised), default=0)}
    preview = {**_full_weights(run, s.offload), **_inference_activations(run, lora=True)}
    plain = {**_full_weights(run, False), **_inference_activations(run, lora=False)}
    pass_ = _streamed_pass(run) if s.offload and not s.keep_statistics else (_calibration(run), _construction(run))
    if run.arch.components:  # the preview pipeline keeps its text encoders and VAE beside the transformer
        preview.update({f"weights ({c.name})": b * c.params for c in _resident_components(run)})
    preview["weights (outside the blocks)"] = _outside_blocks(run) if s.offload else 0
    embeddings = [e for e in (_prompt_embeddings(run, m) for m in METHODS) if e is not None]
    estimates = [
        *embeddings[:1],
        *pass_,
        _training(run, "emloc", {"weights (emulator)": counts.emulator_bytes,
                                 "dequantised layer (4-bit emulator)": counts.dequantised}),
        _correction(run),
        _with_components(run, "preview", "emloc", preview, s.offload),
        _training(run, "lora", {"weights": b * counts.full}),
        _training(run, "qlora", nf4),
        _with_components(run, "preview", "inference", plain, False),
        *embeddings[1:],
    ]
    stats = 0 if s.stats_on_gpu else sum(4 * shapes[n].in_features ** 2 for n, k in ranks.items() if k)
    if s.device == "cpu":  # no CUDA context or caching allocator: the RAM peak has no fixed overhead
        for e in estimates:
            e.parts.pop("overhead", None)
    for e in estimates:
        e.host = {k: int(math.ceil(v)) for k, v in _host(run, e).items() if v}
    offloaded = None
    if s.device == "cuda" and s.offload:  # the same GPU peak as streaming from the files (every variant, the
        # emulator too, one block at a time); the model waits in RAM, pinned in place
        streamed_preview = next(e for e in estimates if e.phase == "preview" and e.method == "emloc")
        offloaded = replace(streamed_preview, offloaded=True,
                            note="the model in RAM (pinned), one block at a time on the GPU")
        host = {"runtime": HOST_RUNTIME_CUDA, "weights (whole model, offloaded)": b * summary.params}
        if run.arch.components:
            host["text encoders and VAE (loading)"] = max(b * c.params for c in run.arch.components)
        offloaded.host = {k: int(math.ceil(v)) for k, v in host.items() if v}
    return MemoryPlan(s, counts, estimates, stats, {k: int(v) for k, v in _run_folder(run).items() if v}, offloaded)


def estimate(model: nn.Module, arch: ArchitectureSpec, settings: MemorySettings) -> MemoryPlan:
    """plan_memory on a model (meta device is enough); summarise once and call plan_memory when planning often."""
    return plan_memory(summarize(model, arch), arch, settings)


# -- emulator kinds (issue 27): what each kind's stand-ins hold -------------------------------------------------------
def _governed(summary: ModelSummary, rules) -> list[tuple[LinearShape, float]]:
    """(layer, its rule's ratio) of every linear a compression rule governs, in model order."""
    rules = normalise_rules(rules)
    return [(lin, rules[index][1]) for lin, index in zip(summary.linears, first_match(summary, tuple(p for p, _ in rules)))
            if index is not None]


def stand_in_sizes(summary: ModelSummary, rules, kind: str, b: int) -> dict[str, int]:
    """`{layer: bytes}` of every replaced layer as `kind` stores it (build_emulator's choices, emloc/emulator.py):
    "lowrank" b·k(in+out); "nf4" every layer whose ratio is below 1, nf4_bytes(in·out) (absmax in the model's dtype,
    b bytes); "lowrank-nf4" nf4_bytes(k·in) + nf4_bytes(k·out). Kept layers are absent; biases (b·out, as small as
    the planner's other rounding) are left out as the lowrank terms always left them."""
    check_kind(kind, "emulator_kind")
    sizes = {}
    for lin, ratio in _governed(summary, rules):
        i, o = lin.in_features, lin.out_features
        k = factored_rank(i, o, ratio)
        if kind == "nf4" and ratio < 1:
            sizes[lin.name] = nf4_bytes(i * o, b)
        elif k and kind == "lowrank-nf4":
            sizes[lin.name] = nf4_bytes(k * i, b) + nf4_bytes(k * o, b)
        elif k:
            sizes[lin.name] = b * k * (i + o)
    return sizes


def dequantised_sizes(summary: ModelSummary, rules, kind: str) -> list[int]:
    """Elements of every weight a 4-bit kind dequantises in its forward (none for "lowrank")."""
    if kind == "lowrank":
        return []
    sizes = []
    for lin, ratio in _governed(summary, rules):
        i, o = lin.in_features, lin.out_features
        k = factored_rank(i, o, ratio)
        if kind == "nf4" and ratio < 1:
            sizes.append(i * o)
        elif kind == "lowrank-nf4" and k:
            sizes += [k * i, k * o]
    return sizes


DEQUANT_CPU_BYTES = 8  # per element, plain torch: the float32 code values and the float32 scaled copy at once


def dequant_bytes(elements: int, b: int, device: str = "cuda") -> int:
    """The working set of dequantising one weight of `elements` (emloc/quantized.py dequantize_nf4): on a GPU
    bitsandbytes' kernel writes the weight in the compute dtype (b per element) plus a float32 copy of its absmax;
    on the CPU the plain-torch path holds the float32 values and their scaled copy, then the cast."""
    if device == "cpu":
        return max(DEQUANT_CPU_BYTES, 4 + b) * elements
    return b * elements + 4 * math.ceil(elements / 64)

