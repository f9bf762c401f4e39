"""The EVA loop over a model in memory, batch by batch, on every rank: forward -> route -> update -> agree -> plan.

    step 0      forward(batch, first)         every target captured; rank 0's layout (shared-input groups,
                                              execution order) is broadcast; PCAs placed on owner ranks
    every step  plan = next_step(verdict)     planning.py: which groups still need tokens, how deep to go
                tokens = source.forward(b)    forward.py / capture.py: the pass, cut after the deepest needed layer
                routed = pool.route(tokens)   pcas.py: every group's rows to the rank that owns its PCA
                core.agree(update)            runcore.py: the owners' updates inside the agreement of ratios,
                                              similarities and tokens; ranks (budget.py) and convergence decided
    the end     result()                      PCAs gathered on rank 0; assemble.py turns them into the EvaState

`EvaRun` is one driver over the shared parts (driver.py: the batch loop, runcore.py: PCAs, agreement, state); the
other takes rounds of batches one block at a time (sequential.py). Each rank runs it on its own share of every
step's samples. A failure on any rank is agreed on (collectively()), so every rank raises together instead of
waiting in a collective for the failed one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..core.config import EvaSettings
from ..core.distributed import Comm, collectively
from ..eva.guards import check_layer_inputs
from ..eva.planning import next_step
from ..model.forward import UserHooks
from ..model.loading import model_device
from .driver import Driver, PassSteps, Read
from .runcore import Progress, RankStats

__all__ = ["EvaRun", "PassSteps", "Progress", "RankStats"]


class EvaRun(Driver):
    """The in-memory driver: one agreed step per batch, each a forward pass of the whole model."""

    def __init__(self, model: nn.Module, settings: EvaSettings, comm: Comm | None = None,
                 hooks: UserHooks | None = None):
        super().__init__(model, settings, model_device(model), comm, hooks)

    @property
    def window(self) -> int:
        return 1

    def take(self, items: list[Read], after_step: Callable[[], bool]) -> int:
        for i, (batch, error) in enumerate(items):
            self.step(batch, error)
            if after_step():
                return i + 1
        return len(items)

    def step(self, batch: Any, error: BaseException | None = None) -> None:
        """One global step on every rank. `error` is a failure this rank met before the step (reading its batch):
        like one raised here, it is agreed on, so every rank raises together."""
        core, first = self.core, self.core.first
        tokens, layout, feeding = {}, None, []
        with collectively(self.comm, error):
            if error is None:
                if not first:
                    plan = next_step(core.progress.verdict, self.settings.refine_converged)
                    self.source.plan(plan)
                    active = plan.needed | (plan.refine & self.source.active)
                    feeding = [o for o in core.progress.layout.owners if o in active]
                tokens = self.source.forward(batch, first)
                check_layer_inputs(tokens, core.width)
                if first and self.comm.is_main:
                    layout = self.source.layout()
        if first:  # every rank uses rank 0's groups and execution order, so all plan the same passes
            self.adopt(core.agreed_layout(layout))
            feeding = core.progress.layout.owners
        n_local = core.local_tokens(tokens, feeding)
        routed = core.pool.route(tokens, feeding)
        core.agree(n_local, lambda: core.pool.update(routed, core.progress.step))
