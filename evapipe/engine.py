"""The EVA loop: forward passes -> captured tokens -> owners' incremental PCAs -> rank budget -> EvaState.

Every rank runs the same loop on its own share of each step's samples. Each shared-input group of layers has one
PCA, owned by one rank (owners balanced by update cost); tokens go to the owner only, the owner alone updates it, and
an agreement at the end of every step gives every rank the explained-variance ratios and convergence of all
PCAs, so all ranks compute the same rank distribution and stop at the same step.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from . import ipca
from .budget import distribute_ranks, layer_r, pattern_value, scaled_alpha
from .capture import Capture, TokenSelector, shared_input_groups
from .config import EvaSettings
from .distributed import Comm, assign_owners, init_comm
from .errors import ConfigError, ConvergenceError, DataError
from .state import FORMAT, FORMAT_VERSION, EvaState
from .streams import LayerStreams, stream_masks
from .targets import resolve_targets

log = logging.getLogger("evapipe")

ForwardFn = Callable[[nn.Module, Any], Any]


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
    updates: dict[str, int] = field(default_factory=dict)  # owned PCA -> updates it received (set by result())


@dataclass
class Progress:
    """Loop state every rank agrees on; the checkpoint saves it with the owners' PCA states."""

    step: int = 0
    tokens: int = 0
    groups: list[list[str]] | None = None
    order: list[str] | None = None
    ranks: dict[str, int] | None = None


