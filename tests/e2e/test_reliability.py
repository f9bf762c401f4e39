"""Reliability traps (issue 11), one test or more per trap, each failing on the code before the fix:

1 nothing selected -> a clear error after at most one pass; tau 1.0 without max_batches refused
2 non-finite layer inputs -> a clear error naming the layers; never a state with NaN/Inf
3 concurrent jobs on one store key (test_concurrent_jobs_on_one_key_share_one_state, below; 2 processes)
4 ranks that disagree on the store key: tests/e2e/test_elastic.py (torchrun)
5 failures outside the agreed paths: malformed checkpoint marks, the dataset fingerprint (bounded, before the work);
  rank 0's failing checkpoint mark under torchrun: tests/e2e/test_elastic.py
6 state/sidecar crash consistency
7 lying or malformed metadata
8 task names that climb out of the store
9 hidden data files and hook sources in the store key
10 silent overwrites (rebudget, convert, apply)
11 null text values
12 numerics: rank-deficient batches in bounded memory, products centred first
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import REPO, TEST_PATHS, tiny_job, write_config
from evapipe import compute_eva_state, config_from_dict, load_state, read_metadata, run_job
from evapipe.cli import main
from evapipe.core.errors import ConfigError, DataError, StateError
from evapipe.states.state import EvaState, pending_spectrum_path, spectrum_path
from evapipe.states.store import job_key, list_states, lookup

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join([*TEST_PATHS, os.environ.get("PYTHONPATH", "")])}


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_batches(llama_dir: str, n: int = 3, seq: int = 12) -> tuple[torch.nn.Module, list[dict]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 1000, (2, seq), generator=g),
                "attention_mask": torch.ones(2, seq, dtype=torch.long)} for _ in range(n)]
    return model, batches


def one_line_error(args: list[str]) -> str:
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 2, run.output
    assert "Traceback" not in run.output and run.output.startswith("error: "), run.output
    assert len(run.output.strip().splitlines()) == 1, run.output
    return run.output


# -- 1. nothing selected ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", [False, True])  # a stream knows its pass length once it has read one
def test_all_tokens_masked_fails_after_one_pass_naming_cause_and_fix(streaming, tmp_path, tiny_llama_dir):
    rows = [{"prompt": "please tell me where my order is " * 4, "completion": f" it ships today {i}"}
            for i in range(10)]
    job = tiny_job(tiny_llama_dir, data={"path": jsonl(tmp_path / "p.jsonl", rows), "prompt_field": "prompt",
                                         "completion_field": "completion", "max_length": 8, "max_samples": None,
                                         "streaming": streaming},
                   eva={"max_batches": 40, "on_unconverged": "warn"}, output={"path": str(tmp_path / "o.safetensors")})
    with pytest.raises(DataError) as err:  # before: an AttributeError at max_batches (an endless loop without it)
        run_job(config_from_dict(job), show_progress=False)
    message = str(err.value)
    assert "in 3 batches" in message  # 10 rows, batch 4: one pass is 3 steps
    assert "data.max_length" in message and "eva.use_label_mask: false" in message
    assert not (tmp_path / "o.safetensors").exists()


def test_a_layer_that_never_gets_a_token_is_named(tiny_llama_dir):
    model, batches = tiny_batches(tiny_llama_dir)

    def starve_down_proj(layer_input, model_input, name):
        x = layer_input[0].reshape(-1, layer_input[0].shape[-1])
        return x[:0] if name.endswith("layers.1.mlp.down_proj") else x

    with pytest.raises(DataError, match=r"1 target layer\(s\) received no token in 3 batches .*layers.1.mlp.down_proj"):
        compute_eva_state(model, batches, r=2, target_modules=["q_proj", "down_proj"], tau=0.999999,
                          prepare_layer_inputs_fn=starve_down_proj, show_progress=False)


def test_tau_one_needs_max_batches(tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"`eva.tau` 1.0 can never be reached.*eva.max_batches"):
        config_from_dict(tiny_job(tiny_llama_dir, eva={"tau": 1.0, "max_batches": None}, output={"path": "o.st"}))
    config_from_dict(tiny_job(tiny_llama_dir, eva={"tau": 1.0, "max_batches": 3}, output={"path": "o.st"}))
    model, batches = tiny_batches(tiny_llama_dir, n=1)
    with pytest.raises(ConfigError, match="eva.tau"):
        compute_eva_state(model, batches, r=2, tau=1.0, show_progress=False)


# -- 2. non-finite inputs --------------------------------------------------------------------------------------------
def test_non_finite_layer_inputs_fail_naming_layers_and_dtype(tiny_llama_dir):
    model, batches = tiny_batches(tiny_llama_dir)
    overflow = model.model.layers[1].register_forward_pre_hook(lambda m, args: (args[0] * float("inf"), *args[1:]))
    try:
        with pytest.raises(DataError, match=r"non-finite values .* at batch 0 .*layers\.1\.self_attn\.q_proj.*"
                                            r"model\.dtype: bfloat16 or float32"):
            compute_eva_state(model, batches, r=2, target_modules=["q_proj", "down_proj"], max_batches=3,
                              on_unconverged="warn", show_progress=False)
    finally:
        overflow.remove()


def test_a_state_with_nan_is_never_written(tmp_path):
    state = EvaState({"a": torch.tensor([[1.0, float("nan")]])}, {"ranks": {"a": 1}})
    with pytest.raises(StateError, match="non-finite values .* in a"):
        state.save(tmp_path / "s.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- 3. concurrent jobs on one store key -----------------------------------------------------------------------------
def test_concurrent_jobs_on_one_key_share_one_state(tmp_path, tiny_llama_dir):
    """The second job starts while the first holds the lock and is held inside its first forward (a gate file,
    not a guessed sleep), so it must find the lock taken, wait, and then get the first one's state."""
    from filelock import FileLock, Timeout

    store, gate = tmp_path / "store", tmp_path / "gate"
    cfg = write_config(tmp_path / "job.yaml", **tiny_job(
        tiny_llama_dir, eva={"tau": 1.0, "max_batches": 6}, output={"store": str(store), "checkpoint_every": 2},
        hooks={"forward_fn": "rel_helpers:gated_forward"}))
    cmd = [sys.executable, "-m", "evapipe.compute", "--config", str(cfg), "--no-progress"]
    env = dict(ENV, EVAPIPE_TEST_GATE=str(gate))
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reached = Path(f"{gate}.reached")
    deadline = time.monotonic() + 300
    while not reached.exists() and first.poll() is None and time.monotonic() < deadline:  # in its first forward
        time.sleep(0.02)
    assert reached.exists() and first.poll() is None, first.stderr.read() if first.poll() is not None else "timeout"
    (lock,) = store.glob(".locks/*.lock")
    with pytest.raises(Timeout):  # the first job holds the store key's lock
        FileLock(str(lock)).acquire(timeout=0)
    second = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, waiting = [], threading.Event()

    def read_second() -> None:
        for line in second.stderr:
            lines.append(line)
            if "is running in another process" in line:
                waiting.set()

    reader = threading.Thread(target=read_second, daemon=True)
    reader.start()
    assert waiting.wait(300), "".join(lines)  # the second job saw the lock taken ...
    gate.touch()  # ... and only then may the first one go on
    second.wait(timeout=300)
    reader.join(timeout=60)
    out1, out2 = first.communicate(timeout=300)[1], "".join(lines)
    assert first.returncode == 0 and second.returncode == 0, out1 + out2
    assert "the same job (store key" in out2 and "is running in another process" in out2
    assert "cache hit" in out2 and "cache hit" not in out1
    (entry,) = [p for p in store.rglob("eva.safetensors")]
    assert sorted(p.name for p in entry.parent.iterdir()) == ["eva.safetensors", "eva.spectrum.safetensors"]
    state = load_state(entry)
    assert state.spectrum and state.meta["batches"] == 6  # the sidecar is the state's own


