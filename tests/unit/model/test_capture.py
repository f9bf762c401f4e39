"""Unit tests of evapipe.model.capture on a tiny stack of nn.Linear layers (no transformers model, no process group):
the captured rows equal a manual masking of each layer's input, the pass stops after the deepest needed layer,
and layers fed the same tensor are grouped."""

from __future__ import annotations

import torch
from torch import nn

from evapipe.model.capture import Capture, TokenSelector, shared_input_groups
from evapipe.model.layout import StepPlan


class Stack(nn.Module):
    """x -> a -> b -> c, plus `twin` reading a's input (the same tensor): q/k/v-like sharing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.twin, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.requires_grad_(False)
        self.reached: list[str] = []

    def forward(self, x):
        self.reached.append("a")
        h = self.a(x) + self.twin(x)
        self.reached.append("b")
        h = self.b(h)
        self.reached.append("c")
        return self.c(h)


NAMES = ["a", "twin", "b", "c"]


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return x, mask


def test_captured_rows_are_the_masked_tokens_of_each_layer_input():
    model, (x, mask) = Stack(), inputs()
    seen = {}
    hooks = [getattr(model, n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0])) for n in NAMES]
    cap = Capture(model, NAMES)
    cap.select(TokenSelector({"input": mask}))
    tokens = cap.run(lambda: model(x), first=True)
    for h in hooks:
        h.remove()
    assert set(tokens) == set(NAMES)
    for name in NAMES:  # a manual masking: the rows of unpadded tokens, in (batch, position) order
        manual = torch.stack([seen[name][i, j] for i in range(2) for j in range(5) if mask[i, j]])
        assert torch.equal(tokens[name], manual), name
    assert tokens["a"].shape == (8, 4)
    cap.select(None)  # no selector: every row
    assert cap.run(lambda: model(x))["a"].shape == (10, 4)


def test_the_pass_stops_after_the_deepest_needed_layer():
    model, (x, _) = Stack(), inputs()
    cap = Capture(model, NAMES)
    cap.run(lambda: model(x), first=True)
    assert cap.order == NAMES  # execution order, recorded on the first pass
    cap.plan(StepPlan(frozenset({"b"})))
    model.reached.clear()
    tokens = cap.run(lambda: model(x))
    assert set(tokens) == {"b"} and model.reached == ["a", "b"]  # c's input was never computed
    cap.plan(StepPlan(frozenset({"a"})))
    model.reached.clear()
    assert set(cap.run(lambda: model(x))) == {"a"} and model.reached == ["a"]
    cap.remove()
    model.reached.clear()
    model(x)
    assert model.reached == ["a", "b", "c"]  # hooks removed: a normal pass again


def test_layers_fed_the_same_tensor_share_one_group():
    model, (x, _) = Stack(), inputs()
    cap = Capture(model, NAMES)
    cap.run(lambda: model(x), first=True)
    assert shared_input_groups(cap.raw, NAMES) == [["a", "twin"], ["b"], ["c"]]
    equal_copy = {"a": x, "twin": x.clone(), "b": x + 1}  # equal values in another tensor: still shared
    assert shared_input_groups(equal_copy, ["a", "twin", "b"]) == [["a", "twin"], ["b"]]
    assert shared_input_groups(equal_copy, ["a", "twin", "b"], alone={"twin"}) == [["a"], ["twin"], ["b"]]
