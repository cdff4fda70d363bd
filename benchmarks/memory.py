"""Measured peak memory of every EMLoC phase against the planner's prediction, one fresh subprocess per phase.

    PYTHONPATH=. python benchmarks/memory.py [--models flux-256,flux-512,internvl] [--device cpu|cuda] [--ratio 0.5]

Models are random-weight builds of real width (weights never matter for memory): the FLUX.1 [schnell]
transformer at full width 3072 with 1 double and 1 single block (256 T5 tokens) at 256 and 512 px, and
InternVL3-1B's shapes with fewer layers (--vlm-layers, default 6 language + 6 vision layers). Every phase
(calibration, emulator construction, a few training steps, correction, preview) and the alternatives
(LoRA on the full model, plain inference) runs in its own process, as the run machine's stages do
(pipelines/runner/stages.py), so peaks never mix. Measured: the process's peak resident memory (ru_maxrss) minus
its resident memory after imports; on CUDA torch.cuda.max_memory_allocated; on the CPU also the peak of what
malloc has handed out and not had back (glibc mallinfo2, polled: the RSS without the freed heap glibc keeps). Predicted: emloc.memory's plan
with the same settings on the same device and dtype (on the CPU: everything in one memory, no CUDA
overhead). Prints a markdown table and writes benchmarks/out/memory-<device>.md and .json.

The model builders and the planner glue below are shared by benchmarks/activations.py and speed.py.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out"
MODELS = ROOT / "assets" / "models"
GiB = 1024 ** 3
PHASES = (("calibration", "emloc"), ("emulator", "emloc"), ("training", "emloc"), ("correction", "emloc"),
          ("preview", "emloc"), ("training", "lora"), ("preview", "inference"))


@dataclass(frozen=True)
class BenchModel:
    """A random-weight model of real width and the shape of its inputs."""

    key: str
    bundle: dict  # catalogue bundle (assets/models format)
    resolution: int = 512  # flux
    seq_len: int = 512  # vlm: tokens per sample, image tokens included
    image_tiles: int = 1  # vlm

    @property
    def family(self) -> str:
        return self.bundle["family"]


def flux_bundle(double: int = 1, single: int = 1, text_tokens: int = 256, **config) -> dict:
    """FLUX.1 [schnell]'s transformer config with `double` + `single` blocks (and any other config override)."""
    doc = json.loads((MODELS / "FLUX.1-schnell.json").read_text())
    transformer = {**doc["components"]["transformer"], "num_layers": double, "num_single_layers": single, **config}
    return {"family": "flux", "components": {"transformer": transformer}, "max_sequence_length": text_tokens}


def vlm_bundle(text_layers: int = 6, vision_layers: int = 6, text: dict | None = None, vision: dict | None = None,
               **config) -> dict:
    """InternVL3-1B's config with fewer layers (and any other override)."""
    doc = json.loads((MODELS / "InternVL3-1B-hf.json").read_text())["config"]
    doc = {**doc, **config}
    doc["text_config"] = {**doc["text_config"], "num_hidden_layers": text_layers, **(text or {})}
    doc["vision_config"] = {**doc["vision_config"], "num_hidden_layers": vision_layers, **(vision or {})}
    return {"family": "vlm", "config": doc}


def bench_models(vlm_layers: int = 6) -> dict[str, BenchModel]:
    flux = flux_bundle()
    return {"flux-256": BenchModel("flux-256", flux, resolution=256),
            "flux-512": BenchModel("flux-512", flux, resolution=512),
            "internvl": BenchModel("internvl", vlm_bundle(vlm_layers, vlm_layers), seq_len=512, image_tiles=1)}


# -- models ---------------------------------------------------------------------------------------------------
def _module(bundle: dict) -> nn.Module:
    if bundle["family"] == "flux":
        from diffusers import FluxTransformer2DModel

        config = {k: v for k, v in bundle["components"]["transformer"].items() if not k.startswith("_")}
        return FluxTransformer2DModel.from_config(config)
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    fields = {k: v for k, v in bundle["config"].items() if k not in ("architectures", "model_type", "transformers_version")}
    return InternVLForConditionalGeneration(InternVLConfig(**fields))


