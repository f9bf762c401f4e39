"""The PCA side of EVA as one part: an incremental PCA per shared-input group, each on its owner rank.

A driver hands it, every step, the tokens this rank captured for some groups (keyed by owner layer); `route` sends
every group's rows to its owner (a collective: every rank calls it with the same groups), `update` folds them into
the owner's PCA. Which groups a step feeds, and how the tokens were produced (a full forward pass, one block of a
model, the tokens routed to one expert), is the driver's business.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace

import torch

from ..core.distributed import Comm, assign_owners
from . import ipca
from .guards import non_finite_inputs


class PCAPool:
    """The PCAs of one run: `states` holds the ones this rank owns, `owner_rank` says where every one lives."""

    def __init__(self, comm: Comm, width: Mapping[str, int], oversample: int | None, device: torch.device,
                 share: Mapping[str, float] = {}):
        self.comm, self.width, self.oversample, self.device = comm, dict(width), oversample, device
        self.share = dict(share)  # a PCA fed a share of the tokens (an expert: top_k / experts); 1 when absent
        self.states: dict[str, ipca.PCAState] = {}
        self.owner_rank: dict[str, int] = {}
        self.svd_s = self.comm_s = 0.0
        self.tokens = 0  # rows this rank's PCAs were fed

    def place(self, owners: Sequence[str], caps: Mapping[str, int], restored: Mapping[str, ipca.PCAState] = {}) -> None:
        """Give every group's PCA an owner rank, balanced by update cost (the same on every rank), and create the
        ones this rank owns (or take them from a checkpoint's `restored`). Seeds follow the group's position."""
        fresh = [ipca.new_state(self.width[o], caps[o], self.oversample, seed=i) for i, o in enumerate(owners)]
        # an update costs about rows x in_features x (tracked + random directions), the rows being the same for all
        # layers and, for an expert, its share of them
        costs = [self.share.get(o, 1.0) * s.n_features * (s.n_track + ipca.EXTRA_RANDOM_DIRECTIONS)
                 for o, s in zip(owners, fresh)]
        self.owner_rank = dict(zip(owners, assign_owners(costs, self.comm.world)))
        self.states = {o: restored.get(o) or s for o, s in zip(owners, fresh) if self.owner_rank[o] == self.comm.rank}
        self.states = {o: state_to(s, self.device) for o, s in self.states.items()}

    @property
    def owned(self) -> list[str]:
        return list(self.states)

    def route(self, tokens: Mapping[str, torch.Tensor], groups: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each of `groups` (owner layers; the same list on every rank) gets the rows all ranks captured for it,
        on its owner; a group this rank captured nothing for sends an empty placeholder."""
        dtype = next(iter(tokens.values())).dtype if tokens else torch.float32
        local = {o: tokens.get(o, torch.empty(0, self.width[o], device=self.device, dtype=dtype)) for o in groups}
        t0 = time.perf_counter()
        routed = self.comm.route(local, self.owner_rank)  # moves them to the collective device; failures agreed
        self.comm_s += time.perf_counter() - t0
        return {o: v for o, v in routed.items() if o in self.states}

    def update(self, routed: Mapping[str, torch.Tensor], step: int) -> None:
        """Fold routed rows into this rank's PCAs (layers of the same width share batched algebra); rows with NaN/Inf
        are a DataError naming their layers and batch `step`, before any PCA changes."""
        t0 = time.perf_counter()
        mine = list(routed)
        try:
            ipca.update_many([self.states[o] for o in mine], [routed[o].to(self.device) for o in mine])
        except ipca.NonFiniteInputs as err:
            bad = [mine[i] for i in err.indices]
            raise non_finite_inputs(bad, routed[bad[0]].dtype, step) from None
        self.tokens += sum(int(routed[o].shape[0]) for o in mine)
        self.svd_s += time.perf_counter() - t0

    def on_cpu(self) -> dict[str, ipca.PCAState]:
        """Copies of this rank's PCAs on the CPU (for checkpoints and the gather to rank 0)."""
        return {o: state_to(s, "cpu") for o, s in self.states.items()}


def state_to(s: ipca.PCAState, device: torch.device | str) -> ipca.PCAState:
    """A copy of a PCA state with every tensor field on `device` (tensors already there are shared, not copied)."""
    moved = {f.name: getattr(s, f.name) for f in fields(s) if f.init}
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
    return replace(s, **(moved | {"history": list(s.history)}))
