"""CorDA's pass for a model bigger than memory (model.offload: sequential): rounds of batches, one block at a time.

As EVA's sequential loop does (sequential.py), the two loops of the forward pass are swapped within a round of
`model.sequential_round` batches, so every block's weights are read once per round (onload.BlockModel):

    head     every batch of the round runs up to the first block; its call waits in host memory
    blocks   block by block: materialise it, push every batch through it, add the rows of the covariance groups that
             sit in it to their owners' sums (corda_stats.CovarianceSums.add, one batch at a time), release it
    end      after the pass, each block once more to decompose the layers whose covariances this rank owns

CorDA has no decision between batches (each sample is added once, whatever came before), so a round is exact
whatever its length: the sums equal the in-memory job's. The groups and the execution order come from one pass of
the first batch through the blocks on rank 0 before the first round, so owners are placed over all groups at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..corda.decompose import Eigens, decompose_owned
from ..corda.stats import CovarianceSums, SampleInputs
from ..core.distributed import Comm, collectively
from ..core.errors import ConfigError
from ..model.capture import TokenSelector, shared_input_groups
from ..model.forward import to_device
from ..model.layout import Layout
from ..model.onload import BlockInputs, BlockModel

HOST = torch.device("cpu")
log = logging.getLogger("evapipe")


@dataclass
class _InFlight:
    """One batch of a round between blocks: its next block call (on the host) and which of its rows count."""

    call: BlockInputs | None
    selector: TokenSelector | None


class BlockDriver:
    """Feeds CovarianceSums block by block; `round(batches)` takes one round, `decompose` ends the job."""

    def __init__(self, blocks: BlockModel, inputs: SampleInputs, sums: CovarianceSums, comm: Comm):
        self.blocks, self.inputs, self.sums, self.comm = blocks, inputs, sums, comm
        prefix = f"{blocks.blocks_name}."
        outside = [n for n in inputs.names if not n.startswith(prefix)]
        if outside:
            raise ConfigError(f"model.offload: sequential captures layers inside {blocks.blocks_name} only, and "
                              f"{len(outside)} target(s) lie outside it: {', '.join(outside[:4])}; leave them out "
                              "of corda.target_modules")
        self.block_of = {n: int(n[len(prefix):].split(".")[0]) for n in inputs.names}

    def _enter(self, batch: Any) -> _InFlight:
        if batch is None:
            return _InFlight(None, None)
        batch = to_device(batch, self.blocks.device)
        src = self.inputs
        call = self.blocks.block_inputs(lambda: src.forward_fn(src.model, batch))
        return _InFlight(call.to(HOST), src.selector(batch))

    def _through(self, block: torch.nn.Module, item: _InFlight,
                 first: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """One batch through one block: the active layers' rows; the batch moves on to the next block."""
        if item.call is None:
            return {}, {}
        out: list[torch.Tensor] = []
        call = item.call.to(self.blocks.device)
        tokens, samples = self.inputs.run(lambda: out.append(self.blocks.call(block, call)), item.selector, first)
        item.call = BlockInputs(out[0].to(HOST), item.call.args, item.call.kwargs)
        return tokens, samples

    def _capture(self, names: list[str]) -> None:
        capture = self.inputs.capture
        capture.active, capture.stop_at = set(names), None  # whole blocks: a block's output feeds the next

    def layout(self, batch: Any) -> Layout:
        """Shared-input groups and execution order from one batch pushed through every block (rank 0)."""
        with self.blocks.head():
            item = self._enter(batch)
        groups: list[list[str]] = []
        order: list[str] = []
        capture = self.inputs.capture
        for i in range(max(self.block_of.values()) + 1):
            names = [n for n in self.inputs.names if self.block_of[n] == i]
            self._capture(names)
            with self.blocks.onloaded(i) as block:
                self._through(block, item, first=bool(names))
            if names and capture.raw:
                groups += shared_input_groups(capture.raw, names)
                order += capture.order
        capture.raw = None
        return Layout.of(groups, order)

    def round(self, batches: list[Any]) -> None:
        """Every batch of a round (this rank's shares; None: an empty share) into the sums, block by block."""
        items: list[_InFlight] = []
        with collectively(self.comm):
            with self.blocks.head():
                items = [self._enter(b) for b in batches]
        owners = self.sums.layout.owners
        for i in range(max(self.block_of[o] for o in owners) + 1):
            here = [o for o in owners if self.block_of[o] == i]
            self._capture(here)
            with self.blocks.onloaded(i) as block:
                for item in items:
                    tokens: dict[str, torch.Tensor] = {}
                    samples: dict[str, int] = {}
                    with collectively(self.comm):
                        tokens, samples = self._through(block, item)
                    if here:
                        self.sums.add(tokens, samples)
        self.sums.step += len(batches)
        log.info("CorDA round at step %d: %d batch(es) through blocks 0-%d", self.sums.step - len(batches),
                 len(batches), i)

    def decompose(self, covariances: Mapping[str, torch.Tensor], r: int, method: str) -> dict[str, Eigens]:
        """Each block once more: the layers whose covariance this rank owns, decomposed with the block on the
        device."""
        out: dict[str, Eigens] = {}
        groups = self.sums.layout.groups
        for i in sorted({self.block_of[g[0]] for g in groups if g[0] in covariances}):
            with self.blocks.onloaded(i) as _:
                out |= decompose_owned(self.blocks.model, [g for g in groups if self.block_of[g[0]] == i],
                                       covariances, r, method)
        return out


def step_groups(it: Iterator[Any], size: int, ended: Callable[[int], bool],
           step: int) -> Iterator[tuple[list[Any], BaseException | None]]:
    """This rank's batches in groups of up to `size` steps (a sequential round; 1 in memory), ending with the pass
    (`ended(step)` true); a read error ends the group it falls in, with the error (agreed on by the caller)."""
    while not ended(step):
        batches: list[Any] = []
        while len(batches) < size and not ended(step + len(batches)):
            try:
                batch = next(it)
            except Exception as err:
                yield batches, err
                return
            if ended(step + len(batches)):  # a stream learns its length when its pass ends
                break
            batches.append(batch)
        if batches:
            yield batches, None
        step += len(batches)
        if not batches:
            return
