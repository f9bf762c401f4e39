"""`evapipe estimate`: per-mode memory from the model's config alone, against the real model and PCA states."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from conftest import tiny_job, write_config
from evapipe import config_from_dict
from evapipe.cli import main as cli
from evapipe.run.estimate import estimate


def _cfg(llama_dir, **eva):
    return config_from_dict(tiny_job(llama_dir, eva={"target_modules": ["o_proj", "down_proj"], **eva},
                                     output={"path": "x.safetensors"}))


def test_weights_and_pca_state_match_the_real_model_and_run(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    est = {m.mode: m for m in estimate(_cfg(tiny_llama_dir)).modes}
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    assert est["none"].weights == total
    layers = model.model.layers
    one_block = sum(p.numel() * 4 for p in layers[0].parameters())
    in_blocks = sum(p.numel() * 4 for p in layers.parameters())
    head = model.lm_head.weight.numel() * 4  # untied: never loaded by sequential
    assert est["sequential"].weights == max(total - in_blocks - head, one_block)  # embeddings, or one block
    assert est["device_map"].weights == one_block
    # o_proj and down_proj share no input: one PCA each, as the estimate assumes
    from evapipe.run.engine import EvaRun

    run = EvaRun(model, _cfg(tiny_llama_dir).eva)
    ids = torch.randint(0, 100, (4, 32))
    with torch.no_grad():
        run.step({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    real = sum(t.numel() * t.element_size() for s in run.pool.states.values()
               for t in (s.components, s.singular_values, s.mean, s.var) if t is not None)
    assert est["none"].pca == real
    # a round's hidden states in host memory; its PCA copies (one per batch) and, at rho > 1, every block's input
    # of every batch in a temporary file
    cfg = _cfg(tiny_llama_dir)
    hidden = model.config.hidden_size * cfg.data.batch_size * cfg.data.max_length * 4
    assert cfg.eva.rho > 1
    assert est["sequential"].host == cfg.model.sequential_round * hidden
    parked = cfg.model.sequential_round * len(layers) * hidden
    assert est["sequential"].disk == cfg.model.sequential_round * real + parked and est["none"].disk == 0
    at_rho_1 = {m.mode: m for m in estimate(_cfg(tiny_llama_dir, rho=1.0)).modes}["sequential"]
    assert at_rho_1.disk == cfg.model.sequential_round * at_rho_1.pca  # no layer comes back: nothing parked


def test_cli_says_which_modes_fit(tmp_path, tiny_llama_dir):
    cfg = write_config(tmp_path / "job.yaml", **tiny_job(tiny_llama_dir, output={"path": "x.safetensors"}))
    small = CliRunner().invoke(cli, ["estimate", "--config", str(cfg), "--device-memory", "1KB"])
    assert small.exit_code == 0, small.output
    rows = {ln.split()[0]: ln.split()[-1] for ln in small.output.splitlines() if ln.endswith((" yes", " no"))}
    assert rows == {"none": "no", "sequential": "no", "device_map": "no"}
    big = CliRunner().invoke(cli, ["estimate", "--config", str(cfg), "--device-memory", "64GiB", "--world-size", "2"])
    assert "per process of 2" in big.output and big.output.count("  yes") == 3
    bad = CliRunner().invoke(cli, ["estimate", "--config", str(cfg), "--set", "model.name_or_path=/nope"])
    assert bad.exit_code == 2 and "no such local directory" in bad.output
