"""CorDA's statistics: every target layer's input covariance over the task data, as PEFT's preprocess_corda defines it.

PEFT hooks each target layer, feeds one sample per forward and, per sample X (tokens x in_features), adds
(X / |max X|)^T (X / |max X|) to the layer's sum (max: the largest element, then its absolute value) and counts the
call; the covariance is the sum divided by the count. Here a batch of samples goes through the model at once:

* `normalised_rows` takes a layer's batched input, keeps the attended tokens (padding never counts, so the sums do
  not depend on the batch size) and divides each sample's rows by its own |max|, so one product rows^T rows adds
  exactly PEFT's per-sample terms;
* `SampleInputs` is the producer: capture.py's hooks on the targets (one per shared-input group: q/k/v read the same
  tensor, so they share one covariance), the pass cut after the last target;
* `CovarianceSums` is the accumulator: each group's sum lives on ONE owner rank (placed by cost as EVA's PCAs are,
  distributed.assign_owners); every step each rank routes its normalised rows to the owners (comm.route) and the
  sample counts are summed over ranks, so no rank ever holds all the covariances.

A driver feeds `CovarianceSums.add` with rows for any subset of the groups, so a block-by-block (sequential) driver
can feed it one block at a time; `snapshot`/`restore` are what a checkpoint keeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.distributed import Comm, assign_owners, collectively
from ..core.errors import ConfigError, DataError
from ..model.capture import Capture, TokenSelector, shared_input_groups
from ..model.forward import ForwardFn, default_forward, to_device
from ..model.layout import Layout
from ..model.streams import LayerStreams, stream_masks


def normalised_rows(x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(rows, samples): a layer input's counted rows in float32, each divided by |max| of its own sample's counted
    rows, and how many samples had a counted row.

    `x` is (samples, ..., features) (a 2-D input: one row per sample); `keep` the flat indices of the counted rows
    of x viewed as (rows, features), None for all. A sample whose max is 0 is a DataError, as PEFT's NaN check is.
    """
    x = x.detach()
    flat = x.reshape(-1, x.shape[-1]).float()
    per_sample = flat.shape[0] // x.shape[0] if x.ndim > 2 else 1
    index = torch.arange(flat.shape[0], device=flat.device) if keep is None else keep.to(flat.device)
    rows, sample = flat.index_select(0, index), index // per_sample
    peak = torch.full((x.shape[0],), float("-inf"), device=flat.device)
    peak = peak.scatter_reduce(0, sample, rows.amax(dim=1), reduce="amax")
    counted = torch.isfinite(peak)
    scale = peak.abs()
    if bool((scale[counted] == 0).any()):
        raise DataError("a sample's layer input is all zeros (its max is 0), so PEFT's normalisation divides by 0")
    return rows / scale[sample].unsqueeze(1), int(counted.sum())


