"""Re-budget a state: redistribute ranks for another r (or rho) from its stored spectrum, without a forward pass.

A state keeps every PCA's spectrum up to round(r * rho) components (the `.spectrum.safetensors` sidecar) and every
layer's explained-variance ratios, which is all EVA's redistribution reads. So a state computed once at r=16 serves
r=8 or r=4 directly. What the spectrum cannot serve (more components per layer than were kept) is refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, StateError
from ..core.remote import is_url
from ..eva.planning import allocate, component_caps
from ..model.layout import Layout, groups_with_singles
from .assemble import assemble_state
from .metadata import utc_now
from .remote_store import save_state
from .state import EvaState, refuse_existing
from .statecache import load_state


def shared_groups(meta: dict[str, Any]) -> list[list[str]]:
    """Every layer's PCA group (owner first): the recorded shared-input groups plus one group per other layer."""
    return groups_with_singles(meta.get("shared_inputs") or [], list(meta["ranks"]))


def rebudget(state: EvaState, r: int, rho: float | None = None) -> EvaState:
    """The state EVA's redistribution gives for rank budget r per layer (and rho), from the stored spectrum.

    Layers whose r was set by a rank_pattern keep their own r; alphas are rescaled per eva.adjust_scaling_factors.
    A layer counts as converged only if it was and its rank did not grow (more components were never checked).
    """
    meta = state.metadata
    rho = float(meta.rho if rho is None else rho)
    if r < 1 or rho < 1.0:
        raise ConfigError(f"r must be >= 1 and rho >= 1, got r={r}, rho={rho}")
    if not state.spectrum:
        raise StateError("this state has no spectrum (its .spectrum.safetensors sidecar is missing, or it was "
                         "converted from PEFT), so it cannot be re-budgeted; compute it again")
    layout = Layout.of(shared_groups(state.meta))
    owner = layout.owner_of
    layer_r = {n: (r if k == meta.r else int(k)) for n, k in meta.layer_r.items()}
    need = component_caps(layer_r, rho, meta.in_features, layout.groups)
    unrouted = set(meta.unrouted)  # experts no token reached: no spectrum, rank 0 whatever the budget
    need.update({n: 0 for n in unrouted})
    short = []
    for n, k in need.items():
        if n in unrouted:
            continue
        key = f"{owner[n]}.components"
        if key not in state.spectrum:
            raise StateError(f"the spectrum has no entry {key}: it does not belong to this state")
        stored = min(state.spectrum[key].shape[0], len(meta.explained_variance[n]))
        if k > stored:
            short.append(f"{n} needs {k}, has {stored}")
    if short:
        raise StateError(
            f"r={r}, rho={rho:g} needs more components than the state keeps (it was computed with r={meta.r}, "
            f"rho={meta.rho:g}): {'; '.join(short[:3])}{' ...' if len(short) > 3 else ''}. Choose a smaller r or "
            "rho, or compute the state again with a larger one"
        )
    ratios = {o: meta.explained_variance[o][: need[o]] for o in layout.owners}
    ranks = allocate(ratios, layout, sum(layer_r.values()), need, list(meta.ranks))
    converged = {n: bool(meta.converged.get(n)) and ranks[n] <= meta.ranks[n] for n in ranks}
    provenance = {"r": meta.r, "rho": meta.rho, "store_key": meta.store_key, "created": meta.created}
    new = replace(meta, r=r, rho=rho, layer_r=layer_r, ranks=ranks, max_components=need, converged=converged,
                  store_key=None, created=utc_now(), extra=meta.extra | {"rebudgeted_from": provenance})
    return assemble_state(new, state.spectrum, owner)


def rebudget_file(state_path: str | Path, output: str | Path, r: int, rho: float | None = None,
                  overwrite: bool = False) -> EvaState:
    """`evapipe rebudget`: load a state with its spectrum, re-budget it and write the result to `output` (an
    existing file only with `overwrite`). Either may be a URL."""
    if str(output) == str(state_path) or (not is_url(output) and Path(output).resolve() == Path(state_path).resolve()):
        raise ConfigError("--output must differ from --state (the original keeps the spectrum's provenance)")
    if not is_url(output):
        refuse_existing(output, overwrite)  # before the work; a URL is refused when written (create-if-absent)
    new = rebudget(load_state(state_path), r, rho)
    save_state(new, output, overwrite)
    return new
