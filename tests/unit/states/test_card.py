"""The model card and what a push sends, offline (the Hub itself is not reached in tests)."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from conftest import tiny_job
from evapipe import config_from_dict, load_state, read_metadata, run_job
from evapipe.cli import main
from evapipe.states.card import front_matter, push, push_files, write_card


def state_file(tmp_path, llama_dir):
    out = tmp_path / "s" / "eva.safetensors"
    run_job(config_from_dict(tiny_job(llama_dir, output={"path": str(out)})), show_progress=False)
    return out


def test_front_matter_names_hub_ids_only():
    meta = {"model": {"id": "meta-llama/Llama-3.2-1B"}, "dataset": {"id": "org/support"}}
    assert front_matter(meta, "apache-2.0") == {"library_name": "evapipe", "tags": ["eva", "lora", "peft"],
                                                "base_model": "meta-llama/Llama-3.2-1B", "datasets": ["org/support"],
                                                "license": "apache-2.0"}
    local = front_matter({"model": {"id": "/tmp/x"}, "dataset": {"id": "builtin:support_intents"}})
    assert "base_model" not in local and "datasets" not in local and "license" not in local


def test_card_holds_settings_layers_plot_and_commands(tmp_path, tiny_llama_dir):
    state = state_file(tmp_path, tiny_llama_dir)
    meta = read_metadata(state)
    url = "hf://org/eva-intents/eva.safetensors"
    shown = CliRunner().invoke(main, ["card", str(state), "--output", str(tmp_path / "card"), "--license", "mit",
                                      "--url", url])
    assert shown.exit_code == 0, shown.output
    text = (tmp_path / "card" / "README.md").read_text()
    head = yaml.safe_load(text.split("---")[1])
    assert head["library_name"] == "evapipe" and head["tags"] == ["eva", "lora", "peft"] and head["license"] == "mit"
    assert f"evapipe apply --state {url} --model {meta['model']['id']} --output adapter/" in text
    assert "model.layers.0.self_attn.q_proj" in text and "![rank per layer" in text
    assert f"| fingerprint | {meta['dataset']['fingerprint']} |" in text and f"| r | {meta['r']} |" in text
    assert (tmp_path / "card" / "eva-layers.png").read_bytes()[:4] == b"\x89PNG"


def test_push_sends_the_state_last_and_a_folder_push_loads(tmp_path, tiny_llama_dir):
    state = state_file(tmp_path, tiny_llama_dir)
    write_card(state, state.parent)
    files = push_files(state, "hf://org/repo")
    assert [dst for _, dst in files] == ["hf://org/repo/eva.spectrum.safetensors", "hf://org/repo/eva-layers.png",
                                         "hf://org/repo/README.md", "hf://org/repo/eva.safetensors"]
    sent = push(state, f"file://{tmp_path / 'published'}", "apache-2.0")
    assert sent[-1].endswith("eva.safetensors") and len(sent) == 4
    pulled = load_state(tmp_path / "published" / "eva.safetensors")
    original = load_state(state)
    assert pulled.spectrum and all(bool((pulled.tensors[k] == a).all()) for k, a in original.tensors.items())