# -- 5. failures outside the agreed paths ----------------------------------------------------------------------------
def test_malformed_checkpoint_mark_is_one_clear_error(tmp_path, tiny_llama_dir):
    from evapipe.states.checkpoint import checkpoint_dir

    out = tmp_path / "o.safetensors"
    step = checkpoint_dir(out) / "step-00000002"
    step.mkdir(parents=True)
    attrs = {"format": "evapipe.checkpoint", "version": 1, "complete": True, "world_size": 1, "job": {}, "loop": {}}
    (step / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}))
    with pytest.raises(ConfigError, match="is malformed .*--restart"):
        run_job(config_from_dict(tiny_job(tiny_llama_dir, output={"path": str(out), "checkpoint_every": 2})),
                show_progress=False)


def test_dataset_fingerprint_streams_and_ignores_storage_chunks(monkeypatch):
    import datasets

    from evapipe.data import tables as data

    rows = {"text": [f"row {i}" for i in range(50)]}
    whole = datasets.Dataset.from_dict(rows)
    halves = datasets.concatenate_datasets([datasets.Dataset.from_dict({"text": rows["text"][:17]}),
                                            datasets.Dataset.from_dict({"text": rows["text"][17:]})])
    changed = datasets.Dataset.from_dict({"text": rows["text"][:-1] + ["other"]})
    monkeypatch.setattr(data, "FINGERPRINT_ROWS", 8)  # several blocks
    seen = []
    real = data._arrow_batches
    monkeypatch.setattr(data, "_arrow_batches", lambda ds, cols: (seen.append(t.num_rows) or t for t in real(ds, cols)))
    fp = data.dataset_fingerprint(whole, ["text"])
    assert max(seen) == 8  # never more than one block in memory
    assert data.dataset_fingerprint(halves, ["text"]) == fp != data.dataset_fingerprint(changed, ["text"])


