"""evapipe's components against the exact centred SVD (float64) of the very same tokens."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from conftest import MINILM_TARGETS, exact_pca, text_batches
from evapipe import EvaSettings, compute_eva_state
from evapipe.model.capture import Capture, TokenSelector


def captured_fraction(tokens: torch.Tensor, comps: torch.Tensor) -> float:
    """Variance the components' span captures, as a fraction of what the exact top-k components capture."""
    x = tokens.double() - tokens.double().mean(0)
    cov = x.T @ x
    q, _ = torch.linalg.qr(comps.double().T)
    exact, _ = exact_pca(tokens)
    return float(torch.trace(q.T @ cov @ q) / exact[: comps.shape[0]].sum())


def tokens_read(model: nn.Module, batches: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """Every counted token (attention mask) each named layer received over `batches`, in order."""
    cap = Capture(model, names)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for b in batches:
        cap.selector = TokenSelector({"input": b["attention_mask"].bool()})
        for name, x in cap.run(lambda b=b: model(**b)).items():
            seen[name].append(x)
    cap.remove()
    return {n: torch.cat(x) for n, x in seen.items()}


class Planted(nn.Module):
    """One linear layer; its inputs are the batch itself."""

    def __init__(self, n: int):
        super().__init__()
        self.proj = nn.Linear(n, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_planted_spectrum_recovered_exactly():
    torch.manual_seed(0)
    n, k = 48, 6
    basis, _ = torch.linalg.qr(torch.randn(n, n))
    scales = torch.cat([torch.tensor([10.0, 8.0, 6.0, 4.5, 3.5, 2.5]), torch.full((n - k,), 0.3)])
    batches = [(torch.randn(256, n) * scales) @ basis.T + 5.0 for _ in range(12)]
    state = compute_eva_state(
        Planted(n), batches, EvaSettings(r=k, rho=1.0, tau=0.9999, max_batches=12, on_unconverged="warn"),
        forward_fn=lambda model, x: model(x), show_progress=False,
    )
    a = state.tensors["proj"]
    _, exact = exact_pca(torch.cat(batches))
    cos = (a.double() * exact[:k]).sum(-1).abs()
    assert cos.min() > 0.999, cos
    assert torch.allclose((basis.T[:k].double() * exact[:k]).sum(-1).abs(), torch.ones(k, dtype=torch.float64), atol=1e-2)
    ratios = torch.tensor(state.meta["explained_variance"]["proj"][:k])
    total = (scales**2).sum()
    assert torch.allclose(ratios, (scales[:k] ** 2 / total).float(), rtol=0.05)


def test_real_layer_inputs_match_exact_pca(minilm, support_texts):
    """MiniLM on the shipped texts, a fixed number of batches: subspaces and well-separated components match."""
    model, tok = minilm
    batches = text_batches(tok, support_texts, batch_size=16, n_batches=6)
    targets = ["encoder.layer.0.attention.self.query", "encoder.layer.3.output.dense", "encoder.layer.5.intermediate.dense"]
    settings = EvaSettings(r=8, rho=1.0, tau=1.0, target_modules=targets, max_batches=6, on_unconverged="warn")
    state = compute_eva_state(model, batches, settings, show_progress=False)
    assert state.meta["batches"] == 6

    seen = tokens_read(model, batches, targets)
    assert state.meta["tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)
    for name in targets:
        tokens = seen[name]
        a = state.tensors[name]
        assert captured_fraction(tokens, a) > 0.99, name
        eig, exact = exact_pca(tokens)
        gaps = (eig[:8] - eig[1:9]) / eig[:8]
        cos = (a.double() * exact[:8]).sum(-1).abs()
        separated = gaps > 0.15
        assert separated.any()
        assert (cos[separated] > 0.99).all(), (name, cos, gaps)


def test_minilm_full_job_components_close_to_exact(minilm, support_texts):
    """The default settings on all 36 linears: every layer's kept subspace is near-exact on the tokens read."""
    model, tok = minilm
    batches = text_batches(tok, support_texts, batch_size=8, n_batches=20)
    state = compute_eva_state(
        model, batches, EvaSettings(r=8, rho=2.0, target_modules=MINILM_TARGETS, max_batches=20, on_unconverged="warn"),
        show_progress=False,
    )
    names = list(state.tensors)
    seen = tokens_read(model, batches[: state.meta["batches"]], names)
    fractions = [captured_fraction(seen[n], state.tensors[n]) for n in names]
    assert min(fractions) > 0.97 and sum(fractions) / len(fractions) > 0.99, fractions


def test_refine_converged_reaches_the_exact_pca_of_every_token_read(minilm, support_texts):
    """eva.refine_converged: the same forward passes as PEFT's semantics, but layers that converged early keep
    learning from the batches deeper layers still need, so their components approach the exact PCA of all of them."""
    model, tok = minilm
    batches = text_batches(tok, support_texts, batch_size=8, n_batches=40)
    targets = ["encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense", "encoder.layer.5.output.dense"]
    base = EvaSettings(r=4, rho=1.0, tau=0.999, target_modules=targets, max_batches=40, on_unconverged="warn")
    plain = compute_eva_state(model, batches, base, show_progress=False)
    refined = compute_eva_state(model, batches, replace(base, refine_converged=True), show_progress=False)
    assert refined.meta["batches"] == plain.meta["batches"] and refined.meta["refine_converged"]
    seen = tokens_read(model, batches[: plain.meta["batches"]], targets)
    gains = {}
    for name in targets:
        tokens = seen[name]
        before, after = captured_fraction(tokens, plain.tensors[name]), captured_fraction(tokens, refined.tensors[name])
        assert after > 0.995, (name, after)
        gains[name] = after - before
    assert min(gains.values()) > -1e-3 and max(gains.values()) > 1e-3, gains  # some layer did stop early and gained
