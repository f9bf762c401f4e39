"""The config-driven job end to end: state file contents, CLI entry points, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import REPO, write_config
from evapipe import load_config, load_state, read_metadata, run_job
from evapipe.core.errors import ConfigError, DataError, StateError

REQUIRED_META = [
    "format", "format_version", "task", "r", "lora_alpha", "rho", "tau", "whiten", "adjust_scaling_factors",
    "target_modules", "rank_pattern", "alpha_pattern", "explained_variance", "converged", "tokens", "batches",
    "world_size", "model", "dataset", "versions", "created",
]


def small_job(tmp_path, **eva):
    out = tmp_path / "state.safetensors"
    cfg = load_config(REPO / "configs" / "default.yaml", [f"output.path={out}", "data.max_samples=96"]
                      + [f"eva.{k}={v}" for k, v in eva.items()])
    return cfg, out


@pytest.fixture(scope="module")
def default_state(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    cfg, out = small_job(tmp, rank_pattern="{'layer\\.5\\.output\\.dense': 0}")
    result = run_job(cfg, show_progress=False)
    return result, out


def test_state_file_says_what_it_is(default_state):
    result, out = default_state
    assert result.path == out and out.is_file()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    with safe_open(str(out), "pt") as f:
        raw = f.metadata()
        keys = list(f.keys())
    assert all(isinstance(v, str) for v in raw.values())
    meta = read_metadata(out)
    for key in REQUIRED_META:
        assert key in meta, key
    assert meta["format"] == "evapipe.eva" and meta["task"] == "support-intents" and meta["world_size"] == 1
    assert meta["model"]["class"] == "BertModel" and len(meta["model"]["fingerprint"]) == 16
    assert meta["dataset"]["split"] == "train" and meta["dataset"]["fingerprint"]
    assert set(meta["versions"]) >= {"evapipe", "torch", "transformers"}
    assert meta["tokens"] > 0 and meta["batches"] >= 2
    # keys are base-model module names; the rank-0 layer has no tensor but is in the metadata
    assert len(meta["ranks"]) == 36
    assert meta["ranks"]["encoder.layer.5.output.dense"] == 0
    assert "encoder.layer.5.output.dense" not in keys
    assert set(keys) == {k for k, r in meta["ranks"].items() if r > 0}
    assert sum(meta["ranks"].values()) == 35 * 8
    state = load_state(out)
    for name, a in state.tensors.items():
        assert a.dtype == torch.float32 and a.shape == (meta["ranks"][name], meta["in_features"][name])
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-4)  # orthonormal rows (no whitening)
        assert len(meta["explained_variance"][name]) == meta["max_components"][name]
    for name, rank in meta["ranks"].items():
        if rank not in (0, 8):
            assert meta["rank_pattern"][name] == rank
            assert meta["alpha_pattern"][name] == pytest.approx(8.0 * rank / 8)


def test_state_for_another_use_is_rejected(tmp_path):
    (tmp_path / "other.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(StateError, match="not an evapipe EVA state"):
        load_state(tmp_path / "plain.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(b"\xff\xff\xff")
    with pytest.raises(StateError, match="truncated or corrupt"):
        load_state(tmp_path / "trunc.safetensors")
    with pytest.raises(StateError, match="not found"):
        load_state(tmp_path / "missing.safetensors")


def test_cli_runs_the_job_and_show_reads_it(tmp_path, default_state):
    _, out = default_state
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    shown = subprocess.run([sys.executable, "-m", "evapipe.cli", "show", str(out)], capture_output=True, text=True,
                           env=env, check=True)
    assert "encoder.layer.0.attention.self.query" in shown.stdout and "rank" in shown.stdout
    as_json = subprocess.run([sys.executable, "-m", "evapipe.cli", "show", "--json", str(out)], capture_output=True,
                             text=True, env=env, check=True)
    assert json.loads(as_json.stdout)["format"] == "evapipe.eva"
    cfg = write_config(tmp_path / "tiny.yaml", task="t", data={"path": "builtin:support_intents", "max_samples": 24},
                       eva={"target_modules": ["query", "value"], "max_batches": 2, "on_unconverged": "warn"},
                       output={"path": str(tmp_path / "cli.safetensors")})
    run = subprocess.run([sys.executable, "-m", "evapipe.compute", "--config", str(cfg), "--set", "eva.r=4",
                          "--no-progress"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "done in" in run.stdout and "cli.safetensors" in run.stdout  # the result on stdout, logs on stderr
    assert read_metadata(tmp_path / "cli.safetensors")["r"] == 4


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["data.path=/nonexistent/data.jsonl"], DataError, "data file not found"),
        (["data.text_field=body"], DataError, "has no column `body`"),
        (["eva.target_modules=[qurey]"], ConfigError, "closest: query"),
        (["eva.target_modules=nomatch.*"], ConfigError, "matches no linear layer"),
        (["hooks.forward_fn=nomodule:fn"], ConfigError, "cannot import"),
        (["model.name_or_path=/nonexistent/model"], ConfigError, "cannot load model config"),
        (["eva.max_batches=1"], Exception, "had not converged after 1 batches"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, overrides, error, message):
    out = tmp_path / "state.safetensors"
    cfg = load_config(REPO / "configs" / "default.yaml", [f"output.path={out}", "data.max_samples=16"] + overrides)
    with pytest.raises(error, match=message.replace("[", r"\[")):
        run_job(cfg, show_progress=False)
    assert not out.exists()


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = load_config(REPO / "configs" / "default.yaml", [f"data.path={empty}", f"output.path={tmp_path / 'o.safetensors'}"])
    with pytest.raises(DataError):
        run_job(cfg, show_progress=False)


def test_empty_data_files_are_named_or_skipped(tmp_path):
    """An empty file alone is a clear error (datasets fails with no message); beside real data it is skipped."""
    from evapipe.core.config import DataConfig
    from evapipe.data.tables import load_task_data

    for name in ("empty.jsonl", "empty.csv", "empty.txt"):
        (tmp_path / name).write_text("")
        with pytest.raises(DataError, match=f"is empty: .*{name} has no content"):
            load_task_data(DataConfig(path=str(tmp_path / name)))
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (folder / "b.jsonl").write_text("")
    assert load_task_data(DataConfig(path=str(folder)))[0]["text"] == ["one", "two"]


def test_target_that_matches_nothing_names_the_closest_layers():
    from torch import nn

    from evapipe.model.targets import resolve_targets

    model = nn.ModuleDict({"block": nn.ModuleDict({"q_proj": nn.Linear(4, 4), "v_proj": nn.Linear(4, 4)})})
    with pytest.raises(ConfigError, match=r"'blok.q_proj' matches no linear layer of the model \(closest: block\.q"):
        resolve_targets(model, "blok.q_proj")
    with pytest.raises(ConfigError, match="entry `q_proj` matches no linear layer of the model that eva.exclude"):
        resolve_targets(model, ["q_proj"], exclude_modules=["q_proj"])
    with pytest.raises(ConfigError, match="'all-linear' matches no linear layer of the model that eva.exclude"):
        resolve_targets(model, "all-linear", exclude_modules=".*")


def test_missing_local_model_folder_is_named(tmp_path):
    from evapipe.core.sources import resolve_model_path

    with pytest.raises(ConfigError, match="no such local directory"):
        resolve_model_path(str(tmp_path / "no-model"))
    assert resolve_model_path("org/model") == "org/model"  # hub ids pass through


def test_crash_during_write_keeps_old_state(tmp_path, default_state, monkeypatch):
    _, out = default_state
    target = tmp_path / "keep.safetensors"
    target.write_bytes(out.read_bytes())
    before = target.read_bytes()
    state = load_state(out)
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        state.save(target)
    assert target.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_summary_names_processes_as_processes(tmp_path):
    """"rank" in the summary is only the LoRA rank; each process's line says "process N"."""
    from types import SimpleNamespace

    from evapipe.states.report import job_summary

    meta = {"ranks": {"a": 0, "b": 4}, "layer_r": {"a": 2, "b": 2}, "tokens": 30, "batches": 2, "lora_alpha": 2,
            "alpha_pattern": {}, "explained_variance": {}, "converged": {"a": True, "b": True},
            "in_features": {"a": 8, "b": 8}}
    stats = [SimpleNamespace(rank=r, tokens=15, forward_s=0.1, svd_s=0.2, owned=["b"], pca_tokens=15, comm_s=0.0)
             for r in (0, 1)]
    text = job_summary(meta, stats, 1.0, tmp_path / "x")
    assert "1 layers at LoRA rank 0" in text and "total LoRA rank 4" in text
    assert [ln.split(":")[0] for ln in text.splitlines() if ln.startswith("process")] == ["process 0", "process 1"]
    assert not [ln for ln in text.splitlines() if ln.startswith("rank ")]
