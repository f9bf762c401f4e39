"""CorDA (`method: corda`) against PEFT 0.21's own preprocess_corda, on a tiny Llama and a tiny BERT.

PEFT's reference feeds one unpadded sample per forward (as its run_model must); evapipe's job reads batches of 4
(padded) in a shuffled order. Both must give the same covariances (float tolerance), the same decomposition, the
same adapter weights and residual base weights, and a model that computes what the base computed. evapipe's files
fed to PEFT (its cache_file, its covariance_file) make PEFT build that same adapter without its own pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import CORDA_JOB, corda_job, write_config
from evapipe import config_from_dict, run_job
from evapipe.cli import main
from evapipe.corda.decompose import adapter_weights, decompose
from evapipe.corda.stats import normalised_rows
from evapipe.core.config import ConfigError
from evapipe.states.corda_state import load_corda_state, read_state_metadata
from evapipe.states.store import job_key, list_states

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]
N_SAMPLES, MAX_LENGTH, R = CORDA_JOB


def load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cls = AutoModelForSequenceClassification if "ForSequenceClassification" in cfg["architectures"][0] \
        else AutoModelForCausalLM
    return cls.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def peft_corda(model_dir: str, texts: list[str], targets: list[str], method: str, **files):
    """PEFT's own: preprocess_corda (one sample per forward when it must run the model) then get_peft_model."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model, tok = load(model_dir)
    config = LoraConfig(r=R, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method=method, **files))

    def run_model():
        for text in texts:
            model(**tok(text, max_length=MAX_LENGTH, truncation=True, return_tensors="pt"))

    preprocess_corda(model, config, run_model=run_model)
    return get_peft_model(model, config)