def materialise(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Give every parameter still on the meta device random values, seeded by its name: two builds of one
    config hold the same weights, and no initialiser temporaries inflate the peak."""
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            full = f"{module_name}.{name}"
            value = torch.empty(param.shape, dtype=dtype)
            if param.dim() == 1:
                value.fill_(0.0 if name == "bias" else 1.0)
            else:
                value.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed + zlib.crc32(full.encode())))
            setattr(module, name, nn.Parameter(value, requires_grad=False))
    return model


def build(spec: BenchModel | dict, emulator: Path | None = None, seed: int = 0, device: str = "cpu",
          dtype: torch.dtype = torch.float32) -> nn.Module:
    """The full model (or, with `emulator`, the emulator: factored layers loaded, never materialised dense)."""
    from accelerate import init_empty_weights

    import emloc

    bundle = spec.bundle if isinstance(spec, BenchModel) else spec
    with init_empty_weights(include_buffers=False):
        model = _module(bundle)
    if emulator is not None:
        emloc.load_emulator(model, emulator, device="cpu", check_fingerprint=False)
        for p in model.parameters():  # factors as saved (float32); the run's dtype for the rest below
            p.data = p.data.to(dtype) if p.device.type != "meta" else p.data
    materialise(model, seed, dtype)
    return model.to(device).eval().requires_grad_(False)


def enable_checkpointing(spec: BenchModel, model: nn.Module) -> None:
    """As the backends do (pipelines/flux/backend.py, pipelines/internvl/backend.py)."""
    from pipelines.runner import Backend
    from pipelines.internvl.backend import VlmBackend

    (VlmBackend if spec.family == "vlm" else Backend).enable_gradient_checkpointing(None, model)


# -- inputs ---------------------------------------------------------------------------------------------------
def make_batch(spec: BenchModel, model: nn.Module, seed: int = 0, batch_size: int = 1, device: str = "cpu") -> dict:
    """Random inputs of the right shape: FLUX transformer kwargs + a velocity target; InternVL ids, pixels, labels."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(p.dtype for p in model.parameters())
    if spec.family == "flux":
        cfg = spec.bundle["components"]["transformer"]
        side = spec.resolution // 16
        text = spec.bundle["max_sequence_length"]
        image = torch.randn(batch_size, side * side, cfg["in_channels"], generator=g)
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        kwargs = {"hidden_states": image, "encoder_hidden_states": torch.randn(batch_size, text, cfg["joint_attention_dim"], generator=g),
                  "pooled_projections": torch.randn(batch_size, cfg["pooled_projection_dim"], generator=g),
                  "timestep": torch.rand(batch_size, generator=g), "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(text, 3),
                  "guidance": torch.full((batch_size,), 3.5) if cfg.get("guidance_embeds") else None, "return_dict": False}
        kwargs = {k: (v.to(device, dtype) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        return {"kwargs": kwargs, "target": torch.randn(image.shape, generator=g).to(device, dtype)}
    cfg = spec.bundle["config"]
    vocab, image_id = cfg["text_config"]["vocab_size"], cfg["image_token_id"]
    per_tile = cfg.get("image_seq_length", 256)
    ids = torch.randint(0, min(vocab, image_id), (batch_size, spec.seq_len), generator=g)
    ids[:, 4:4 + per_tile * spec.image_tiles] = image_id
    labels = ids.clone()
    labels[:, : 4 + per_tile * spec.image_tiles] = -100
    side = cfg["vision_config"]["image_size"][0]
    pixels = torch.randn(batch_size * spec.image_tiles, 3, side, side, generator=g).to(device, dtype)
    return {"kwargs": {"input_ids": ids.to(device), "pixel_values": pixels, "labels": labels.to(device)}}


def loss_of(spec: BenchModel, model: nn.Module, batch: dict) -> torch.Tensor:
    """The backend's training loss on `batch`: FLUX velocity MSE in float32, InternVL answer cross-entropy."""
    if spec.family == "flux":
        pred = model(**batch["kwargs"])[0]
        return ((pred.float() - batch["target"].float()) ** 2).mean()
    return model(**batch["kwargs"]).loss


def forward(spec: BenchModel, model: nn.Module, batch: dict):
    """One inference forward (calibration, preview): no labels, no loss."""
    kwargs = {k: v for k, v in batch["kwargs"].items() if k != "labels"}
    return model(**kwargs)


# -- the planner ----------------------------------------------------------------------------------------------
def planner(spec: BenchModel):
    """(ModelSummary, ArchitectureSpec) of the bench model, built on the meta device as the app's planner does."""
    from emloc.architecture import summarize
    from pipelines.planner.catalogue import meta_model_from_bundle

    model, arch = meta_model_from_bundle(copy.deepcopy(spec.bundle))
    return summarize(model, arch), arch


def memory_settings(spec: BenchModel, device: str = "cpu", dtype: str = "float32", **overrides):
    from emloc.memory import MemorySettings

    values = dict(dtype=dtype, device=device, ratio=0.5, lora_rank=16, batch_size=1, seq_len=spec.seq_len,
                  image_tiles=spec.image_tiles, resolution=spec.resolution, gradient_checkpointing=True,
                  offload=False, calibration_batch_size=1, generate_tokens=8)
    return MemorySettings(**{**values, **overrides})


def compress_rules(spec: BenchModel, ratio: float) -> list[tuple[str, float]]:
    _, arch = planner(spec)
    return [(p, ratio) for p in arch.default_compress]


def lora_settings(spec: BenchModel, rank: int = 16):
    import emloc

    _, arch = planner(spec)
    return emloc.LoraSettings(rank=rank, alpha=rank, targets=list(arch.default_lora_targets))


# -- one phase in this process ----------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class MallocInUse:
    """The peak of the bytes malloc has handed out and not had back (glibc mallinfo2: in-use heap chunks +
    mmapped chunks) plus the resident pages of mapped files (safetensors loads lazily), polled every 0.2 ms
    from a thread: what the program holds, without the freed heap glibc keeps (which RSS counts). Sampled, so
    a spike shorter than the poll can be missed. None off glibc."""

    def __init__(self):
        import ctypes
        import threading

        class _Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]
        try:
            self._mallinfo = ctypes.CDLL("libc.so.6").mallinfo2
        except (OSError, AttributeError):
            self._mallinfo = None
            return
        self._mallinfo.restype = _Info
        self.baseline = self.now()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def now(self) -> int:
        info = self._mallinfo()
        return info.uordblks + info.hblkhd + self._file_backed()

    @staticmethod
    def _file_backed() -> int:
        """Resident pages of mapped files: tensors safetensors loads lazily (the emulator, adapters) live there."""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.0002)

    def stop(self) -> int | None:
        """The peak above the baseline, in bytes (None where mallinfo2 is missing)."""
        if self._mallinfo is None:
            return None
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now()) - self.baseline


