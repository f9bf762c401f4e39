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


def compare(ours, ref):
    assert set(ref) == set(ours.ranks)
    assert {k: int(v.shape[0]) for k, v in ref.items()} == ours.ranks
    for name, a_ref in ref.items():
        if a_ref.shape[0] == 0:
            assert name not in ours.tensors
            continue
        a = torch.nn.functional.normalize(ours.tensors[name].double(), dim=1)
        a_ref = torch.nn.functional.normalize(a_ref.double(), dim=1)
        assert a.shape == a_ref.shape
        assert abs(float((a[0] * a_ref[0]).sum())) > 0.99, name  # the leading component, up to sign
        assert subspace_cos(a[:2], a_ref[:2]) > 0.9, name


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