class SampleInputs:
    """Forward passes that return, per shared-input group, the normalised rows of its owner layer and the number of
    samples they came from. The first pass records the groups and the execution order (see `layout`)."""

    def __init__(self, model: nn.Module, names: Sequence[str], device: torch.device,
                 forward_fn: ForwardFn | None = None):
        self.model, self.names, self.device = model, list(names), device
        self.forward_fn = forward_fn or default_forward
        self.streams = LayerStreams(model, self.names)
        self.capture = Capture(model, self.names, self._rows)
        self.samples: dict[str, int] = {}
        self.first = True
        self.groups: list[list[str]] = []  # from the first pass (see layout)
        self.forward_s = 0.0

    def _rows(self, args: tuple, selector: TokenSelector | None, name: str) -> torch.Tensor:
        """capture.py's layer function: the counted rows, normalised per sample; counts their samples."""
        x = args[0]
        keep = selector.flat_index(x, name) if selector is not None else None
        rows, n = normalised_rows(x, keep)
        self.samples[name] = self.samples.get(name, 0) + n  # a layer called twice per pass counts twice, as in PEFT
        return rows

    def forward(self, batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """({layer: rows}, {layer: samples}) of one batch through the whole model (None: nothing this step)."""
        if batch is None:
            return {}, {}
        batch = to_device(batch, self.device)
        tokens, samples = self.run(lambda: self.forward_fn(self.model, batch), self.selector(batch))
        if self.first:
            self.first = False
            self.groups = shared_input_groups(self.capture.raw, self.names)
            self.capture.raw = None  # the first pass's raw inputs served the groups; do not keep them
        return tokens, samples

    def selector(self, batch: Any) -> TokenSelector | None:
        """Which rows of a batch (on the device) count: every attended token, as PEFT's one-sample forwards see."""
        masks = stream_masks(batch, False, -100, self.streams.encoder_decoder)
        return TokenSelector(masks, self.streams) if masks else None

    def run(self, forward: Callable[[], Any], selector: TokenSelector | None,
            first: bool | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """({layer: rows}, {layer: samples}) of the active layers `forward` reaches: a whole model's pass, or one
        block's (a sequential driver); `first` (default: until the groups are known) records raw inputs and order."""
        self.capture.select(None, selector)
        self.samples = {}
        t0 = time.perf_counter()
        with self.streams.watching():
            tokens = self.capture.run(forward, self.first if first is None else first)
        self.forward_s += time.perf_counter() - t0
        return tokens, {n: self.samples.get(n, 0) for n in tokens}

    def layout(self) -> Layout:
        """Groups of layers with identical inputs (owner first) and the execution order, from the first pass."""
        seen = {n for g in self.groups for n in g}
        unused = [n for n in self.names if n not in seen]
        if unused:
            raise ConfigError(f"{len(unused)} target layer(s) got no input in the first forward pass (the model's "
                              f"forward does not use them): {', '.join(unused[:6])}; leave them out of "
                              "corda.target_modules")
        return Layout.of(self.groups, self.capture.order)

    def follow(self, layout: Layout) -> None:
        """Capture the group owners only, and cut every pass after the last of them (rank 0's order)."""
        self.first = False
        self.capture.active = set(layout.owners)
        order = [n for n in layout.order if n in self.capture.active]
        self.capture.stop_at = order[-1] if order and len(layout.order) == len(self.names) else None

    def close(self) -> None:
        self.capture.remove()


@dataclass
class CovarianceSum:
    """One group's running sum of normalised X^T X (float32, in_features^2), on its owner rank."""

    total: torch.Tensor


@dataclass
class CordaSnapshot:
    """A CorDA run after a step: the shared loop state, and this rank's own sums (on the CPU). A checkpoint
    (checkpoint.py) keeps it; `loop()` is its JSON part."""

    step: int
    layout: Layout
    samples: dict[str, int]
    tokens: dict[str, int]
    states: dict[str, CovarianceSum] = field(default_factory=dict)
    state_cls = CovarianceSum  # what checkpoint.py reads a rank's states back as

    def loop(self) -> dict[str, Any]:
        groups, order = [list(g) for g in self.layout.groups], list(self.layout.order)
        return {"progress": {"step": self.step, "groups": groups, "order": order},
                "samples": dict(self.samples), "tokens": dict(self.tokens)}

    @classmethod
    def from_loop(cls, loop: dict[str, Any], states: dict[str, CovarianceSum]) -> CordaSnapshot:
        p = loop["progress"]
        return cls(p["step"], Layout.of(p["groups"], p["order"]), dict(loop["samples"]), dict(loop["tokens"]), states)


class CovarianceSums:
    """The covariance sums of one run: `sums` holds the groups this rank owns, `owner_rank` where every one lives;
    `samples` / `tokens` (every group's, summed over ranks) are known on every rank."""

    def __init__(self, comm: Comm, width: Mapping[str, int], device: torch.device):
        self.comm, self.width, self.device = comm, dict(width), device
        self.layout: Layout | None = None
        self.owner_rank: dict[str, int] = {}
        self.sums: dict[str, CovarianceSum] = {}
        self.samples: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.step = 0  # steps (batches of every rank) fully added: the driver counts them
        self.add_s = self.comm_s = 0.0

    def place(self, layout: Layout, restored: Mapping[str, CovarianceSum] = {}) -> None:
        """Give every group an owner rank, balanced by its cost (in_features^2 per row to add, and one SVD per
        member at the end), and create the sums this rank owns (or take them from a checkpoint)."""
        owners = layout.owners
        costs = [self.width[o] ** 2 * len(layout.members({o})) for o in owners]
        self.layout = layout
        self.owner_rank = dict(zip(owners, assign_owners(costs, self.comm.world)))
        mine = [o for o in owners if self.owner_rank[o] == self.comm.rank]
        self.sums = {o: CovarianceSum((restored[o].total if o in restored else
                                       torch.zeros(self.width[o], self.width[o])).to(self.device, torch.float32))
                     for o in mine}
        self.samples = {o: self.samples.get(o, 0) for o in owners}
        self.tokens = {o: self.tokens.get(o, 0) for o in owners}

    def add(self, tokens: Mapping[str, torch.Tensor], samples: Mapping[str, int]) -> None:
        """Fold rows into the sums: one batch of every rank, for any of the groups (keyed by group owner: all of
        them in memory, one block's with sequential onloading). A collective: every rank calls it alike. Rows go to
        their group's owner; sample and row counts are summed over ranks. The driver counts the steps."""
        owners = self.layout.owners
        local = {o: tokens.get(o, torch.empty(0, self.width[o], device=self.device)) for o in owners}
        t0 = time.perf_counter()
        routed = self.comm.route(local, self.owner_rank)  # failures (out of memory) agreed inside
        self.comm_s += time.perf_counter() - t0
        counts = torch.tensor([float(samples.get(o, 0)) for o in owners] + [float(local[o].shape[0]) for o in owners],
                              dtype=torch.float64)
        with collectively(self.comm, values=lambda: counts) as shared:
            t0 = time.perf_counter()
            for o, rows in routed.items():
                if rows.shape[0]:
                    rows = rows.to(self.device, torch.float32)
                    self.sums[o].total.addmm_(rows.T, rows)
            self.add_s += time.perf_counter() - t0
        agreed = [int(v) for v in shared.values.tolist()]
        for i, o in enumerate(owners):
            self.samples[o] += agreed[i]
            self.tokens[o] += agreed[len(owners) + i]

    def covariances(self) -> dict[str, torch.Tensor]:
        """This rank's covariances once the pass is done: each sum divided by the samples it was fed (PEFT's
        definition), in place, so the sums' memory becomes the covariances' (no second copy); the sums end."""
        empty = [o for o in self.sums if self.samples[o] == 0]
        if empty:
            raise DataError(f"{', '.join(empty[:4])} received no sample of the data; their covariance is undefined")
        out = {o: s.total.div_(self.samples[o]) for o, s in self.sums.items()}
        self.sums = {}
        return out

    def snapshot(self) -> CordaSnapshot:
        return CordaSnapshot(self.step, self.layout, dict(self.samples), dict(self.tokens),
                             {o: CovarianceSum(s.total.detach().cpu()) for o, s in self.sums.items()})

    def restore(self, snap: CordaSnapshot) -> None:
        """Continue from `snapshot()` of a run with the same settings and world size."""
        self.samples, self.tokens, self.step = dict(snap.samples), dict(snap.tokens), snap.step
        self.place(snap.layout, snap.states)
