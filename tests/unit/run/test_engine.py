"""Unit tests of the engine through its public surface (compute_eva_state) on a two-layer stand-in model and plain
tensors (no transformers model, no process group): the components equal the exact centred PCA of the very rows
each layer received, and the metadata counts what was read."""

from __future__ import annotations

import torch
from torch import nn

from evapipe import EvaSettings, compute_eva_state


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def batches(n=3):
    """Rows with a clearly separated spectrum (scales 6, 3, 1.5, then noise), shape (batch, seq, features)."""
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    scales = torch.tensor([6.0, 3.0, 1.5, 0.1, 0.1, 0.1])
    return [(torch.randn(4, 5, 6, generator=g) * scales) @ basis.T for _ in range(n)]


def exact_components(rows: torch.Tensor, k: int) -> torch.Tensor:
    x = rows.double() - rows.double().mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:k]


def test_components_are_the_exact_pca_of_each_layers_inputs():
    model, data = Tiny().eval(), batches()
    settings = EvaSettings(r=2, rho=1.0, tau=1.0, max_batches=3, target_modules=["up", "down"],
                           on_unconverged="warn")
    state = compute_eva_state(model, data, settings, show_progress=False)
    rows = torch.cat([b.reshape(-1, 6) for b in data])
    with torch.no_grad():
        inputs = {"up": rows, "down": torch.relu(model.up(rows))}
    assert state.ranks == {"up": 2, "down": 2}  # rho = 1: every layer its r
    assert state.meta["batches"] == 3 and state.meta["tokens"] == 60
    for name, x in inputs.items():
        ref = exact_components(x, 2)
        cos = (torch.nn.functional.normalize(state.tensors[name].double(), dim=1) * ref).sum(1).abs()
        assert bool((cos > 0.999).all()), (name, cos)