def test_dataset_fingerprint_is_taken_before_the_work(tmp_path, tiny_llama_dir, monkeypatch):
    from evapipe.data import tables as data
    from evapipe.run import engine

    def broken(ds, columns):
        raise MemoryError("fingerprint")

    steps = []
    monkeypatch.setattr(data, "dataset_fingerprint", broken)
    monkeypatch.setattr(engine.EvaRun, "step", lambda self, *a: steps.append(1))
    with pytest.raises(MemoryError):
        run_job(config_from_dict(tiny_job(tiny_llama_dir, output={"path": str(tmp_path / "o.safetensors")})),
                show_progress=False)
    assert steps == []  # nothing computed that the failure could lose


# -- 6. state/sidecar crash consistency ------------------------------------------------------------------------------
def spectral_state(task: str = "t") -> EvaState:
    g = torch.Generator().manual_seed(len(task))
    meta = {"format": "evapipe.eva", "format_version": 2, "task": task, "r": 1, "lora_alpha": 1.0,
            "ranks": {"a": 1}, "in_features": {"a": 3}, "layer_r": {"a": 1}, "layer_alpha": {"a": 1.0},
            "rank_pattern": {}, "alpha_pattern": {}, "explained_variance": {"a": [0.5]}, "converged": {"a": True}}
    return EvaState({"a": torch.randn(1, 3, generator=g)}, meta,
                    {"a.components": torch.randn(1, 3, generator=g), "a.singular_values": torch.ones(1)})


def test_crash_between_the_renames_leaves_a_matching_pair(tmp_path, monkeypatch):
    path = spectral_state("old").save(tmp_path / "s.safetensors")
    real, calls = os.replace, []

    def crash_at_the_sidecar_rename(src, dst):
        calls.append(dst)
        if Path(dst) == spectrum_path(path):
            raise KeyboardInterrupt  # the process dies between the state's rename and the sidecar's
        real(src, dst)

    new = spectral_state("new")
    monkeypatch.setattr(os, "replace", crash_at_the_sidecar_rename)
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    monkeypatch.setattr(os, "replace", real)
    back = load_state(path)
    assert back.meta["task"] == "new" and torch.equal(back.spectrum["a.components"], new.spectrum["a.components"])
    assert pending_spectrum_path(path, back.meta["spectrum_id"]).is_file()
    spectral_state("next").save(path)  # the next save clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors", "s.spectrum.safetensors"]


