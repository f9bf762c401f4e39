"""model.offload: sequential -- rounds of batches, one block at a time, give the in-memory state on the same
batches (each model kind, any round size, one and two processes, resumed after SIGKILL); what it refuses."""

from __future__ import annotations

import pytest
import torch
from test_distributed import compute, torchrun
from test_kinds import job_config
from test_resume import kill_then_rerun

from conftest import REPO, tiny_job, write_config
from evapipe import config_from_dict, load_config, load_state, run_job
from evapipe.core.errors import ConfigError
from evapipe.run.sequential import RoundLedger, first_rows
from evapipe.states.checkpoint import checkpoint_dir


def assert_same_state(a, b, exact: bool) -> None:
    assert a.ranks == b.ranks and a.meta["converged"] == b.meta["converged"]
    assert a.meta["batches"] == b.meta["batches"] and a.meta["tokens"] == b.meta["tokens"]
    assert a.tensors.keys() == b.tensors.keys()
    for name, x in a.tensors.items():
        if exact:
            assert torch.equal(x, b.tensors[name]), name
        cos = (x * b.tensors[name]).sum(1).abs() / (x.norm(dim=1) * b.tensors[name].norm(dim=1))
        assert float(cos.min()) >= 0.99, (name, cos)


# -- the round ledger (pure) -----------------------------------------------------------------------------------
def test_ledger_says_which_pcas_a_step_must_feed_off_the_blocks_pass():
    ledger = RoundLedger({"a", "b", "c"}, ["a", "b", "c", "d"])
    assert ledger.off_pass({"a", "b", "c"}) == set()
    ledger.take({"a", "b", "c"})
    assert ledger.off_pass({"a", "c"}) == set()
    ledger.take({"a", "c"})  # b converged: set back to its copy, no longer fed
    assert ledger.off_pass({"a", "b"}) == {"b"}  # b needed again: its later copies hold updates memory would not make
    ledger.take({"a", "b"})
    assert ledger.off_pass({"a", "b", "c", "d"}) == {"b", "c", "d"}  # once off the pass, always; d was never fed


def test_layout_pass_takes_the_first_sample_of_any_batch():
    batch = {"input_ids": torch.arange(12).reshape(3, 4), "attention_mask": torch.ones(3, 4), "scale": torch.tensor(2.0),
             "meta": "x"}
    first = first_rows(batch)
    assert torch.equal(first["input_ids"], torch.arange(4).reshape(1, 4)) and first["attention_mask"].shape == (1, 4)
    assert first["scale"] is batch["scale"] and first["meta"] == "x"
    assert first_rows(torch.ones(5, 2)).shape == (1, 2) and first_rows(["a"]) == ["a"]
    padded = {"input_ids": torch.arange(18).reshape(3, 6), "labels": torch.arange(18).reshape(3, 6),
              "attention_mask": torch.tensor([[0, 1, 1, 1, 0, 0], [1] * 6, [1] * 6]), "pixel_values": torch.ones(3, 2, 6)}
    first = first_rows(padded)  # the first sample's padding cut at both ends, in every tensor of the mask's shape
    assert first["input_ids"].tolist() == [[1, 2, 3]] and first["labels"].tolist() == [[1, 2, 3]]
    assert first["attention_mask"].tolist() == [[1, 1, 1]] and first["pixel_values"].shape == (1, 2, 6)
    embeds = first_rows({**padded, "inputs_embeds": torch.ones(3, 6, 4)})  # (batch, length, ...): nothing cut
    assert embeds["input_ids"].shape == (1, 6) and embeds["inputs_embeds"].shape == (1, 6, 4)


# -- equality with the in-memory state ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["causal-lm", "conv1d-causal-lm", "seq-cls", "image-cls"])
def test_every_kind_gives_the_in_memory_state(kind, tmp_path, tiny_model_dir):
    cfg = job_config(kind, tmp_path, tiny_model_dir)
    reference = run_job(cfg, show_progress=False).state
    for size in (1, 3):
        seq = config_from_dict(_raw(cfg), [f"output.path={tmp_path / f'seq{size}.safetensors'}", "model.offload=sequential",
                                           f"model.sequential_round={size}"])
        assert_same_state(reference, run_job(seq, show_progress=False).state, exact=True)


