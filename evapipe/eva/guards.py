"""Checks that end a run with a clear error instead of an endless loop or a poisoned PCA.

Both drivers call them where every rank sees the same thing (inside a step's agreement, or on agreed ratios), so
every rank raises together instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

import torch

from ..core.errors import DataError


def _listed(names: Sequence[str]) -> str:
    return f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"


def check_layer_inputs(tokens: Mapping[str, torch.Tensor], width: Mapping[str, int]) -> None:
    """Refuse layer inputs that would break routing. Finiteness is checked by the PCA update itself (see
    non_finite_inputs), from sums it computes anyway: a separate pass over every input cost a tenth of a run."""
    for n, x in tokens.items():
        if x.ndim != 2 or x.shape[1] != width[n]:
            raise DataError(f"the input of layer {n} came out as {tuple(x.shape)}, not (tokens, {width[n]}); "
                            "check hooks.prepare_layer_inputs_fn")


def non_finite_inputs(bad: Sequence[str], dtype: torch.dtype, step: int) -> DataError:
    """The error for layer inputs with NaN/Inf, which would poison a PCA's mean and variance for the rest of the run."""
    name = str(dtype).removeprefix("torch.")
    return DataError(
        f"non-finite values (NaN/Inf) in the inputs of {len(bad)} layer(s) at batch {step} ({name}): "
        f"{_listed(list(bad))}. The model overflows in {name}: load it with model.dtype: bfloat16 or float32 (or fix "
        "the hook that produces these inputs)"
    )


def check_fed(starved: Sequence[str], n_targets: int, experts: AbstractSet[str], batches: int,
              label_mask_value: int) -> None:
    """A layer that never received a token is an error; an expert its routers never pick is not (it ends at rank
    0 and is named as unrouted), unless nothing at all was fed."""
    if not starved:
        return
    if len(starved) == n_targets:
        raise DataError(
            f"no token reached any target layer in {batches} batches: every token was masked out. With "
            f"eva.use_label_mask only tokens whose label is not {label_mask_value} count, and prompts of "
            "data.max_length tokens or more leave no completion token. Raise data.max_length, or set "
            "eva.use_label_mask: false"
        )
    starved = [n for n in starved if n not in experts]
    if starved:
        raise DataError(
            f"{len(starved)} target layer(s) received no token in {batches} batches while the others did: "
            f"{_listed(starved)}. Check hooks.prepare_layer_inputs_fn and the label mask, or leave them out with "
            "eva.exclude_modules"
        )
