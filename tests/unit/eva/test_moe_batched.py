"""Expert PCAs updated together (evapipe/eva/ipca.py's batched Gram update, experts.routed_inputs' one sort):

* many experts' updates in one call equal the exact float64 PCA of each expert's own tokens, and one-at-a-time
  updates, whatever the token counts (none, one, few, more than the Gram path takes);
* a NaN anywhere is refused before any state changes;
* a tiny gpt-oss model (gate_up stored transposed, (experts, hidden, 2 x intermediate), with biases, gate and up
  interleaved, sliding and full attention layers): each expert's components against the exact PCA of the tokens
  its router sent it, recomputed here by hand from the routers' choices and the saved weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import _tiny_tokenizer, exact_pca, text_batches
from evapipe import EvaSettings, compute_eva_state
from evapipe.eva import ipca


def expert_batches(n_experts: int, n: int, steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per step, one batch of rows per expert: counts from 0 to past the Gram path's limit, each expert its own
    planted spectrum and a mean large against its spread."""
    g = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0] for _ in range(n_experts)]
    scales = [torch.linspace(6.0, 0.2, n, dtype=torch.float64) * (1 + e) for e in range(n_experts)]
    means = [20 * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(n_experts)]
    counts = [0, 1, 3, 9, 40, 400]
    out = []
    for t in range(steps):
        step = []
        for e in range(n_experts):
            m = counts[(e + t) % len(counts)] if e else 0 if t == 0 else 30  # expert 0: nothing on the first step
            step.append(((torch.randn(m, n, generator=g, dtype=torch.float64) * scales[e]) @ bases[e].T
                         + means[e]).float())
        out.append(step)
    return out


def fit(batches: list[list[torch.Tensor]], k: int, oversample: int, together: bool) -> list[ipca.PCAState]:
    states = [ipca.new_state(batches[0][0].shape[1], k, oversample, seed=e) for e in range(len(batches[0]))]
    for step in batches:
        if together:
            ipca.update_many(states, step)
        else:
            for s, x in zip(states, step):
                ipca.update_many([s], [x])
    return states


def test_batched_expert_updates_equal_exact_per_expert_pca_and_one_at_a_time():
    n, k = 24, 12
    batches = expert_batches(n_experts=6, n=n, steps=5)
    # every direction tracked (k + oversample >= n): the incremental PCA is then the exact PCA of all tokens
    together = fit(batches, k, oversample=n, together=True)
    alone = fit(batches, k, oversample=n, together=False)
    for e, (s, a) in enumerate(zip(together, alone)):
        tokens = torch.cat([step[e] for step in batches]).double()
        _, sv, exact = torch.linalg.svd(tokens - tokens.mean(0), full_matrices=False)
        values = sv.square()
        assert s.n_seen == a.n_seen == tokens.shape[0]
        assert torch.allclose(s.mean, tokens.mean(0), atol=1e-4)
        assert float(s.var) * s.n_seen == pytest.approx(float(values.sum()), rel=1e-5)
        assert torch.allclose(s.singular_values[:k].double() ** 2, values[:k], rtol=1e-4), e
        assert (s.components[:k].double() * exact[:k]).sum(-1).abs().min() > 0.9999, e
        assert torch.allclose(s.components, a.components, atol=1e-5) and s.steps == a.steps
        assert torch.allclose(s.singular_values, a.singular_values, rtol=1e-5)


def test_truncated_batched_updates_capture_the_exact_top_k_variance():
    """Tracking fewer directions than the data has (the usual case): the variance the top components capture on all
    tokens stays within a hair of the exact top-k's, for experts fed a few rows per step."""
    n, k = 64, 4
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    sd = torch.cat([torch.tensor([9.0, 7.0, 5.0, 4.0]), torch.full((n - 4,), 0.5)]).double()
    batches = [[((torch.randn(12, n, generator=g, dtype=torch.float64) * sd) @ basis.T).float() for _ in range(8)]
               for _ in range(30)]
    for e, s in enumerate(fit(batches, k, oversample=None, together=True)):
        x = torch.cat([step[e] for step in batches]).double()
        x = x - x.mean(0)
        values, _ = exact_pca(x)
        q = s.components[:k].double().T
        assert float(torch.trace(q.T @ x.T @ x @ q) / values[:k].sum()) > 0.995, e


def test_non_finite_rows_are_refused_before_any_state_changes():
    batches = expert_batches(n_experts=4, n=16, steps=2)
    states = fit(batches[:1], 4, oversample=4, together=True)
    before = copy.deepcopy(states)
    poisoned = [x.clone() for x in batches[1]]
    poisoned[2][0, 3] = float("nan")
    big = torch.randn(500, 16)  # the randomised path
    big[7, 0] = float("inf")
    extra = ipca.new_state(16, 4, 4, seed=9)
    with pytest.raises(ipca.NonFiniteInputs) as err:
        ipca.update_many([*states, extra], [*poisoned, big])
    assert err.value.indices == [2, 4]
    assert [(s.n_seen, s.steps) for s in states] == [(b.n_seen, b.steps) for b in before]
    assert all(torch.equal(s.components, b.components) for s, b in zip(states, before) if b.fitted)
    assert not extra.fitted


