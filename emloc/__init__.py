"""EMLoC: memory-efficient fine-tuning with a LoRA-corrected low-rank emulator (arXiv 2506.12015).

Components only (torch + peft): calibration statistics, the activation-aware SVD emulator,
LoRA on the emulator, LoRA correction with the λ clamp, and the memory planner.
"""

from .calibration import COUNT_SUFFIX, collect_input_stats, merge_stats, second_moments
from .correction import CORRECTION_METHODS, correct_lora
from .emulator import (
    DEFAULT_SOLVER,
    EmulatorReport,
    LayerReport,
    LowRankLinear,
    build_emulator,
    load_emulator,
    save_emulator,
    weights_fingerprint,
)
from .blockwise import BlockwiseModel, stream_emulator
from .streaming import calibrate_and_build, plan_groups
from .factorize import SOLVERS, low_rank_factors, weighted_error
from .quantized import EMULATOR_KINDS, NF4Linear
from .lora import (
    LoraSettings,
    adapter_factors,
    adapter_state,
    attach_lora,
    config_with_rank,
    load_adapter,
    lora_config,
    lora_scaling,
    lora_target_names,
    read_adapter,
    write_adapter,
)
from .rules import factored_rank, match_rule, normalise_rules, rank_for_ratio, target_linears

__all__ = [
    "BlockwiseModel", "CORRECTION_METHODS", "EMULATOR_KINDS", "NF4Linear", "COUNT_SUFFIX", "DEFAULT_SOLVER", "SOLVERS", "EmulatorReport", "LayerReport", "LoraSettings",
    "LowRankLinear", "adapter_factors", "adapter_state", "attach_lora", "build_emulator", "config_with_rank", "calibrate_and_build",
    "plan_groups", "collect_input_stats", "correct_lora", "factored_rank", "load_adapter",
    "load_emulator", "low_rank_factors", "lora_config", "lora_scaling", "lora_target_names", "match_rule",
    "merge_stats", "normalise_rules", "rank_for_ratio", "read_adapter", "save_emulator", "second_moments", "stream_emulator",
    "target_linears", "weighted_error", "weights_fingerprint", "write_adapter",
]
