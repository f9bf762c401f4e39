"""Forward pre-hooks that take the tokens that count from each still-needed target layer's input.

Three costs PEFT pays that this module avoids:
* the forward pass is cut right after the deepest layer still needed (logits are never computed);
* layers whose PCA is done, or that share another layer's input, are not captured at all;
* layers with identical inputs are found on the first batch by tensor identity, then by a two-number
  fingerprint on the device confirmed with torch.equal, not by hashing tensors as Python tuples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import planning


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
        stream = self.stream_of(name, x) if self.stream_of is not None else next(iter(self.index), None)
        if self.shape.get(stream) != tuple(x.shape[:-1]):
            return flat
        return flat.index_select(0, self.index[stream])


LayerFn = Callable[[Any, Any, str], torch.Tensor]


class Capture:
    """Owns the hooks on all target layers; `active` says which layers' inputs are kept this step."""

    def __init__(self, model: nn.Module, names: Sequence[str], layer_fn: LayerFn | Mapping[str, LayerFn] | None = None):
        self.model = model
        self.names = list(names)
        self.layer_fn = layer_fn
        self.active: set[str] = set(names)
        self.stop_at: str | None = None
        self.model_input: Any = None  # what a layer_fn is given besides the layer's input (see select)
        self.selector: TokenSelector | None = None  # which rows count (see select)
        self.raw: dict[str, torch.Tensor] | None = None  # first batch only: raw inputs, for duplicate detection
        self.tokens: dict[str, list[torch.Tensor]] = {}
        self.order: list[str] = []
        self.calls: dict[str, int] = {}
        self._handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in self.active:
                return
            if self.raw is not None:  # first pass: record execution order, calls and raw inputs
                self.calls[name] = self.calls.get(name, 0) + 1
                if self.calls[name] == 1:
                    self.order.append(name)
                self.raw.setdefault(name, args[0])
            self.tokens.setdefault(name, []).append(self._prepare(name, args).detach())
            if name == self.stop_at or (self.raw is not None and len(self.order) == len(self.names)):
                raise StopForward  # on the first pass: once every target has been seen

        return hook

    def _prepare(self, name: str, args: tuple) -> torch.Tensor:
        fn = self.layer_fn.get(name) if isinstance(self.layer_fn, Mapping) else self.layer_fn
        if fn is not None:
            x = fn(args, self.model_input, name)
            return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x
        x = args[0]
        return self.selector(x, name) if self.selector is not None else x.reshape(-1, x.shape[-1])

    def select(self, selector: TokenSelector | None, model_input: Any = None) -> None:
        """For the next passes: `selector` picks the rows that count (None: all); `model_input` is what a layer_fn
        receives as its second argument."""
        self.selector, self.model_input = selector, model_input

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

    def plan(self, plan: planning.StepPlan) -> None:
        """Capture what the next step needs; stop the pass after the deepest needed layer (in execution order)."""
        self.stop_at, self.active = planning.capture_depth(self.order, plan)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _fingerprint(x: torch.Tensor, probe: torch.Tensor) -> tuple:
    proj = x.reshape(-1, x.shape[-1]).float() @ probe[: x.shape[-1]].to(x.device)  # layers may sit on several devices
    return tuple(x.shape), float(proj.sum()), float(proj.abs().sum())


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x is y or (x.shape == y.shape and x.data_ptr() == y.data_ptr() and x.stride() == y.stride())


def shared_input_groups(raw: Mapping[str, torch.Tensor], names: Sequence[str]) -> list[list[str]]:
    """Groups (owner first, model order) of layers that received identical inputs on the first batch."""
    first = next(iter(raw.values()))
    probe = torch.randn(max(t.shape[-1] for t in raw.values()), generator=torch.Generator().manual_seed(0))
    probe = probe.to(first.device)
    groups: list[list[str]] = []
    keys: list[tuple] = []
    for name in names:
        x = raw.get(name)
        if x is None:
            continue
        key = _fingerprint(x, probe)
        for g, g_key in zip(groups, keys):
            y = raw[g[0]]
            if _same_tensor(x, y) or (key == g_key and torch.equal(x, y)):
                g.append(name)
                break
        else:
            groups.append([name])
            keys.append(key)
    return groups
