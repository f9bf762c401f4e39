"""The producer of EVA's tokens: forward passes of a model, cut short, with the layers' counted inputs captured.

`ModelTokens` owns the hooks (capture.py), the token streams (streams.py) and the user's forward and input hooks
(PEFT's `forward_fn`, `prepare_model_inputs_fn`, `prepare_layer_inputs_fn` semantics). A driver tells it what
the next pass needs (`plan`) and gets {layer: rows x in_features} back from `forward(batch)`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .capture import Capture, TokenSelector, shared_input_groups
from .config import EvaSettings
from .errors import ConfigError, DataError
from .experts import ExpertHooks
from .planning import Layout, StepPlan
from .streams import LayerStreams, stream_masks

ForwardFn = Callable[[nn.Module, Any], Any]


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

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        settings: EvaSettings,
        device: torch.device,
        forward_fn: ForwardFn | None = None,
        prepare_model_inputs_fn: Callable | None = None,
        prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = None,
        experts: ExpertHooks | None = None,
    ):
        self.model, self.names, self.settings, self.device = model, list(names), settings, device
        self.experts = experts or ExpertHooks([])
        self.forward_fn = forward_fn or default_forward
        self.prepare_model_inputs_fn = prepare_model_inputs_fn
        layer_fn = prepare_layer_inputs_fn
        if layer_fn is None and prepare_model_inputs_fn is not None:
            layer_fn = peft_layer_input
        self.capture = Capture(model, self.names, layer_fn, self.experts.spec())
        self.streams = LayerStreams(model, self.names)
        self.forward_s = 0.0

    def forward(self, batch: Any, first: bool = False) -> dict[str, torch.Tensor]:
        """One pass over `batch` (None: nothing this step); the first pass also records the layout."""
        if batch is None:
            return {}
        batch = to_device(batch, self.device)
        model_input, selector = self.selection(batch)
        # PEFT's layer hooks know no experts: experts count the batch's masked tokens
        expert_selector = selector if self.prepare_model_inputs_fn is None else self.token_selector(batch)
        t0 = time.perf_counter()
        with self.streams.watching():
            self.capture.select(selector, model_input, expert_selector)
            tokens = self.capture.run(lambda: self.forward_fn(self.model, batch), first)
        self.forward_s += time.perf_counter() - t0
        return tokens

    def selection(self, batch: Any) -> tuple[Any, TokenSelector | None]:
        """What the hooks work with for a batch (on the device): the model input a layer function receives, and
        the selector of the rows that count (None with a custom prepare_model_inputs_fn: PEFT's semantics)."""
        if self.prepare_model_inputs_fn is not None:
            return self.prepare_model_inputs_fn(batch, settings_namespace(self.settings)), None
        return batch, self.token_selector(batch)

    def token_selector(self, batch: Any) -> TokenSelector | None:
        """The selector of a batch's counted tokens (attention mask, and labels with eva.use_label_mask)."""
        s = self.settings
        masks = stream_masks(batch, s.use_label_mask, s.label_mask_value, self.streams.encoder_decoder)
        return TokenSelector(masks, self.streams) if masks else None

    def layout(self) -> Layout:
        """Shared-input groups and execution order, from the first pass (`forward(batch, first=True)`)."""
        raw = self.capture.raw
        if not raw:
            raise ConfigError(
                "the first batch reached none of the target layers (the forward pass does not use them); "
                "check eva.target_modules and hooks.forward_fn"
            )
        return Layout.of(shared_input_groups(raw, self.names, alone=set(self.experts.keys)), self.capture.order)

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
