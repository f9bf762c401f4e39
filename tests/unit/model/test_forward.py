"""Unit tests of evapipe.model.forward's plain parts with stand-in modules (no transformers model, no process group):
what the default forward passes to the model, PEFT's default layer-input rule, and endless passes over a loader."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evapipe.core.errors import DataError
from evapipe.model.forward import cycle_batches, default_forward, peft_layer_input, to_device


class Records(nn.Module):
    """Returns the keyword arguments it was called with."""

    def forward(self, **kw):
        return kw


class Seq2Seq(Records):
    def prepare_decoder_input_ids_from_labels(self, labels):
        return labels + 1000


def test_default_forward_drops_labels_and_shifts_them_for_encoder_decoders():
    ids, labels = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, -100]])
    assert set(default_forward(Records(), {"input_ids": ids, "labels": labels})) == {"input_ids"}
    kw = default_forward(Seq2Seq(), {"input_ids": ids, "labels": labels})
    assert torch.equal(kw["decoder_input_ids"], labels + 1000) and "labels" not in kw
    given = torch.tensor([[7]])  # decoder inputs the batch brings are kept
    kw = default_forward(Seq2Seq(), {"input_ids": ids, "labels": labels, "decoder_input_ids": given})
    assert kw["decoder_input_ids"] is given
    assert torch.equal(default_forward(nn.Identity(), ids), ids)  # a bare tensor is passed positionally


def test_to_device_keeps_the_structure():
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(1), "text")], "c": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["c"] == 3 and isinstance(moved["b"][1], tuple) and moved["b"][1][1] == "text"
    assert torch.equal(moved["a"], batch["a"])


def test_peft_layer_input_rule():
    x = torch.arange(24.0).reshape(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.equal(peft_layer_input((x,), mask, "l"), x[mask])  # a boolean (batch, seq) mask selects rows
    index = torch.tensor([[0, 2], [1, 0]])  # (n, 2) integer index pairs (batch, position)
    assert torch.equal(peft_layer_input((x,), index, "l"), torch.stack([x[0, 2], x[1, 0]]))
    assert torch.equal(peft_layer_input(x, {"any": 1}, "l"), x.reshape(-1, 4))  # else every row


def test_cycle_batches_repeats_passes_and_names_an_empty_loader():
    it = cycle_batches([1, 2, 3])
    assert [next(it) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    with pytest.raises(DataError, match="yielded no batch"):
        next(cycle_batches([]))
