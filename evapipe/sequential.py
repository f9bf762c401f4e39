"""The EVA loop for a model bigger than memory: rounds of batches, one block at a time (model.offload: sequential).

The in-memory loop is `for batch: for block:` with a decision after every batch (ranks, which PCAs are done). Here
the loops are swapped within a *round* of `model.sequential_round` batches, so each block's weights are read from
the checkpoint once per round:

    head       every batch of the round runs up to the first block (embeddings, rotary, masks); the first
               block's call arguments wait in host memory (onload.BlockModel.block_inputs)
    blocks     for each block up to the deepest one an unconverged PCA sits in: materialise it, push every
               batch through it, feed the captured tokens of its unconverged PCAs to their owners (in batch
               order, as the in-memory loop does), keep a copy of each PCA after each batch, release the block
    replay     the decisions of the in-memory loop, step by step: agree on the ratios and similarities each
               PCA had after that batch, redistribute ranks, judge convergence. A PCA that converged at batch t
               is set back to its copy after batch t: it stops updating at the batch where it converged, exactly
               as in memory, however long the round.

The blocks fed every PCA that was unconverged when the round began, for every batch of the round. The replay stays
exact while the PCAs each step needs are among those still fed; when a step needs one that was not (a converged
PCA whose rank grew, so that its new components have not passed the cosine test), the round ends before that
step and the next round starts at its batch. So the state equals the in-memory state on the same batches; what a
round costs beyond that is the updates of PCAs after the batch where they converged (discarded).

The shared-input groups and execution order come from one extra pass of the first batch's first sample through
the blocks (rank 0, as in memory), before the first round, so that PCA owners are assigned over all groups at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .agreement import Agreement
from .capture import shared_input_groups
from .config import EvaSettings
from .distributed import Comm, collectively
from .engine import EvaRun, PassSteps
from .errors import ConfigError, DataError
from .forward import to_device
from .guards import check_layer_inputs
from .onload import BlockInputs, BlockModel
from .planning import Layout, next_step
from .roundcopies import RoundCopies

HOST = torch.device("cpu")
log = logging.getLogger("evapipe")


class RoundLedger:
    """Which PCAs a round still feeds; says whether an agreed step's needs stay inside what the blocks computed.

    Every PCA the round began with unconverged was fed every batch. A step may need only PCAs that were fed at
    every step of the round so far: once a PCA is left out of a step, its later copies include updates the
    in-memory loop would not have made.
    """

    def __init__(self, fed: AbstractSet[str], owners: Sequence[str]):
        self.fed = set(fed)
        self.stopped = set(owners) - self.fed

    def admit(self, needed: AbstractSet[str]) -> bool:
        """True (and the ledger moves on) if the round can take this step; False: the round ends before it."""
        if needed & self.stopped:
            return False
        self.stopped |= self.fed - needed
        self.fed &= set(needed)
        return True


@dataclass
class _InFlight:
    """One batch of a round between blocks: its next block call (on the host) and how its tokens are selected."""

    call: BlockInputs | None
    selector: Any
    model_input: Any


def first_rows(batch: Any) -> Any:
    """The first sample of a batch (every tensor that shares the batch's leading size, sliced), for the layout
    pass: which layers share an input and the order they run in show on one sample as on all."""
    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch.values()) if isinstance(batch, Mapping) else []
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.ndim > 0]
    if not tensors:
        return batch
    n = tensors[0].shape[0]
    if isinstance(batch, torch.Tensor):
        return batch[:1]
    return {k: v[:1] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v for k, v in batch.items()}


class SequentialRun(EvaRun):
    """EvaRun over a BlockModel: the same PCA pool, agreements, decisions and checkpoints, driven round by round."""

    def __init__(
        self,
        blocks: BlockModel,
        settings: EvaSettings,
        comm: Comm | None = None,
        forward_fn: Callable | None = None,
        prepare_model_inputs_fn: Callable | None = None,
        prepare_layer_inputs_fn: Callable | None = None,
        round_size: int = 8,
    ):
        super().__init__(blocks.model, settings, comm, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn)
        self.blocks, self.round_size = blocks, round_size
        # the model holds no weights between passes, so its parameters cannot say where PCAs and batches belong
        self.pool.device = self.source.device = blocks.device
        prefix = f"{blocks.blocks_name}."
        outside = [n for n in self.names if not n.startswith(prefix)]
        if outside:
            raise ConfigError(
                f"model.offload: sequential captures layers inside {blocks.blocks_name} only, and "
                f"{len(outside)} target(s) lie outside it: {', '.join(outside[:4])}; leave them out with "
                "eva.exclude_modules"
            )
        self.block_of = {n: int(n[len(prefix):].split(".")[0]) for n in self.names}

    # -- the parts of a round --------------------------------------------------------------------------------
    def _enter(self, batch: Any) -> _InFlight:
        """Run a batch up to the first block; its call waits on the host."""
        if batch is None:
            return _InFlight(None, None, None)
        src = self.source
        batch = to_device(batch, self.blocks.device)
        model_input, selector = src.selection(batch)
        t0 = time.perf_counter()
        call = self.blocks.block_inputs(lambda: src.forward_fn(src.model, batch))
        src.forward_s += time.perf_counter() - t0
        return _InFlight(call.to(HOST), selector, model_input)

    def _through(self, block: torch.nn.Module, item: _InFlight, first: bool = False) -> dict[str, torch.Tensor]:
        """One batch through one block: its active layers' tokens; the batch moves on to the next block."""
        if item.call is None:
            return {}
        src, out = self.source, []
        call = item.call.to(self.blocks.device)
        t0 = time.perf_counter()
        with src.streams.watching():
            src.capture.select(item.selector, item.model_input)
            tokens = src.capture.run(lambda: out.append(self.blocks.call(block, call)), first)
        src.forward_s += time.perf_counter() - t0
        check_layer_inputs(tokens, self.width, self.progress.step)
        item.call = BlockInputs(out[0].to(HOST), item.call.args, item.call.kwargs) if out else None
        return tokens

    def _capture_only(self, names: Iterable[str]) -> None:
        """The next passes keep these layers' inputs and run whole blocks (a block's output feeds the next)."""
        capture = self.source.capture
        capture.active, capture.stop_at = set(names), None

    def _layout(self, item: _InFlight) -> Layout:
        """Shared-input groups and execution order from the first batch, pushed through the blocks one by one."""
        groups: list[list[str]] = []
        order: list[str] = []
        capture = self.source.capture
        for i in range(max(self.block_of.values()) + 1):
            names = [n for n in self.names if self.block_of[n] == i]
            self._capture_only(names)
            with self.blocks.onloaded(i) as block:
                self._through(block, item, first=bool(names))
            if names and capture.raw:
                groups += shared_input_groups(capture.raw, names)
                order += capture.order
        if not groups:
            raise ConfigError("the first batch reached none of the target layers; check eva.target_modules")
        return Layout.of(groups, order)

    def _feed(self, owners: Sequence[str], tokens: dict[str, torch.Tensor], rows: dict[str, list[int]],
              copies: RoundCopies, step: int) -> None:
        """Route one batch's (step `step`) tokens of `owners` to their owner ranks, update, and keep a copy of each
        PCA."""
        for o in owners:
            rows[o].append(int(tokens[o].shape[0]) if o in tokens else 0)
        pool = self.pool
        routed = pool.route(tokens, owners)
        with collectively(self.comm):  # a failed update or copy (a full temporary folder) stops every rank
            pool.update(routed, step)
            for o in owners:
                if o in pool.states:
                    copies.keep(o, pool.states[o])

    def _round(self, batches: list[tuple[Any, BaseException | None]], after_step: Callable[[], bool]) -> int:
        """One round over `batches` (this rank's shares); returns how many steps it took (a prefix of them)."""
        error = next((e for _, e in batches if e is not None), None)
        items: list[_InFlight] = []
        layout, layout_item, first = None, None, self.progress.layout is None
        with collectively(self.comm, error):
            if error is None:
                with self.blocks.head():
                    items = [self._enter(b) for b, _ in batches]
                    layout_item = self._enter(first_rows(batches[0][0])) if first and self.comm.is_main else None
                if layout_item is not None:  # rank 0's layout for every rank, as in memory
                    layout = self._layout(layout_item)
        if first:
            self._adopt(self.comm.broadcast(layout))
        owners = self.progress.layout.owners
        needed = next_step(self.progress.verdict).needed  # every PCA at the first step
        fed = [o for o in owners if o in needed]
        rows: dict[str, list[int]] = {o: [] for o in fed}
        start, deepest = self.progress.step, max(self.block_of[o] for o in fed)
        with RoundCopies() as copies:
            for i in range(deepest + 1):
                here = [o for o in fed if self.block_of[o] == i]
                self._capture_only(here)
                with self.blocks.onloaded(i) as block:
                    for j, item in enumerate(items):
                        tokens = {}
                        with collectively(self.comm):
                            tokens = self._through(block, item)
                        if here:
                            self._feed(here, tokens, rows, copies, start + j)
            taken = self._replay(owners, fed, rows, copies, len(items), after_step)
        early = taken < len(items) and not self.done and self.progress.step != self.settings.max_batches
        log.info("sequential round at step %d: %d batch(es) through blocks 0-%d, %d step(s) taken%s", start,
                 len(items), deepest, taken, " (a layer that had stopped is needed again: the next round starts there)"
                 if early else "")
        return taken

    def _replay(self, owners: list[str], fed: list[str], rows: dict[str, list[int]],
                copies: RoundCopies, n: int, after_step: Callable[[], bool]) -> int:
        """The in-memory loop's decisions over the round's batches; each PCA set back to its copy after the last
        batch it would have been fed."""
        ledger, p, width = RoundLedger(set(fed), owners), self.progress, max(self.caps.values())
        taken = 0
        for j in range(n):
            needed = set(fed) if j == 0 else set(next_step(p.verdict).needed)
            if not ledger.admit(needed):
                break
            for o in needed & set(self.pool.states):
                self.pool.states[o] = copies.get(o, j, self.pool.device)
            first_fed = next((o for o in owners if o in needed), None)
            n_local = rows[first_fed][j] if first_fed is not None else 0
            self.tokens_read += n_local
            share = partial(self._local_agreement, n_local, owners, width)
            with collectively(self.comm, values=share) as shared:
                pass
            self._decide(Agreement.unpack(shared.values, owners, width, self.caps))
            p.step += 1
            taken += 1
            if after_step():
                break
        return taken

    # -- driving ---------------------------------------------------------------------------------------------
    def run(self, batches: Iterable[Any], show_progress: bool = True,
            on_step: Callable[[EvaRun], None] | None = None, pass_steps: PassSteps = None) -> None:
        """Rounds until every PCA is done or eva.max_batches; `batches` yields this rank's share (None if empty).
        `pass_steps`: as in EvaRun.run, a layer still without a token after one pass over the data is an error."""
        from tqdm.auto import tqdm

        pass_steps = self.agreed_pass_steps(pass_steps)
        max_batches = self.settings.max_batches
        bar = tqdm(total=max_batches, disable=not (show_progress and self.comm.is_main), desc="EVA", unit="batch",
                   initial=self.progress.step)

        def after_step() -> bool:
            self._after_step(bar, pass_steps, on_step)
            return self.done or (max_batches is not None and self.progress.step >= max_batches)

        it = iter(batches)
        waiting: list[tuple[Any, BaseException | None]] = []  # read, not yet taken by a round
        try:
            while max_batches is None or self.progress.step < max_batches:
                size = self.round_size if max_batches is None else min(self.round_size, max_batches - self.progress.step)
                while len(waiting) < size:
                    try:
                        waiting.append((next(it), None))
                    except StopIteration:
                        waiting.append((None, DataError(
                            f"the batches ran out after {self.progress.step + len(waiting)} steps on rank "
                            f"{self.comm.rank}")))
                        break
                    except Exception as err:  # a bad row on one rank: agreed on in the round
                        waiting.append((None, err))
                        break
                taken = self._round(waiting[:size], after_step)
                waiting = waiting[taken:]
                if self.done:
                    break
        finally:
            bar.close()
            self.source.close()
