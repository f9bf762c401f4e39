"""The EVA loop for a model bigger than memory: rounds of batches, one block at a time (model.offload: sequential).

The in-memory loop is `for batch: for block:` with a decision after every batch (ranks, which PCAs are done). Here
the loops are swapped within a *round* of `model.sequential_round` batches, so each block's weights are read from
the checkpoint once per round:

    head       every batch of the round runs up to the first block (embeddings, rotary, masks); every block's
               own call arguments (its layer type's mask and rotary embedding, shared objects held once) wait in
               host memory (onload.BlockModel.block_calls)
    blocks     for each block up to the deepest one an unconverged PCA sits in: materialise it, push every
               batch through it, feed the captured tokens of its unconverged PCAs to their owners (in batch
               order, as the in-memory loop does), keep a copy of each PCA after each batch, release the block;
               when a layer may come back (rho > 1, refine_converged), park each block's input of each batch
    replay     the decisions of the in-memory loop, step by step: agree on the ratios and similarities each
               PCA had after that batch, redistribute ranks, judge convergence. A PCA that converged at batch t
               is set back to its copy after batch t: it stops updating at the batch where it converged, exactly
               as in memory, however long the round.

The blocks fed every PCA that was unconverged when the round began, for every batch of the round. A step may need
a PCA the blocks' pass stopped feeding correctly (a converged layer whose rank grew, so that its new components
have not passed the cosine test; or one left out at an earlier step and back since): that PCA still holds its state
from the last batch it was fed, so the step runs its block once more on that batch's parked input (cut after the
layer: nothing needs the block's output) and feeds it, and the round goes on. Only where nothing was parked (rho 1
without refining: ranks stay put, so a converged layer is rarely needed again) or the block lies past the round's
deepest one does the round end before that step, the next one starting at its batch. So the state equals the
in-memory state on the same batches; what a round costs beyond that is the updates of PCAs after the batch where
they converged (discarded) and those block passes of one batch.

The shared-input groups and execution order come from one extra pass of the first batch's first sample (its real
tokens) through the blocks (rank 0, as in memory), before the first round, so that PCA owners are assigned over
all groups at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.config import EvaSettings
from ..core.distributed import Comm, collectively
from ..core.errors import ConfigError
from ..core.spill import Parked, Spill
from ..eva.guards import check_layer_inputs
from ..eva.planning import fed_at, layers_come_back
from ..eva.roundcopies import RoundCopies
from ..model.forward import Selection, UserHooks, to_device
from ..model.layout import Layout
from ..model.onload import BlockCalls, BlockInputs, BlockModel
from .driver import Driver, Read

HOST = torch.device("cpu")
log = logging.getLogger("evapipe")


class RoundLedger:
    """Which PCAs the blocks' pass still feeds correctly, step by step.

    Every PCA the round began with unconverged was fed every batch by the blocks' pass, and its copies hold what
    the in-memory loop computes for as long as it is needed at every step. Once a step leaves a PCA out, its later
    copies include updates the in-memory loop would not have made: from then on (and for a PCA the round never
    fed) a step that needs it must feed it that step's batch itself.
    """

    def __init__(self, fed: AbstractSet[str], owners: Sequence[str]):
        self.fed = set(fed)
        self.stopped = set(owners) - self.fed

    def off_pass(self, needed: AbstractSet[str]) -> set[str]:
        """What a step needs that the blocks' pass did not feed correctly up to it."""
        return set(needed) & self.stopped

    def take(self, needed: AbstractSet[str]) -> None:
        """The step is taken: what it left out drops out of the pass's care."""
        self.stopped |= self.fed - needed
        self.fed &= set(needed)


@dataclass
class _InFlight:
    """One batch of a round between blocks: its next block call (on the host; None once its pass stopped), how its
    tokens are selected, and every block's other arguments (kept for blocks run again)."""

    calls: BlockCalls | None
    selection: Selection | None
    each: list[tuple[tuple, dict[str, Any]]] = field(default_factory=list)


