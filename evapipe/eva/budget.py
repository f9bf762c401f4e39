"""Rank budget: share sum(r) ranks across layers by pooled explained-variance ratios (EVA's redistribution)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch

from ..core.names import pattern_name


def distribute_ranks(
    ratios: Mapping[str, torch.Tensor | Sequence[float]],
    budget: int,
    max_components: Mapping[str, int],
    groups: Sequence[Sequence[str]] = (),
) -> dict[str, int]:
    """Give the `budget` largest ratios over all layers to their layers; a layer gets at most max_components.

    `ratios` maps every layer (followers of a shared PCA included, with their owner's ratios) to its ratios in
    descending order. Ties break by layer order, then component index, so every rank computes the same answer.
    In each group of layers that share one PCA (owner first), the owner is given the group's highest rank, as the
    PCA it owns must serve every member.
    """
    entries: list[tuple[float, int, int]] = []
    names = list(ratios)
    for li, name in enumerate(names):
        values = ratios[name]
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        for ci, v in enumerate(values[: max_components[name]]):
            entries.append((-float(v), li, ci))
    entries.sort()
    ranks = {name: 0 for name in names}
    for _, li, _ in entries[: max(budget, 0)]:
        ranks[names[li]] += 1
    for group in groups:
        members = [g for g in group if g in ranks]
        if not members:
            continue
        owner = members[0]
        best = max(members, key=lambda m: ranks[m])
        ranks[owner], ranks[best] = ranks[best], ranks[owner]
    return ranks


def layer_r(names: Sequence[str], r: int, rank_pattern: Mapping[str, int]) -> dict[str, int]:
    """Per-layer r with PEFT's rank_pattern semantics (a key matches the end of the module name as a regex)."""
    return {n: int(pattern_value(rank_pattern, n, r)) for n in names}


def pattern_value(pattern: Mapping[str, object], name: str, default: object) -> object:
    """The value of the first key that matches the end of `name` (PEFT's rank_pattern/alpha_pattern rule); an
    expert's key is matched by its parameter's name, as PEFT matches target_parameters."""
    name = pattern_name(name)
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def scaled_alpha(lora_alpha: float, rank: int, r: int, adjust: bool, rslora: bool = False) -> float:
    """alpha * rank / r keeps alpha / rank, the LoRA scaling, equal to lora_alpha / r whatever the rank.

    rsLoRA scales by alpha / sqrt(rank), so there alpha * sqrt(rank / r) keeps every layer at lora_alpha / sqrt(r)
    (PEFT's EVA loader applies rank / r to every variant, which gives rsLoRA layers sqrt(rank / r) times the scaling).
    """
    if not adjust or r <= 0:
        return lora_alpha
    return lora_alpha * (math.sqrt(rank / r) if rslora else rank / r)


def state_patterns(
    ranks: Mapping[str, int],
    layer_r: Mapping[str, int],
    layer_alpha: Mapping[str, float],
    r: int,
    lora_alpha: float,
    adjust: bool,
) -> tuple[dict[str, int], dict[str, float]]:
    """A state's rank_pattern / alpha_pattern (PEFT semantics): the layers whose final rank differs from r, and
    whose alpha (scaled to the rank when `adjust`) differs from lora_alpha."""
    alphas = {n: scaled_alpha(layer_alpha[n], k, layer_r[n], adjust) for n, k in ranks.items()}
    return {n: k for n, k in ranks.items() if k != r}, {n: a for n, a in alphas.items() if a != lora_alpha}