def _raw(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


@pytest.mark.parametrize("tau, rho, comes_back, parked", [(0.9, 2.0, False, True), (0.99, 4.0, True, True),
                                                          (0.99, 4.0, True, False)])
def test_convergence_inside_a_round_and_layers_coming_back_keep_the_in_memory_state(tau, rho, comes_back, parked,
                                                                                   tmp_path, tiny_llama_dir,
                                                                                   monkeypatch):
    """Layers converge at different batches of a round and, at some tau, a converged PCA is needed again (its rank
    grew): its block runs again on the parked inputs and the round goes on, or, with nothing parked, the round ends
    early. Either way every PCA stops where it stopped in memory."""
    from evapipe.run import sequential

    refeeds = []
    refeed = sequential.SequentialRun._refeed
    monkeypatch.setattr(sequential.SequentialRun, "_refeed",
                        lambda self, again, rnd, j: refeeds.append(refeed(self, again, rnd, j)) or refeeds[-1])
    if not parked:
        monkeypatch.setattr(sequential.SequentialRun, "may_come_back", property(lambda self: False))

    reference, seq = in_memory_and_sequential(tiny_llama_dir, tmp_path, tau=tau, rho=rho)
    assert_same_state(reference.state, seq.state, exact=True)
    updates = seq.rank_stats[0].updates
    assert updates == reference.rank_stats[0].updates  # every PCA stopped at the batch where it stopped in memory
    assert len(set(updates.values())) > 1
    assert bool(refeeds) == comes_back  # a step needed a PCA the blocks' pass had stopped feeding
    assert all(refeeds) == parked  # fed from its block's parked input, or (nothing parked) the round ended early


def in_memory_and_sequential(llama_dir: str, tmp_path, **eva) -> tuple:
    """The job results of the tiny Llama, all linear layers, 12 batches, in memory and sequentially (rounds of 5)."""
    def job(out, **model):
        return config_from_dict(tiny_job(llama_dir, model={"name_or_path": llama_dir, **model},
                                         eva={"max_batches": 12, "target_modules": "all-linear", **eva},
                                         output={"path": str(tmp_path / out)}))

    reference = run_job(job("ref.safetensors"), show_progress=False)
    return reference, run_job(job("seq.safetensors", offload="sequential", sequential_round=5), show_progress=False)


def test_one_block_at_a_time_and_blocks_after_the_deepest_target_never_run(tmp_path, tiny_llama_dir, monkeypatch):
    from evapipe.model.onload import BlockModel

    onloaded, live = [], []
    real = BlockModel.onloaded

    def spy(self, i):
        onloaded.append(i)
        live.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in self.blocks)
                    + (self.model.model.embed_tokens.weight.device.type != "meta"))  # nor the embeddings
        return real(self, i)

    monkeypatch.setattr(BlockModel, "onloaded", spy)
    cfg = config_from_dict(tiny_job(tiny_llama_dir, model={"name_or_path": tiny_llama_dir, "offload": "sequential",
                                                           "sequential_round": 2},
                                    eva={"target_modules": r"model\.layers\.0\..*_proj", "max_batches": 4},
                                    output={"path": str(tmp_path / "s.safetensors")}))
    state = run_job(cfg, show_progress=False).state
    assert set(state.ranks) and all(n.startswith("model.layers.0.") for n in state.ranks)
    assert onloaded and set(onloaded) == {0}  # layer 1 holds no target: never materialised
    assert live == [0] * len(live)  # nothing else held when a block is onloaded


# -- two processes -------------------------------------------------------------------------------------------------
def test_two_processes_give_the_one_process_in_memory_state(tmp_path, tiny_model_dir):
    one, state = one_and_two_processes(tmp_path, dict(
        model={"name_or_path": tiny_model_dir("llama"), "offload": "sequential", "sequential_round": 3},
        data={"path": "builtin:support_intents", "max_samples": 40, "batch_size": 4, "max_length": 32},
        eva={"r": 2, "tau": 0.99, "max_batches": 7, "on_unconverged": "warn"},
        output={"path": str(tmp_path / "two.safetensors")},
    ))
    assert state.meta["world_size"] == 2
    assert_same_state(one, state, exact=False)