def test_a_state_without_spectrum_never_takes_a_stale_sidecar(tmp_path):
    path = spectral_state().save(tmp_path / "s.safetensors")
    plain = spectral_state("plain")
    plain.spectrum = {}
    plain.save(path)  # as `convert` writes over an existing path
    assert not spectrum_path(path).exists() and load_state(path).spectrum == {}
    spectral_state().save(tmp_path / "other.safetensors")
    spectrum_path(path).write_bytes(spectrum_path(tmp_path / "other.safetensors").read_bytes())
    assert load_state(path).spectrum == {}  # its id is None, the sidecar's is not


# -- 7. lying or malformed metadata ----------------------------------------------------------------------------------
def forged(path: Path, tensors: dict, **meta) -> Path:
    """A state file written around evapipe's own checks (no checksum: as an older evapipe or a hand edit)."""
    from safetensors.torch import save_file

    base = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in spectral_state().meta.items()}
    base.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    save_file(tensors, str(path), metadata=base)
    return path


def raw_header_file(path: Path, header: dict) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob)
    return path


@pytest.mark.parametrize("case", ["list-metadata", "non-string", "ranks-vs-tensors", "narrow", "missing-tensor",
                                  "ranks-not-a-mapping", "int-tensor"])
def test_lying_metadata_is_one_clear_error(tmp_path, case):
    t = {"a": torch.ones(1, 3)}
    path = tmp_path / "s.safetensors"
    if case == "list-metadata":
        raw_header_file(path, {"__metadata__": ["format", "evapipe.eva"]})
    elif case == "non-string":
        raw_header_file(path, {"__metadata__": {"format": "evapipe.eva", "format_version": 2}})
    elif case == "ranks-vs-tensors":
        forged(path, t, ranks={"a": 2})
    elif case == "narrow":
        forged(path, {"a": torch.ones(1, 2)})
    elif case == "missing-tensor":
        forged(path, t, ranks={"a": 1, "b": 1}, in_features={"a": 3, "b": 3}, layer_r={"a": 1, "b": 1},
               layer_alpha={"a": 1, "b": 1}, explained_variance={"a": [], "b": []}, converged={"a": 1, "b": 1})
    elif case == "ranks-not-a-mapping":
        forged(path, t, ranks=[1])
    elif case == "int-tensor":
        forged(path, {"a": torch.ones(1, 3, dtype=torch.int32)})
    with pytest.raises(StateError):
        load_state(path)
    one_line_error(["show", str(path)])
    if case == "missing-tensor":  # convert used to write a zero-row tensor for it
        one_line_error(["convert", str(path), str(tmp_path / "p.pt")])
        assert not (tmp_path / "p.pt").exists()


def test_list_marks_unreadable_entries_and_lookup_sets_them_aside(tmp_path):
    good = spectral_state("good").save(tmp_path / "good" / "eva.safetensors")
    bad = tmp_path / "bad" / "eva.safetensors"
    bad.parent.mkdir()
    raw_header_file(bad, {"__metadata__": {"format": "evapipe.eva", "ranks": "[1]", "format_version": "2"}})
    entries = list_states(tmp_path)
    assert [e.task for e in entries if not e.error] == ["good"] and [e.path for e in entries if e.error] == [bad]
    run = CliRunner().invoke(main, ["list", str(tmp_path)])
    assert run.exit_code == 0 and "UNREADABLE" in run.output and "good" in run.output
    content = bad.read_bytes()
    assert lookup(bad, "somekey") is None and not bad.exists()
    (aside,) = bad.parent.glob("eva.safetensors.unreadable-*")
    assert aside.read_bytes() == content  # kept, not deleted
    assert lookup(good, "other-key") is None and list(good.parent.glob("eva.safetensors.unreadable-*"))


