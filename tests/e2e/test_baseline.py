"""`evapipe apply --baseline` / apply_eva_state(baseline=True): the EVA adapter with PEFT's default init (issue 21).

The baseline must differ from the EVA adapter only in lora_A: the same targets, per-layer ranks and alphas, flags
and trainable parameters; its lora_A is what PEFT's own get_peft_model draws for that config (the independent
reference), lora_B is zero, so it starts equal to the base model.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import tiny_job
from evapipe import apply_eva_state, config_from_dict, run_job
from evapipe.adapters.apply import lora_config_for
from evapipe.cli import main


@pytest.fixture(scope="module")
def state_path(tmp_path_factory, tiny_llama_dir):
    """A tiny-Llama state whose layers got different ranks (so per-layer ranks and alphas are exercised)."""
    out = tmp_path_factory.mktemp("baseline") / "state.safetensors"
    job = tiny_job(tiny_llama_dir, eva={"r": 4, "rho": 2.0, "max_batches": 6}, output={"path": str(out)})
    state = run_job(config_from_dict(job), show_progress=False).state
    assert len(set(state.ranks.values())) > 1
    return out


def base(llama_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("flags", [{}, {"use_dora": True, "use_rslora": True}])
def test_baseline_is_the_same_adapter_with_peft_default_init(state_path, tiny_llama_dir, flags):
    from peft import get_peft_model

    from evapipe import load_state

    state = load_state(state_path)
    eva = apply_eva_state(base(tiny_llama_dir), state, **flags)
    torch.manual_seed(7)
    baseline = apply_eva_state(base(tiny_llama_dir), state, baseline=True, **flags)
    torch.manual_seed(7)  # the reference: PEFT itself, on the same config and seed
    model = base(tiny_llama_dir)
    config = lora_config_for(state, model, use_dora=flags.get("use_dora", False),
                             use_rslora=flags.get("use_rslora", False))
    reference = get_peft_model(model, config)

    assert eva.peft_config["default"].to_dict() == baseline.peft_config["default"].to_dict()
    assert trainable(eva) == trainable(baseline) == trainable(reference)
    layers, eva_layers, ref_layers = lora_layers(baseline), lora_layers(eva), lora_layers(reference)
    assert set(layers) == set(eva_layers) == {n for n, k in state.ranks.items() if k > 0}
    for name, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert layer.r["default"] == eva_layers[name].r["default"] == state.ranks[name]
        assert layer.scaling["default"] == eva_layers[name].scaling["default"]
        assert torch.equal(b, torch.zeros_like(b))
        assert torch.equal(a, ref_layers[name].lora_A["default"].weight)  # PEFT's own default init
        assert not torch.allclose(a, state.tensors[name])
        assert torch.equal(eva_layers[name].lora_A["default"].weight, state.tensors[name])
        if flags.get("use_dora"):
            assert torch.equal(layer.lora_magnitude_vector["default"].weight,
                               eva_layers[name].lora_magnitude_vector["default"].weight)
    ids = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B = 0: the baseline starts equal to the base model, as the EVA adapter does
        assert torch.allclose(baseline(input_ids=ids).logits, base(tiny_llama_dir)(input_ids=ids).logits, atol=1e-5)


def test_cli_baseline_writes_the_same_adapter_config(state_path, tmp_path):
    runner = CliRunner()
    for name, extra in (("eva", []), ("baseline", ["--baseline"])):
        run = runner.invoke(main, ["apply", "--state", str(state_path), "--output", str(tmp_path / name),
                                   "--device", "cpu", *extra])
        assert run.exit_code == 0, run.output
    assert "PEFT's default init (baseline)" in run.output
    configs = [json.loads((tmp_path / n / "adapter_config.json").read_text()) for n in ("eva", "baseline")]
    assert configs[0] == configs[1]
    inits = [json.loads((tmp_path / n / "evapipe.json").read_text())["adapter_for"]["init"] for n in ("eva", "baseline")]
    assert inits == ["eva", "peft-default"]
    eva, baseline = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("eva", "baseline"))
    assert {k: v.shape for k, v in eva.items()} == {k: v.shape for k, v in baseline.items()}
    for key, tensor in baseline.items():
        if "lora_B" in key:
            assert not tensor.any()
        elif "lora_A" in key:
            assert not torch.allclose(tensor, eva[key])


def test_baseline_keeps_expert_parameters_with_peft_default_init(tiny_model_dir, support_texts):
    """Mixture-of-experts: the same target_parameters and ranks, PEFT's own init of the expert lora_A blocks."""
    from peft import get_peft_model
    from peft.tuners.lora.layer import ParamWrapper
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import text_batches
    from evapipe import EvaSettings, compute_eva_state

    path = tiny_model_dir("mixtral")
    tok = AutoTokenizer.from_pretrained(path)
    settings = EvaSettings(r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"],
                           max_batches=2, on_unconverged="warn")
    state = compute_eva_state(AutoModelForCausalLM.from_pretrained(path).eval(),
                              text_batches(tok, support_texts, 6, 2), settings, show_progress=False)
    eva = apply_eva_state(AutoModelForCausalLM.from_pretrained(path), state)
    torch.manual_seed(3)
    baseline = apply_eva_state(AutoModelForCausalLM.from_pretrained(path), state, baseline=True)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(path)
    reference = get_peft_model(model, lora_config_for(state, model))
    assert eva.peft_config["default"].to_dict() == baseline.peft_config["default"].to_dict()
    assert trainable(eva) == trainable(baseline)

    def wrappers(m):
        return {n: w for n, w in m.get_base_model().named_modules() if isinstance(w, ParamWrapper)}

    ours, theirs, evas = wrappers(baseline), wrappers(reference), wrappers(eva)
    assert ours and set(ours) == set(theirs) == set(evas)
    for name, w in ours.items():
        assert torch.equal(w.lora_A["default"].weight, theirs[name].lora_A["default"].weight)
        assert not torch.equal(w.lora_A["default"].weight, evas[name].lora_A["default"].weight)
        assert not w.lora_B["default"].weight.any()
