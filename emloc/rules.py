"""Compression rules: which linear layers an EMLoC run touches, and at what ratio.

A rule list is `[(regex, ratio), ...]`. A layer named `name` is governed by the first rule whose
regex *fullmatches* `name`; a ratio `ρ` in (0, 1] is the fraction of the layer's parameters kept, and
ρ = 1 keeps the layer itself (dense, unchanged). Linear children of an already compressed layer
(`<name>.u`, `<name>.v`) are never targets.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction
from typing import Iterable, Sequence, Union

from torch import nn

from .lowrank import LowRankLinear

Rule = tuple[str, float]
RuleLike = Union[str, tuple[str, float], Sequence]


def rank_for_ratio(in_features: int, out_features: int, ratio: float) -> int:
    """Rank `k = floor(ρ·in·out / (in + out))` so that the factors keep a fraction `ρ` of the weights.

    Exact integer arithmetic, with `ρ` read as the shortest decimal that is the float (`repr`): 0.3 is 3/10, as
    the user typed it, not the binary float just below it. Floating point, the formula gives one less than that
    when ρ·in·out/(in + out) is a whole number (82 of the 750 000 layers up to 150 x 50 at ratios 0.01, ..., 1).
    """
    rho = Fraction(repr(check_ratio(ratio)))
    return (rho.numerator * in_features * out_features) // (rho.denominator * (in_features + out_features))


@functools.lru_cache(maxsize=65536, typed=True)  # the planner asks for the same few shapes thousands of times per plan
def factored_rank(in_features: int, out_features: int, ratio: float) -> int:
    """The rank build_emulator factors a layer at (at least 1), or 0 where the layer stays as it is: at ratio 1,
    which keeps the whole layer, and where the factors would not be smaller (`k(in + out) >= in·out`)."""
    if check_ratio(ratio) == 1.0:
        return 0
    rank = max(1, rank_for_ratio(in_features, out_features, ratio))
    return 0 if rank * (in_features + out_features) >= in_features * out_features else rank


def check_ratio(ratio: float, where: str = "ratio") -> float:
    """Raise a ValueError unless `ratio` is a number in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"{where} must be a number in (0, 1] (the fraction of parameters kept); got {ratio!r}")
    return float(ratio)


def normalise_rules(rules: Iterable[RuleLike], default_ratio: float = 1.0) -> list[Rule]:
    """Turn `["regex", ("regex", 0.5), ...]` into `[(compiled-checked regex, ratio), ...]`.

    A bare string means `(regex, default_ratio)`; every regex is compiled here so that a typo is
    reported before any model work starts.
    """
    if isinstance(rules, (str, tuple)):
        rules = [rules]
    out: list[Rule] = []
    for rule in rules:
        if isinstance(rule, str):
            pattern, ratio = rule, default_ratio
        else:
            try:
                pattern, ratio = rule
            except (TypeError, ValueError):
                raise ValueError(f"a rule is (regex, ratio); got {rule!r}") from None
        if not isinstance(pattern, str):
            raise ValueError(f"a rule's pattern must be a regex string; got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"rule pattern {pattern!r} is not a valid regex: {err}") from None
        out.append((pattern, check_ratio(ratio, f"ratio of rule {pattern!r}")))
    if not out:
        raise ValueError("no compression rules given; pass at least one (regex, ratio)")
    return out


def match_rule(name: str, rules: Sequence[Rule]) -> Rule | None:
    """The first rule whose regex fullmatches `name`, or None."""
    for pattern, ratio in rules:
        if re.fullmatch(pattern, name):
            return pattern, ratio
    return None


def factor_names(model: nn.Module) -> set[str]:
    """Names of the `.u`/`.v` factor Linears inside every LowRankLinear: never a compression or LoRA target."""
    return {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for c in ("u", "v")}


def target_linears(model: nn.Module, rules: Sequence[Rule]) -> dict[str, tuple[nn.Linear, float]]:
    """Every `nn.Linear` of `model` governed by a rule, as `{name: (module, ratio)}`, in model order.

    Raises a ValueError that names the patterns when nothing matches, because an empty match is
    almost always a wrong regex, and silently compressing nothing would hide it.
    """
    inside_low_rank = factor_names(model)
    found: dict[str, tuple[nn.Linear, float]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in inside_low_rank:
            continue
        rule = match_rule(name, rules)
        if rule is not None:
            found[name] = (module, rule[1])
    if not found:
        patterns = ", ".join(repr(p) for p, _ in rules)
        example = next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), None)
        hint = f" (a linear layer of this model is named {example!r})" if example else " (the model has no nn.Linear)"
        raise ValueError(f"no linear layer matches the rules {patterns}{hint}; patterns must fullmatch a module name")
    return found