def _reset_peak() -> None:
    """Linux: reset the process's resident-memory high-water mark (what ru_maxrss reports) to now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_dtype(device: str) -> torch.dtype:
    """The dtype a run uses on `device` (pipelines/runner: "auto" precision): bfloat16 on CUDA, float32 on the CPU."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def _train_steps(spec: BenchModel, model: nn.Module, steps: int, device: str, checkpointing: bool) -> tuple[float, nn.Module]:
    """LoRA training as pipelines/stages.train: float32 adapters, AdamW, and on CUDA bf16 autocast around the
    forward and loss (accelerate's mixed precision, as the run); returns the last loss and the PEFT model."""
    import emloc

    if checkpointing:
        enable_checkpointing(spec, model)
    torch.manual_seed(0)
    peft_model = emloc.attach_lora(model, lora_settings(spec))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    peft_model.train()
    value = float("nan")
    cuda = str(device).startswith("cuda")
    for step in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_of(spec, peft_model, make_batch(spec, model, seed=step, device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
    return value, peft_model


def run_phase(spec: BenchModel, phase: str, method: str, work: Path, device: str, ratio: float, steps: int) -> dict:
    """Run one phase the way its stage does; returns measured bytes (peak minus the baseline after imports)."""
    import emloc
    from safetensors.torch import load_file

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    gc.collect()
    _reset_peak()
    baseline = _rss_bytes()
    in_use = MallocInUse()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rules = compress_rules(spec, ratio)
    dtype = run_dtype(device)  # F19: the run's weights (bf16 on CUDA), so the plan's bf16 figures compare like with like
    started = time.perf_counter()
    if (phase, method) == ("calibration", "emloc"):
        model = build(spec, device=device, dtype=dtype)
        batches = (make_batch(spec, model, seed=100 + i, device=device) for i in range(2))
        stats = emloc.collect_input_stats(model, batches, rules, forward=lambda m, b: forward(spec, m, b),
                                          stats_device="cpu", progress=False)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in stats.items()}, str(work / "stats.safetensors"))
    elif phase == "emulator":
        model = build(spec, dtype=dtype)  # the stage loads the model on the CPU and factorises each layer on the device
        stats = emloc.second_moments(load_file(str(work / "stats.safetensors")))
        emloc.build_emulator(model, rules, stats, svd=emloc.DEFAULT_SOLVER, compute_device=device, progress=False)
        shutil.rmtree(work / "emulator", ignore_errors=True)
        emloc.save_emulator(model, work / "emulator")
    elif phase == "training":
        model = build(spec, work / "emulator" if method == "emloc" else None, device=device, dtype=dtype)
        _, peft_model = _train_steps(spec, model, steps, device, checkpointing=True)
        if method == "emloc":
            emloc.write_adapter(emloc.adapter_state(peft_model), peft_model.peft_config["default"], work / "adapter")
    elif phase == "correction":
        state, config = emloc.read_adapter(work / "adapter")
        full, emulator = build(spec, dtype=dtype), build(spec, work / "emulator", dtype=dtype)
        emloc.correct_lora(full, emulator, state, emloc.lora_scaling(config), lam=3.0, compute_device=device,
                           progress=False)
    elif phase == "preview":
        model = build(spec, device=device, dtype=dtype)
        if method == "emloc":
            model = emloc.load_adapter(model, work / "adapter")
        model.eval()
        with torch.no_grad():
            batch = make_batch(spec, model, seed=7, device=device)
            if spec.family == "vlm":
                kwargs = {k: v for k, v in batch["kwargs"].items() if k != "labels"}
                model.generate(**kwargs, max_new_tokens=8, do_sample=False)
            else:
                forward(spec, model, batch)
    else:
        raise ValueError(f"unknown phase {phase}/{method}")
    seconds = time.perf_counter() - started
    result = {"measured": _peak_rss_bytes() - baseline, "in_use": in_use.stop(), "baseline": baseline,
              "seconds": round(seconds, 2)}
    if device.startswith("cuda"):
        result["cuda_allocated"] = torch.cuda.max_memory_allocated()
        result["cuda_reserved"] = torch.cuda.max_memory_reserved()
    return result


