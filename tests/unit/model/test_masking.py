"""Padding and label-masked tokens never reach the SVD; the forward pass stops after the deepest needed layer."""

from __future__ import annotations

import torch

from conftest import text_batches
from evapipe import EvaSettings, compute_eva_state
from evapipe.core.config import DataConfig
from evapipe.data.collate import TextCollator
from evapipe.eva import ipca


def spy_updates(monkeypatch) -> list[tuple[int, torch.Tensor]]:
    """Record every (rows, tokens) batch handed to the incremental PCA."""
    seen: list[tuple[int, torch.Tensor]] = []
    real = ipca.update_many

    def spy(states, inputs):
        for x in inputs:
            seen.append((x.shape[0], x.detach().clone()))
        return real(states, inputs)

    monkeypatch.setattr(ipca, "update_many", spy)
    return seen


def test_padding_never_reaches_svd(minilm, support_texts, monkeypatch):
    model, tok = minilm
    batches = text_batches(tok, support_texts, batch_size=8, n_batches=3)
    assert any((b["attention_mask"] == 0).any() for b in batches)
    seen = spy_updates(monkeypatch)
    target = "encoder.layer.1.attention.self.query"
    compute_eva_state(model, batches, EvaSettings(r=2, rho=1.0, target_modules=[target], max_batches=3,
                                                  on_unconverged="warn"), show_progress=False)
    assert [rows for rows, _ in seen] == [int(b["attention_mask"].sum()) for b in batches]
    # the rows are exactly the unpadded positions' inputs
    captured = {}
    handle = model.get_submodule(target).register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    with torch.no_grad():
        model(**batches[0])
    handle.remove()
    expected = captured["x"][batches[0]["attention_mask"].bool()]
    assert torch.allclose(seen[0][1], expected)


def test_label_mask_keeps_only_completion_tokens(tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = DataConfig(path="x", prompt_field="prompt", completion_field="completion", max_length=64)
    collate = TextCollator(tok, cfg, "causal-lm")
    rows = [{"prompt": "Classify: my card was charged twice. Label:", "completion": " billing"},
            {"prompt": "Classify: where is my parcel? it is late. Label:", "completion": " shipping please"}]
    batch = collate(rows)
    prompt_len = [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]  # [CLS] + prompt
    for i, n in enumerate(prompt_len):
        assert (batch["labels"][i, :n] == -100).all()
        assert batch["labels"][i, n] != -100  # the completion's first token counts (not hidden by the prompt's [SEP])
        kept = batch["labels"][i] != -100
        assert kept.sum() > 0 and (batch["attention_mask"][i][kept] == 1).all()
    seen = spy_updates(monkeypatch)
    settings = EvaSettings(r=2, rho=1.0, target_modules=["q_proj"], max_batches=1, on_unconverged="warn")
    compute_eva_state(model, [batch], settings, show_progress=False)
    n_completion = int((batch["labels"] != -100).sum())
    assert seen[0][0] == n_completion
    # without the label mask, every non-padding token counts
    seen.clear()
    settings.use_label_mask = False
    compute_eva_state(model, [batch], settings, show_progress=False)
    assert seen[0][0] == int(batch["attention_mask"].sum())


def test_forward_stops_after_deepest_needed_layer(tiny_llama_dir, support_texts):
    """Targets in layer 0 only: layer 1 and the LM head never run after the first (detection) pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    batches = text_batches(tok, support_texts, batch_size=4, n_batches=4)
    calls = {"head": 0, "layer1": 0}
    model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    model.model.layers[1].register_forward_hook(lambda *a: calls.__setitem__("layer1", calls["layer1"] + 1))
    settings = EvaSettings(r=2, rho=1.0, target_modules=r"model\.layers\.0\.self_attn\.(q|k|v)_proj", max_batches=4,
                           on_unconverged="warn")
    state = compute_eva_state(model, batches, settings, show_progress=False)
    assert state.meta["batches"] == 4
    assert calls == {"head": 0, "layer1": 0}
    assert len(state.meta["shared_inputs"]) == 1 and len(state.meta["shared_inputs"][0]) == 3
