"""The EVA loop, batch by batch, on every rank: forward -> route -> update -> agree -> plan.

    step 0      forward(batch, first)         every target captured; rank 0's layout (shared-input groups,
                                              execution order) is broadcast; PCAs placed on owner ranks
    every step  plan = next_step(verdict)     planning.py: which groups still need tokens, how deep to go
                tokens = source.forward(b)    forward.py / capture.py: the pass, cut after the deepest needed layer
                routed = pool.route(tokens)   pcas.py: every group's rows to the rank that owns its PCA
                pool.update(routed)           ipca.py: the owners fold them into their incremental PCAs
                agreed = Agreement(...)       agreement.py: ratios, similarities, tokens, summed over ranks
                ranks = allocate(agreed)      planning.py + budget.py: EVA's rank redistribution
                verdict = judge(ranks, ...)   planning.py: which PCAs passed the cosine test
    the end     result()                      PCAs gathered on rank 0; assemble.py turns them into the EvaState

Each rank runs it on its own share of every step's samples. A failure on any rank is agreed on (collectively()),
so every rank raises together instead of waiting in a collective for the failed one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ipca
from .agreement import Agreement
from .assemble import assemble_state, spectrum_entries
from .budget import layer_r, pattern_value
from .checkpoint import Snapshot
from .config import EvaSettings, check_stopping
from .distributed import Comm, collectively, init_comm
from .errors import ConvergenceError, DataError
from .experts import ExpertHooks, model_order, resolve_expert_params
from .forward import ForwardFn, ModelTokens
from .guards import check_fed, check_layer_inputs
from .metadata import StateMeta, versions
from .models import model_device
from .pcas import PCAPool
from .planning import Layout, Verdict, allocate, component_caps, judge, next_step, settle_waiting, unconverged
from .state import EvaState
from .targets import resolve_targets

# one pass over the data, in steps: a number (rank 0's counts), a function asked after each step, or unknown
PassSteps = int | Callable[[], int | None] | None
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


class EvaRun:
    """One EVA computation over a model; `run()` drives it, the job adds checkpoints and a summary around it."""

    def __init__(
        self,
        model: nn.Module,
        settings: EvaSettings,
        comm: Comm | None = None,
        forward_fn: ForwardFn | None = None,
        prepare_model_inputs_fn: Callable | None = None,
        prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = None,
    ):
        check_stopping(settings)
        device = model_device(model)
        self.settings = settings
        self.comm = comm if comm is not None else init_comm(device)  # the launcher's group, if any
        targets = resolve_targets(model, settings.target_modules, settings.exclude_modules)
        self.experts = ExpertHooks(resolve_expert_params(model, settings.target_parameters))
        self.names = model_order(model, [t.name for t in targets] + self.experts.keys)
        self.width = {t.name: t.in_features for t in targets}
        self.width.update({k: p.in_features for p in self.experts.params for k in p.keys()})
        self.share = {k: p.share for p in self.experts.params for k in p.keys()}  # experts see a share of the tokens
        self.r = layer_r(self.names, settings.r, settings.rank_pattern)
        self.budget = sum(self.r.values())
        self.caps = component_caps(self.r, settings.rho, self.width)
        self.source = ModelTokens(model, self.names, settings, device, forward_fn, prepare_model_inputs_fn,
                                  prepare_layer_inputs_fn, self.experts)
        self.pool = PCAPool(self.comm, self.width, settings.oversample, device, self.share)
        self.progress = Progress()
        self.tokens_read = 0  # tokens this rank's forward passes counted
        self.rank_stats: list[RankStats] = []

    @property
    def done(self) -> bool:
        return self.progress.layout is not None and self.progress.verdict.all_done

    def _adopt(self, layout: Layout, states: Mapping[str, ipca.PCAState] = {}) -> None:
        """Take the agreed layout: a shared PCA serves its largest member, and each group's PCA gets its owner."""
        self.source.follow(layout)
        self.caps = component_caps(self.r, self.settings.rho, self.width, layout.groups)
        self.pool.place(layout.owners, self.caps, states)
        p = self.progress
        p.layout, p.ranks = layout, p.ranks or dict(self.caps)
        p.verdict = Verdict({o: p.verdict.done.get(o, False) for o in layout.owners}, p.verdict.done_at)

    def step(self, batch: Any, error: BaseException | None = None) -> None:
        """One global step on every rank. `error` is a failure this rank met before the step (reading its batch):
        like one raised here, it is agreed on, so every rank raises together."""
        p, first = self.progress, self.progress.layout is None
        tokens, layout, feeding = {}, None, []
        with collectively(self.comm, error):
            if error is None:
                if not first:
                    plan = next_step(p.verdict, self.settings.refine_converged)
                    self.source.plan(plan)
                    feeding = [o for o in p.layout.owners if o in plan.needed | (plan.refine & self.source.active)]
                tokens = self.source.forward(batch, first)
                check_layer_inputs(tokens, self.width, self.progress.step)
                if first and self.comm.is_main:
                    layout = self.source.layout()
        if first:  # every rank uses rank 0's groups and execution order, so all plan the same passes
            self._adopt(self.comm.broadcast(layout))
            feeding = p.layout.owners
        n_local = next((int(tokens[o].shape[0]) for o in feeding if o not in self.share and o in tokens), None)
        if n_local is None:  # only experts captured: the tokens their modules counted
            n_local = self.experts.tokens if tokens else 0
        self.tokens_read += n_local
        routed = self.pool.route(tokens, feeding)
        owners, width = p.layout.owners, max(self.caps.values())
        share = partial(self._local_agreement, n_local, owners, width)
        with collectively(self.comm, values=share) as shared:
            self.pool.update(routed, p.step)
        self._decide(Agreement.unpack(shared.values, owners, width, self.caps))
        p.step += 1

    def starved(self) -> list[str]:
        """Layers whose PCA has received no token at all so far (agreed: every rank sees the same ratios)."""
        p = self.progress
        return [] if p.layout is None else [n for n in self.names if p.layout.owner_of[n] not in p.agreed.ratios]

    def _check_fed(self) -> None:
        """After a full pass over the data (or at the end): waiting longer cannot feed a starved layer."""
        check_fed(self.starved(), len(self.names), set(self.share), self.progress.step, self.settings.label_mask_value)

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

    def run(self, batches: Iterable[Any], show_progress: bool = True,
            on_step: Callable[[EvaRun], None] | None = None, pass_steps: PassSteps = None) -> None:
        """Step until every PCA is done or eva.max_batches; `batches` yields this rank's share (None if empty).

        `pass_steps` is the length of one pass over the data (see agreed_pass_steps): a layer that has received no
        token after it is an error instead of an endless loop.
        """
        pass_steps = self.agreed_pass_steps(pass_steps)
        max_batches = self.settings.max_batches
        bar = tqdm(total=max_batches, disable=not (show_progress and self.comm.is_main), desc="EVA", unit="batch",
                   initial=self.progress.step)
        it = iter(batches)
        try:
            while max_batches is None or self.progress.step < max_batches:
                batch, error = None, None
                try:
                    batch = next(it)
                except StopIteration:
                    error = DataError(f"the batches ran out after {self.progress.step} steps on rank {self.comm.rank}")
                except Exception as err:  # a bad row on one rank: agreed on in step(), not left to hang the others
                    error = err
                self.step(batch, error)
                self._after_step(bar, pass_steps, on_step)
                if self.done:
                    break
        finally:
            bar.close()
            self.source.close()

    def agreed_pass_steps(self, pass_steps: PassSteps) -> Callable[[], int | None]:
        """One pass's length as every rank sees it. A number counts as rank 0's (users' dataloaders may differ in
        length per rank); a function is asked after every step: a stream learns its length when a pass ends, at the
        same step on every rank, since every rank reads the whole stream."""
        if callable(pass_steps):
            return pass_steps
        agreed = self.comm.broadcast(pass_steps)
        return lambda: agreed

    def _after_step(self, bar: Any, pass_steps: Callable[[], int | None],
                    on_step: Callable[[EvaRun], None] | None) -> None:
        """What follows every agreed step, whichever driver took it: progress, the one-pass check for layers that
        never got a token, and the caller's hook (checkpoints)."""
        p = self.progress
        bar.update(1)
        bar.set_postfix_str(f"{len(p.layout.members(p.verdict.passed()))}/{len(self.names)} layers converged")
        length = pass_steps()
        if length and p.step >= length:
            self._check_fed()
        if on_step is not None:
            on_step(self)

    def snapshot(self) -> Snapshot:
        """What a checkpoint keeps: the loop state all ranks share, and this rank's own PCAs (on the CPU)."""
        p = self.progress
        return Snapshot(p.step, p.tokens, p.layout, dict(p.ranks), p.verdict,
                        {o: t.tolist() for o, t in p.agreed.ratios.items()},
                        {o: t.tolist() for o, t in p.agreed.similar.items()}, self.pool.on_cpu())

    def restore(self, snap: Snapshot) -> None:
        """Continue a run from `snapshot()` of one with the same settings and world size (next step: its step)."""
        agreed = Agreement({o: torch.tensor(v, dtype=torch.float32) for o, v in snap.ratios.items()},
                           {o: torch.tensor(v, dtype=torch.float32) for o, v in snap.similar.items()})
        self.progress = Progress(snap.step, snap.tokens, None, dict(snap.ranks), snap.verdict, agreed)
        self._adopt(snap.layout, snap.states)

    def unconverged(self) -> list[str]:
        p = self.progress
        return unconverged(p.layout, p.verdict, p.ranks)

    def result(self, extra_meta: Mapping[str, Any] | None = None) -> EvaState | None:
        """The state on rank 0 (None elsewhere); raises ConvergenceError per eva.on_unconverged."""
        self._check_fed()
        missing = self.unconverged()
        if missing:
            msg = f"{len(missing)} layer(s) had not converged after {self.progress.step} batches: {', '.join(missing[:8])}"
            if self.settings.on_unconverged == "error":
                raise ConvergenceError(msg + ". Raise eva.max_batches, lower eva.tau, or set eva.on_unconverged: warn")
            if self.comm.is_main:
                log.warning(msg + "; keeping their current estimates (eva.on_unconverged: warn)")
        gathered = self.comm.gather_to_main((self.pool.on_cpu(), self.stats()))
        if gathered is None:
            return None
        states: dict[str, ipca.PCAState] = {}
        for part, _ in gathered:
            states.update(part)
        self.rank_stats = [st for _, st in gathered]
        return self._state(states, extra_meta or {})

    def stats(self) -> RankStats:
        """This rank's share of the work so far."""
        pool = self.pool
        return RankStats(self.comm.rank, self.tokens_read, pool.tokens, self.source.forward_s, pool.svd_s, pool.comm_s,
                         pool.owned, {o: s.steps for o, s in pool.states.items()})

    def _state(self, states: Mapping[str, ipca.PCAState], extra: Mapping[str, Any]) -> EvaState:
        s, p = self.settings, self.progress
        spectrum, ratios, singular = {}, {}, {}
        for o in p.layout.owners:
            st, k = states[o], states[o].n_components
            ratios[o], singular[o] = [], []  # an expert no token reached has no spectrum
            if st.fitted:
                spectrum |= spectrum_entries(o, st.top(k), st.singular_values[:k])
                ratios[o] = [round(float(v), 8) for v in st.explained_variance_ratio()[:k]]
                singular[o] = [float(v) for v in st.singular_values[:k]]
        unrouted = [k for k in self.share if not states[k].fitted]
        if unrouted:
            log.warning("%d expert(s) received no token of the data and end at rank 0: %s", len(unrouted),
                        ", ".join(unrouted[:8]) + (" ..." if len(unrouted) > 8 else ""))
        owner_of = p.layout.owner_of
        meta = StateMeta(
            r=s.r, lora_alpha=s.lora_alpha, ranks=dict(p.ranks), in_features=dict(self.width), layer_r=dict(self.r),
            layer_alpha={n: float(pattern_value(s.alpha_pattern, n, s.lora_alpha)) for n in self.names},
            rho=s.rho, tau=s.tau, whiten=s.whiten, adjust_scaling_factors=s.adjust_scaling_factors,
            use_label_mask=s.use_label_mask, label_mask_value=s.label_mask_value, target_modules=s.target_modules,
            exclude_modules=s.exclude_modules, oversample=s.oversample, refine_converged=s.refine_converged,
            max_components=dict(self.caps), explained_variance={n: ratios[owner_of[n]] for n in self.names},
            singular_values={n: singular[owner_of[n]] for n in self.names},
            converged={n: bool(p.verdict.done[owner_of[n]]) and states[owner_of[n]].fitted for n in self.names},
            shared_inputs=p.layout.shared, target_parameters=s.target_parameters,
            experts={e.name: {"num_experts": e.num_experts, "in_features": e.in_features,
                              "out_features": e.out_features} for e in self.experts.params},
            expert_tokens={k: states[k].n_seen for k in self.share}, unrouted=unrouted,
            tokens=p.tokens, batches=p.step, world_size=self.comm.world, versions=versions("transformers"),
        )
        return assemble_state(StateMeta.from_dict(meta.to_dict() | dict(extra)), spectrum, owner_of)