# -- the driver -------------------------------------------------------------------------------------------------
def predicted(spec: BenchModel, phase: str, method: str, device: str, ratio: float) -> tuple[int, dict]:
    from emloc.memory import plan_memory

    summary, arch = planner(spec)
    dtype = "float32" if device == "cpu" else "bfloat16"
    plan = plan_memory(summary, arch, memory_settings(spec, device=device, dtype=dtype, ratio=ratio))
    est = plan.get(phase, method)
    return (est.total if device == "cpu" else est.allocated), est.parts


def free_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 1024 ** 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="flux-256,flux-512,internvl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--vlm-layers", type=int, default=6)
    parser.add_argument("--phases", default="", help="comma-separated phase/method (default: all)")
    parser.add_argument("--results", default="", help="results file in benchmarks/out (default memory-<device>.json)")
    parser.add_argument("--report", action="store_true", help="only re-print the table: measured values as saved, "
                        "predictions from the planner as it is now")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "PHASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = bench_models(args.vlm_layers)
    work_root = OUT / "work"
    if args.child:
        key, phase, method = args.child
        work = work_root / key.split("-")[0]  # flux-256 and flux-512: one model, one emulator
        work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run_phase(models[key], phase, method, work, args.device, args.ratio, args.steps)))
        return 0
    chosen = [tuple(p.split("/")) for p in args.phases.split(",")] if args.phases else list(PHASES)
    rows = []
    results_file = OUT / (args.results or f"memory-{args.device}.json")
    previous = json.loads(results_file.read_text()) if results_file.exists() else []
    if args.report:
        for row in previous:
            row["predicted"], row["parts"] = predicted(models[row["model"]], row["phase"], row["method"], args.device,
                                                       args.ratio)
        results_file.write_text(json.dumps(previous, indent=1))
    for key in [] if args.report else args.models.split(","):
        for phase, method in chosen:
            print(f"[{key}] {phase}/{method}: {free_gib():.1f} GiB available", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--device", args.device, "--ratio", str(args.ratio), "--steps", str(args.steps),
                   "--vlm-layers", str(args.vlm_layers), "--child", key, phase, method]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{key} {phase}/{method} failed")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            pred, parts = predicted(models[key], phase, method, args.device, args.ratio)
            row = {"model": key, "phase": phase, "method": method, "predicted": pred, "parts": parts, **measured}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "parts"}), file=sys.stderr, flush=True)
            merged = {(r["model"], r["phase"], r["method"]): r for r in previous + rows}
            results_file.write_text(json.dumps(list(merged.values()), indent=1))  # after every row: resumable
    merged = {(r["model"], r["phase"], r["method"]): r for r in previous + rows}
    table = markdown(list(merged.values()), args.device)
    (OUT / f"memory-{args.device}.md").write_text(table + "\n")
    print(table)
    return 0


def markdown(rows: list[dict], device: str) -> str:
    names = {"emloc": "EMLoC", "lora": "LoRA (full model)", "inference": "plain inference"}
    lines = [f"Device {device}, {platform.processor() or platform.machine()}, torch {torch.__version__}; GiB; "
             "error = predicted / measured - 1", "",
             "| model | phase | method | predicted | measured | error % | malloc in use | error % |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        measured = r.get("cuda_allocated", r["measured"]) if device != "cpu" else r["measured"]
        error = 100 * (r["predicted"] / measured - 1) if measured > 0 else float("nan")
        in_use = r.get("in_use")
        held = (f"{in_use / GiB:.2f} | {100 * (r['predicted'] / in_use - 1):+.1f}" if in_use and device == "cpu"
                else "- | -")
        lines.append(f"| {r['model']} | {r['phase']} | {names[r['method']]} | {r['predicted'] / GiB:.2f} | "
                     f"{measured / GiB:.2f} | {error:+.1f} | {held} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
