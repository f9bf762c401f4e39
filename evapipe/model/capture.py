"""Forward pre-hooks that take the tokens that count from each still-needed target layer's input.

Three costs PEFT pays that this module avoids:
* the forward pass is cut right after the deepest layer still needed (logits are never computed);
* layers whose PCA is done, or that share another layer's input, are not captured at all;
* layers with identical inputs are found on the first batch by tensor identity, then by a two-number
  fingerprint on the device confirmed with torch.equal, not by hashing tensors as Python tuples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import torch
from torch import nn

from .layout import StepPlan, capture_depth


class StopForward(Exception):
    """Raised inside the model once the deepest needed layer's input is captured."""


class TokenSelector:
    """Picks the counted rows of a (batch, seq, features) layer input with the mask of the stream the layer reads.

    `masks` maps a stream (streams.INPUT, streams.DECODER) to its (batch, seq) mask; `stream_of(name, x)` says which
    stream a layer reads (without it, every layer reads the first mask). Encoder and decoder masks can share a shape,
    so the stream is never guessed from the input's shape; an input whose leading shape is not its mask's (a
    pooler's (batch, features)) keeps every row. The flat indices are built once per batch.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor], stream_of: Callable[[str, torch.Tensor], str] | None = None):
        self.shape = {k: tuple(m.shape) for k, m in masks.items()}
        self.index = {k: m.reshape(-1).nonzero().squeeze(1) for k, m in masks.items()}
        self.stream_of = stream_of

    def __call__(self, x: torch.Tensor, name: str = "") -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        keep = self.flat_index(x, name)
        return flat if keep is None else flat.index_select(0, keep)

    def flat_index(self, x: torch.Tensor, name: str = "") -> torch.Tensor | None:
        """Indices of the counted rows of `x` flattened to (rows, features): for (batch, seq, features), and for
        the flattened (batch * seq, features) an experts module receives; None (every row) for other shapes."""
        stream = self.stream_of(name, x) if self.stream_of is not None else next(iter(self.index), None)
        shape = self.shape.get(stream)
        if shape is None or (shape != tuple(x.shape[:-1]) and (x.ndim != 2 or x.shape[0] != math.prod(shape))):
            return None
        return self.index[stream]


LayerFn = Callable[[Any, Any, str], torch.Tensor]
# the counted rows of each wanted expert of an experts module call, from the module, its call's args and kwargs,
# the wanted expert keys and the batch's TokenSelector (see evapipe.model.experts.ExpertHooks)
ExpertsFn = Callable[[nn.Module, tuple, Mapping[str, Any], AbstractSet[str], "TokenSelector | None"],
                     Mapping[str, torch.Tensor]]


class Capture:
    """Owns the hooks on all target layers; `active` says which layers' inputs are kept this step.

    `experts` maps an experts module's name to its expert keys and the function that gives their rows: one hook on
    that module captures all of them (an expert is a target "layer" that no module input alone describes).
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        layer_fn: LayerFn | Mapping[str, LayerFn] | None = None,
        experts: Mapping[str, tuple[Sequence[str], ExpertsFn]] | None = None,
    ):
        self.model = model
        self.names = list(names)
        self.layer_fn = layer_fn
        self.active: set[str] = set(names)
        self.stop_at: str | None = None
        self.model_input: Any = None  # what a layer_fn is given besides the layer's input (see select)
        self.selector: TokenSelector | None = None  # which rows count (see select)
        self.expert_selector: TokenSelector | None = None  # which rows experts count (see select)
        self.raw: dict[str, torch.Tensor] | None = None  # first batch only: raw inputs, for duplicate detection
        self.tokens: dict[str, list[torch.Tensor]] = {}
        self.order: list[str] = []
        self.calls: dict[str, int] = {}
        experts = dict(experts or {})
        grouped = {k for keys, _ in experts.values() for k in keys}
        self._handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n))
                         for n in self.names if n not in grouped]
        self._handles += [model.get_submodule(m).register_forward_pre_hook(self._experts_hook(keys, fn), with_kwargs=True)
                          for m, (keys, fn) in experts.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in self.active:
                return
            if self._record(name, args[0], self._prepare(name, args)):
                raise StopForward

        return hook

    def _experts_hook(self, keys: Sequence[str], fn: ExpertsFn) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            wanted = self.active.intersection(keys)
            if not wanted:
                return
            stop = False
            for key, rows in fn(module, args, kwargs, wanted, self.expert_selector).items():
                stop = self._record(key, rows, rows) or stop
            if stop:
                raise StopForward

        return hook

    def _record(self, name: str, raw: torch.Tensor, tokens: torch.Tensor) -> bool:
        """Keep a layer's counted tokens; True when the pass can stop after this layer (on the first pass: once
        every target has been seen)."""
        if self.raw is not None:  # first pass: record execution order, calls and raw inputs
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] == 1:
                self.order.append(name)
            self.raw.setdefault(name, raw)
        self.tokens.setdefault(name, []).append(tokens.detach())
        return name == self.stop_at or (self.raw is not None and len(self.order) == len(self.names))

    def _prepare(self, name: str, args: tuple) -> torch.Tensor:
        fn = self.layer_fn.get(name) if isinstance(self.layer_fn, Mapping) else self.layer_fn
        if fn is not None:
            x = fn(args, self.model_input, name)
            return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x
        x = args[0]
        return self.selector(x, name) if self.selector is not None else x.reshape(-1, x.shape[-1])

    def select(self, selector: TokenSelector | None, model_input: Any = None,
               expert_selector: TokenSelector | None = None) -> None:
        """For the next passes: `selector` picks the rows that count (None: all); `model_input` is what a layer_fn
        receives as its second argument; `expert_selector` picks the tokens experts count (PEFT's layer hooks know
        no experts: they count the batch's masked tokens)."""
        self.selector, self.model_input, self.expert_selector = selector, model_input, expert_selector

    def run(self, forward: Callable[[], Any], first: bool = False) -> dict[str, torch.Tensor]:
        """Run one forward pass; returns counted tokens (rows x features) per active layer."""
        self.tokens, self.raw = {}, ({} if first else None)
        if first:
            self.order, self.calls = [], {}
        try:
            forward()
        except StopForward:
            pass
        if first and any(c > 1 for c in self.calls.values()):
            self.order = []  # a layer called twice per pass (weight sharing): never cut the pass short
        return {n: (t[0] if len(t) == 1 else torch.cat(t)) for n, t in self.tokens.items()}

    def follow(self, order: Sequence[str]) -> None:
        """Plan passes by this execution order (rank 0's, so that every rank cuts its passes alike)."""
        self.order = list(order)

    def plan(self, plan: StepPlan) -> None:
        """Capture what the next step needs; stop the pass after the deepest needed layer (in execution order)."""
        self.stop_at, self.active = capture_depth(self.order, plan)

    def only(self, names: Iterable[str]) -> None:
        """Capture these layers in the next passes and never stop a pass early."""
        self.stop_at, self.active = None, set(names)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _fingerprint(x: torch.Tensor, probe: torch.Tensor) -> tuple:
    proj = x.reshape(-1, x.shape[-1]).float() @ probe[: x.shape[-1]].to(x.device)  # layers may sit on several devices
    return tuple(x.shape), float(proj.sum()), float(proj.abs().sum())


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x is y or (x.shape == y.shape and x.data_ptr() == y.data_ptr() and x.stride() == y.stride())


def shared_input_groups(
    raw: Mapping[str, torch.Tensor], names: Sequence[str], alone: AbstractSet[str] = frozenset()
) -> list[list[str]]:
    """Groups (owner first, model order) of layers that received identical inputs on the first batch.

    Layers in `alone` (experts: two that no token reached both received nothing) always have a PCA of their own.
    """
    shared = {n: x for n, x in raw.items() if n not in alone}
    probe = None
    if shared:
        first = next(iter(shared.values()))
        probe = torch.randn(max(t.shape[-1] for t in shared.values()), generator=torch.Generator().manual_seed(0))
        probe = probe.to(first.device)
    groups: list[list[str]] = []
    keys: list[tuple | None] = []
    for name in names:
        x = raw.get(name)
        if x is None:
            continue
        if name in alone:
            groups.append([name])
            keys.append(None)
            continue
        key = _fingerprint(x, probe)
        for g, g_key in zip(groups, keys):
            if g_key is None:
                continue
            y = raw[g[0]]
            if _same_tensor(x, y) or (key == g_key and torch.equal(x, y)):
                g.append(name)
                break
        else:
            groups.append([name])
            keys.append(key)
    return groups
