"""eva.target_parameters (mixture-of-experts experts) under model.offload: sequential: each block's experts get
their routed tokens while the block is onloaded; unrouted experts, budgets and rounds as in memory, so the state
equals the in-memory one -- on Mixtral (per-expert checkpoint matrices fused while a block is read), Qwen2-MoE and a
gpt-oss-style model (fused experts stored transposed with biases, sliding and full attention layers)."""

from __future__ import annotations

import pytest
import torch
from test_layer_types import assert_cos
from test_moe import EXPERT_PARAMS, moe_job
from test_resume import kill_then_rerun
from test_sequential import assert_same_state, one_and_two_processes

from conftest import _tiny_tokenizer, tiny_job, write_config
from evapipe import config_from_dict, load_config, load_state, run_job
from evapipe.states.checkpoint import checkpoint_dir


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory, minilm_path) -> str:
    import transformers as tf

    tok = _tiny_tokenizer(minilm_path)
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(tf.GptOssConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id))
    path = tmp_path_factory.mktemp("tiny-gpt-oss")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _sequential(job: dict, out, size: int = 3) -> dict:
    return job | {"model": {**job["model"], "offload": "sequential", "sequential_round": size},
                  "output": {**job["output"], "path": str(out)}}


def test_mixtral_experts_with_an_unrouted_one_equal_in_memory(tmp_path, tiny_model_dir):
    job = moe_job(tiny_model_dir("mixtral"), tmp_path / "ref.safetensors")
    reference = run_job(config_from_dict(job), show_progress=False)
    seq = run_job(config_from_dict(_sequential(job, tmp_path / "seq.safetensors")), show_progress=False)
    assert reference.state.meta["unrouted"] and seq.state.meta["unrouted"] == reference.state.meta["unrouted"]
    assert seq.state.meta["expert_tokens"] == reference.state.meta["expert_tokens"]
    assert seq.rank_stats[0].updates == reference.rank_stats[0].updates
    assert_same_state(reference.state, seq.state, exact=False)
    assert_cos(reference.state, seq.state)


@pytest.mark.parametrize("arch", ["qwen2-moe", "gpt-oss"])
def test_other_moe_families_equal_in_memory(arch, tmp_path, tiny_model_dir, request):
    path = request.getfixturevalue("gpt_oss_dir") if arch == "gpt-oss" else tiny_model_dir(arch)
    job = tiny_job(path, eva={"r": 2, "rho": 2.0, "tau": 0.999, "target_modules": ["q_proj", "o_proj"],
                              "target_parameters": EXPERT_PARAMS, "max_batches": 5},
                   output={"path": str(tmp_path / "ref.safetensors")})
    reference = run_job(config_from_dict(job), show_progress=False).state
    seq = run_job(config_from_dict(_sequential(job, tmp_path / "seq.safetensors", 2)), show_progress=False).state
    assert reference.meta["experts"] and seq.meta["expert_tokens"] == reference.meta["expert_tokens"]
    assert_same_state(reference, seq, exact=False)
    assert_cos(reference, seq)


@pytest.mark.parametrize("arch", ["mixtral", "gpt-oss"])
def test_experts_that_come_back_mid_round_are_fed_from_parked_inputs(arch, tmp_path, tiny_model_dir, request,
                                                                     monkeypatch):
    """rho 4: ranks move between experts every step, and experts the round had stopped feeding are needed again;
    each such step runs its batch through their block from its parked input. The state is the in-memory one."""
    from evapipe.run import sequential

    refed: list[str] = []
    refeed = sequential.SequentialRun._refeed
    monkeypatch.setattr(sequential.SequentialRun, "_refeed",
                        lambda self, again, rnd, j: refed.extend(again) or refeed(self, again, rnd, j))
    path = request.getfixturevalue("gpt_oss_dir") if arch == "gpt-oss" else tiny_model_dir(arch)
    job = tiny_job(path, eva={"r": 2, "rho": 4.0, "tau": 0.9, "target_modules": ["q_proj"],
                              "target_parameters": EXPERT_PARAMS, "max_batches": 12, "on_unconverged": "warn"},
                   output={"path": str(tmp_path / "ref.safetensors")})
    reference = run_job(config_from_dict(job), show_progress=False)
    seq = run_job(config_from_dict(_sequential(job, tmp_path / "seq.safetensors", 6)), show_progress=False)
    assert any(k.endswith("]") for k in refed), refed  # an expert's PCA was fed off the blocks' pass
    assert seq.rank_stats[0].updates == reference.rank_stats[0].updates
    assert_same_state(reference.state, seq.state, exact=False)
    assert_cos(reference.state, seq.state)


def test_two_processes_and_a_resume_give_the_in_memory_state(tmp_path, tiny_model_dir):
    path = tiny_model_dir("mixtral")
    job = _sequential(moe_job(path, tmp_path / "two.safetensors"), tmp_path / "two.safetensors")
    job["data"]["batch_size"] = 2
    one, state = one_and_two_processes(tmp_path, job)  # one: in memory, one process, batches of 4
    assert state.meta["world_size"] == 2
    assert_same_state(one, state, exact=False)
    assert_cos(one, state)

    out = tmp_path / "eva.safetensors"
    job = _sequential(moe_job(path, out), out)
    job["eva"].update(tau=1.0, max_batches=10)
    job["output"]["checkpoint_every"] = 2
    job["hooks"] = {"forward_fn": "test_resume:slow_forward"}
    reference = run_job(load_config(write_config(tmp_path / "ref.yaml", **job), [
        "model.offload=none", f"output.path={tmp_path / 'ref.safetensors'}", "output.checkpoint_every=null"]),
        show_progress=False).state
    step, stderr = kill_then_rerun(write_config(tmp_path / "job.yaml", **job), out, delay=0.3)
    assert 2 <= step < 10
    assert f"resuming from {checkpoint_dir(out)} at batch " in stderr
    assert_same_state(reference, load_state(out), exact=False)
    assert_cos(reference, load_state(out))


def test_estimate_counts_experts_in_a_block_and_their_pcas(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from evapipe.run.engine import EvaRun
    from evapipe.run.estimate import estimate

    path = tiny_model_dir("mixtral")
    cfg = config_from_dict(moe_job(path, "x.safetensors"))
    est = {m.mode: m for m in estimate(cfg).modes}
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    experts = model.model.layers[0].mlp.experts
    one_block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    assert sum(p.numel() * p.element_size() for p in experts.parameters()) < one_block
    assert est["device_map"].weights == one_block  # the experts are in the block's weights
    run = EvaRun(model, cfg.eva)
    ids = torch.randint(5, 100, (4, 16))
    with torch.no_grad():
        run.step({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    run.source.close()
    assert len(run.pool.states) == 2 + 2 * 2 * 4  # q_proj and 4 experts of 2 parameters, in 2 layers
    real = sum(t.numel() * t.element_size() for s in run.pool.states.values()
               for t in (s.components, s.singular_values, s.mean, s.var) if t is not None)
    assert est["none"].pca == real and est["sequential"].pca == real
