"""Same model, same batches in the same order, same settings: evapipe agrees with PEFT's get_eva_state_dict."""

from __future__ import annotations

import pytest
import torch

from conftest import MINILM_TARGETS, text_batches
from evapipe import EvaSettings, compute_eva_state
from evapipe.states.state import strip_peft_prefix


def peft_state(model, batches, targets, **eva):
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=targets, eva_config=EvaConfig(**eva))
    torch.manual_seed(0)
    return strip_peft_prefix(get_eva_state_dict(model, batches, cfg, show_progress_bar=False))


def subspace_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine of the principal angles between two row spaces."""
    qa, _ = torch.linalg.qr(a.double().T)
    qb, _ = torch.linalg.qr(b.double().T)
    return float(torch.linalg.svdvals(qa.T @ qb).min())


MIN_GAP = 0.02  # relative singular-value gap from which a direction is determined by the data, not by noise
MIN_COS = 0.99


def separated(sv: list[float], k: int) -> tuple[list[int], int]:
    """Of a layer's first k components: those whose singular value is at least MIN_GAP (relative) away from both
    neighbours, and the longest prefix that ends at such a gap. A component whose neighbour was never computed
    (the last of the spectrum) is left out: its direction is not determined by what was computed."""
    s = [float(v) for v in sv]
    gap = [(s[i] - s[i + 1]) / s[i] for i in range(len(s) - 1)]  # gap[i]: between components i and i+1
    comps = [i for i in range(min(k, len(gap))) if gap[i] >= MIN_GAP and (i == 0 or gap[i - 1] >= MIN_GAP)]
    prefix = max([m for m in range(1, min(k, len(gap)) + 1) if gap[m - 1] >= MIN_GAP], default=0)
    return comps, prefix


def compare(ours, ref):
    """Same ranks; the leading component and rows 0-1 as before; then every well-separated component up to sign,
    and the span of the longest well-separated prefix of the rank rows (principal angles)."""
    assert set(ref) == set(ours.ranks)
    assert {k: int(v.shape[0]) for k, v in ref.items()} == ours.ranks
    checked, spans = 0, []
    for name, a_ref in ref.items():
        if a_ref.shape[0] == 0:
            assert name not in ours.tensors
            continue
        a = torch.nn.functional.normalize(ours.tensors[name].double(), dim=1)
        a_ref = torch.nn.functional.normalize(a_ref.double(), dim=1)
        assert a.shape == a_ref.shape
        assert abs(float((a[0] * a_ref[0]).sum())) > 0.99, name  # the leading component, up to sign
        assert subspace_cos(a[:2], a_ref[:2]) > 0.9, name
        comps, prefix = separated(ours.meta["singular_values"][name], a.shape[0])
        checked += len(comps)
        cos = (a[comps] * a_ref[comps]).sum(1).abs()
        assert bool((cos > MIN_COS).all()), (name, dict(zip(comps, cos.tolist())))
        if prefix:
            assert subspace_cos(a[:prefix], a_ref[:prefix]) > MIN_COS, (name, prefix)
            spans.append(prefix / a.shape[0])
    # most of the rank rows are compared (a state whose later rows are noise fails above, not here)
    assert checked >= 0.6 * sum(ours.ranks.values()) and sum(spans) >= 0.6 * len(spans), (checked, spans)


def test_minilm_matches_peft(minilm, support_texts):
    """Three batches, cycled until both converge tightly: identical rank distribution, matching components."""
    model, tok = minilm
    batches = text_batches(tok, support_texts, batch_size=16, n_batches=3)
    targets = MINILM_TARGETS
    ref = peft_state(model, batches, targets, rho=2.0, tau=0.999, whiten=True)
    ours = compute_eva_state(model, batches, EvaSettings(r=8, rho=2.0, tau=0.999, target_modules=targets, whiten=True),
                             show_progress=False)
    compare(ours, ref)
    shared = {n for g in ours.meta["shared_inputs"] for n in g}
    for name, a in ours.tensors.items():  # whitened rows: component / sqrt(singular value)
        sv = torch.tensor(ours.meta["singular_values"][name][: a.shape[0]])
        assert torch.allclose(a.norm(dim=1), sv.rsqrt(), rtol=1e-4)
        if name not in shared:  # PEFT whitens a shared PCA's rows in place once per member (a PEFT bug)
            assert torch.allclose(ref[name].float().norm(dim=1), sv.rsqrt(), rtol=0.05)
    # shared inputs (query/key/value) share one PCA and the same components
    q, k = "encoder.layer.2.attention.self.query", "encoder.layer.2.attention.self.key"
    assert torch.equal(ours.tensors[q][: ours.ranks[k]], ours.tensors[k])
    assert any(q in g and k in g for g in ours.meta["shared_inputs"])


def test_tiny_llama_matches_peft(tiny_llama_dir, support_texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    batches = text_batches(tok, support_texts, batch_size=16, n_batches=3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ref = peft_state(model, batches, targets, rho=2.0, tau=0.999)
    ours = compute_eva_state(model, batches, EvaSettings(r=8, rho=2.0, tau=0.999, target_modules=targets),
                             show_progress=False)
    compare(ours, ref)
    # PEFT's alpha semantics: alpha scales with rank / r when adjust_scaling_factors
    for name, rank in ours.ranks.items():
        if rank != 8:
            assert ours.rank_pattern[name] == rank
            assert ours.alpha_pattern[name] == pytest.approx(8 * rank / 8)


def test_rho_one_gives_every_layer_r(minilm, support_texts):
    model, tok = minilm
    batches = text_batches(tok, support_texts, batch_size=8, n_batches=4)
    ours = compute_eva_state(model, batches, EvaSettings(r=4, rho=1.0, target_modules=["query", "value"], max_batches=4,
                                                         on_unconverged="warn"), show_progress=False)
    assert set(ours.ranks.values()) == {4} and ours.rank_pattern == {} and ours.alpha_pattern == {}
