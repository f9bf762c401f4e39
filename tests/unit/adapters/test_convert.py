"""PEFT interop: evapipe state <-> torch.save'd PEFT EVA state dicts, both key styles, into PEFT's own loader."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from conftest import REPO
from evapipe import load_state
from evapipe.adapters.convert import convert_file, load_peft_file, peft_to_state, state_to_peft
from evapipe.cli import main
from evapipe.core.errors import ConfigError, StateError
from evapipe.states.state import PEFT_PREFIX

V2 = REPO / "tests" / "fixtures" / "state_v2.safetensors"


def test_evapipe_to_peft_and_back(tmp_path):
    state = load_state(V2)
    for prefix in (True, False):
        peft_file = tmp_path / f"eva_{prefix}.pt"
        convert_file(V2, peft_file, prefix=prefix)
        sd = load_peft_file(peft_file)
        assert set(sd) == {(PEFT_PREFIX if prefix else "") + n for n in state.ranks}
        back_path = tmp_path / f"back_{prefix}.safetensors"
        back = convert_file(peft_file, back_path, r=2, lora_alpha=4.0, task="fixture", model="tiny-llama")
        back = load_state(back_path)
        assert back.ranks == state.ranks and back.meta["source"] == "peft"
        assert back.meta["rank_pattern"] == state.meta["rank_pattern"]
        assert back.meta["alpha_pattern"] == state.meta["alpha_pattern"]
        assert back.meta["task"] == "fixture" and back.meta["model"]["id"] == "tiny-llama"
        for name, a in state.tensors.items():
            assert torch.equal(back.tensors[name], a)


def test_peft_dict_round_trips_with_its_key_style(tmp_path):
    g = torch.Generator().manual_seed(0)
    plain = {"enc.0.q": torch.randn(3, 16, generator=g), "enc.0.v": torch.zeros(0, 16), "enc.1.q": torch.randn(5, 16, generator=g)}
    for prefix in (False, True):
        sd = {(PEFT_PREFIX if prefix else "") + k: v for k, v in plain.items()}
        torch.save(sd, tmp_path / "in.pt")
        convert_file(tmp_path / "in.pt", tmp_path / "s.safetensors", r=4, overwrite=True)
        state = load_state(tmp_path / "s.safetensors")
        assert state.ranks == {"enc.0.q": 3, "enc.0.v": 0, "enc.1.q": 5} and "enc.0.v" not in state.tensors
        assert state.meta["alpha_pattern"] == {"enc.0.q": 6.0, "enc.0.v": 0.0, "enc.1.q": 10.0}  # 8 * rank / 4
        convert_file(tmp_path / "s.safetensors", tmp_path / "out.pt", prefix=prefix, overwrite=True)
        out = torch.load(tmp_path / "out.pt", weights_only=True)
        assert list(out) == list(sd) and all(torch.equal(out[k], sd[k]) for k in sd)


def test_peft_computed_dict_loads_into_peft(tmp_path):
    """A dict from PEFT's get_eva_state_dict converts, and our PEFT file initialises a PeftModel through PEFT."""
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora.eva import get_eva_state_dict, initialize_lora_eva_weights
    from transformers import LlamaConfig, LlamaModel

    def model():
        torch.manual_seed(0)
        return LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)).eval()

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (4, 8), generator=g), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
               for _ in range(30)]
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], init_lora_weights="eva",
                     eva_config=EvaConfig(rho=2.0, tau=0.9))
    sd = get_eva_state_dict(model(), batches, cfg, show_progress_bar=False)
    torch.save(sd, tmp_path / "peft.pt")
    state = peft_to_state(load_peft_file(tmp_path / "peft.pt"), r=2, lora_alpha=4.0, tau=0.9)
    assert state.total_rank() == sum(int(v.shape[0]) for v in sd.values()) == 4
    state.save(tmp_path / "s.safetensors")
    convert_file(tmp_path / "s.safetensors", tmp_path / "for_peft.pt")
    peft_model = get_peft_model(model(), cfg)
    initialize_lora_eva_weights(peft_model, eva_state_dict=torch.load(tmp_path / "for_peft.pt", weights_only=True))
    for name, a in state.tensors.items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert torch.equal(layer.lora_A["default"].weight, a)


def test_bad_input_is_refused_clearly(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(StateError, match="not a readable torch.save file"):
        load_peft_file(tmp_path / "junk.pt")
    torch.save([torch.zeros(2, 2)], tmp_path / "list.pt")
    with pytest.raises(StateError, match="holds a list"):
        load_peft_file(tmp_path / "list.pt")
    torch.save({"a": torch.zeros(3)}, tmp_path / "flat.pt")
    with pytest.raises(StateError, match="not 2-D tensors"):
        load_peft_file(tmp_path / "flat.pt")
    with pytest.raises(StateError, match="not found"):
        load_peft_file(tmp_path / "missing.pt")
    torch.save({"a": torch.zeros(1, 3)}, tmp_path / "ok.pt")
    with pytest.raises(ConfigError, match="does not record r: pass --r"):
        convert_file(tmp_path / "ok.pt", tmp_path / "s.safetensors")
    with pytest.raises(ConfigError, match="convert turns one kind into the other"):
        convert_file(V2, tmp_path / "copy.safetensors")
    with pytest.raises(ConfigError, match="invalid PEFT settings"):
        convert_file(tmp_path / "ok.pt", tmp_path / "s.safetensors", r=2, rho=0.5)
    (tmp_path / "bad.safetensors").write_bytes(b"xx")
    with pytest.raises(StateError, match="truncated or corrupt"):
        convert_file(tmp_path / "bad.safetensors", tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()


def test_unreadable_peft_file_is_one_error_line(tmp_path):
    """torch's weights-only unpickling error runs to a dozen lines; the user gets its first."""
    (tmp_path / "junk.pt").write_text("xx")
    with pytest.raises(StateError, match="UnpicklingError") as err:
        load_peft_file(tmp_path / "junk.pt")
    assert "\n" not in str(err.value)


def test_cli_both_ways(tmp_path):
    runner = CliRunner()
    run = runner.invoke(main, ["convert", str(V2), str(tmp_path / "p.pt"), "--no-prefix"])
    assert run.exit_code == 0, run.output
    assert "3 layers, total rank 6" in run.output
    assert set(torch.load(tmp_path / "p.pt", weights_only=True)) == set(load_state(V2).ranks)
    run = runner.invoke(main, ["convert", str(tmp_path / "p.pt"), str(tmp_path / "s.safetensors"), "--r", "2",
                               "--lora-alpha", "4", "--task", "from-peft", "--no-adjust-scaling-factors"])
    assert run.exit_code == 0, run.output
    meta = load_state(tmp_path / "s.safetensors").meta
    assert meta["task"] == "from-peft" and meta["adjust_scaling_factors"] is False and meta["alpha_pattern"] == {}
    missing = runner.invoke(main, ["convert", str(tmp_path / "p.pt"), str(tmp_path / "t.safetensors")])
    assert missing.exit_code == 2 and "error: a PEFT state dict does not record r" in missing.output
    shown = runner.invoke(main, ["inspect", str(tmp_path / "s.safetensors")])
    assert shown.exit_code == 0 and "from-peft" in shown.output
    rows = [line.split() for line in shown.output.splitlines() if line.split()[:1] and line.split()[0] in load_state(V2).ranks]
    assert rows and all(row[3] == "-" for row in rows)  # PEFT files record no explained variance: shown as unknown
    assert state_to_peft(load_state(tmp_path / "s.safetensors"), prefix=False).keys() == load_state(V2).ranks.keys()