@dataclass
class _Round:
    """What a round's replay works with: its batches, their counts and PCA copies, and (`inputs` set: when a layer
    may come back) each block's input of each batch, parked by (block, batch) in a temporary file."""

    flights: list[_InFlight]
    counts: RoundCounts
    copies: RoundCopies
    start: int
    deepest: int
    inputs: Spill | None
    parked: dict[tuple[int, int], Parked] = field(default_factory=dict)
    again: int = 0  # blocks run again, one batch each, for layers off the blocks' pass


class RoundCounts:
    """The tokens each batch of a round counted, as the in-memory step would count them: rows of the first fed
    layer that is not an expert, else the tokens the experts modules saw (experts get only their routed share)."""

    def __init__(self, n: int, experts: AbstractSet[str]):
        self.rows: dict[str, dict[int, int]] = {}
        self.expert_tokens = [0] * n
        self.experts = experts

    def add(self, owners: Sequence[str], tokens: Mapping[str, torch.Tensor], j: int, expert_tokens: int) -> None:
        """Batch j's rows for `owners` (one block's fed PCAs); `expert_tokens`: what its experts modules counted."""
        for o in owners:
            self.rows.setdefault(o, {})[j] = int(tokens[o].shape[0]) if o in tokens else 0
        if tokens and any(o in self.experts for o in owners):
            self.expert_tokens[j] = expert_tokens

    def local(self, j: int, needed: AbstractSet[str], owners: Sequence[str]) -> int:
        """The tokens this rank counted at step j of the round, which fed `needed`."""
        first = next((o for o in owners if o in needed and o not in self.experts), None)
        if first is not None:
            return self.rows[first][j]
        return self.expert_tokens[j] if needed else 0


def first_rows(batch: Any) -> Any:
    """The first sample of a batch (every tensor that shares the batch's leading size, sliced) without its padding
    (the columns its 2-D attention mask leaves out at either end, cut from the tensors of the mask's shape), for the
    layout pass: which layers share an input
    and the order they run in show on one sample's tokens as on all, at a fraction of a batch's cost."""
    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch.values()) if isinstance(batch, Mapping) else []
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.ndim > 0]
    if not tensors:
        return batch
    n = tensors[0].shape[0]
    if isinstance(batch, torch.Tensor):
        return batch[:1]
    one = {k: v[:1] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v for k, v in batch.items()}
    mask = one.get("attention_mask")
    kept = mask[0].nonzero().flatten() if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
    if kept is None or not len(kept):
        return one
    lo, hi, shape = int(kept[0]), int(kept[-1]) + 1, mask.shape
    if any(isinstance(v, torch.Tensor) and v.ndim > 2 and v.shape[:2] == shape for v in one.values()):
        return one  # (1, length, ...): embeddings by position, or a coincidence of sizes; left whole
    return {k: v[:, lo:hi] if isinstance(v, torch.Tensor) and v.shape == shape else v for k, v in one.items()}


