"""The seam every EVA driver is written against: a `Driver` holds the shared parts (a RunCore: targets, PCAs,
agreement, state; a ModelTokens: hooks, streams, the user's hooks, passes) and says only how it takes steps.

    window          how many of this rank's batches the driver wants at once (1 in memory, a round sequentially)
    take(items)     take agreed steps over a prefix of them; `after_step()` after each, True when the run is over

`BatchLoop` is the rest, the same for every driver: read the batches in windows (running out, or a bad row, is an
error agreed on in the driver's next step), the progress bar, the one-pass check for layers that never got a token,
the caller's hook (checkpoints), and the clean-up. A pipeline-parallel driver would implement these two members.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.config import EvaSettings, check_stopping
from ..core.distributed import Comm, init_comm
from ..core.errors import DataError
from ..eva.pcas import PCAPool
from ..model.forward import ModelTokens, UserHooks
from ..model.layout import Layout
from ..states.checkpoint import Snapshot
from ..states.state import EvaState
from .runcore import Progress, RankStats, RunCore

# one pass over the data, in steps: a number (rank 0's counts), a function asked after each step, or unknown
PassSteps = int | Callable[[], int | None] | None
# one batch of this rank as read: the batch (None if none) or the error met reading it
Read = tuple[Any, BaseException | None]


class Driver(ABC):
    """One EVA computation over `model`; `run()` drives it, the job adds checkpoints and a summary around it."""

    def __init__(self, model: nn.Module, settings: EvaSettings, device: torch.device, comm: Comm | None = None,
                 hooks: UserHooks | None = None):
        check_stopping(settings)
        self.settings = settings
        self.comm = comm if comm is not None else init_comm(device)  # the launcher's group, if any
        self.core = RunCore(model, settings, self.comm, device)
        self.source = ModelTokens(model, self.core.names, settings, device, hooks or UserHooks(), self.core.experts)

    # -- the two members a driver implements --------------------------------------------------------------------
    @property
    @abstractmethod
    def window(self) -> int:
        """Batches the next `take` wants (fewer near eva.max_batches)."""

    @abstractmethod
    def take(self, items: list[Read], after_step: Callable[[], bool]) -> int:
        """Agreed steps over a prefix of `items`; returns how many were taken."""

    # -- what the job sees -------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return self.core.names

    @property
    def budget(self) -> int:
        return self.core.budget

    @property
    def progress(self) -> Progress:
        return self.core.progress

    @property
    def pool(self) -> PCAPool:
        return self.core.pool

    @property
    def rank_stats(self) -> list[RankStats]:
        return self.core.rank_stats

    @property
    def done(self) -> bool:
        return self.core.done

    def adopt(self, layout: Layout, states: Mapping[str, Any] = {}) -> None:
        """The agreed layout: passes planned by its execution order, PCAs placed by its groups."""
        self.source.follow(layout)
        self.core.adopt(layout, states)

    def run(self, batches: Iterable[Any], show_progress: bool = True,
            on_step: Callable[[Driver], None] | None = None, pass_steps: PassSteps = None) -> None:
        """Step until every PCA is done or eva.max_batches; `batches` yields this rank's share (None if empty).

        `pass_steps` is the length of one pass over the data (see agreed_pass_steps): a layer that has received no
        token after it is an error instead of an endless loop.
        """
        BatchLoop(self, show_progress, on_step, self.agreed_pass_steps(pass_steps)).run(iter(batches))

    def agreed_pass_steps(self, pass_steps: PassSteps) -> Callable[[], int | None]:
        """One pass's length as every rank sees it. A number counts as rank 0's (users' dataloaders may differ in
        length per rank); a function is asked after every step: a stream learns its length when a pass ends, at the
        same step on every rank, since every rank reads the whole stream."""
        if callable(pass_steps):
            return pass_steps
        agreed = self.comm.broadcast(pass_steps)
        return lambda: agreed

    def snapshot(self) -> Snapshot:
        return self.core.snapshot()

    def restore(self, snap: Snapshot) -> None:
        """Continue a run from `snapshot()` of one with the same settings and world size (next step: its step)."""
        self.core.restored(snap)
        self.adopt(snap.layout, snap.states)

    def starved(self) -> list[str]:
        return self.core.starved()

    def unconverged(self) -> list[str]:
        return self.core.unconverged()

    def result(self, extra_meta: Mapping[str, Any] | None = None) -> EvaState | None:
        """The state on rank 0 (None elsewhere); raises ConvergenceError per eva.on_unconverged."""
        return self.core.result(self.source.forward_s, extra_meta)

    def stats(self) -> RankStats:
        return self.core.stats(self.source.forward_s)


class BatchLoop:
    """The loop of every driver: windows of batches in, agreed steps out, progress and checks after each step."""

    def __init__(self, driver: Driver, show_progress: bool, on_step: Callable[[Driver], None] | None,
                 pass_steps: Callable[[], int | None]):
        self.driver, self.on_step, self.pass_steps = driver, on_step, pass_steps
        self.max_batches = driver.settings.max_batches
        self.bar = tqdm(total=self.max_batches, disable=not (show_progress and driver.comm.is_main), desc="EVA",
                        unit="batch", initial=driver.progress.step)

    def run(self, it: Iterator[Any]) -> None:
        d, waiting = self.driver, []  # read, not yet taken by a step
        try:
            while self.max_batches is None or d.progress.step < self.max_batches:
                size = d.window if self.max_batches is None else min(d.window, self.max_batches - d.progress.step)
                waiting += read_batches(it, size - len(waiting), d.progress.step + len(waiting), d.comm.rank)
                taken = d.take(waiting[:size], self.after_step)
                waiting = waiting[taken:]
                if d.done:
                    break
        finally:
            self.bar.close()
            d.source.close()

    def after_step(self) -> bool:
        """What follows every agreed step, whichever driver took it: progress, the one-pass check for layers that
        never got a token, and the caller's hook (checkpoints). True when the run is over."""
        d, p = self.driver, self.driver.progress
        self.bar.update(1)
        self.bar.set_postfix_str(f"{len(p.layout.members(p.verdict.passed()))}/{len(d.names)} layers converged")
        length = self.pass_steps()
        if length and p.step >= length:
            d.core.check_fed()
        if self.on_step is not None:
            self.on_step(d)
        return d.done or (self.max_batches is not None and p.step >= self.max_batches)


def read_batches(it: Iterator[Any], n: int, step: int, rank: int) -> list[Read]:
    """Up to `n` batches; the data running out, or a failure reading a row, ends the list as its last item's error
    (agreed on in the next step, not left to hang the other ranks)."""
    out: list[Read] = []
    while len(out) < n:
        try:
            out.append((next(it), None))
        except StopIteration:
            out.append((None, DataError(f"the batches ran out after {step + len(out)} steps on rank {rank}")))
            break
        except Exception as err:
            out.append((None, err))
            break
    return out