def test_two_processes_feed_a_layer_that_comes_back_mid_round(tmp_path, tiny_llama_dir):
    """The rho = 4, tau = 0.99 job of the round test on two processes: layers come back mid-round, every rank runs
    their blocks again on its own parked inputs, and the state is the one-process in-memory state."""
    cfg = write_config(tmp_path / "job.yaml", **tiny_job(
        tiny_llama_dir, model={"name_or_path": tiny_llama_dir, "offload": "sequential", "sequential_round": 5},
        data={"batch_size": 2},  # per process: the round test's steps of 4 rows
        eva={"max_batches": 12, "target_modules": "all-linear", "tau": 0.99, "rho": 4.0},
        output={"path": str(tmp_path / "two.safetensors")}))
    batch = load_config(cfg).data.batch_size
    one = run_job(load_config(cfg, [f"output.path={tmp_path / 'one.safetensors'}", f"data.batch_size={2 * batch}",
                                    "model.offload=none"]), show_progress=False).state
    two = torchrun(*compute(cfg))
    assert two.returncode == 0, two.stdout[-3000:]
    out = two.stdout + two.stderr
    assert "for layers needed after they had stopped" in out and "the next round starts there" not in out
    assert_same_state(one, load_state(tmp_path / "two.safetensors"), exact=False)


def one_and_two_processes(tmp_path, job: dict) -> tuple:
    """(the in-memory state of one process at twice the batch size, the state of `job` on two processes)."""
    cfg = write_config(tmp_path / "job.yaml", **job)
    one = run_job(load_config(cfg, [f"output.path={tmp_path / 'one.safetensors'}",
                                    f"data.batch_size={2 * job['data']['batch_size']}", "model.offload=none"]),
                  show_progress=False).state
    two = torchrun(*compute(cfg))
    assert two.returncode == 0, two.stdout[-3000:]
    return one, load_state(job["output"]["path"])


# -- resume ----------------------------------------------------------------------------------------------------
def test_sigkill_then_rerun_resumes_to_the_uninterrupted_state(tmp_path, tiny_llama_dir):
    def job(out):
        return tiny_job(tiny_llama_dir, model={"name_or_path": tiny_llama_dir, "offload": "sequential",
                                               "sequential_round": 3},
                        eva={"tau": 1.0, "max_batches": 10}, output={"path": str(out), "checkpoint_every": 2},
                        hooks={"forward_fn": "test_resume:slow_forward"})

    out = tmp_path / "eva.safetensors"
    cfg_path = write_config(tmp_path / "job.yaml", **job(out))
    reference = run_job(config_from_dict(job(tmp_path / "ref.safetensors")), show_progress=False).state
    step, stderr = kill_then_rerun(cfg_path, out, delay=0.3)
    assert 2 <= step < 10
    assert f"resuming from {checkpoint_dir(out)} at batch " in stderr
    assert_same_state(reference, load_state(out), exact=True)


# -- refused ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["model.quantization=4bit"], "model.quantization` is not supported with model.offload: sequential"),
    (["model.sequential_round=0"], "model.sequential_round` must be >= 1"),
])
def test_unsupported_settings_are_refused_by_the_config(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(REPO / "configs" / "default.yaml", ["model.offload=sequential", *overrides])


def test_targets_outside_the_blocks_and_seq2seq_are_refused(tmp_path, tiny_model_dir):
    cfg = load_config(REPO / "configs" / "default.yaml", ["model.offload=sequential", "eva.target_modules=all-linear",
                                                          f"output.path={tmp_path / 'x.safetensors'}"])
    with pytest.raises(ConfigError, match="1 target\\(s\\) lie outside it: pooler.dense; leave them out"):
        run_job(cfg, show_progress=False)
    t5 = job_config("seq2seq", tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match="does not support encoder-decoder models"):
        run_job(config_from_dict(_raw(t5), ["model.offload=sequential"]), show_progress=False)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "state.safetensors").exists()


def test_memory_budget_below_one_block_is_refused(tmp_path, tiny_llama_dir):
    cfg = config_from_dict(tiny_job(tiny_llama_dir, model={"name_or_path": tiny_llama_dir, "offload": "sequential",
                                                           "max_memory": {"cpu": "1KB"}},
                                    output={"path": str(tmp_path / "x.safetensors")}))
    with pytest.raises(ConfigError, match=r"at most 1000\.0 B on any device \(cpu\), below one block"):
        run_job(cfg, show_progress=False)


@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_refine_converged_gives_the_in_memory_state(rho, tmp_path, tiny_llama_dir):
    """Converged PCAs the in-memory pass reaches before its deepest unconverged layer keep being refined; sequential
    rounds feed the same ones at the same batches."""
    reference, seq = in_memory_and_sequential(tiny_llama_dir, tmp_path, tau=0.99, rho=rho, refine_converged=True)
    assert_same_state(reference.state, seq.state, exact=True)
    updates = seq.rank_stats[0].updates
    assert updates == reference.rank_stats[0].updates
    # refined to the end before the deepest unconverged layer, stopped beyond it
    assert max(updates.values()) == reference.state.meta["batches"] and len(set(updates.values())) > 1
