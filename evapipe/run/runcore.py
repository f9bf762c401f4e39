"""What every EVA driver shares, whatever order it runs batches and blocks in: the targets and their budget, the
PCAs on their owner ranks, the loop state every rank agrees on, one agreement step, and the state at the end.

A driver (engine.EvaRun: batch by batch over a model in memory; sequential.SequentialRun: rounds of batches, one
block at a time) produces tokens and says when a step's updates are made; `RunCore` does the rest:

    adopt_first(layout)      rank 0's layout (shared-input groups, execution order) for every rank; PCAs placed
    agree(n_local, update)   the step's updates inside one all-reduce of ratios, similarities and tokens, then
                             EVA's decisions (planning.py): ranks redistributed, convergence judged
    result()                 PCAs gathered on rank 0; assemble.py turns them into the EvaState
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from ..core.config import EvaSettings
from ..core.distributed import Comm, collectively
from ..core.errors import ConvergenceError
from ..eva import ipca
from ..eva.agreement import Agreement
from ..eva.budget import layer_r, pattern_value
from ..eva.guards import check_fed
from ..eva.pcas import PCAPool
from ..eva.planning import Verdict, allocate, component_caps, judge, settle_waiting, unconverged
from ..model.experts import ExpertHooks, model_order, resolve_expert_params
from ..model.layout import Layout
from ..model.targets import resolve_targets
from ..states.assemble import assemble_state, spectrum_entries
from ..states.checkpoint import Snapshot
from ..states.metadata import StateMeta, versions
from ..states.state import EvaState

log = logging.getLogger("evapipe")


@dataclass
class RankStats:
    """What one rank did: shown in the end-of-job summary so users see the work was divided."""

    rank: int
    tokens: int = 0
    pca_tokens: int = 0
    forward_s: float = 0.0
    svd_s: float = 0.0
    comm_s: float = 0.0
    owned: list[str] = field(default_factory=list)
    updates: dict[str, int] = field(default_factory=dict)  # owned PCA -> updates it received


@dataclass
class Progress:
    """Loop state every rank agrees on (the checkpoint keeps it, with the owners' PCAs)."""

    step: int = 0
    tokens: int = 0
    layout: Layout | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    verdict: Verdict = field(default_factory=lambda: Verdict({}))
    agreed: Agreement = field(default_factory=Agreement)  # the latest ratios and similarities of every PCA


class RunCore:
    """The targets of `model`, their PCAs (on `device`) and the agreed progress of one EVA computation."""

    def __init__(self, model: nn.Module, settings: EvaSettings, comm: Comm, device: torch.device):
        self.settings, self.comm = settings, comm
        targets = resolve_targets(model, settings.target_modules, settings.exclude_modules)
        self.experts = ExpertHooks(resolve_expert_params(model, settings.target_parameters))
        self.names = model_order(model, [t.name for t in targets] + self.experts.keys)
        self.width = {t.name: t.in_features for t in targets}
        self.width.update({k: p.in_features for p in self.experts.params for k in p.keys()})
        self.share = {k: p.share for p in self.experts.params for k in p.keys()}  # experts see a share of the tokens
        self.r = layer_r(self.names, settings.r, settings.rank_pattern)
        self.budget = sum(self.r.values())
        self.caps = component_caps(self.r, settings.rho, self.width)
        self.pool = PCAPool(comm, self.width, settings.oversample, device, self.share)
        self.progress = Progress()
        self.tokens_read = 0  # tokens this rank's passes counted
        self.rank_stats: list[RankStats] = []

    @property
    def done(self) -> bool:
        return self.progress.layout is not None and self.progress.verdict.all_done

    @property
    def first(self) -> bool:
        """No step taken yet: the next pass records the layout."""
        return self.progress.layout is None

    def adopt(self, layout: Layout, states: Mapping[str, ipca.PCAState] = {}) -> None:
        """Take the agreed layout: a shared PCA serves its largest member, and each group's PCA gets its owner."""
        self.caps = component_caps(self.r, self.settings.rho, self.width, layout.groups)
        self.pool.place(layout.owners, self.caps, states)
        p = self.progress
        p.layout, p.ranks = layout, p.ranks or dict(self.caps)
        p.verdict = Verdict({o: p.verdict.done.get(o, False) for o in layout.owners}, p.verdict.done_at)

    def agreed_layout(self, layout: Layout | None) -> Layout:
        """Rank 0's layout (None elsewhere) for every rank, so all plan the same passes and owners."""
        return self.comm.broadcast(layout)

    def local_tokens(self, tokens: Mapping[str, torch.Tensor], feeding: list[str]) -> int:
        """The tokens this rank's pass counted: any fed non-expert layer's rows, else what the experts counted."""
        n = next((int(tokens[o].shape[0]) for o in feeding if o not in self.share and o in tokens), None)
        return n if n is not None else (self.experts.tokens if tokens else 0)

    def agree(self, n_local: int, update: Callable[[], None] = lambda: None) -> None:
        """One agreed step: `update` (this rank's PCA updates) runs inside the all-reduce of every PCA's ratios and
        similarities, so a failure on any rank stops every rank; then ranks and convergence are decided."""
        p = self.progress
        self.tokens_read += n_local
        owners, width = p.layout.owners, max(self.caps.values())
        share = partial(self._local_agreement, n_local, owners, width)
        with collectively(self.comm, values=share) as shared:
            update()
        self._decide(Agreement.unpack(shared.values, owners, width, self.caps))
        p.step += 1

    def _local_agreement(self, n_local: int, owners: list[str], width: int) -> torch.Tensor:
        return Agreement.local(self.pool.states, n_local).pack(owners, width)

    def _decide(self, agreed: Agreement) -> None:
        """Ranks and convergence from what every rank now knows of every PCA."""
        p = self.progress
        p.tokens += agreed.tokens
        p.agreed.ratios.update(agreed.ratios)
        p.agreed.similar.update(agreed.similar)
        owners = p.layout.owners
        waiting = {o for o in owners if o in self.share and o not in p.agreed.ratios}  # experts no token reached yet
        if len(waiting) < len(owners) and all(o in p.agreed.ratios for o in owners if o not in waiting):
            p.ranks = allocate(p.agreed.ratios, p.layout, self.budget, self.caps, self.names)
        p.ranks.update({o: 0 for o in waiting})
        s = self.settings
        verdict = judge(owners, p.ranks, p.agreed.similar, s.tau, p.verdict, s.refine_converged)
        p.verdict = settle_waiting(verdict, waiting)

    def states(self, owners: list[str]) -> dict[str, ipca.PCAState]:
        """The PCAs of `owners` this rank holds (for copies a driver keeps)."""
        return {o: self.pool.states[o] for o in owners if o in self.pool.states}

    def set_back(self, states: Mapping[str, ipca.PCAState]) -> None:
        """Replace this rank's PCAs of those owners by earlier copies (a driver that updated them past a step)."""
        self.pool.states.update({o: s for o, s in states.items() if o in self.pool.states})

    def starved(self) -> list[str]:
        """Layers whose PCA has received no token at all so far (agreed: every rank sees the same ratios)."""
        p = self.progress
        return [] if p.layout is None else [n for n in self.names if p.layout.owner_of[n] not in p.agreed.ratios]

    def check_fed(self) -> None:
        """After a full pass over the data (or at the end): waiting longer cannot feed a starved layer."""
        check_fed(self.starved(), len(self.names), set(self.share), self.progress.step, self.settings.label_mask_value)

    def snapshot(self) -> Snapshot:
        """What a checkpoint keeps: the loop state all ranks share, and this rank's own PCAs (on the CPU)."""
        p = self.progress
        return Snapshot(p.step, p.tokens, p.layout, dict(p.ranks), p.verdict,
                        {o: t.tolist() for o, t in p.agreed.ratios.items()},
                        {o: t.tolist() for o, t in p.agreed.similar.items()}, self.pool.on_cpu())

    def restored(self, snap: Snapshot) -> None:
        """The progress of `snap` (the caller then adopts its layout and states)."""
        agreed = Agreement({o: torch.tensor(v, dtype=torch.float32) for o, v in snap.ratios.items()},
                           {o: torch.tensor(v, dtype=torch.float32) for o, v in snap.similar.items()})
        self.progress = Progress(snap.step, snap.tokens, None, dict(snap.ranks), snap.verdict, agreed)

    def unconverged(self) -> list[str]:
        p = self.progress
        return unconverged(p.layout, p.verdict, p.ranks)

    def result(self, forward_s: float, extra_meta: Mapping[str, Any] | None = None) -> EvaState | None:
        """The state on rank 0 (None elsewhere); raises ConvergenceError per eva.on_unconverged."""
        self.check_fed()
        missing = self.unconverged()
        if missing:
            msg = f"{len(missing)} layer(s) had not converged after {self.progress.step} batches: {', '.join(missing[:8])}"
            if self.settings.on_unconverged == "error":
                raise ConvergenceError(msg + ". Raise eva.max_batches, lower eva.tau, or set eva.on_unconverged: warn")
            if self.comm.is_main:
                log.warning(msg + "; keeping their current estimates (eva.on_unconverged: warn)")
        gathered = self.comm.gather_to_main((self.pool.on_cpu(), self.stats(forward_s)))
        if gathered is None:
            return None
        states: dict[str, ipca.PCAState] = {}
        for part, _ in gathered:
            states.update(part)
        self.rank_stats = [st for _, st in gathered]
        return final_state(self, states, extra_meta or {})

    def stats(self, forward_s: float) -> RankStats:
        """This rank's share of the work so far (`forward_s`: the time its passes took)."""
        pool = self.pool
        return RankStats(self.comm.rank, self.tokens_read, pool.tokens, forward_s, pool.svd_s, pool.comm_s,
                         pool.owned, {o: s.steps for o, s in pool.states.items()})


def final_state(core: RunCore, states: Mapping[str, ipca.PCAState], extra: Mapping[str, Any]) -> EvaState:
    """The EvaState of a finished run from every PCA (gathered on rank 0) and the run's agreed progress."""
    s, p = core.settings, core.progress
    spectrum, ratios, singular = {}, {}, {}
    for o in p.layout.owners:
        st, k = states[o], states[o].n_components
        ratios[o], singular[o] = [], []  # an expert no token reached has no spectrum
        if st.fitted:
            spectrum |= spectrum_entries(o, st.top(k), st.singular_values[:k])
            ratios[o] = [round(float(v), 8) for v in st.explained_variance_ratio()[:k]]
            singular[o] = [float(v) for v in st.singular_values[:k]]
    unrouted = [k for k in core.share if not states[k].fitted]
    if unrouted:
        log.warning("%d expert(s) received no token of the data and end at rank 0: %s", len(unrouted),
                    ", ".join(unrouted[:8]) + (" ..." if len(unrouted) > 8 else ""))
    owner_of, names = p.layout.owner_of, core.names
    meta = StateMeta(
        r=s.r, lora_alpha=s.lora_alpha, ranks=dict(p.ranks), in_features=dict(core.width), layer_r=dict(core.r),
        layer_alpha={n: float(pattern_value(s.alpha_pattern, n, s.lora_alpha)) for n in names},
        rho=s.rho, tau=s.tau, whiten=s.whiten, adjust_scaling_factors=s.adjust_scaling_factors,
        use_label_mask=s.use_label_mask, label_mask_value=s.label_mask_value, target_modules=s.target_modules,
        exclude_modules=s.exclude_modules, oversample=s.oversample, refine_converged=s.refine_converged,
        max_components=dict(core.caps), explained_variance={n: ratios[owner_of[n]] for n in names},
        singular_values={n: singular[owner_of[n]] for n in names},
        converged={n: bool(p.verdict.done[owner_of[n]]) and states[owner_of[n]].fitted for n in names},
        shared_inputs=p.layout.shared, target_parameters=s.target_parameters,
        experts={e.name: {"num_experts": e.num_experts, "in_features": e.in_features,
                          "out_features": e.out_features} for e in core.experts.params},
        expert_tokens={k: states[k].n_seen for k in core.share}, unrouted=unrouted,
        tokens=p.tokens, batches=p.step, world_size=core.comm.world, versions=versions("transformers"),
    )
    return assemble_state(StateMeta.from_dict(meta.to_dict() | dict(extra)), spectrum, owner_of)
