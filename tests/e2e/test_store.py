"""The per-task store: key semantics, cache hits without a forward pass (or torch), layout, list and inspect."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from click.testing import CliRunner

from conftest import REPO, tiny_job, write_config
from evapipe import config_from_dict, load_state, read_metadata, run_job
from evapipe.cli import main
from evapipe.states.metadata import FORMAT_VERSION
from evapipe.states.store import STATE_FILE, job_key, list_states, model_slug, state_dir

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def cfg_for(llama_dir, task="t", **sections):
    return config_from_dict(tiny_job(llama_dir, task, **sections))


def test_key_follows_what_changes_the_result(tmp_path, tiny_llama_dir):
    data = tmp_path / "a" / "rows.jsonl"
    data.parent.mkdir()
    shutil.copy(REPO / "evapipe" / "assets" / "support_intents.jsonl", data)
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    base = tiny_job(str(model), data={"path": str(data), "batch_size": 8}, output={"store": "s"})

    def key(world=1, **sections):
        job = json.loads(json.dumps(base))
        for name, values in sections.items():
            job[name] = {**job.get(name, {}), **values} if isinstance(values, dict) else values
        return job_key(config_from_dict(job), world)

    k = key()
    assert len(k) == 12 and key() == k
    same = [dict(output={"path": "elsewhere.safetensors", "checkpoint_every": 3, "store": "s"}),
            dict(model={"device": "cpu"}), dict(eva={"on_unconverged": "error"}), dict(distributed={"timeout_s": 5.0}),
            dict(world=2, data={"batch_size": 4}),  # same global batch, same token order
            dict(task="other")]  # the task names the store folder, not the key
    for change in same:
        assert key(**change) == k, change
    changed = [dict(eva={"r": 3}), dict(eva={"tau": 0.5}), dict(eva={"lora_alpha": 2.0}), dict(eva={"whiten": True}),
               dict(eva={"target_modules": ["q_proj"]}), dict(eva={"rank_pattern": {"q_proj": 1}}),
               dict(eva={"max_batches": 9}), dict(eva={"oversample": 4}), dict(eva={"use_label_mask": False}),
               dict(data={"seed": 1}), dict(data={"shuffle": False}), dict(data={"max_length": 16}),
               dict(data={"max_samples": 12}), dict(data={"text_field": "body"}), dict(world=2),
               dict(model={"dtype": "bfloat16"}), dict(model={"kind": "encoder"}), dict(hooks={"forward_fn": "x:y"})]
    for change in changed:
        assert key(**change) != k, change
    # data: the bytes count, not where they are
    moved = tmp_path / "b" / "other-name.jsonl"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    assert key(data={"path": str(moved)}) == k
    assert key(data={"path": str(moved.parent)}) == k  # a folder of the same single file
    moved.write_text(moved.read_text() + '{"text": "one more"}\n')
    assert key(data={"path": str(moved)}) != k
    # model folder: load/save-only config keys do not count, the architecture and the weights do
    cfg_path = model / "config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**raw, "transformers_version": "0.0.1", "use_cache": False}, indent=4))
    assert key() == k
    cfg_path.write_text(json.dumps({**raw, "rms_norm_eps": 1e-3}))
    assert key() != k
    cfg_path.write_text(json.dumps(raw))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x40")  # last norm weight 1.0 -> 2.0
    assert key() != k


def test_key_and_cache_hit_need_no_torch(tmp_path, tiny_llama_dir):
    store = tmp_path / "store"
    cfg_path = write_config(tmp_path / "job.yaml", **tiny_job(tiny_llama_dir, output={"store": str(store)}))
    first = run_job(config_from_dict(tiny_job(tiny_llama_dir, output={"store": str(store)})), show_progress=False)
    assert not first.cached
    script = (
        "import sys\n"
        "from evapipe import load_config, run_job\n"
        f"r = run_job(load_config({str(cfg_path)!r}))\n"
        "print(r.cached, r.path, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, check=True)
    cached, path, torch_imported, transformers_imported = out.stdout.split()
    assert cached == "True" and path == str(first.path) and torch_imported == "False", out.stdout
    assert transformers_imported == "False", out.stdout
    assert "cache hit:" in out.stderr and "no forward pass" in out.stderr


def test_store_layout_cache_hit_and_force(tmp_path, tiny_llama_dir, monkeypatch):
    store = tmp_path / "store"
    cfg = cfg_for(tiny_llama_dir, output={"store": str(store)})
    first = run_job(cfg, show_progress=False)
    key = job_key(cfg)
    expected = store / "t" / model_slug(tiny_llama_dir) / key / STATE_FILE
    assert first.path == expected == state_dir(store, cfg, key) / STATE_FILE and not first.cached
    meta = read_metadata(expected)
    assert meta["store_key"] == key and meta["task"] == "t" and meta["format_version"] == FORMAT_VERSION
    before = expected.read_bytes()

    import evapipe.model.loading
    import evapipe.run.engine

    def no_forward(*a, **k):
        raise AssertionError("a cache hit must not load the model or run a forward pass")

    monkeypatch.setattr(evapipe.model.loading, "load_model", no_forward)
    monkeypatch.setattr(evapipe.run.engine.EvaRun, "step", no_forward)
    copy = tmp_path / "copy" / "eva.safetensors"
    again = run_job(cfg_for(tiny_llama_dir, output={"store": str(store), "path": str(copy)}), show_progress=False)
    assert again.cached and again.path == expected and again.state is None
    assert expected.read_bytes() == before and copy.read_bytes() == before  # output.path gets the stored state
    assert load_state(copy).spectrum
    monkeypatch.undo()
    forced = run_job(cfg, show_progress=False, force=True)
    assert not forced.cached and forced.path == expected
    assert read_metadata(expected)["created"] >= meta["created"]
    # an unreadable stored state is computed again, not trusted and not a crash
    expected.write_bytes(b"junk")
    redone = run_job(cfg, show_progress=False)
    assert not redone.cached and read_metadata(expected)["store_key"] == key


def test_tasks_and_models_side_by_side_and_list(tmp_path, tiny_llama_dir, monkeypatch):
    store = tmp_path / "store"
    other_model = tmp_path / "llama-b"
    shutil.copytree(tiny_llama_dir, other_model)
    jobs = [("intents", tiny_llama_dir, 2), ("faq", tiny_llama_dir, 2), ("intents", str(other_model), 3)]
    paths = []
    for task, model, r in jobs:
        cfg = cfg_for(model, task, eva={"r": r}, output={"store": str(store)})
        paths.append(run_job(cfg, show_progress=False).path)
    assert len(set(paths)) == 3
    assert {p.relative_to(store).parts[:2] for p in paths} == {
        ("intents", model_slug(tiny_llama_dir)), ("faq", model_slug(tiny_llama_dir)), ("intents", "llama-b")}
    entries = list_states(store)
    assert [e.task for e in entries] == ["faq", "intents", "intents"]  # sorted by task, then model
    assert sorted((e.task, e.model, e.r) for e in entries) == sorted(
        (task, model, r) for task, model, r in jobs)
    for e in entries:
        assert e.total_rank == e.r * 8 and e.tokens > 0 and e.size > e.path.stat().st_size and e.created
        assert e.key == e.path.parent.name and e.error is None
    (store / "broken").mkdir()
    (store / "broken" / "eva.safetensors").write_bytes(b"\x01")
    shutil.copy(other_model / "model.safetensors", store / "weights.safetensors")  # not a state: skipped
    runner = CliRunner()
    listed = runner.invoke(main, ["list", str(store)])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split()[:6] == ["task", "model", "r", "rho", "total", "rank"]
    assert sum("intents" in line for line in lines) == 2 and "UNREADABLE" in listed.output
    assert "weights.safetensors" not in listed.output
    monkeypatch.setenv("EVAPIPE_STORE", str(store))
    as_json = json.loads(runner.invoke(main, ["list", "--json"]).output)
    assert len(as_json) == 4 and {e["task"] for e in as_json} == {"intents", "faq", None}


def test_inspect_table_json_and_plot(tmp_path, tiny_llama_dir):
    state = run_job(cfg_for(tiny_llama_dir, output={"path": str(tmp_path / "s.safetensors")}), show_progress=False)
    runner = CliRunner()
    for command in ("show", "inspect"):
        shown = runner.invoke(main, [command, str(state.path)])
        assert shown.exit_code == 0, shown.output
        assert "model.layers.0.self_attn.q_proj" in shown.output and "explained" in shown.output
        assert f"store key {state.state.meta['store_key']}" in shown.output
    as_json = json.loads(runner.invoke(main, ["inspect", "--json", str(state.path)]).output)
    assert as_json["store_key"] == job_key(cfg_for(tiny_llama_dir, output={"path": "x"})) and as_json["format_version"] == FORMAT_VERSION
    png = tmp_path / "fig" / "layers.png"
    plotted = runner.invoke(main, ["inspect", str(state.path), "--plot", str(png)])
    assert plotted.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_compute_reports_the_cache_hit(tmp_path, tiny_llama_dir):
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "job.yaml", **tiny_job(tiny_llama_dir, output={"store": str(store)}))
    run_job(config_from_dict(tiny_job(tiny_llama_dir, output={"store": str(store)})), show_progress=False)
    hit = subprocess.run([sys.executable, "-X", "importtime", "-m", "evapipe.compute", "--config", str(cfg)],
                         capture_output=True, text=True, env=ENV)
    assert hit.returncode == 0, hit.stderr
    assert "cache hit:" in hit.stderr and str(store) in hit.stderr and "--force recomputes it" in hit.stderr
    # the launcher's cache hit imports neither torch nor the model code (-X importtime lists every import)
    imported = {line.split("|")[-1].strip() for line in hit.stderr.splitlines() if line.startswith("import time:")}
    assert "evapipe.states.store" in imported, sorted(m for m in imported if m.startswith("evapipe"))
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}
