"""The producer of EVA's tokens: forward passes of a model, cut short, with the layers' counted inputs captured.

`ModelTokens` owns the hooks (capture.py), the token streams (streams.py) and the user's forward and input hooks
(PEFT's `forward_fn`, `prepare_model_inputs_fn`, `prepare_layer_inputs_fn` semantics). A driver tells it what
the next pass needs (`plan`) and gets {layer: rows x in_features} back from `forward(batch)`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..core.config import EvaSettings
from ..core.errors import ConfigError, DataError
from .capture import Capture, TokenSelector, shared_input_groups
from .experts import ExpertHooks
from .layout import Layout, StepPlan
from .streams import LayerStreams, stream_masks

ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class UserHooks:
    """The user's three hooks, PEFT's semantics: how the model is called on a batch (`forward_fn(model, batch)`),
    what layer hooks receive as the model input (`prepare_model_inputs_fn(batch, peft_config)`), and how a layer's
    input becomes rows (`prepare_layer_inputs_fn(layer_input, model_input, layer_name)`, or one per layer name)."""

    forward_fn: ForwardFn | None = None
    prepare_model_inputs_fn: Callable | None = None
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = None

    @property
    def forward(self) -> ForwardFn:
        return self.forward_fn or default_forward

    @property
    def layer_fn(self) -> Callable | Mapping[str, Callable] | None:
        """The layer-input function; with only a custom prepare_model_inputs_fn, PEFT's default one."""
        if self.prepare_layer_inputs_fn is None and self.prepare_model_inputs_fn is not None:
            return peft_layer_input
        return self.prepare_layer_inputs_fn


@dataclass(frozen=True)
class Selection:
    """What a batch's hooks work with: the model input a layer function receives, the selector of the rows that
    count, and the one experts use."""

    model_input: Any
    selector: TokenSelector | None
    expert_selector: TokenSelector | None


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


def to_device(inputs: Any, device: torch.device, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """`inputs` (tensors in mappings, lists, tuples) on `device`; with `memo`, a tensor met twice is moved once and
    stays one shared object (a mask every block of a layer type receives)."""
    if isinstance(inputs, torch.Tensor):
        if memo is None:
            return inputs.to(device, non_blocking=True)
        if id(inputs) not in memo:
            memo[id(inputs)] = inputs.to(device, non_blocking=True)
        return memo[id(inputs)]
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device, memo) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_device(v, device, memo) for v in inputs)
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
    eva_keys = ("rho", "tau", "use_label_mask", "label_mask_value", "whiten", "adjust_scaling_factors")
    eva = SimpleNamespace(**{k: getattr(settings, k) for k in eva_keys})
    return SimpleNamespace(r=settings.r, lora_alpha=settings.lora_alpha, rank_pattern=settings.rank_pattern,
                           eva_config=eva)


def cycle_batches(dataloader: Iterable) -> Iterator[Any]:
    """Endless passes over a dataloader (as PEFT does), failing clearly if it is empty."""
    for epoch in itertools.count():
        empty = True
        for batch in dataloader:
            empty = False
            yield batch
        if empty:
            raise DataError("the dataloader yielded no batch" if epoch == 0 else "the dataloader is exhausted")


class ModelTokens:
    """Forward passes of `model` that return the counted input rows of the target layers the plan needs."""

    def __init__(self, model: nn.Module, names: Sequence[str], settings: EvaSettings, device: torch.device,
                 hooks: UserHooks | None = None, experts: ExpertHooks | None = None):
        self.model, self.names, self.settings, self.device = model, list(names), settings, device
        self.experts = experts or ExpertHooks([])
        self.hooks = hooks or UserHooks()
        self.capture = Capture(model, self.names, self.hooks.layer_fn, self.experts.spec())
        self.streams = LayerStreams(model, self.names)
        self.forward_s = 0.0

    def forward(self, batch: Any, first: bool = False) -> dict[str, torch.Tensor]:
        """One pass of the whole model over `batch` (None: nothing this step); the first pass also records the
        layout."""
        if batch is None:
            return {}
        batch = to_device(batch, self.device)
        return self.capture_pass(lambda: self.hooks.forward(self.model, batch), self.selection(batch), first)

    def capture_pass(self, run: Callable[[], Any], selection: Selection, first: bool = False) -> dict[str, torch.Tensor]:
        """The one way any pass is run, through the whole model or some of its blocks: `run` under the hooks, with
        `selection`'s rows counted; {layer: counted rows} of the layers this pass captures."""
        t0 = time.perf_counter()
        with self.streams.watching():
            self.capture.select(selection.selector, selection.model_input, selection.expert_selector)
            tokens = self.capture.run(run, first)
        self.forward_s += time.perf_counter() - t0
        return tokens

    def selection(self, batch: Any) -> Selection:
        """What the hooks work with for a batch (on the device). With a custom prepare_model_inputs_fn (PEFT's
        semantics) layers get its output and every row; experts, which PEFT's layer hooks do not know, count the
        batch's masked tokens."""
        fn = self.hooks.prepare_model_inputs_fn
        selector = self.token_selector(batch)
        if fn is not None:
            return Selection(fn(batch, settings_namespace(self.settings)), None, selector)
        return Selection(batch, selector, selector)

    def token_selector(self, batch: Any) -> TokenSelector | None:
        """The selector of a batch's counted tokens (attention mask, and labels with eva.use_label_mask)."""
        s = self.settings
        masks = stream_masks(batch, s.use_label_mask, s.label_mask_value, self.streams.encoder_decoder)
        return TokenSelector(masks, self.streams) if masks else None

    def layout(self) -> Layout:
        """Shared-input groups and execution order, from the first pass (`forward(batch, first=True)`)."""
        groups, order = self.seen(self.names)
        if not groups:
            raise ConfigError(
                "the first batch reached none of the target layers (the forward pass does not use them); "
                "check eva.target_modules and hooks.forward_fn"
            )
        return Layout.of(groups, order)

    def seen(self, names: Sequence[str]) -> tuple[list[list[str]], list[str]]:
        """The shared-input groups among `names` and the execution order the last first pass recorded (a layout,
        or the part of one that a pass through some blocks saw)."""
        raw = self.capture.raw
        if not raw:
            return [], []
        return shared_input_groups(raw, names, alone=set(self.experts.keys)), list(self.capture.order)

    def capture_only(self, names: Iterable[str]) -> None:
        """The next passes keep these layers' inputs and run to their end (no layer stops them)."""
        self.capture.only(names)

    def capture_then_stop(self, names: Iterable[str]) -> None:
        """The next passes keep these layers' inputs and stop after the last of them (in execution order): for a
        pass whose output nothing needs, such as a block run again for some of its layers only."""
        self.capture.plan(StepPlan(frozenset(names), frozenset()))

    def follow(self, layout: Layout) -> None:
        """Use the agreed layout (rank 0's) for planning passes; every target must have had an input."""
        seen = {n for g in layout.groups for n in g}
        unused = [n for n in self.names if n not in seen]
        if unused:
            raise ConfigError(
                f"{len(unused)} target layer(s) got no input in the first forward pass (the model's forward does not "
                f"use them): {', '.join(unused[:6])}. Leave them out with eva.exclude_modules."
            )
        self.capture.follow(layout.order)

    def plan(self, plan: StepPlan) -> None:
        self.capture.plan(plan)

    @property
    def active(self) -> set[str]:
        """The layers the next pass captures (after `plan`)."""
        return self.capture.active

    def close(self) -> None:
        self.capture.remove()
