"""Bad input to every command that reads a file a user hands it is one clear line (issue 21).

Each command (check, apply, show, list, convert both ways, rebudget, estimate, compute) gets each of its input
files missing, empty, truncated and of the wrong kind; the answer is exit status 2 and one `error: ...` line that
names the file, never a traceback. And every file a job config names is checked before any weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import tiny_job, write_config
from evapipe import apply_to_directory, config_from_dict, run_job
from evapipe.adapters.convert import convert_file
from evapipe.cli import main
from evapipe.core.errors import ConfigError, DataError

KINDS = ("missing", "empty", "truncated", "wrong-kind")


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """One good file of each kind the commands read: a state, a PEFT state dict, an adapter directory, a config."""
    tmp = tmp_path_factory.mktemp("good")
    job = tiny_job(tiny_llama_dir, output={"path": str(tmp / "state.safetensors")})
    state = run_job(config_from_dict(job), show_progress=False).path
    adapter = apply_to_directory(state, tmp / "adapter", device="cpu")[0]
    convert_file(state, tmp / "state.pt")
    config = write_config(tmp / "job.yaml", **job)
    return {"state": state, "peft": tmp / "state.pt", "adapter": adapter, "config": config}


def bad_file(good: Path, kind: str, where: Path, other: Path) -> Path:
    """`good` made bad in one way, under `where` with the same name: missing, empty, cut in half, or `other` (a
    file of another kind) in its place."""
    path = where / good.name
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "wrong-kind":
        path.write_bytes(other.read_bytes())
    return path


def bad_adapter(good: Path, kind: str, where: Path) -> Path:
    """An adapter directory made bad: missing, an empty folder, its weights cut in half, or a config that is not
    JSON (a foreign file in its place)."""
    path = where / "adapter"
    if kind == "missing":
        return path
    path.mkdir()
    if kind == "empty":
        return path
    for item in good.iterdir():
        (path / item.name).write_bytes(item.read_bytes())
    if kind == "truncated":
        weights = path / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
    else:
        (path / "adapter_config.json").write_bytes((good / "adapter_model.safetensors").read_bytes()[:64])
    return path


def one_line_error(args: list[str], names: Path) -> str:
    run = CliRunner().invoke(main, [str(a) for a in args])
    assert run.exit_code == 2, run.output
    assert "Traceback" not in run.output and run.output.startswith("error: "), run.output
    assert len(run.output.strip().splitlines()) == 1, run.output
    assert names.name in run.output, run.output
    return run.output


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["show", "apply", "rebudget", "convert-to-peft"])
def test_commands_reading_a_state(command, kind, good, tmp_path):
    state = bad_file(good["state"], kind, tmp_path, other=good["adapter"] / "adapter_model.safetensors")
    args = {
        "show": ["show", state],
        "apply": ["apply", "--state", state, "--output", tmp_path / "out", "--device", "cpu"],
        "rebudget": ["rebudget", "--state", state, "--r", 1, "--output", tmp_path / "out.safetensors"],
        "convert-to-peft": ["convert", state, tmp_path / "out.pt"],
    }[command]
    one_line_error(args, state)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_convert_reading_a_peft_file(kind, good, tmp_path):
    peft = bad_file(good["peft"], kind, tmp_path, other=good["config"])
    one_line_error(["convert", peft, tmp_path / "out.safetensors", "--r", 2], peft)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["estimate", "compute"])
def test_commands_reading_a_config(command, kind, good, tmp_path):
    config = bad_file(good["config"], kind, tmp_path, other=good["state"])
    one_line_error([command, "--config", config], config)


@pytest.mark.parametrize("kind", KINDS)
def test_check_reading_an_adapter_directory(kind, good, tmp_path):
    adapter = bad_adapter(good["adapter"], kind, tmp_path)
    one_line_error(["check", "--adapter", adapter], adapter)


def test_check_refuses_a_file_and_a_non_lora_adapter(good, tmp_path):
    one_line_error(["check", "--adapter", good["state"]], good["state"])
    other = tmp_path / "ia3"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    assert "not a LoRA adapter config" in one_line_error(["check", "--adapter", other], other)
    provenance = bad_adapter(good["adapter"], "truncated", tmp_path)
    (provenance / "adapter_model.safetensors").write_bytes((good["adapter"] / "adapter_model.safetensors").read_bytes())
    (provenance / "evapipe.json").write_text("{")
    one_line_error(["check", "--adapter", provenance], provenance)


@pytest.mark.parametrize("kind", KINDS)
def test_list_reading_a_directory(kind, good, tmp_path):
    """A missing folder or a file is an error; an empty folder lists nothing, and a truncated or foreign state is
    listed as UNREADABLE among the good ones (list is how one finds them)."""
    folder = tmp_path / "store"
    if kind == "missing":
        one_line_error(["list", folder], folder)
        return
    if kind == "wrong-kind":
        one_line_error(["list", good["state"]], good["state"])
        return
    folder.mkdir()
    if kind == "truncated":
        bad_file(good["state"], kind, folder, other=good["state"])
    run = CliRunner().invoke(main, ["list", str(folder)])
    assert run.exit_code == 0 and "Traceback" not in run.output, run.output
    assert ("UNREADABLE" in run.output) == (kind == "truncated"), run.output
    assert kind == "truncated" or run.output.strip() == "no states found"


@pytest.mark.parametrize("case", ["data", "data-streaming", "data-empty", "model", "hook"])
def test_every_file_a_config_names_is_checked_before_any_weight_is_read(case, tiny_llama_dir, tmp_path,
                                                                        monkeypatch):
    """Data files (with data.streaming too), the model folder and hook modules fail before the model is loaded."""
    import evapipe.model.loading

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was read before the inputs were checked")

    monkeypatch.setattr(evapipe.model.loading, "load_model", no_weights)
    monkeypatch.setattr(evapipe.model.loading, "load_blocks", no_weights)
    job = tiny_job(tiny_llama_dir, output={"path": str(tmp_path / "o.safetensors")})
    missing = str(tmp_path / "missing.jsonl")
    if case.startswith("data"):
        job["data"]["path"] = missing
        job["data"]["streaming"] = case == "data-streaming"
    if case == "data-empty":
        (tmp_path / "missing.jsonl").write_text("")
    if case == "model":
        job["model"]["name_or_path"] = str(tmp_path / "no-model")
    if case == "hook":
        job["hooks"] = {"forward_fn": "no_such_module_here:forward"}
    error, message = {"data": (DataError, "data file not found"), "data-streaming": (DataError, "data file not found"),
                      "data-empty": (DataError, "is empty"), "model": (ConfigError, "no such local directory"),
                      "hook": (ConfigError, "hooks.forward_fn")}[case]
    with pytest.raises(error, match=message):
        run_job(config_from_dict(job), show_progress=False)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    run = CliRunner().invoke(main, ["compute", "--config", str(config)])
    assert run.exit_code == 2 and run.output.startswith("error: ") and len(run.output.splitlines()) == 1, run.output
