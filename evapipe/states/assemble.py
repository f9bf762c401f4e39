"""PCA spectra + ranks -> an EvaState: the one place that says what a layer's LoRA A init is.

A layer of rank k gets the top k components of its group's PCA (a shared PCA serves every member: each takes its
own leading rows), divided by sqrt(singular value) when whitening. The spectrum kept beside the state holds every
PCA's components and singular values keyed by the owner, which is what re-budgeting reads back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .metadata import StateMeta
from .state import EvaState

Spectrum = Mapping[str, torch.Tensor]  # "<owner>.components" (k, in_features), "<owner>.singular_values" (k,)


def spectrum_entries(owner: str, components: torch.Tensor, singular_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """One PCA's entries in a spectrum (float32)."""
    return {f"{owner}.components": components.float(), f"{owner}.singular_values": singular_values.float()}


def layer_init(spectrum: Spectrum, owner: str, rank: int, whiten: bool) -> torch.Tensor:
    """A (rank, in_features) for a layer whose PCA `owner` owns: its top components, whitened if asked."""
    a = spectrum[f"{owner}.components"][:rank].clone().float()
    if whiten:
        a /= spectrum[f"{owner}.singular_values"][:rank].float().clamp_min(1e-12).sqrt().unsqueeze(1)
    return a


def assemble_state(meta: StateMeta, spectrum: Spectrum, owner_of: Mapping[str, str]) -> EvaState:
    """The state of `meta.ranks`: every layer of rank > 0 gets its init from the spectrum, and the patterns are
    recomputed from the ranks, so they never disagree with the tensors."""
    tensors = {n: layer_init(spectrum, owner_of[n], k, bool(meta.whiten)) for n, k in meta.ranks.items() if k > 0}
    return EvaState(tensors, meta.with_patterns().to_dict(), dict(spectrum))


def state_from_inits(tensors: Mapping[str, torch.Tensor], meta: StateMeta) -> EvaState:
    """A state from ready LoRA A inits (a PEFT EVA state dict: no spectrum, rank-0 layers as zero-row tensors)."""
    kept = {n: a.detach().float().cpu() for n, a in tensors.items() if a.shape[0] > 0}
    return EvaState(kept, meta.with_patterns().to_dict())
