"""EVA for mixture-of-experts experts (eva.target_parameters) on tiny random Mixtral and Qwen2-MoE models.

* each expert's components against the exact PCA of the tokens routed to it, recomputed here from the routers'
  own choices (hooks on the routers' outputs) and the experts' saved weights, not through evapipe's capture;
* the token masks (padding, labels) apply to experts' tokens; an expert no token reaches ends at rank 0, named,
  without blocking convergence;
* apply: a PEFT adapter with target_parameters (and attention LoRA in the same adapter) that starts equal to the
  base, moves with one training step, saves and reloads; expert blocks hold the state's components;
* config validation (closest names, non-expert parameters), all-linear leaves routers out, rebudget.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from conftest import exact_pca, text_batches, tiny_job
from evapipe import EvaSettings, apply_eva_state, compute_eva_state, config_from_dict, run_job
from evapipe.core.errors import ConfigError
from evapipe.core.names import expert_key, split_key
from evapipe.model.experts import resolve_expert_params
from evapipe.model.targets import resolve_targets
from evapipe.states.rebudget import rebudget

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def masked_batches(tok, texts, n_batches: int, batch_size: int = 6) -> list[dict]:
    """Padded batches whose first two tokens are label-masked (-100), so both masks matter."""
    out = []
    for b in text_batches(tok, texts[7:], batch_size=batch_size, n_batches=n_batches, max_length=24):
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        labels[:, :2] = -100
        out.append(b | {"labels": labels})
    return out


def routed_reference(model: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Every counted token each expert received, per expert key, computed independently of evapipe: the MoE blocks'
    inputs and their routers' top-k choices come from forward hooks, the intermediate act(gate) * up from the saved
    expert weights."""
    blocks = {n: m for n, m in model.named_modules() if n.endswith(".mlp") and hasattr(m, "experts")}
    seen: dict[str, list[torch.Tensor]] = {}
    inputs, picks = {}, {}
    handles = []
    for name, block in blocks.items():
        handles.append(block.register_forward_hook(lambda m, a, o, n=name: inputs.__setitem__(n, a[0])))
        handles.append(block.gate.register_forward_hook(lambda m, a, o, n=name: picks.__setitem__(n, o[2])))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            counted = (b["attention_mask"].bool() & (b["labels"] != -100)).reshape(-1)
            for name, block in blocks.items():
                x = inputs[name].reshape(-1, inputs[name].shape[-1])[counted]
                top = picks[name][counted]
                experts = block.experts
                for e in range(experts.num_experts):
                    rows = x[(top == e).any(-1)]
                    gate, up = (rows @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
                    seen.setdefault(f"{name}.experts.gate_up_proj[{e}]", []).append(rows)
                    seen.setdefault(f"{name}.experts.down_proj[{e}]", []).append(nn.functional.silu(gate) * up)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def test_expert_components_match_the_exact_pca_of_their_routed_tokens(tiny_model_dir, support_texts):
    model, tok = load(tiny_model_dir("mixtral"))
    batches = masked_batches(tok, support_texts, n_batches=4)
    # r = 8 components per expert, every tracked direction kept (oversample fills the width): the incremental PCA
    # is then exact, and tau = 1 keeps every expert updating on every batch
    settings = EvaSettings(r=8, rho=1.0, tau=1.0, oversample=32, target_modules=[], target_parameters=EXPERT_PARAMS,
                           max_batches=4, on_unconverged="warn")
    state = compute_eva_state(model, batches, settings, show_progress=False)
    reference = routed_reference(model, batches)
    assert set(reference) == set(state.ranks) and len(reference) == 2 * 2 * 4
    assert state.meta["tokens"] == sum(int((b["attention_mask"].bool() & (b["labels"] != -100)).sum()) for b in batches)
    for key, tokens in reference.items():
        assert state.meta["expert_tokens"][key] == tokens.shape[0] > 8, key
        values, exact = exact_pca(tokens)
        a = state.tensors[key].double()
        assert a.shape == (8, 32)
        # the span: the variance it captures equals the exact top-8's
        x = tokens.double() - tokens.double().mean(0)
        q, _ = torch.linalg.qr(a.T)
        assert float(torch.trace(q.T @ x.T @ x @ q) / values[:8].sum()) > 0.9999, key
        # each component whose eigenvalue is well separated from its neighbours
        cos = (a * exact[:8]).sum(-1).abs()
        gaps = torch.minimum((values[:8] - values[1:9]).abs(), torch.cat([values[:1], (values[1:8] - values[:7]).abs()]))
        separated = gaps > 0.02 * values[:8]
        assert separated.sum() >= 4 and bool((cos[separated] > 0.999).all()), (key, cos, separated)
        ratios = torch.tensor(state.meta["explained_variance"][key][:8], dtype=torch.float64)
        assert torch.allclose(ratios, values[:8] / values.sum(), rtol=1e-3), key


def never_route_expert_3(model: nn.Module) -> None:
    """Every router sends the tokens that picked expert 3 to an expert they did not pick (0, or 1 when their other
    choice is 0): a model in which expert 3 of every layer receives no token."""

    def reroute(module, args, output):
        logits, scores, index = output
        index = index.clone()
        other = index.flip(-1)
        index[index == 3] = torch.where(other[index == 3] == 0, 1, 0)  # never equal to the token's other choice
        return logits, scores, index

    for name, module in model.named_modules():
        if name.endswith("mlp.gate") and not getattr(module, "_evapipe_test_rerouted", False):
            module.register_forward_hook(reroute)
            module._evapipe_test_rerouted = True


def forward_without_expert_3(model, inputs):
    """hooks.forward_fn for jobs: the model as in never_route_expert_3, then the default forward."""
    from evapipe.model.forward import default_forward

    never_route_expert_3(model)
    return default_forward(model, inputs)


def test_unrouted_expert_ends_at_rank_0_named_and_convergence_ends(tiny_model_dir, support_texts, caplog):
    model, tok = load(tiny_model_dir("mixtral"))
    never_route_expert_3(model)
    batches = masked_batches(tok, support_texts, n_batches=30, batch_size=4)
    settings = EvaSettings(r=2, rho=1.5, tau=0.9, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS,
                           max_batches=200)
    with caplog.at_level(logging.WARNING, logger="evapipe"):
        state = compute_eva_state(model, batches, settings, show_progress=False)
    unrouted = sorted(k for k in state.ranks if k.endswith("[3]"))
    assert sorted(state.meta["unrouted"]) == unrouted and len(unrouted) == 4
    assert all(state.ranks[k] == 0 and state.meta["expert_tokens"][k] == 0 for k in unrouted)
    assert state.meta["batches"] < 200  # converged: waiting experts did not hold the job
    assert all(state.meta["converged"][k] for k, r in state.ranks.items() if r > 0)
    assert "4 expert(s) received no token" in caplog.text and unrouted[0] in caplog.text
    assert sum(state.ranks.values()) <= sum(state.meta["layer_r"].values())
    # re-budgeting keeps them at 0 (no spectrum to draw from) and serves the rest
    smaller = rebudget(state, r=1)
    assert all(smaller.ranks[k] == 0 for k in unrouted) and sum(smaller.ranks.values()) == len(smaller.ranks)

    # apply: their blocks keep PEFT's default init (B = 0: the model still starts at the base)
    base = copy.deepcopy(model)
    peft_model = apply_eva_state(model, state)
    wrapper = dict(peft_model.named_modules())["base_model.model.model.layers.0.mlp.experts"]
    r = wrapper.r["default"]
    blocks = wrapper.lora_A["default"].weight.view(4, r, -1)
    assert blocks[3].abs().sum() > 0
    with torch.no_grad():
        ids = batches[0]["input_ids"]
        assert torch.equal(peft_model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_expert_rows_honour_the_token_masks(tiny_model_dir, support_texts):
    model, tok = load(tiny_model_dir("mixtral"))
    batches = masked_batches(tok, support_texts, n_batches=1)
    key = "model.layers.1.mlp.experts.down_proj[2]"
    reference = routed_reference(model, batches)[key].shape[0]
    unmasked = routed_reference(model, [b | {"labels": b["input_ids"]} for b in batches])[key].shape[0]
    assert unmasked > reference
    for use_label_mask, want in ((True, reference), (False, unmasked)):
        settings = EvaSettings(r=2, target_modules=[], target_parameters=["experts.down_proj"], max_batches=1,
                               on_unconverged="warn", use_label_mask=use_label_mask)
        state = compute_eva_state(model, batches, settings, show_progress=False)
        assert state.meta["expert_tokens"][key] == want
    # PEFT-style custom hooks shape linear layers' inputs only: experts still count the batch's masked tokens
    from peft.tuners.lora.eva import prepare_model_inputs_fn_language_modeling

    state = compute_eva_state(model, batches, replace(settings, use_label_mask=True), show_progress=False,
                              prepare_model_inputs_fn=prepare_model_inputs_fn_language_modeling)
    assert state.meta["expert_tokens"][key] == reference


def trained_logits_move(peft_model, batch) -> float:
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    before = peft_model(input_ids=batch["input_ids"]).logits.detach()
    loss = peft_model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    loss.backward()
    torch.optim.SGD(params, lr=1.0).step()
    peft_model.eval()
    with torch.no_grad():
        return float((peft_model(input_ids=batch["input_ids"]).logits - before).abs().max())


@pytest.mark.parametrize("arch", ["mixtral", "qwen2-moe"])
def test_apply_with_attention_lora_starts_at_the_base_trains_and_reloads(arch, tiny_model_dir, support_texts, tmp_path):
    from peft import PeftModel

    path = tiny_model_dir(arch)
    model, tok = load(path)
    batches = masked_batches(tok, support_texts, n_batches=3)
    targets = ["q_proj", "v_proj"] + (["shared_expert.down_proj"] if arch == "qwen2-moe" else [])
    settings = EvaSettings(r=3, target_modules=targets, target_parameters=EXPERT_PARAMS, max_batches=3,
                           on_unconverged="warn")
    state = compute_eva_state(model, batches, settings, show_progress=False)
    state.save(tmp_path / "eva.safetensors")
    base = copy.deepcopy(model)
    with torch.no_grad():
        expected = base(input_ids=batches[0]["input_ids"]).logits
    peft_model = apply_eva_state(model, tmp_path / "eva.safetensors")
    config = peft_model.peft_config["default"]
    assert set(config.target_parameters) == {f"model.layers.{i}.{p}" for i in range(2) for p in EXPERT_PARAMS}
    assert any(n.endswith("q_proj") for n in config.target_modules)
    modules = dict(peft_model.get_base_model().named_modules())
    for i in range(2):
        for j, p_name in enumerate(["down_proj", "gate_up_proj"]):  # PEFT nests the second wrapper inside
            wrapper = modules[f"model.layers.{i}.mlp.experts" + ".base_layer" * j]
            assert wrapper.parameter_name == p_name
            p = f"model.layers.{i}.mlp.experts.{p_name}"
            ranks = [state.ranks[expert_key(p, e)] for e in range(4)]
            r = wrapper.r["default"]
            assert r == max(ranks)
            assert wrapper.scaling["default"] == pytest.approx(settings.lora_alpha / settings.r)  # alpha scaled to r
            blocks = wrapper.lora_A["default"].weight.view(4, r, -1)
            for e, rank in enumerate(ranks):
                key = expert_key(p, e)
                assert torch.equal(blocks[e, :rank], state.tensors[key])
                # the rows past its rank: the expert's next PCA components, orthonormal to its own
                assert torch.allclose(blocks[e, rank:], state.spectrum[f"{key}.components"][rank:r])
            assert not wrapper.lora_B["default"].weight.any()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=batches[0]["input_ids"]).logits, expected)
    rs_modules = dict(apply_eva_state(copy.deepcopy(base), state, use_rslora=True).get_base_model().named_modules())
    for i in range(2):
        for j in range(2):  # rsLoRA: each parameter's scaling stays lora_alpha / sqrt(r), at its own r
            assert rs_modules[f"model.layers.{i}.mlp.experts" + ".base_layer" * j].scaling["default"] == pytest.approx(
                settings.lora_alpha / math.sqrt(settings.r))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert trained_logits_move(peft_model, batches[0]) > 1e-4
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batches[0]["input_ids"]).logits, expected)


