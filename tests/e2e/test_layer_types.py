"""model.offload: sequential on models whose blocks are called with different arguments: per layer-type masks and
rotary embeddings (a Gemma-3-style stack of sliding and full attention) and a hybrid stack of block classes
(Jamba: state-space and attention blocks). Each block runs with the model's own call for it, so the blocks equal
the in-memory model's, and the state equals `offload: none` on the same batches (1 and 2 processes, resumed)."""

from __future__ import annotations

import pytest
import torch
from test_resume import kill_then_rerun
from test_sequential import assert_same_state, one_and_two_processes

from conftest import _tiny_tokenizer, tiny_job, write_config
from evapipe import config_from_dict, load_state, run_job
from evapipe.model.onload import BlockModel, block_list, empty_model
from evapipe.states.checkpoint import checkpoint_dir


def tiny_mixed(arch: str, vocab: int = 100, **ids):
    """A tiny random model of `arch`: gemma3 (sliding window 4, alternating layer types, one rotary embedding per
    type) or jamba (state-space blocks and attention blocks, two block classes, PyTorch kernels)."""
    import transformers as tf

    torch.manual_seed(0)
    small = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, **ids)
    if arch == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **small, head_dim=8, sliding_window=4, max_position_embeddings=256,
            layer_types=["sliding_attention", "full_attention"] * 2)).eval()
    return tf.JambaForCausalLM(tf.JambaConfig(
        **small, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=100, expert_layer_offset=99,
        num_experts=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)).eval()


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory, minilm_path):
    """mixed_dir(arch) -> a saved tiny model of arch beside MiniLM's tokenizer."""
    made: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in made:
            tok = _tiny_tokenizer(minilm_path)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            tiny_mixed(arch, len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                       eos_token_id=tok.sep_token_id).save_pretrained(path)
            tok.save_pretrained(path)
            made[arch] = str(path)
        return made[arch]

    return make


@pytest.mark.parametrize("arch", ["gemma3", "jamba"])
def test_each_block_runs_with_its_own_call_and_equals_the_model(arch, tmp_path):
    model = tiny_mixed(arch)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    _, blocks = block_list(model)
    want: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, o: want.append(o)) for b in blocks]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()
    bm = BlockModel(empty_model(type(model), model.config, torch.float32), tmp_path, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        with bm.head() as m:
            calls = bm.block_calls(lambda: m(input_ids=ids, attention_mask=mask))
        kinds = {id(kw.get("attention_mask")) for _, kw in calls.calls}
        if arch == "gemma3":  # one mask and one rotary embedding per layer type, shared by its blocks
            assert len(kinds) == 2 and calls.calls[0][1]["attention_mask"] is calls.calls[2][1]["attention_mask"]
            assert calls.calls[0][1]["position_embeddings"] is calls.calls[2][1]["position_embeddings"]
            assert calls.calls[0][1]["position_embeddings"] is not calls.calls[1][1]["position_embeddings"]
        for i in range(len(bm.blocks)):
            with bm.onloaded(i) as block:
                calls.hidden = bm.call(block, calls.inputs(i))
            torch.testing.assert_close(calls.hidden, want[i], atol=1e-5, rtol=1e-5)
    assert {type(b).__name__ for b in bm.blocks} == {type(b).__name__ for b in blocks}


def _job(model_dir: str, out, **model) -> dict:
    # a state-space block's dt_proj weight is used by the scan directly, never called: no input to capture
    return tiny_job(model_dir, model={"name_or_path": model_dir, **model},
                    eva={"r": 2, "rho": 2.0, "tau": 0.99, "target_modules": "all-linear", "exclude_modules": ["dt_proj"],
                         "max_batches": 6}, output={"path": str(out)})


@pytest.mark.parametrize("arch", ["gemma3", "jamba"])
def test_sequential_state_equals_in_memory(arch, tmp_path, mixed_dir):
    path = mixed_dir(arch)
    reference = run_job(config_from_dict(_job(path, tmp_path / "ref.safetensors")), show_progress=False).state
    seq = run_job(config_from_dict(_job(path, tmp_path / "seq.safetensors", offload="sequential",
                                        sequential_round=4)), show_progress=False).state
    assert_same_state(reference, seq, exact=False)
    assert_cos(reference, seq)


def assert_cos(a, b) -> None:
    """|cos| >= 0.9999 per component of every layer."""
    for name, x in a.tensors.items():
        y = b.tensors[name]
        cos = (x * y).sum(1).abs() / (x.norm(dim=1) * y.norm(dim=1))
        assert float(cos.min()) >= 0.9999, (name, cos)


def test_two_processes_give_the_one_process_in_memory_state(tmp_path, mixed_dir):
    path = mixed_dir("gemma3")
    job = _job(path, tmp_path / "two.safetensors", offload="sequential", sequential_round=3)
    job["data"]["batch_size"] = 2
    one, state = one_and_two_processes(tmp_path, job)
    assert state.meta["world_size"] == 2
    assert_same_state(one, state, exact=False)
    assert_cos(one, state)


def test_sigkill_then_rerun_resumes_to_the_in_memory_state(tmp_path, mixed_dir):
    path = mixed_dir("gemma3")

    def job(out, **model):
        j = _job(path, out, **model)
        j["eva"].update(tau=1.0, max_batches=10)
        j["output"]["checkpoint_every"] = 2
        return j | {"hooks": {"forward_fn": "test_resume:slow_forward"}}

    out = tmp_path / "eva.safetensors"
    cfg_path = write_config(tmp_path / "job.yaml", **job(out, offload="sequential", sequential_round=3))
    reference = run_job(config_from_dict(job(tmp_path / "ref.safetensors")), show_progress=False).state
    step, stderr = kill_then_rerun(cfg_path, out, delay=0.3)
    assert 2 <= step < 10
    assert f"resuming from {checkpoint_dir(out)} at batch " in stderr
    assert_same_state(reference, load_state(out), exact=False)
    assert_cos(reference, load_state(out))
