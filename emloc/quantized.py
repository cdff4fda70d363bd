"""4-bit stand-ins for `W` (docs/method.md step 2, issue 27): the emulator kinds beside the low-rank one.

EMLoC's correction does not care how the emulator was made: it maps a LoRA trained on any stand-in `W_E` for `W`
onto `W` on the inputs the LoRA acts on. The kinds (`EMULATOR_KINDS`, the run setting `emulator_kind`):

- `lowrank`: `W_E = u v`, the activation-aware truncated SVD at the rule's ratio (emulator.py, lowrank.py);
- `nf4`: `W_E = dequant(NF4(W))`, the whole weight in 4 bits (NF4 codes, one absmax per 64 values), full rank;
- `lowrank-nf4`: `W_E = dequant(NF4(u)) dequant(NF4(v))`, the low-rank factors stored in 4 bits.

A layer whose rule ratio is 1 stays dense in every kind ("keep this layer"); `nf4` quantises every other target
layer whatever its ratio (the ratio picks the layers, not a rank).

The format is bitsandbytes' NF4 (quant_type "nf4", blocksize 64, no double quantisation): the weight flattened in
row-major order, two codes per byte (the first in the high nibble), absmax per block of 64 (the last block may be
shorter). It is computed here in plain torch, so that emloc needs no bitsandbytes (tests/test_quantized.py checks
it bit for bit against `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`), and it runs on any device,
the `meta` and fake tensors of a dry run included. On a CUDA device the dequantisation uses bitsandbytes' kernel
when it is installed (the same values, fewer temporaries).

Why a module of our own rather than bitsandbytes' Linear4bit: the layer must be a skeleton on `meta` that
CheckpointReader / StreamedForward fill from safetensors files by name (codes and absmax are plain, frozen
parameters), its absmax keeps the model's dtype (so a block read in the model's dtype is the stand-in the correction
reads), and it must run on the CPU under autograd. `NF4Linear` dequantises in its forward and again in backward
(`_DequantisedLinear`): autograd keeps only the codes, so training holds one layer's dequantised weight at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EMULATOR_KINDS = ("lowrank", "nf4", "lowrank-nf4")
DEFAULT_KIND = "lowrank"
NF4_BLOCK = 64
# bitsandbytes' NF4 code book (bitsandbytes/backends/utils.py _NF4_QUANT_TABLE; QLoRA, Dettmers et al. 2023)
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0)


def check_kind(kind: str, what: str = "--emulator-kind") -> str:
    """`kind` if it is one of EMULATOR_KINDS, else a ValueError naming the setting."""
    if kind not in EMULATOR_KINDS:
        raise ValueError(f"{what} must be one of {', '.join(EMULATOR_KINDS)}; got {kind!r}")
    return kind


def nf4_sizes(numel: int) -> tuple[int, int]:
    """(bytes of codes, number of absmax values) of a weight with `numel` elements."""
    return (numel + 1) // 2, math.ceil(numel / NF4_BLOCK)


def nf4_bytes(numel: int, absmax_bytes: int = 2) -> int:
    """Bytes an NF4 weight of `numel` elements is stored in: 0.5 per element + one absmax per 64."""
    codes, blocks = nf4_sizes(numel)
    return codes + absmax_bytes * blocks


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(codes, absmax)` of `weight` in NF4: uint8 (ceil(n/2),), float32 (ceil(n/64),); bitsandbytes' layout."""
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    blocks = math.ceil(n / NF4_BLOCK)
    padded = F.pad(flat, (0, blocks * NF4_BLOCK - n)).view(blocks, NF4_BLOCK)
    absmax = padded.abs().amax(dim=1)  # zero padding never raises a block's absmax
    scaled = (padded / absmax.clamp(min=1e-38)[:, None]).clamp_(-1, 1).reshape(-1)[:n]
    del padded
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=flat.device)
    bounds = (code[:-1] + code[1:]) / 2
    if n % 2:  # an odd count: the last byte's low nibble codes a zero, as bitsandbytes pads
        scaled = F.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)  # nearest code (ties to the upper one)
    del scaled
    return (q[0::2] << 4) | q[1::2], absmax


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of `shape` that `(codes, absmax)` stand for, in `dtype` (computed in float32)."""
    n = math.prod(shape)
    if codes.device.type == "cuda":
        kernel = _bnb_dequantize()
        if kernel is not None:
            return kernel(codes, absmax.float(), NF4_BLOCK, "nf4", list(shape), dtype)
    table = torch.tensor(NF4_CODE, dtype=torch.float32, device=codes.device)
    values = table[torch.stack((codes >> 4, codes & 0xF), dim=-1).reshape(-1)[:n].int()]  # (n,) float32
    blocks = math.ceil(n / NF4_BLOCK)
    scale = absmax.float()
    if n == blocks * NF4_BLOCK:
        values = values.view(blocks, NF4_BLOCK).mul_(scale[:, None])
    else:
        values = values * scale.repeat_interleave(NF4_BLOCK)[:n]
    return values.reshape(shape).to(dtype)


def _bnb_dequantize():
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    except Exception:  # not installed, or no kernel for this platform: the plain torch path
        return None
    return torch.ops.bitsandbytes.dequantize_4bit.default


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _DequantisedLinear(torch.autograd.Function):
    """`y = x Wᵀ + b` with `W` dequantised in forward and again in backward: autograd keeps the codes only."""

    @staticmethod
    def forward(ctx, x, codes, absmax, bias, shape):
        dtype = _compute_dtype(x)
        weight = dequantize_nf4(codes, absmax, shape, dtype)
        ctx.save_for_backward(codes, absmax)
        ctx.shape, ctx.x_dtype, ctx.has_bias = shape, x.dtype, bias is not None
        return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        codes, absmax = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_nf4(codes, absmax, ctx.shape, grad.dtype)
            grad_x = (grad @ weight).to(ctx.x_dtype)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None


class NF4Linear(nn.Module):
    """A frozen Linear(in, out) stored in NF4: `codes` (uint8) and `absmax` (the model's dtype), both frozen
    parameters (so checkpoint readers fill them by name), and an optional `bias`. No `weight` attribute, on
    purpose: PEFT would then try to merge a LoRA into it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        n_codes, n_blocks = nf4_sizes(in_features * out_features)
        self.codes = nn.Parameter(torch.zeros(n_codes, dtype=torch.uint8, device=device), requires_grad=False)
        self.absmax = nn.Parameter(torch.zeros(n_blocks, dtype=dtype or torch.float32, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantise `weight` (out x in); absmax is rounded to `dtype` (default: the weight's), the model's dtype,
        so that reading the layer in the model's dtype changes nothing."""
        dtype = dtype or weight.dtype
        codes, absmax = quantize_nf4(weight)
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=dtype)
        state = {"codes": codes.to(weight.device), "absmax": absmax.to(weight.device, dtype)}
        if bias is not None:
            state["bias"] = bias.detach().to(weight.device, dtype)
        layer.load_state_dict(state, assign=True)
        for p in layer.parameters():
            p.requires_grad_(False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantisedLinear.apply(x, self.codes, self.absmax, self.bias, (self.out_features, self.in_features))

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stand-in `W_E = dequant(codes, absmax)` (out x in)."""
        return dequantize_nf4(self.codes, self.absmax, (self.out_features, self.in_features), dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def linear_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight a factor stands for: an nn.Linear's own, an NF4Linear's dequantised one."""
    if isinstance(layer, NF4Linear):
        return layer.dense_weight(dtype)
    return layer.weight.to(dtype)


def quantize_factors(low: nn.Module) -> nn.Module:
    """A LowRankLinear whose `u` and `v` are NF4Linear (the `lowrank-nf4` kind), in place; returns it."""
    for part in ("v", "u"):
        factor = getattr(low, part)
        setattr(low, part, NF4Linear.from_weight(factor.weight.detach(), factor.bias))
    return low


def first_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (a LowRankLinear's factors, an NF4Linear's codes)."""
    return next(module.parameters()).device
