"""The low-rank layer (docs/method.md step 2): `y = u(v(x))`, the factors `W_E = u v` of one linear layer.

The layer knows nothing about the model around it; emulator.py decides which layers become one and
at what rank, and lora.py / correction.py wrap or read it.
"""

from __future__ import annotations

import torch
from torch import nn

from .factorize import DEFAULT_SOLVER, Whitening, low_rank_factors


class LowRankLinear(nn.Module):
    """`y = u(v(x))`: `v` = Linear(in, rank, bias=False), `u` = Linear(rank, out, bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1; got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))  # (..., in) -> (..., k) -> (..., out)

    def dense_weight(self) -> torch.Tensor:
        """The emulated dense weight `W_E = u v` (out x in), for inspection and tests.

        Deliberately not a `weight` attribute: PEFT would then try to merge LoRA into it in place.
        """
        from .quantized import linear_weight  # factors may be stored in NF4 (the lowrank-nf4 kind)

        if isinstance(self.u, nn.Linear) and isinstance(self.v, nn.Linear):
            return self.u.weight @ self.v.weight
        return linear_weight(self.u) @ linear_weight(self.v)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        second_moment: torch.Tensor | None = None,
        svd: str = DEFAULT_SOLVER,
        compute_device: torch.device | str | None = None,
        white: Whitening | None = None,
    ) -> "LowRankLinear":
        """Factor `linear` at `rank` (activation-aware when `second_moment` = Σ xᵀx is given).

        The factorisation runs in float32, its eigendecompositions in float64, on `compute_device` (default:
        the layer's device); the factors come back in the layer's dtype, on its device (for a layer offloaded
        by accelerate, on the device it executes on).
        """
        weight, bias, home = dense_parameters(linear)
        device = torch.device(compute_device) if compute_device is not None else home
        u, v = low_rank_factors(weight.detach().to(device), rank, second_moment, svd, white=white)
        layer = cls(linear.in_features, linear.out_features, rank, bias=bias is not None,
                    device="meta", dtype=weight.dtype)
        state = {"u.weight": u, "v.weight": v}
        if bias is not None:
            state["u.bias"] = bias.detach()
        state = {k: t.to(home, weight.dtype).contiguous() for k, t in state.items()}
        layer.load_state_dict(state, assign=True)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def dense_parameters(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None, torch.device]:
    """`(weight, bias, home device)` of a Linear, also when accelerate offloaded it (meta weights + hook).

    An offloaded layer's weights are read from its hook's weights_map (CPU or disk), one layer at a
    time; its home is the hook's execution device, where its replacement will run.
    """
    if linear.weight.device.type != "meta":
        return linear.weight, linear.bias, linear.weight.device
    hook = getattr(linear, "_hf_hook", None)
    for part in getattr(hook, "hooks", (hook,)):
        weights_map = getattr(part, "weights_map", None)
        if weights_map is not None and "weight" in weights_map:
            bias = weights_map["bias"] if linear.bias is not None else None
            home = getattr(part, "execution_device", None) or weights_map["weight"].device
            return weights_map["weight"], bias, torch.device(home)
    raise ValueError("a layer has no weights loaded (meta device, no offload hook); load the model's weights first")