# -- 8. task names ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["../../x", "a/b", "..", "a\\b", ".hidden", "x/../../y"])
def test_task_names_cannot_climb_out_of_the_store(tmp_path, tiny_llama_dir, task):
    with pytest.raises(ConfigError, match="`task` must be a plain name"):
        config_from_dict(tiny_job(tiny_llama_dir, task=task, output={"store": str(tmp_path / "store")}))


# -- 9. the store key sees what the loader reads ---------------------------------------------------------------------
def test_hidden_data_files_are_neither_read_nor_keyed(tmp_path, tiny_llama_dir):
    from evapipe.data.tables import load_task_data

    folder = tmp_path / "data"
    folder.mkdir()
    jsonl(folder / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    (folder / ".ipynb_checkpoints").mkdir()
    jsonl(folder / ".ipynb_checkpoints" / "a-checkpoint.jsonl", [{"text": "stale"}])
    cfg = config_from_dict(tiny_job(tiny_llama_dir, data={"path": str(folder), "max_samples": None},
                                    output={"path": "o.safetensors"}))
    assert load_task_data(cfg.data)[0]["text"] == ["one", "two"]
    key = job_key(cfg)
    jsonl(folder / ".ipynb_checkpoints" / "a-checkpoint.jsonl", [{"text": "changed"}])
    assert job_key(cfg) == key
    jsonl(folder / "a.jsonl", [{"text": "one"}, {"text": "three"}])
    assert job_key(cfg) != key


def test_hooks_are_keyed_by_their_source(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    hook = tmp_path / "my_hooks_for_key.py"
    hook.write_text("def fwd(model, inputs):\n    return model(**inputs)\n")
    cfg = config_from_dict(tiny_job(tiny_llama_dir, hooks={"forward_fn": "my_hooks_for_key:fwd"},
                                    output={"path": "o.safetensors"}))
    key = job_key(cfg)
    hook.write_text("def fwd(model, inputs):\n    return model(input_ids=inputs['input_ids'])\n")
    assert job_key(cfg) != key
    assert "my_hooks_for_key" not in sys.modules  # found on sys.path, never imported for the key


# -- 10. silent overwrites -------------------------------------------------------------------------------------------
def test_rebudget_and_convert_refuse_to_overwrite_without_the_flag(tmp_path):
    fixture = REPO / "tests" / "fixtures" / "state_v2.safetensors"
    out = tmp_path / "small.safetensors"
    out.write_text("precious")
    one_line_error(["rebudget", "--state", str(fixture), "--r", "1", "--output", str(out)])
    assert out.read_text() == "precious"
    assert CliRunner().invoke(main, ["rebudget", "--state", str(fixture), "--r", "1", "--output", str(out),
                                     "--overwrite"]).exit_code == 0
    assert read_metadata(out)["r"] == 1
    dst = tmp_path / "peft.pt"
    dst.write_text("precious")
    one_line_error(["convert", str(fixture), str(dst)])
    assert dst.read_text() == "precious"
    assert CliRunner().invoke(main, ["convert", str(fixture), str(dst), "--overwrite"]).exit_code == 0


def test_apply_overwrite_keeps_unrelated_files_and_other_backups(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from evapipe.adapters.apply import apply_eva_state, save_adapter

    model, batches = tiny_batches(tiny_llama_dir)
    state = compute_eva_state(model, batches, r=2, target_modules=["q_proj"], max_batches=2, on_unconverged="warn",
                              show_progress=False)
    out = tmp_path / "adapter"
    save_adapter(apply_eva_state(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), state), out, state)
    (out / "train_log.txt").write_text("epoch 1")
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-10" / "optimizer.pt").write_text("opt")
    other_backup = tmp_path / ".adapter.old"  # what another apply to the same output may hold
    other_backup.mkdir()
    (other_backup / "x").write_text("theirs")
    before = (out / "adapter_model.safetensors").stat().st_mtime_ns
    save_adapter(apply_eva_state(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), state), out, state,
                 overwrite=True)
    assert (out / "train_log.txt").read_text() == "epoch 1"
    assert (out / "checkpoint-10" / "optimizer.pt").read_text() == "opt"
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns >= before
    assert (other_backup / "x").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.old", "adapter"]


# -- 11. null text values --------------------------------------------------------------------------------------------
def test_null_text_rows_are_skipped_and_counted(tmp_path, tiny_llama_dir):
    from evapipe.states.report import job_summary

    rows = [{"text": f"where is my order {i}"} for i in range(12)]
    rows[3]["text"] = rows[7]["text"] = None
    job = tiny_job(tiny_llama_dir, data={"path": jsonl(tmp_path / "t.jsonl", rows), "max_samples": None},
                   output={"path": str(tmp_path / "o.safetensors")})
    result = run_job(config_from_dict(job), show_progress=False)
    dataset = result.state.meta["dataset"]
    assert dataset["samples"] == 10 and dataset["skipped_null_rows"] == 2
    assert "2 rows with a null text skipped" in job_summary(result.state.meta, [], 1.0, result.path)
    pairs = [{"prompt": None if i % 2 else "q", "completion": "a"} for i in range(4)]
    job["data"].update(path=jsonl(tmp_path / "p.jsonl", pairs), prompt_field="prompt", completion_field="completion")
    assert run_job(config_from_dict(job), show_progress=False).state.meta["dataset"]["skipped_null_rows"] == 2
    job["data"]["path"] = jsonl(tmp_path / "n.jsonl", [{"prompt": None, "completion": "a"}] * 3)
    with pytest.raises(DataError, match="every row of .* has a null prompt or completion"):
        run_job(config_from_dict(job), show_progress=False)


# -- 12. numerics ----------------------------------------------------------------------------------------------------
def exact_components(x: torch.Tensor, k: int) -> torch.Tensor:
    x = x.double()
    return torch.linalg.svd(x - x.mean(0), full_matrices=False)[2][:k]


def max_subspace_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - the smallest |cos| between matched components."""
    return float(1 - (a.double() * b.double()).sum(1).abs().min())


def test_large_mean_against_the_spread_keeps_the_components():
    """Inputs around 1e4 with a spread of 0.1: against the exact PCA of the same float32 inputs, the components are
    off by about 1e-8 (1 - |cos|) when centred first, about 1e-5 with raw float32 products (the code before)."""
    from evapipe.eva import ipca

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(96, 4, generator=g, dtype=torch.float64))[0].T
    scales = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    batches = [((torch.randn(200, 4, generator=g, dtype=torch.float64) * scales) @ basis
                + 0.001 * torch.randn(200, 96, generator=g, dtype=torch.float64) + 1e4).float() for _ in range(6)]
    state = ipca.new_state(96, 4, None, seed=0)
    for b in batches:
        ipca.update_many([state], [b])
    ref = exact_components(torch.cat(batches), 4)
    assert max_subspace_error(state.top(4), ref) < 1e-6


def test_rank_deficient_batches_stay_on_the_bounded_path(monkeypatch):
    from evapipe.eva import ipca

    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(128, 3, generator=g, dtype=torch.float64))[0].T
    batches = [(torch.randn(400, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0],
               dtype=torch.float64)) @ basis for _ in range(4)]  # rank 3 in 128 features, 400 rows a batch
    dense = []
    monkeypatch.setattr(ipca, "_exact", lambda layers, k: dense.append(1) or (_ for _ in ()).throw(AssertionError))
    state = ipca.new_state(128, 4, None, seed=0)
    for b in batches:
        ipca.update_many([state], [b.float()])
    assert dense == []  # no dense (rows x features) float64 SVD of the batch
    ref = exact_components(torch.cat(batches), 3)
    assert max_subspace_error(state.top(3), ref) < 1e-4
    assert float(state.singular_values[3]) < 1e-3 * float(state.singular_values[0])  # the 4th is (numerically) zero
