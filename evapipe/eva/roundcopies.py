"""The PCA states a sequential round keeps for its replay, their bulk in a temporary file instead of host memory.

A round (sequential.py) pushes every batch through one block before the next, so the in-memory loop's decisions are
replayed after the last block: each PCA must be set back to its state after any batch of the round. Those copies are
the round's largest host cost -- per batch, every PCA's components and mean (n_track x n_features), 8 x 660 MiB for
Llama-3.1-70B at the default round -- and the replay reads each once, in batch order. So they are written to an
unlinked temporary file (in TMPDIR) as they are made and read back one at a time: host memory holds the live PCAs,
not a round of their copies. The small fields (counts, variance, singular values, similarities) stay in memory.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from ..core.spill import Parked, Spill
from .ipca import PCAState

HOST = torch.device("cpu")
FILED = ("components", "mean")  # the per-feature tensors; the others (a few numbers per component) stay in memory


class RoundCopies:
    """Per PCA, its copy after each batch of a round (by the batch's place in the round); their FILED tensors wait
    in the file. A later copy for the same batch replaces the earlier (a PCA fed those batches again)."""

    def __init__(self) -> None:
        self._spill = Spill("PCA copies")
        self._kept: dict[str, dict[int, tuple[PCAState, dict[str, Parked]]]] = {}

    def __enter__(self) -> RoundCopies:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the copies; the file (unlinked from the start) goes with them."""
        self._spill.close()
        self._kept = {}

    def keep(self, name: str, j: int, state: PCAState) -> None:
        """Keep a copy of `state` after the round's batch j, which later updates of it cannot change."""
        small, stored = {}, {}
        for f in fields(state):
            if not f.init:
                continue
            v = getattr(state, f.name)
            if isinstance(v, torch.Tensor) and f.name in FILED:
                stored[f.name] = self._spill.park(v)
                small[f.name] = None
            elif isinstance(v, torch.Tensor):
                small[f.name] = v.to(HOST, copy=True)
        light = replace(state, **small, history=list(state.history))
        self._kept.setdefault(name, {})[j] = (light, stored)

    def get(self, name: str, j: int, device: torch.device) -> PCAState:
        """`name`'s copy after the round's batch j, every tensor on `device`."""
        light, stored = self._kept[name][j]
        values = {f.name: getattr(light, f.name) for f in fields(light) if f.init}
        values = {k: v.to(device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        values |= {k: self._spill.read(s).to(device) for k, s in stored.items()}
        return replace(light, **(values | {"history": list(light.history)}))