class SequentialRun(Driver):
    """The driver over a BlockModel: the shared PCA pool, agreement, decisions and checkpoints, taken round by
    round (a round: every batch through one block before the next)."""

    def __init__(self, blocks: BlockModel, settings: EvaSettings, comm: Comm | None = None,
                 hooks: UserHooks | None = None, round_size: int = 8):
        # the model holds no weights between passes, so its parameters cannot say where PCAs and batches belong
        super().__init__(blocks.model, settings, blocks.device, comm, hooks)
        self.blocks, self.round_size = blocks, round_size
        prefix = f"{blocks.blocks_name}."
        outside = [n for n in self.names if not n.startswith(prefix)]
        if outside:
            raise ConfigError(
                f"model.offload: sequential captures layers inside {blocks.blocks_name} only, and "
                f"{len(outside)} target(s) lie outside it: {', '.join(outside[:4])}; leave them out with "
                "eva.exclude_modules"
            )
        self.block_of = {n: int(n[len(prefix):].split(".")[0]) for n in self.names}

    @property
    def window(self) -> int:
        return self.round_size

    # -- the parts of a round --------------------------------------------------------------------------------
    def _enter(self, batch: Any) -> _InFlight:
        """Run a batch up to the first block; every block's call waits on the host."""
        if batch is None:
            return _InFlight(None, None)
        src = self.source
        batch = to_device(batch, self.blocks.device)
        selection = src.selection(batch)
        calls: list[BlockCalls] = []
        src.capture_pass(lambda: calls.append(self.blocks.block_calls(lambda: src.hooks.forward(src.model, batch))),
                         selection)
        host = calls[0].to(HOST)
        return _InFlight(host, selection, host.calls)

    def _pass(self, block: torch.nn.Module, call: BlockInputs, item: _InFlight,
              first: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """One batch's call through one block under the capture hooks: the captured layers' tokens, and the block's
        output (None where the pass stopped after the last layer it captures)."""
        out = []
        tokens = self.source.capture_pass(lambda: out.append(self.blocks.call(block, call)), item.selection, first)
        check_layer_inputs(tokens, self.core.width)
        return tokens, (out[0] if out else None)

    def _through(self, i: int, block: torch.nn.Module, item: _InFlight, first: bool = False) -> dict[str, torch.Tensor]:
        """One batch through block i, called as the model calls it: its active layers' tokens; the batch moves on
        to the next block."""
        if item.calls is None:
            return {}
        tokens, out = self._pass(block, item.calls.inputs(i, self.blocks.device), item, first)
        if out is not None:
            item.calls.hidden = out.to(HOST)
        else:
            item.calls = None
        return tokens

    def _again(self, i: int, block: torch.nn.Module, rnd: _Round, j: int) -> dict[str, torch.Tensor]:
        """Batch j through block i once more, from the block's parked input: the tokens of the layers captured."""
        item, parked = rnd.flights[j], rnd.parked.get((i, j))
        if parked is None or rnd.inputs is None:
            return {}
        args, kwargs = item.each[i]
        return self._pass(block, BlockInputs(rnd.inputs.read(parked), args, kwargs).to(self.blocks.device), item)[0]

    def _layout(self, item: _InFlight) -> Layout:
        """Shared-input groups and execution order from the first batch, pushed through the blocks one by one."""
        groups: list[list[str]] = []
        order: list[str] = []
        for i in range(max(self.block_of.values()) + 1):
            names = [n for n in self.names if self.block_of[n] == i]
            self.source.capture_only(names)
            with self.blocks.onloaded(i) as block:
                self._through(i, block, item, first=bool(names))
            if names:
                seen = self.source.seen(names)
                groups += seen[0]
                order += seen[1]
        if not groups:
            raise ConfigError("the first batch reached none of the target layers; check eva.target_modules")
        return Layout.of(groups, order)

    def _feed(self, owners: Sequence[str], tokens: dict[str, torch.Tensor], rnd: _Round, j: int) -> None:
        """Route the tokens of `owners` from the round's batch j to their owner ranks, update, and keep a copy of
        each PCA."""
        pool = self.pool
        rnd.counts.add(owners, tokens, j, self.core.experts.tokens)
        routed = pool.route(tokens, list(owners))
        with collectively(self.comm):  # a failed update or copy (a full temporary folder) stops every rank
            pool.update(routed, rnd.start + j)
            for o, state in self.core.states(list(owners)).items():
                rnd.copies.keep(o, j, state)

    def _start(self, batches: list[Read]) -> list[_InFlight]:
        """Every batch of the round up to the first block; on the first round, rank 0's layout adopted."""
        error = next((e for _, e in batches if e is not None), None)
        items: list[_InFlight] = []
        layout, layout_item, first = None, None, self.core.first
        with collectively(self.comm, error):
            if error is None:
                with self.blocks.head():
                    items = [self._enter(b) for b, _ in batches]
                    layout_item = self._enter(first_rows(batches[0][0])) if first and self.comm.is_main else None
                if layout_item is not None:  # rank 0's layout for every rank, as in memory
                    layout = self._layout(layout_item)
        if first:
            self.adopt(self.core.agreed_layout(layout))
        return items

    def take(self, items: list[Read], after_step: Callable[[], bool]) -> int:
        """One round over `items` (this rank's shares); returns how many steps it took (a prefix of them)."""
        flights = self._start(items)
        owners = self.progress.layout.owners
        needed = self._fed()
        fed = [o for o in owners if o in needed]
        deepest = max(self.block_of[o] for o in fed)
        with RoundCopies() as copies, Spill("block inputs") as inputs:
            rnd = _Round(flights, RoundCounts(len(flights), set(self.core.share)), copies, self.progress.step,
                         deepest, inputs if self.may_come_back else None)
            for i in range(deepest + 1):
                here = [o for o in fed if self.block_of[o] == i]
                self.source.capture_only(here)
                with self.blocks.onloaded(i) as block:
                    for j, item in enumerate(flights):
                        if rnd.inputs is not None and item.calls is not None:
                            rnd.parked[i, j] = rnd.inputs.park(item.calls.hidden)
                        tokens = {}
                        with collectively(self.comm):
                            tokens = self._through(i, block, item)
                        if here:
                            self._feed(here, tokens, rnd, j)
            taken = self._replay(owners, fed, rnd, after_step)
        early = taken < len(flights) and not self.done and self.progress.step != self.settings.max_batches
        log.info("sequential round at step %d: %d batch(es) through blocks 0-%d, %d step(s) taken%s%s", rnd.start,
                 len(flights), deepest, taken,
                 f"; {rnd.again} block pass(es) of one batch again for layers needed after they had stopped"
                 if rnd.again else "",
                 " (a layer that had stopped is needed again: the next round starts there)" if early else "")
        return taken

    @property
    def may_come_back(self) -> bool:
        """Whether the blocks' inputs are parked, to feed a layer that is needed again after it had stopped."""
        return layers_come_back(self.settings.rho, self.settings.refine_converged)

    def _refeed(self, again: AbstractSet[str], rnd: _Round, j: int) -> bool:
        """Feed the PCAs a step needs off the blocks' pass (a converged layer whose rank grew, and any that came
        back before) the round's batch j, from their blocks' parked inputs, each block cut after its last such
        layer: each PCA goes on from where it stopped, as in memory. False (the round then ends before step j)
        when no inputs were parked or a block lies past the round's deepest one."""
        blocks = sorted({self.block_of[o] for o in again})
        if rnd.inputs is None or blocks[-1] > rnd.deepest:
            return False
        for i in blocks:
            here = [o for o in self.progress.layout.owners if o in again and self.block_of[o] == i]
            self.source.capture_then_stop(here)
            with self.blocks.onloaded(i) as block:
                tokens = {}
                with collectively(self.comm):
                    tokens = self._again(i, block, rnd, j)
                self._feed(here, tokens, rnd, j)
        rnd.again += len(blocks)
        return True

    def _fed(self) -> set[str]:
        """What the in-memory loop feeds at the next step (every PCA at the first: none is done yet)."""
        p = self.progress
        return fed_at(p.layout.order, p.verdict, self.settings.refine_converged)

    def _replay(self, owners: list[str], fed: list[str], rnd: _Round, after_step: Callable[[], bool]) -> int:
        """The in-memory loop's decisions over the round's batches; each PCA set back to its copy after the last
        batch it would have been fed."""
        ledger, core, n = RoundLedger(set(fed), owners), self.core, len(rnd.flights)
        for j in range(n):
            needed = set(fed) if j == 0 else self._fed()
            again = ledger.off_pass(needed)
            if again and not self._refeed(again, rnd, j):
                return j
            ledger.take(needed)
            core.set_back({o: rnd.copies.get(o, j, self.blocks.device) for o in core.states(sorted(needed))})
            core.agree(rnd.counts.local(j, needed, owners))
            if after_step():
                return j + 1
        return n
