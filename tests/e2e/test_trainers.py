"""The examples/ recipes, each a test: a few steps from EVA init, finite losses, and an adapter that moved (lora_B
away from 0, lora_A away from the EVA components). TRL's SFTTrainer and FSDP start from an evapipe adapter directory
on a tiny chat Llama; the HF Trainer recipe applies a state to MiniLM as a classifier."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import REPO, chat_data, job_state
from evapipe import load_config, load_state, run_job
from evapipe.cli import main as cli


def example(name: str):
    """An examples/ script as a module (its neighbours, such as recipe_args, importable as when it runs)."""
    if str(REPO / "examples") not in sys.path:
        sys.path.insert(0, str(REPO / "examples"))
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def chat_adapter(tmp_path_factory, tiny_model_dir):
    """(model dir, chat data file, adapter dir): configs/chat-sft.yaml's job on a tiny Llama, then `evapipe apply`."""
    tmp = tmp_path_factory.mktemp("chat")
    model = tiny_model_dir("llama")
    data = chat_data(tmp)
    cfg = load_config(REPO / "configs" / "chat-sft.yaml", [
        f"model.name_or_path={model}", "model.dtype=float32", "model.device=cpu", f"data.path={data}",
        "data.max_length=64", "data.batch_size=8", "eva.r=4", "eva.max_batches=3", "eva.on_unconverged=warn",
        f"output.path={tmp / 'state.safetensors'}",
    ])
    state = run_job(cfg, show_progress=False).path
    adapter = tmp / "adapter"
    result = CliRunner().invoke(cli, ["apply", "--state", str(state), "--output", str(adapter), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return model, data, adapter


class StartingPoint(TrainerCallback):
    """Records every lora_A and lora_B when training begins, before the first optimizer step: what the recipe
    really starts from (the recipes build their own trainer; `watched` adds this to it)."""

    lora: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.lora = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if ".lora_" in n}


def watched(trainer_class, callback):
    """`trainer_class` with `callback` added to every instance (the recipes build their own trainer)."""

    class Watched(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(callback)

    return Watched


def layer_weights(weights: dict[str, torch.Tensor], kind: str, prefix: str) -> dict[str, torch.Tensor]:
    """{layer name: weight} of the lora_A or lora_B weights, saved or live ('.default' adapter name dropped)."""
    return {k.removeprefix(prefix).split(f".{kind}")[0]: v for k, v in weights.items() if f".{kind}." in k}


def assert_starts_from(start: dict[str, torch.Tensor], components: dict[str, torch.Tensor], prefix: str) -> None:
    """Training began with lora_A = the EVA components (exactly) and lora_B = 0, on exactly those layers."""
    a, b = layer_weights(start, "lora_A", prefix), layer_weights(start, "lora_B", prefix)
    assert a and set(a) == set(components) == set(b), sorted(set(a) ^ set(components))
    for name, comp in components.items():
        assert torch.equal(a[name], comp.to(a[name].dtype)), name
        assert not b[name].any(), name


def assert_adapter_moved(before_dir, after_dir) -> None:
    before = load_file(str(before_dir / "adapter_model.safetensors"))
    after = load_file(str(after_dir / "adapter_model.safetensors"))
    assert set(before) == set(after)
    b_keys = [k for k in after if "lora_B" in k]
    assert b_keys and all(not before[k].any() for k in b_keys)
    assert all(after[k].abs().sum() > 0 for k in b_keys)  # every lora_B left 0
    assert any(not torch.equal(before[k], after[k]) for k in after if "lora_A" in k)


def test_trl_sft_trainer_from_an_adapter_directory(chat_adapter, tmp_path, monkeypatch):
    model, data, adapter = chat_adapter
    out = tmp_path / "sft"
    import trl

    start = StartingPoint()
    monkeypatch.setattr(trl, "SFTTrainer", watched(trl.SFTTrainer, start))
    losses = example("sft_trl").main(["--adapter", str(adapter), "--model", model, "--data", data, "--steps", "4",
                                      "--batch-size", "4", "--max-length", "64", "--lr", "1e-2", "--out", str(out)])
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert_adapter_moved(adapter, out / "adapter")
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert_starts_from(start.lora, layer_weights(saved, "lora_A", "base_model.model."), "base_model.model.")


def test_fsdp_two_cpu_processes_train_the_adapter(chat_adapter, tmp_path):
    """`accelerate launch` (2 processes, gloo) runs examples/train_fsdp.py: FSDP2 shards the model, each process
    holds about half of it, trains on its share, and the gathered adapter is saved once."""
    model, data, adapter = chat_adapter
    out = tmp_path / "fsdp"
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "jobs" / "cpu-2proc.yaml"),
         str(REPO / "examples" / "train_fsdp.py"), "--adapter", str(adapter), "--model", model, "--data", data,
         "--steps", "4", "--batch-size", "4", "--max-length", "64", "--lr", "1e-2", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    for share in report["processes"]:
        assert len(share["losses"]) == 4 and all(math.isfinite(x) for x in share["losses"])
        assert share["local_params"] < 0.6 * share["params"]  # sharded, not replicated
    assert_adapter_moved(adapter, out / "adapter")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(out / "adapter"))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    layer = reloaded.get_base_model().model.layers[0].self_attn.q_proj
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(layer.lora_B["default"].weight, saved[key])


def test_hf_trainer_example(tmp_path, monkeypatch):
    """examples/train_minilm_trainer.py: MiniLM as a classifier, a state it finds in --out (computed on the bare
    BertModel: apply_eva_state finds it under `bert.`), 3 Trainer steps, the adapter saved and reloaded."""
    out = tmp_path / "run"
    out.mkdir()
    state_path = job_state(out, "eva.max_batches=2")
    state = load_state(state_path)
    recipe = example("train_minilm_trainer")
    start = StartingPoint()
    monkeypatch.setattr(recipe, "Trainer", watched(recipe.Trainer, start))
    losses = recipe.main(["--steps", "3", "--out", str(out)])
    # training began from the state: lora_A = its components, lora_B = 0, on exactly its layers of rank > 0
    assert_starts_from(start.lora, {n: a for n, a in state.tensors.items() if state.ranks[n] > 0},
                       "base_model.model.bert.")
    assert len(losses) == 1 and all(math.isfinite(x) for x in losses)  # logged every min(5, steps) steps
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    a = {k.removeprefix("base_model.model.bert.").removesuffix(".lora_A.weight"): v for k, v in saved.items()
         if "lora_A" in k}
    assert set(a) == {n for n, k in state.ranks.items() if k > 0}
    assert any(not torch.equal(a[n], state.tensors[n]) for n in a)
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    assert "base_model.model.classifier.weight" in saved