def default_forward(model: nn.Module, inputs: Any) -> Any:
    """model(**inputs) without `labels`: labels only select tokens, and a loss would need the logits.

    An encoder-decoder model given labels but no decoder inputs gets them from the labels, as in training.
    """
    if isinstance(inputs, Mapping):
        kw = {k: v for k, v in inputs.items() if k != "labels"}
        labels = inputs.get("labels")
        shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if labels is not None and callable(shift) and not {"decoder_input_ids", "decoder_inputs_embeds"} & set(kw):
            kw["decoder_input_ids"] = shift(labels=labels)
        return model(**kw)
    return model(inputs)


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def peft_layer_input(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """Default layer-input preparation when a custom prepare_model_inputs_fn is given (PEFT's semantics)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if isinstance(model_input, torch.Tensor):
        if model_input.dtype == torch.bool and model_input.shape == x.shape[:-1]:
            return x[model_input]
        if model_input.ndim == 2 and model_input.shape[1] == x.ndim - 1 and not model_input.is_floating_point():
            return x[model_input.T.unbind()]
    return x.reshape(-1, x.shape[-1])


def settings_namespace(settings: EvaSettings) -> SimpleNamespace:
    """What PEFT hooks receive as `peft_config` (they read .r and .eva_config.*)."""
    eva = SimpleNamespace(**{k: getattr(settings, k) for k in ("rho", "tau", "use_label_mask", "label_mask_value", "whiten", "adjust_scaling_factors")})
    return SimpleNamespace(r=settings.r, lora_alpha=settings.lora_alpha, rank_pattern=settings.rank_pattern, eva_config=eva)


def cycle_batches(dataloader: Iterable) -> Iterator[Any]:
    """Endless passes over a dataloader (as PEFT does), failing clearly if it is empty."""
    for epoch in itertools.count():
        empty = True
        for batch in dataloader:
            empty = False
            yield batch
        if empty:
            from .errors import DataError

            raise DataError("the dataloader yielded no batch" if epoch == 0 else "the dataloader is exhausted")


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
        self.model, self.settings = model, settings
        self.comm = comm if comm is not None else init_comm(_device_of(model))  # the launcher's group, if any
        self.forward_fn = forward_fn or default_forward
        self.prepare_model_inputs_fn = prepare_model_inputs_fn
        layer_fn = prepare_layer_inputs_fn
        if layer_fn is None and prepare_model_inputs_fn is not None:
            layer_fn = peft_layer_input
        self.targets = resolve_targets(model, settings.target_modules, settings.exclude_modules)
        self.names = [t.name for t in self.targets]
        self.width = {t.name: t.in_features for t in self.targets}
        self.r = layer_r(self.names, settings.r, settings.rank_pattern)
        self.budget = sum(self.r.values())
        self.max_components = {n: min(round(self.r[n] * settings.rho), self.width[n]) for n in self.names}
        self.capture = Capture(model, self.names, layer_fn)
        self.streams = LayerStreams(model, self.names)
        self.device = _device_of(model)
        self.progress = Progress()
        self.states: dict[str, ipca.PCAState] = {}  # owner layer -> PCA, on its owner rank only
        self.stats = RankStats(self.comm.rank)
        self.ratios: dict[str, torch.Tensor] = {}
        self.similar: dict[str, torch.Tensor] = {}
        self.owner_rank: dict[str, int] = {}
        self.done: dict[str, bool] = {}
        self.done_at: dict[str, int] = {}  # PCA -> the component count it last converged for (refine_converged)

    # -- setup from the first batch ------------------------------------------------------------------------
    def _set_groups(self, groups: list[list[str]], order: list[str]) -> None:
        p = self.progress
        seen = {n for g in groups for n in g}
        unused = [n for n in self.names if n not in seen]
        if unused:
            raise ConfigError(
                f"{len(unused)} target layer(s) got no input in the first forward pass (the model's forward does not "
                f"use them): {', '.join(unused[:6])}. Leave them out with eva.exclude_modules."
            )
        p.groups, p.order = groups, order
        self.capture.order = list(order)
        for g in groups:  # a shared PCA must serve its largest member
            top = max(self.max_components[n] for n in g)
            for n in g:
                self.max_components[n] = top
        owners = [g[0] for g in groups]
        fresh = [ipca.new_state(self.width[o], self.max_components[o], self.settings.oversample, seed=i)
                 for i, o in enumerate(owners)]
        # an update costs about rows x in_features x (tracked + random directions), the rows being the same for all
        costs = [s.n_features * (s.n_track + ipca.EXTRA_RANDOM_DIRECTIONS) for s in fresh]
        ranks = assign_owners(costs, self.comm.world)
        self.owner_rank = dict(zip(owners, ranks))
        self.stats.owned = [o for o in owners if self.owner_rank[o] == self.comm.rank]
        for o, state in zip(owners, fresh):
            if self.owner_rank[o] == self.comm.rank and o not in self.states:
                self.states[o] = state
        self.done = {o: False for o in owners}
        if p.ranks is None:
            p.ranks = dict(self.max_components)

    @property
    def owners(self) -> list[str]:
        return [g[0] for g in self.progress.groups]

    def token_selection(self, batch: Any) -> tuple[Any, TokenSelector | None]:
        """What the capture hooks work with for a batch: the model input layer functions receive, and the selector
        of the tokens that count (None with a custom prepare_model_inputs_fn: PEFT's semantics)."""
        if self.prepare_model_inputs_fn is not None:
            return self.prepare_model_inputs_fn(batch, settings_namespace(self.settings)), None
        s = self.settings
        masks = stream_masks(batch, s.use_label_mask, s.label_mask_value, self.streams.encoder_decoder)
        return batch, (TokenSelector(masks, self.streams) if masks else None)

    # -- one step ----------------------------------------------------------------------------------------------
    def _forward(self, batch: Any, first: bool) -> dict[str, torch.Tensor]:
        if batch is None:
            return {}
        batch = to_device(batch, self.device)
        self.capture.model_input, self.capture.selector = self.token_selection(batch)
        t0 = time.perf_counter()
        with self.streams.watching():
            tokens = self.capture.run(lambda: self.forward_fn(self.model, batch), first=first)
        self.stats.forward_s += time.perf_counter() - t0
        return tokens

    def step(self, batch: Any, error: BaseException | None = None) -> None:
        """One global step on every rank: forward, route tokens to owners, update, agree.

        `error` is a failure this rank met before the step (reading its batch): like one raised here, it is
        agreed on, so every rank raises together instead of waiting in a collective for the failed one.
        """
        p, first = self.progress, self.progress.groups is None
        tokens: dict[str, torch.Tensor] = {}
        layout, updating = None, set()
        if error is None:
            try:
                if not first:
                    undone = {o for o in self.owners if not self.done[o]}
                    refine = set(self.owners) - undone if self.settings.refine_converged else set()
                    self.capture.plan(undone, also=refine)
                    updating = undone | (refine & self.capture.active)
                tokens = self._forward(batch, first)
                if first and self.comm.is_main:
                    layout = self._first_layout()
            except Exception as err:  # surfaced on every rank by the agreement below
                error = err
        self.comm.agree(error)
        if first:  # every rank uses rank 0's groups and execution order, so all plan the same passes
            self._set_groups(*self.comm.broadcast(layout))
        active = [o for o in self.owners if first or o in updating]
        dtype = next(iter(tokens.values())).dtype if tokens else torch.float32
        local = {o: tokens.get(o, torch.empty(0, self.width[o], device=self.device, dtype=dtype)) for o in active}
        n_local = next((int(v.shape[0]) for v in local.values()), 0)
        self.stats.tokens += n_local
        t0 = time.perf_counter()
        routed = self.comm.route({o: v.to(self.comm.device) for o, v in local.items()}, self.owner_rank)
        self.stats.comm_s += time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            mine = [o for o in active if o in self.states]
            ipca.update_many([self.states[o] for o in mine], [routed[o].to(self.device) for o in mine])
            self.stats.pca_tokens += sum(int(routed[o].shape[0]) for o in mine)
            self.stats.svd_s += time.perf_counter() - t0
        except Exception as err:
            error = err
        self._agree_and_plan(error, n_local)
        p.step += 1

    def _first_layout(self) -> tuple[list[list[str]], list[str]]:
        """Shared-input groups and execution order, from this rank's first forward pass."""
        raw = self.capture.raw
        if not raw:
            raise ConfigError(
                "the first batch reached none of the target layers (the forward pass does not use them); "
                "check eva.target_modules and hooks.forward_fn"
            )
        return shared_input_groups(raw, self.names), list(self.capture.order)

    def _agree_and_plan(self, error: BaseException | None, n_local: int) -> None:
        """Share every PCA's ratios and similarities, then recompute ranks and which PCAs are done."""
        owners, width = self.owners, max(self.max_components.values())
        table = torch.zeros(len(owners), 2 * width + 1, dtype=torch.float64)
        for i, o in enumerate(owners):
            s = self.states.get(o)
            if s is None or not s.fitted:
                continue
            k = s.n_components
            table[i, :k] = s.explained_variance_ratio()[:k].double().cpu()
            table[i, width : width + k] = -1.0 if s.similarity is None else s.similarity.double().cpu()
            table[i, -1] = 1.0
        values = torch.cat([table.reshape(-1), torch.tensor([float(n_local)], dtype=torch.float64)])
        summed = self.comm.agree(error, values)
        table = summed[:-1].reshape(len(owners), 2 * width + 1)
        self.progress.tokens += int(summed[-1])
        for i, o in enumerate(owners):
            if table[i, -1] > 0:
                k = self.max_components[o]
                self.ratios[o] = table[i, :k].float()
                self.similar[o] = table[i, width : width + k].float()
        p = self.progress
        if len(self.ratios) == len(owners):
            group_of = {n: g[0] for g in p.groups for n in g}
            ordered = {n: self.ratios[group_of[n]] for n in self.names}
            p.ranks = distribute_ranks(ordered, self.budget, self.max_components, p.groups)
        tau = self.settings.tau
        for o in owners:
            sim = self.similar.get(o)
            need = p.ranks[o]
            if self.settings.refine_converged and need <= self.done_at.get(o, -1):
                self.done[o] = True  # converged for this many components before: refining updates do not undo that
                continue
            self.done[o] = need == 0 or (sim is not None and bool((sim[:need] >= tau).all()))
            if self.done[o]:
                self.done_at[o] = need

    # -- driving --------------------------------------------------------------------------------------------
    def run(self, batches: Iterable[Any], show_progress: bool = True, on_step: Callable[["EvaRun"], None] | None = None) -> None:
        """Step until every PCA is done or eva.max_batches; `batches` yields this rank's share (None if empty)."""
        from tqdm.auto import tqdm

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
                bar.update(1)
                n_done = sum(len(g) for g in self.progress.groups if self.done[g[0]])
                bar.set_postfix_str(f"{n_done}/{len(self.names)} layers converged")
                if on_step is not None:
                    on_step(self)
                if all(self.done.values()):
                    break
        finally:
            bar.close()
            self.capture.remove()

    # -- checkpointing ------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """What a checkpoint keeps: the loop state all ranks share, and this rank's own PCAs (on the CPU)."""
        p = self.progress
        return {
            "progress": {"step": p.step, "tokens": p.tokens, "groups": p.groups, "order": p.order, "ranks": p.ranks},
            "done": dict(self.done),
            "done_at": dict(self.done_at),
            "ratios": {o: t.tolist() for o, t in self.ratios.items()},
            "similar": {o: t.tolist() for o, t in self.similar.items()},
            "states": {o: _state_to(s, "cpu") for o, s in self.states.items()},
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Continue a run from `snapshot()` of one with the same settings and world size (next step: its step)."""
        p = snapshot["progress"]
        self.progress = Progress(step=p["step"], tokens=p["tokens"], ranks=dict(p["ranks"]))
        self.states = {o: _state_to(s, self.device) for o, s in snapshot["states"].items()}
        self._set_groups([list(g) for g in p["groups"]], list(p["order"]))
        self.done = dict(snapshot["done"])
        self.done_at = dict(snapshot.get("done_at", {}))
        self.ratios = {o: torch.tensor(v, dtype=torch.float32) for o, v in snapshot["ratios"].items()}
        self.similar = {o: torch.tensor(v, dtype=torch.float32) for o, v in snapshot["similar"].items()}

    def unconverged(self) -> list[str]:
        return [n for g in self.progress.groups for n in g if not self.done[g[0]] and self.progress.ranks[n] > 0]

    def result(self, extra_meta: Mapping[str, Any] | None = None) -> EvaState | None:
        """The state on rank 0 (None elsewhere); raises ConvergenceError per eva.on_unconverged."""
        missing = self.unconverged()
        if missing:
            msg = f"{len(missing)} layer(s) had not converged after {self.progress.step} batches: {', '.join(missing[:8])}"
            if self.settings.on_unconverged == "error":
                raise ConvergenceError(msg + ". Raise eva.max_batches, lower eva.tau, or set eva.on_unconverged: warn")
            if self.comm.is_main:
                log.warning(msg + "; keeping their current estimates (eva.on_unconverged: warn)")
        self.stats.updates = {o: s.steps for o, s in self.states.items()}
        gathered = self.comm.gather_to_main(({o: _cpu_state(s) for o, s in self.states.items()}, self.stats))
        if gathered is None:
            return None
        states: dict[str, ipca.PCAState] = {}
        for part, _ in gathered:
            states.update(part)
        self.rank_stats = [st for _, st in gathered]
        return self._build_state(states, extra_meta or {})

    def _build_state(self, states: Mapping[str, ipca.PCAState], extra: Mapping[str, Any]) -> EvaState:
        s_cfg, p = self.settings, self.progress
        group_of = {n: g[0] for g in p.groups for n in g}
        tensors, ratios, singular, conv = {}, {}, {}, {}
        alpha_pattern, rank_pattern, layer_alpha = {}, {}, {}
        for n in self.names:
            st, rank = states[group_of[n]], p.ranks[n]
            k = st.n_components
            ratios[n] = [round(float(v), 8) for v in st.explained_variance_ratio()[:k]]
            singular[n] = [float(v) for v in st.singular_values[:k]]
            conv[n] = bool(self.done[group_of[n]])
            if rank > 0:
                a = st.top(rank).clone().float()
                if s_cfg.whiten:
                    a /= st.singular_values[:rank].clamp_min(1e-12).sqrt().unsqueeze(1)
                tensors[n] = a
            alpha_n = layer_alpha[n] = float(pattern_value(s_cfg.alpha_pattern, n, s_cfg.lora_alpha))
            alpha = scaled_alpha(alpha_n, rank, self.r[n], s_cfg.adjust_scaling_factors)
            if rank != s_cfg.r:
                rank_pattern[n] = rank
            if alpha != s_cfg.lora_alpha:
                alpha_pattern[n] = alpha
        spectrum = {}
        for o in self.owners:
            spectrum[f"{o}.components"] = states[o].top(states[o].n_components).float()
            spectrum[f"{o}.singular_values"] = states[o].singular_values[: states[o].n_components].float()
        import transformers

        from . import __version__

        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": "default",
            "r": s_cfg.r,
            "lora_alpha": s_cfg.lora_alpha,
            "rho": s_cfg.rho,
            "tau": s_cfg.tau,
            "whiten": s_cfg.whiten,
            "adjust_scaling_factors": s_cfg.adjust_scaling_factors,
            "use_label_mask": s_cfg.use_label_mask,
            "label_mask_value": s_cfg.label_mask_value,
            "target_modules": s_cfg.target_modules,
            "exclude_modules": s_cfg.exclude_modules,
            "oversample": s_cfg.oversample,
            "refine_converged": s_cfg.refine_converged,
            "layer_r": self.r,
            "layer_alpha": layer_alpha,
            "store_key": None,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "ranks": dict(p.ranks),
            "in_features": dict(self.width),
            "max_components": dict(self.max_components),
            "explained_variance": ratios,
            "singular_values": singular,
            "converged": conv,
            "shared_inputs": [g for g in p.groups if len(g) > 1],
            "tokens": p.tokens,
            "batches": p.step,
            "world_size": self.comm.world,
            "versions": {"evapipe": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        meta.update(extra)
        return EvaState(tensors, meta, spectrum)


def _cpu_state(s: ipca.PCAState) -> ipca.PCAState:
    return ipca.PCAState(
        s.n_features, s.n_components, s.n_track, s.seed,
        mean=s.mean.cpu(), var=s.var.cpu(), n_seen=s.n_seen, steps=s.steps,
        components=s.components.cpu(), singular_values=s.singular_values.cpu(),
        similarity=None if s.similarity is None else s.similarity.cpu(), history=list(s.history),
    )


def _state_to(s: ipca.PCAState, device: torch.device | str) -> ipca.PCAState:
    """A copy of a PCA state with every tensor field on `device` (tensors already there are shared, not copied)."""
    moved = {f.name: getattr(s, f.name) for f in fields(s) if f.init}
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
    return replace(s, **(moved | {"history": list(s.history)}))


def _device_of(model: nn.Module) -> torch.device:
    from .models import model_device

    return model_device(model)


def compute_eva_state(
    model: nn.Module,
    dataloader: Iterable[Any],
    settings: EvaSettings | None = None,
    *,
    forward_fn: ForwardFn | None = None,
    prepare_model_inputs_fn: Callable | None = None,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = None,
    comm: Comm | None = None,
    show_progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> EvaState | None:
    """EVA state for a model and a dataloader you already have (PEFT-style hooks optional).

    Keyword overrides set EvaSettings fields (`r=16, rho=2`). Under torch.distributed each rank passes its own
    dataloader shard and gets the state on rank 0 (None elsewhere). The model is left as it was (mode, hooks).
    """
    settings = settings or EvaSettings()
    if overrides:
        import dataclasses

        settings = dataclasses.replace(settings, **overrides)
    from .models import model_info

    training = model.training
    model.eval()
    try:
        run = EvaRun(model, settings, comm, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn)
        with torch.no_grad():
            run.run(cycle_batches(dataloader), show_progress=show_progress)
        extra = {"model": model_info(model), "dataset": {"id": None, "split": None, "fingerprint": None}}
        extra.update(metadata or {})
        return run.result(extra)
    finally:
        model.train(training)
