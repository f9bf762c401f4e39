"""The incremental PCA against the exact float64 SVD: planted spectra, large means, small and rank-deficient
batches, and batched updates equal to one-at-a-time updates (guards every speed-up in evapipe/eva/ipca.py)."""

from __future__ import annotations

import pytest
import torch

from evapipe.eva import ipca


def planted(n: int, scales: list[float], offset: float, batches: int, rows: int, seed: int = 0):
    """Batches whose covariance has the given leading standard deviations (0.3 after them) along a random basis."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    sd = torch.cat([torch.tensor(scales, dtype=torch.float64), torch.full((n - len(scales),), 0.3, dtype=torch.float64)])
    mean = offset * torch.randn(n, generator=g, dtype=torch.float64)
    out = [((torch.randn(rows, n, generator=g, dtype=torch.float64) * sd) @ basis.T + mean).float() for _ in range(batches)]
    return out, basis.T[: len(scales)]


def exact(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, singular values, right singular vectors) of all tokens, centred, float64."""
    x = torch.cat(batches).double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, s, vh


def fit(batches: list[torch.Tensor], k: int, seed: int = 0, oversample: int | None = None) -> ipca.PCAState:
    state = ipca.new_state(batches[0].shape[1], k, oversample, seed)
    for x in batches:
        ipca.update_many([state], [x])
    return state


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double()).sum(-1).abs()


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_planted_spectrum_matches_exact_svd(offset):
    """Well-separated components, singular values, mean and total variance: exact to float32 precision, also when
    the mean is 100x the spread (the update never centres the batch explicitly)."""
    scales = [12.0, 9.0, 7.0, 5.0, 3.5, 2.5]
    batches, truth = planted(96, scales, offset, batches=10, rows=300)
    state = fit(batches, k=6)
    mean, s, vh = exact(batches)
    assert cosines(state.components[:6], vh[:6]).min() > 0.9999
    assert cosines(state.components[:6], truth).min() > 0.995  # the sample's PCA, not the population's
    assert torch.allclose(state.singular_values[:6].double(), s[:6], rtol=1e-3)
    assert torch.allclose(state.mean, mean, atol=1e-4 * (1 + offset))
    total = float(s.square().sum())
    assert float(state.var) * state.n_seen == pytest.approx(total, rel=1e-4)
    ratios = state.explained_variance_ratio()[:6].double()
    assert torch.allclose(ratios, s[:6] ** 2 / total, rtol=2e-3)
    gram = state.components @ state.components.T
    assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-5)


def test_small_batches_track_the_exact_incremental_result():
    """Many small batches (fewer tokens than features): the tracked subspace stays that of all tokens seen."""
    batches, _ = planted(256, [20.0, 15.0, 11.0, 8.0, 6.0, 4.0, 3.0, 2.0], 5.0, batches=30, rows=40, seed=1)
    state = fit(batches, k=8)
    _, s, vh = exact(batches)
    x = torch.cat(batches).double()
    x = x - x.mean(0)
    q, _ = torch.linalg.qr(state.components[:8].double().T)
    captured = float(torch.linalg.matrix_norm(x @ q) ** 2 / s[:8].square().sum())
    assert captured > 0.999
    assert cosines(state.components[:4], vh[:4]).min() > 0.999


@pytest.mark.parametrize("rows", [3, 20])
def test_rank_deficient_and_tiny_batches_take_the_exact_path(rows):
    """Inputs of rank 3 (or 3 tokens per batch) in 64 dimensions: the exact path, orthonormal components."""
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(64, 3, generator=g)).Q
    batches = [torch.randn(rows, 3, generator=g) * torch.tensor([5.0, 3.0, 1.0]) @ basis.T for _ in range(4)]
    state = fit(batches, k=4)
    _, _, vh = exact(batches)
    assert cosines(state.components[:2], vh[:2]).min() > 0.999
    nonzero = state.components[state.singular_values > 1e-3]
    assert torch.allclose(nonzero @ nonzero.T, torch.eye(nonzero.shape[0]), atol=1e-4)
    assert torch.isfinite(state.components).all() and torch.isfinite(state.singular_values).all()


def test_batched_updates_equal_one_at_a_time():
    """Layers updated together (shared batched algebra, mixed widths and token counts) equal separate updates."""
    widths, rows = [48, 48, 48, 80, 80], [64, 64, 50, 64, 70]
    g = torch.Generator().manual_seed(3)
    together = [ipca.new_state(n, 6, None, seed=i) for i, n in enumerate(widths)]
    alone = [ipca.new_state(n, 6, None, seed=i) for i, n in enumerate(widths)]
    for _ in range(5):
        xs = [torch.randn(m, n, generator=g) * torch.linspace(4, 0.5, n) + 2 for m, n in zip(rows, widths)]
        ipca.update_many(together, xs)
        for s, x in zip(alone, xs):
            ipca.update_many([s], [x])
    for a, b in zip(together, alone):
        assert a.steps == b.steps == 5 and a.n_seen == b.n_seen
        assert torch.allclose(a.components, b.components, atol=1e-5)
        assert torch.allclose(a.singular_values, b.singular_values, rtol=1e-5)
        assert torch.allclose(a.similarity, b.similarity, atol=1e-5)


def test_updates_are_deterministic_and_skip_empty_batches():
    batches, _ = planted(40, [5.0, 3.0], 1.0, batches=3, rows=50)
    a, b = fit(batches, k=2, seed=7), fit(batches, k=2, seed=7)
    assert torch.equal(a.components, b.components)
    ipca.update_many([a], [torch.empty(0, 40)])
    assert a.steps == 3 and torch.equal(a.components, b.components)