def test_runs_of_height_cover_every_layer_once_with_bounded_padding():
    rows = [33, 127, 40, 1, 94, 60, 33, 41, 500, 2]
    runs = ipca.runs_of_height(list(range(len(rows))), rows)
    assert sorted(i for run in runs for i in run) == list(range(len(rows)))
    for run in runs:
        heights = [rows[i] for i in run]
        assert heights == sorted(heights) and max(heights) <= ipca.GRAM_RUN * min(heights)
    assert [rows[run[0]] for run in runs] == sorted(rows[run[0]] for run in runs)  # shortest first
    assert ipca.runs_of_height([], rows) == []


def test_uneven_experts_in_runs_equal_one_padded_update(monkeypatch):
    """Runs of similar heights (the router feeds experts unevenly) give what one update padded to the busiest
    expert gives: zero rows change no singular value or vector."""
    batches = expert_batches(n_experts=12, n=16, steps=3)
    runs = fit(batches, 4, oversample=4, together=True)
    monkeypatch.setattr(ipca, "GRAM_RUN", float("inf"))
    padded = fit(batches, 4, oversample=4, together=True)
    for a, b in zip(runs, padded):
        assert a.n_seen == b.n_seen
        if b.fitted:
            torch.testing.assert_close(a.singular_values, b.singular_values, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.components.abs(), b.components.abs(), rtol=1e-4, atol=1e-4)


def test_non_finite_rows_in_several_runs_are_all_named():
    batches = expert_batches(n_experts=6, n=16, steps=2)
    states = fit(batches[:1], 4, oversample=4, together=True)
    poisoned = [x.clone() for x in batches[1]]
    short, tall = 1, 3  # 3 rows and 40: two different runs of the Gram update
    assert [poisoned[e].shape[0] for e in (short, tall)] == [3, 40]
    poisoned[short][0, 1] = float("nan")
    poisoned[tall][5, 2] = float("-inf")
    with pytest.raises(ipca.NonFiniteInputs) as err:
        ipca.update_many(states, poisoned)
    assert err.value.indices == sorted([short, tall])


def tiny_gpt_oss(minilm_path: str):
    import transformers as tf

    tok = _tiny_tokenizer(minilm_path)
    torch.manual_seed(0)
    cfg = tf.GptOssConfig(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, hidden_size=32, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256)
    model = tf.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases, so that a reference that forgot them would differ
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.5)
    return model, tok


def gpt_oss_reference(model, batches) -> dict[str, torch.Tensor]:
    """Each expert's counted tokens and intermediates, by hand: x @ gate_up[e] + bias (transposed layout),
    gate = even columns, up = odd ones, clamped, (up + 1) * gate * sigmoid(alpha * gate)."""
    seen: dict[str, list[torch.Tensor]] = {}
    inputs, picks = {}, {}
    mlps = {n: m for n, m in model.named_modules() if n.endswith(".mlp")}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, a[0])) for n, m in mlps.items()]
    handles += [m.router.register_forward_hook(lambda mod, a, o, n=n: picks.__setitem__(n, o[2]))
                for n, m in mlps.items()]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            counted = b["attention_mask"].bool().reshape(-1)
            for name, mlp in mlps.items():
                x = inputs[name].reshape(-1, inputs[name].shape[-1])[counted]
                top, ex = picks[name][counted], mlp.experts
                for e in range(ex.num_experts):
                    rows = x[(top == e).any(-1)]
                    gu = rows @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
                    gate, up = gu[:, 0::2].clamp(max=ex.limit), gu[:, 1::2].clamp(-ex.limit, ex.limit)
                    act = (up + 1) * gate * torch.sigmoid(gate * ex.alpha)
                    seen.setdefault(f"{name}.experts.gate_up_proj[{e}]", []).append(rows)
                    seen.setdefault(f"{name}.experts.down_proj[{e}]", []).append(act)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def test_gpt_oss_experts_match_the_exact_pca_of_their_routed_tokens(minilm_path, support_texts):
    model, tok = tiny_gpt_oss(minilm_path)
    batches = text_batches(tok, support_texts, batch_size=6, n_batches=4, max_length=24)
    settings = EvaSettings(r=6, rho=1.0, tau=1.0, oversample=32, target_modules=["q_proj"],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                           max_batches=4, on_unconverged="warn", use_label_mask=False)
    state = compute_eva_state(model, batches, settings, show_progress=False)
    reference = gpt_oss_reference(model, batches)
    assert len(reference) == 2 * 2 * 4 and set(reference) <= set(state.ranks)
    assert sum(t.shape[0] > 6 for t in reference.values()) >= 12
    for key, tokens in reference.items():
        assert state.meta["expert_tokens"][key] == tokens.shape[0], key
        if tokens.shape[0] <= 6:  # a rarely picked expert: fewer tokens than components
            continue
        values, exact = exact_pca(tokens)
        a = state.tensors[key].double()
        assert a.shape == (6, 32 if "gate_up" in key else 24)
        x = tokens.double() - tokens.double().mean(0)
        q, _ = torch.linalg.qr(a.T)
        assert float(torch.trace(q.T @ x.T @ x @ q) / values[:6].sum()) > 0.9999, key
