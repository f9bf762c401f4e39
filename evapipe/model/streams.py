"""Token streams: which tokens of a batch count, and which stream each target layer reads.

A single-stack model (decoder-only LM, encoder, ViT) has one stream, the model input's tokens. An encoder-decoder
model (T5, BART) has two: the encoder reads the input tokens, the decoder the target tokens. Their masks can have the
same shape, so a layer's stream comes from where it sits in the model, never from the shape of its input: layers
outside the decoder read the input stream, layers inside it the decoder stream, except the cross-attention keys and
values, which are fed the encoder's output. Those are recognised on the first pass that reaches them, by identity
with the encoder's output, and every decision is kept for the rest of the run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

INPUT, DECODER = "input", "decoder"


def _label_masked(mask: torch.Tensor, labels: Any, use_label_mask: bool, label_mask_value: int) -> torch.Tensor:
    """`mask` less the tokens whose label is label_mask_value, when labels of the mask's shape are given."""
    if use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        return mask & (labels != label_mask_value)
    return mask


def token_mask(inputs: Mapping[str, Any], use_label_mask: bool, label_mask_value: int) -> torch.Tensor | None:
    """Boolean (batch, seq) mask of tokens that count: attention mask and, optionally, labels != mask value."""
    mask = inputs.get("attention_mask")
    ids = inputs.get("input_ids")
    if mask is None and ids is None:
        return None
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return _label_masked(mask, inputs.get("labels"), use_label_mask, label_mask_value)


def stream_masks(
    inputs: Any, use_label_mask: bool, label_mask_value: int, encoder_decoder: bool
) -> dict[str, torch.Tensor]:
    """(batch, seq) masks of the tokens that count, per stream.

    In an encoder-decoder model the labels are the decoder's targets: they mask the decoder stream (with
    `decoder_attention_mask`), never the encoder's input tokens, even when both have the same length.
    """
    if not isinstance(inputs, Mapping):
        return {}
    masks = {}
    first = token_mask(inputs, use_label_mask and not encoder_decoder, label_mask_value)
    if first is not None:
        masks[INPUT] = first
    if encoder_decoder:
        labels = inputs.get("labels") if isinstance(inputs.get("labels"), torch.Tensor) else None
        mask = inputs.get("decoder_attention_mask")
        if mask is None and labels is not None:
            mask = torch.ones_like(labels, dtype=torch.bool)
        if mask is not None:
            masks[DECODER] = _label_masked(mask.bool(), labels, use_label_mask, label_mask_value)
    return masks


def encoder_and_decoder(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """(encoder module, decoder's qualified name) of an encoder-decoder model; (None, None) for one stack."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None, None
    get_encoder, get_decoder = getattr(model, "get_encoder", None), getattr(model, "get_decoder", None)
    if not (callable(get_encoder) and callable(get_decoder)):
        return None, None
    encoder, decoder = get_encoder(), get_decoder()
    prefix = next((name for name, module in model.named_modules() if module is decoder and name), None)
    return (encoder, prefix) if isinstance(encoder, nn.Module) and prefix else (None, None)


class LayerStreams:
    """`streams(name, x)` -> the stream target layer `name` reads; call sites pass the layer's input `x`."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.encoder, prefix = encoder_and_decoder(model)
        self.encoder_decoder = self.encoder is not None
        in_decoder = {n for n in names if prefix is not None and n.startswith(prefix + ".")}
        self.stream = {n: INPUT for n in names if n not in in_decoder}
        self.undecided = set(in_decoder)
        self._encoder_out: torch.Tensor | None = None

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Around a forward pass: while decoder layers are undecided, keep a reference to the encoder's output."""
        if not self.undecided:
            yield
            return
        handle = self.encoder.register_forward_hook(self._remember)
        try:
            yield
        finally:
            handle.remove()
            self._encoder_out = None

    def _remember(self, module: nn.Module, args: Any, output: Any) -> None:
        out = output if isinstance(output, torch.Tensor) else output[0]
        self._encoder_out = out if isinstance(out, torch.Tensor) else None

    def __call__(self, name: str, x: torch.Tensor) -> str:
        stream = self.stream.get(name)
        if stream is not None:
            return stream
        enc = self._encoder_out
        if enc is None:  # not watched: a layer in the decoder reads decoder tokens unless shown otherwise
            return DECODER
        fed_encoder = x is enc or (x.shape == enc.shape and (x.data_ptr() == enc.data_ptr() or torch.equal(x, enc)))
        self.stream[name] = INPUT if fed_encoder else DECODER
        self.undecided.discard(name)
        return self.stream[name]