def lora_weights(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (lora_A, lora_B, base weight)} of every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {n: (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(),
                m.get_base_layer().weight.detach())
            for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def assert_same_adapter(ours, ref) -> None:
    """Same layers; per layer the same B A product (sign-free), A and B up to one sign per component, the same
    residual base weight."""
    assert ours.keys() == ref.keys() and ours
    for name, (a, b, w) in ours.items():
        ra, rb, rw = ref[name]
        torch.testing.assert_close(b @ a, rb @ ra, rtol=2e-3, atol=2e-4, msg=name)
        sign = torch.sign((a * ra).sum(1))
        torch.testing.assert_close(a * sign.unsqueeze(1), ra, rtol=5e-3, atol=5e-4, msg=name)
        torch.testing.assert_close(b * sign, rb, rtol=5e-3, atol=5e-4, msg=name)
        torch.testing.assert_close(w, rw, rtol=1e-4, atol=2e-5, msg=name)


def outputs(model, tok, texts):
    enc = tok(texts[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


# -- pure parts ------------------------------------------------------------------------------------------------


def test_normalised_rows_are_peft_per_sample_terms():
    """Batched rows with padding give exactly the per-sample sum of (X / |max X|)^T (X / |max X|), count = samples."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    x[1] -= 10  # a sample whose max is negative: PEFT divides by the absolute value of the max
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    rows, n = normalised_rows(x, mask.reshape(-1).nonzero().squeeze(1))
    want = sum((s[m] / torch.max(s[m]).abs()).T @ (s[m] / torch.max(s[m]).abs()) for s, m in zip(x, mask))
    assert n == 3
    torch.testing.assert_close(rows.T @ rows, want)


def test_decompose_reconstructs_the_weight_and_crops_by_method():
    torch.manual_seed(0)
    w, x = torch.randn(6, 5), torch.randn(40, 5)
    cov = x.T @ x / 40
    full = decompose(w, cov, 5, "ipm")
    torch.testing.assert_close(full.U * full.S @ full.V.T, w, rtol=1e-4, atol=1e-4)  # U S V^T = W
    top, low = decompose(w, cov, 2, "ipm"), decompose(w, cov, 2, "kpm")
    torch.testing.assert_close(top.S, full.S[:2])
    torch.testing.assert_close(low.S, full.S[-2:])
    a, b = adapter_weights(top, scaling=2.0)
    torch.testing.assert_close(2.0 * b @ a, top.U * top.S @ top.V.T)


def test_config_validation():
    base = {"method": "corda", "output": {"path": "x.safetensors"}}
    with pytest.raises(ConfigError, match="corda_method"):
        config_from_dict(base | {"corda": {"corda_method": "pca"}})
    with pytest.raises(ConfigError, match="did you mean `corda.corda_method`"):
        config_from_dict(base | {"corda": {"corda_mehtod": "ipm"}})
    with pytest.raises(ConfigError, match="quantization"):
        config_from_dict(base | {"model": {"quantization": "4bit"}})
    with pytest.raises(ConfigError, match="hooks.prepare_layer_inputs_fn"):
        config_from_dict(base | {"hooks": {"prepare_layer_inputs_fn": "a:b"}})
    from evapipe.run.estimate import estimate

    with pytest.raises(ConfigError, match="estimates EVA jobs"):
        estimate(config_from_dict(base))


def test_store_keys_keep_eva_and_separate_methods(tiny_llama_dir):
    eva = config_from_dict({"model": {"name_or_path": tiny_llama_dir}})
    corda = config_from_dict({"model": {"name_or_path": tiny_llama_dir}, "method": "corda"})
    assert job_key(eva) != job_key(corda)
    # batch size and world size only group the samples of one pass: the same CorDA job
    assert job_key(corda, world=1) == job_key(config_from_dict(
        {"model": {"name_or_path": tiny_llama_dir}, "method": "corda", "data": {"batch_size": 3}}), world=2)


# -- against PEFT ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, targets, method", [("llama", LLAMA_TARGETS, "ipm"), ("bert-cls", BERT_TARGETS, "kpm")])
def test_matches_peft(tmp_path, tiny_model_dir, support_texts, arch, targets, method):
    model_dir = tiny_model_dir(arch)
    texts = support_texts[:N_SAMPLES]
    result = run_job(config_from_dict(corda_job(model_dir, tmp_path, targets, method)), show_progress=False)
    ref_files = {"covariance_file": str(tmp_path / "ref" / "cov.pt"), "cache_file": str(tmp_path / "ref" / "cache.pt")}
    ref = peft_corda(model_dir, texts, targets, method, **ref_files)

    ours_cov, ref_cov = torch.load(tmp_path / "ours" / "cov.pt"), torch.load(ref_files["covariance_file"])
    assert ours_cov.keys() == ref_cov.keys()
    for name, c in ref_cov.items():
        torch.testing.assert_close(ours_cov[name], c, rtol=1e-4, atol=1e-6, msg=name)
    meta = result.state.meta
    assert set(meta["samples"].values()) == {N_SAMPLES} and meta["method"] == "corda"
    assert read_state_metadata(result.path)["corda_method"] == method

    ref_weights = lora_weights(ref)
    for files in ({"cache_file": str(tmp_path / "ours" / "cache.pt")},
                  {"covariance_file": str(tmp_path / "ours" / "cov.pt")}):  # PEFT skips its pass with either
        assert_same_adapter(lora_weights(peft_corda(model_dir, [], targets, method, **files)), ref_weights)

    out = tmp_path / "adapter"
    applied = CliRunner().invoke(main, ["apply", "--state", str(result.path), "--output", str(out)])
    assert applied.exit_code == 0, applied.output
    from peft import PeftModel
    from transformers import AutoConfig

    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] is True
    cls = type(load(model_dir)[0])
    residual = cls.from_pretrained(out / "residual_model", config=AutoConfig.from_pretrained(model_dir)).eval()
    adapter = PeftModel.from_pretrained(residual, out).eval()
    assert_same_adapter(lora_weights(adapter), ref_weights)
    base, tok = load(model_dir)
    torch.testing.assert_close(outputs(adapter, tok, texts), outputs(base, tok, texts), rtol=1e-3, atol=1e-4)


def test_store_list_show_and_cache_hit(tmp_path, tiny_llama_dir, caplog):
    store = tmp_path / "store"
    job = corda_job(tiny_llama_dir, tmp_path, ["q_proj", "down_proj"], output={"path": None, "store": str(store)})
    first = run_job(config_from_dict(job), show_progress=False)
    assert first.path.name == "corda.safetensors" and not first.cached
    (tmp_path / "ours" / "cache.pt").unlink()
    again = run_job(config_from_dict(job), show_progress=False)
    assert again.cached and (tmp_path / "ours" / "cache.pt").is_file()  # PEFT's cache file served from the state
    (entry,) = list_states(store)
    assert entry.method == "corda" and entry.r == R and entry.total_rank == R * 4
    runner = CliRunner()
    listed = runner.invoke(main, ["list", str(store)])
    assert listed.exit_code == 0 and "corda" in listed.output
    shown = runner.invoke(main, ["show", str(first.path)])
    assert shown.exit_code == 0 and "model.layers.1.mlp.down_proj" in shown.output and "ipm" in shown.output
    config = write_config(tmp_path / "job.yaml", **job)
    for extra in ([], ["--force"]):  # the cache hit's summary from the file, the computed one's with its processes
        done = runner.invoke(main, ["compute", "--config", str(config), "--json", "--quiet", *extra])
        assert done.exit_code == 0, done.output
        record = json.loads(done.stdout)
        assert record["method"] == "corda" and record["cached"] == (not extra) and record["corda_method"] == "ipm"
        assert {row["layer"]: row["rank"] for row in record["layers"]} == dict(entry_ranks(first.path))
        assert len(record["processes"]) == (1 if extra else 0)


def test_resume_continues_to_the_same_state(tmp_path, tiny_llama_dir, caplog):
    job = corda_job(tiny_llama_dir, tmp_path, ["q_proj", "down_proj"],
                    output={"checkpoint_every": 2, "keep_checkpoint": True})
    first = run_job(config_from_dict(job), show_progress=False)
    job["output"]["keep_checkpoint"] = False
    again = run_job(config_from_dict(job), show_progress=False)
    assert "resuming from" in caplog.text and "at batch 4" in caplog.text
    for name, t in first.state.tensors.items():
        torch.testing.assert_close(again.state.tensors[name], t)
    assert load_corda_state(again.path).meta["samples"] == first.state.meta["samples"]


def test_sequential_onloading_gives_the_in_memory_state(tmp_path, tiny_model_dir, caplog):
    """model.offload: sequential (rounds of 2 batches, one block at a time) sums and decomposes what memory does."""
    llama = tiny_model_dir("llama")
    mem, seq = tmp_path / "mem", tmp_path / "seq"
    a = run_job(config_from_dict(corda_job(llama, mem, LLAMA_TARGETS)), show_progress=False).state
    b = run_job(config_from_dict(corda_job(llama, seq, LLAMA_TARGETS,
                                           model={"offload": "sequential", "sequential_round": 2})),
                show_progress=False).state
    assert "CorDA round at step 4: 2 batch(es) through blocks 0-1" in caplog.text
    assert a.meta["samples"] == b.meta["samples"] and a.meta["layer_tokens"] == b.meta["layer_tokens"]
    assert a.meta["shared_inputs"] == b.meta["shared_inputs"] and b.meta["batches"] == N_SAMPLES // 4
    cov_a, cov_b = torch.load(mem / "ours" / "cov.pt"), torch.load(seq / "ours" / "cov.pt")
    for name, c in cov_a.items():
        torch.testing.assert_close(cov_b[name], c, rtol=1e-5, atol=1e-7, msg=name)
    for name in a.layers:
        (s, u, v), (s2, u2, v2) = a.eigens(name), b.eigens(name)
        sign = torch.sign((u * u2).sum(0))
        torch.testing.assert_close(s2, s, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(u2 * sign, u, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(v2 * sign, v, rtol=1e-3, atol=1e-4)


def entry_ranks(path: Path) -> dict[str, int]:
    return {n: int(k) for n, k in read_state_metadata(path)["ranks"].items()}