def test_target_parameters_are_validated_with_closest_names(tiny_model_dir):
    model, _ = load(tiny_model_dir("mixtral"))
    with pytest.raises(ConfigError, match=r"`mlp.experts.gate_proj` matches no parameter .*closest: .*gate_up_proj"):
        resolve_expert_params(model, ["mlp.experts.gate_proj"])
    with pytest.raises(ConfigError, match=r"q_proj.weight` \(\(32, 32\) in a Linear\), which is not a fused expert parameter"):
        resolve_expert_params(model, ["self_attn.q_proj.weight"])
    found = resolve_expert_params(model, ["down_proj"])
    assert [(p.name, p.num_experts, p.in_features, p.out_features) for p in found] == [
        (f"model.layers.{i}.mlp.experts.down_proj", 4, 32, 32) for i in range(2)]
    with pytest.raises(ConfigError, match="eva.target_modules` is an empty list"):
        config_from_dict({"eva": {"target_modules": []}})
    config_from_dict({"eva": {"target_modules": [], "target_parameters": EXPERT_PARAMS}})


def test_all_linear_leaves_routers_out(tiny_model_dir):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    class LinearRouterBlock(nn.Module):  # the pre-5.x layout: the router is an nn.Linear beside the experts
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(16, 4, bias=False)
            self.experts = MixtralExperts(MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4))
            self.shared_expert_gate = nn.Linear(16, 1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.mlp = LinearRouterBlock()

    assert [t.name for t in resolve_targets(Model(), "all-linear")] == ["proj", "mlp.shared_expert_gate"]
    model, _ = load(tiny_model_dir("mixtral"))
    names = [t.name for t in resolve_targets(model, "all-linear")]
    assert not any("gate" in n for n in names) and any(n.endswith("o_proj") for n in names)


def test_expert_keys_name_their_parameter_and_expert():
    assert expert_key("model.layers.0.mlp.experts.gate_up_proj", 3) == "model.layers.0.mlp.experts.gate_up_proj[3]"
    assert split_key("model.layers.0.mlp.experts.gate_up_proj[3]") == ("model.layers.0.mlp.experts.gate_up_proj", 3)
    assert split_key("model.layers.0.mlp.gate") is None


def test_job_and_apply_to_directory_on_qwen2_moe(tiny_model_dir, tmp_path):
    from evapipe.adapters.apply import apply_to_directory

    out = tmp_path / "eva.safetensors"
    cfg = config_from_dict(tiny_job(tiny_model_dir("qwen2-moe"), eva={
        "target_modules": "all-linear", "target_parameters": EXPERT_PARAMS}, output={"path": str(out)}))
    result = run_job(cfg, show_progress=False)
    meta = result.state.meta
    assert meta["target_parameters"] == EXPERT_PARAMS and len(meta["experts"]) == 4
    assert not any(n.endswith("mlp.gate") for n in meta["ranks"])
    assert any(n.endswith("shared_expert_gate") for n in meta["ranks"])  # a linear layer like any other
    adapter, _ = apply_to_directory(out, tmp_path / "adapter")
    import json

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(
        p for p in meta["experts"] if any(result.state.ranks[expert_key(p, e)] for e in range(4)))


def moe_job(model_dir: str, out, **sections) -> dict:
    """A tiny Mixtral job whose routers never pick expert 3, on prompt/completion rows (labels mask the prompts)."""
    return tiny_job(model_dir, eva={"r": 2, "rho": 2.0, "tau": 0.999, "target_modules": ["q_proj"],
                                    "target_parameters": EXPERT_PARAMS, "max_batches": 6, "on_unconverged": "warn"},
                    hooks={"forward_fn": "test_moe:forward_without_expert_3"}, output={"path": str(out)}, **sections)


def test_resume_restores_expert_pcas_bit_identically(tmp_path, tiny_model_dir, caplog):
    from evapipe.states.checkpoint import checkpoint_dir, latest

    out = tmp_path / "eva.safetensors"
    keep = {"path": str(out), "checkpoint_every": 2, "keep_checkpoint": True}
    first = run_job(config_from_dict(moe_job(tiny_model_dir("mixtral"), out) | {"output": keep}), show_progress=False)
    assert latest(checkpoint_dir(out))[1]["loop"]["progress"]["step"] == 4
    assert len(first.state.meta["unrouted"]) == 4  # checkpointed while never fitted
    with caplog.at_level(logging.INFO, logger="evapipe"):
        again = run_job(config_from_dict(moe_job(tiny_model_dir("mixtral"), out)), show_progress=False)
    assert "at batch 4" in caplog.text
    assert again.state.ranks == first.state.ranks and again.state.meta["unrouted"] == first.state.meta["unrouted"]
    assert again.state.meta["expert_tokens"] == first.state.meta["expert_tokens"]
    assert all(torch.equal(again.state.tensors[k], t) for k, t in first.state.tensors.items())


@pytest.mark.slow
def test_two_processes_match_one_with_experts(tmp_path, tiny_model_dir):
    """2 processes x batch 4 = 1 x 8: same expert ranks, tokens and components; every expert PCA on one rank."""
    import json

    from test_distributed import REPO, assert_same_state, torchrun
    from test_distributed import prompt_rows as rows

    from conftest import write_config

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    job = moe_job(tiny_model_dir("mixtral"), tmp_path / "two.safetensors",
                  data={"path": str(data), "prompt_field": "prompt", "completion_field": "completion",
                        "shuffle": False, "max_length": 48, "batch_size": 4, "max_samples": None})
    cfg = write_config(tmp_path / "job.yaml", **job)
    one = run_job(config_from_dict(job, [f"output.path={tmp_path / 'one.safetensors'}", "data.batch_size=8"]),
                  show_progress=False)
    two = torchrun(str(REPO / "tests" / "dist_helpers.py"), "--config", str(cfg), "--stats", str(tmp_path / "s.json"))
    assert two.returncode == 0, two.stdout[-3000:]
    assert_same_state(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    from evapipe import load_state

    a, b = load_state(tmp_path / "one.safetensors"), load_state(tmp_path / "two.safetensors")
    assert a.meta["expert_tokens"] == b.meta["expert_tokens"] and a.meta["unrouted"] == b.meta["unrouted"]
    stats = json.loads((tmp_path / "s.json").read_text())
    owned = [set(s["updates"]) for s in stats]
    experts = {o for o in one.rank_stats[0].updates if split_key(o) is not None}
    assert experts and all(experts & o for o in owned) and not owned[0] & owned[1]
    assert {k: v for s in stats for k, v in s["updates"].items()} == one.rank_stats[0].updates


def test_four_bit_base_keeps_experts_in_full_precision_and_applies(tmp_path, minilm_path, support_texts):
    """bitsandbytes quantizes nn.Linear layers only: a 4-bit Mixtral's experts stay float, EVA computes on them and
    the adapter (4-bit attention LoRA + full-precision expert LoRA) starts at the base."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MixtralConfig, MixtralForCausalLM

    from conftest import _tiny_tokenizer

    torch.manual_seed(0)
    tok = _tiny_tokenizer(minilm_path)
    MixtralForCausalLM(MixtralConfig(  # 4-bit blocks need widths of at least 64
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
    )).save_pretrained(tmp_path)

    def load_4bit():
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map={"": "cpu"})

    batches = masked_batches(tok, support_texts, n_batches=2)
    model = load_4bit().eval()
    assert model.model.layers[0].mlp.experts.down_proj.dtype == torch.float32
    state = compute_eva_state(model, batches, EvaSettings(r=2, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS,
                                                          max_batches=2, on_unconverged="warn"), show_progress=False)
    fresh = load_4bit().train()  # fresh, and not in eval mode: bitsandbytes repacks a CPU 4-bit model's weights at
    with torch.no_grad():  # its first eval-mode forward without grad (apply_eva_state refuses such a model)
        expected = fresh(input_ids=batches[0]["input_ids"]).logits
    peft_model = apply_eva_state(fresh, state)
    assert peft_model.peft_config["default"].target_parameters
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=batches[0]["input_ids"]).logits, expected, atol=1e-6)


def test_apply_refuses_a_state_whose_experts_do_not_fit(tiny_model_dir, support_texts):
    from evapipe.core.errors import StateError

    model, tok = load(tiny_model_dir("mixtral"))
    batches = masked_batches(tok, support_texts, n_batches=1)
    state = compute_eva_state(model, batches, EvaSettings(r=2, target_modules=[], target_parameters=["down_proj"],
                                                          max_batches=1, on_unconverged="warn"), show_progress=False)
    name = "model.layers.1.mlp.experts.down_proj"
    state.meta["experts"][name] = state.meta["experts"][name] | {"num_experts": 8}
    with pytest.raises(StateError, match=r"down_proj \(4 experts of in_features 32 in the model, 8 of 32 in the state"):
        apply_eva_state(model, state)
    qwen, _ = load(tiny_model_dir("qwen2-moe"))
    other = copy.deepcopy(state)
    other.meta["experts"] = {n.replace("layers.1", "layers.7"): v for n, v in state.meta["experts"].items()}
    with pytest.raises(StateError, match="layers.7.mlp.experts.down_proj \\(no module model.layers.7.mlp.experts"):
        apply_eva_state(qwen, other)
