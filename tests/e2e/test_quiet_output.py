"""Every command prints only evapipe's lines; results on stdout, progress and logs on stderr (issue 21).

Each command runs in a fresh process (dependencies print at import time) on the embedded default (the packaged
MiniLM and support-intents data), with a user's environment (only HF_HUB_OFFLINE set, as there is no network
here). stderr may hold only evapipe's log lines (`HH:MM:SS evapipe: ...`) and its own progress bar (`EVA: ...`);
stdout only the command's result, compared with what the command's own function produces.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO
from evapipe import read_metadata
from evapipe.cli import main
from evapipe.states.report import layer_table

EVAPIPE_STDERR = re.compile(r"^(\d\d:\d\d:\d\d evapipe: |EVA: )")
SUMMARY = re.compile(r"^(total LoRA rank \d+ over \d+ layers|process \d+: |(done|cache hit) in [\d.]+s -> )")
SMALL = ["--set", "data.max_samples=48", "--set", "eva.tau=0.5"]  # the default job, converged in a few batches


def user_env() -> dict[str, str]:
    """The environment a user has: none of the switches evapipe sets for itself or the test suite sets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "DATASETS_", "HF_"))}
    env.pop("TOKENIZERS_PARALLELISM", None)
    return env | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}


def run(cwd: Path, *args: str, module: str = "evapipe.cli") -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=user_env(),
                          cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def foreign_lines(stderr: str) -> list[str]:
    """stderr lines (progress bars redraw with \\r) that evapipe did not write."""
    return [ln for ln in re.split(r"[\r\n]+", stderr) if ln.strip() and not EVAPIPE_STDERR.match(ln.strip())]


@pytest.fixture(scope="module")
def computed(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`python -m evapipe.compute` on configs/default.yaml (fewer samples), stdout and stderr apart."""
    tmp = tmp_path_factory.mktemp("quiet")
    out = tmp / "s.safetensors"
    done = run(tmp, "--config", str(REPO / "configs" / "default.yaml"), "--set", f"output.path={out}", *SMALL,
               module="evapipe.compute")
    return out, done


def test_compute_puts_the_summary_on_stdout_and_only_its_logs_on_stderr(computed):
    out, done = computed
    assert foreign_lines(done.stderr) == []
    assert "evapipe: loading builtin:minilm" in done.stderr and "EVA: " in done.stderr  # logs and progress
    table = layer_table(read_metadata(out)).splitlines()
    lines = done.stdout.strip().splitlines()
    assert lines[: len(table)] == table
    assert all(SUMMARY.match(ln) for ln in lines[len(table):] if ln), lines[len(table):]
    assert lines[-1].endswith(f"-> {out}")


@pytest.mark.slow
def test_compute_json_summary_and_quiet(computed, tmp_path):
    out, _ = computed
    config = str(REPO / "configs" / "default.yaml")
    done = run(tmp_path, "compute", "--config", config, "--set", f"output.path={tmp_path / 'j.safetensors'}", *SMALL,
               "--json")
    summary = json.loads(done.stdout)  # nothing but the JSON on stdout
    meta = read_metadata(tmp_path / "j.safetensors")
    assert summary["path"] == str(tmp_path / "j.safetensors") and summary["cached"] is False
    assert summary["total_rank"] == sum(meta["ranks"].values()) and summary["tokens"] == meta["tokens"]
    assert {row["layer"]: row["rank"] for row in summary["layers"]} == meta["ranks"]
    assert [p["process"] for p in summary["processes"]] == [0]
    assert foreign_lines(done.stderr) == []
    quiet = run(tmp_path, "compute", "--config", config, "--set", f"output.path={tmp_path / 'q.safetensors'}", *SMALL,
                "--quiet")
    assert quiet.stdout == "" and quiet.stderr == ""  # neither the table nor progress nor logs
    both = run(tmp_path, "compute", "--config", config, "--set", f"output.path={tmp_path / 'q.safetensors'}", *SMALL,
               "--json", "--quiet")  # a cache-free rerun: the JSON alone on stdout, nothing on stderr
    assert json.loads(both.stdout)["path"] == str(tmp_path / "q.safetensors") and both.stderr == ""
    assert read_metadata(tmp_path / "q.safetensors")["ranks"] == meta["ranks"]


@pytest.mark.slow
def test_every_other_command_prints_only_its_result(computed, tmp_path):
    """apply (a new classifier head: transformers' load report; peft: bitsandbytes' kernel lookup), check, show,
    list, rebudget, convert both ways, estimate, config-reference: stderr empty, stdout the result alone."""
    state, _ = computed
    adapter = tmp_path / "adapter"
    single = {  # commands whose result is one line
        "wrote": ["apply", "--state", str(state), "--output", str(adapter), "--kind", "seq-cls", "--num-labels", "3"],
        "ok: ": ["check", "--adapter", str(adapter)],
        "wrote ": ["rebudget", "--state", str(state), "--r", "2", "--output", str(tmp_path / "r2.safetensors")],
    }
    for prefix, args in [*single.items(), ("wrote", ["convert", str(state), str(tmp_path / "p.pt")]),
                         ("wrote", ["convert", str(tmp_path / "p.pt"), str(tmp_path / "back.safetensors"), "--r", "8"])]:
        done = run(tmp_path, *args)
        assert done.stderr == "", (args[0], done.stderr)
        assert len(done.stdout.splitlines()) == 1 and done.stdout.startswith(prefix), (args[0], done.stdout)
    for args in (["show", str(state)], ["list", str(tmp_path)], ["config-reference"],
                 ["estimate", "--config", str(REPO / "configs" / "default.yaml"), "--device-memory", "8GiB"]):
        done = run(tmp_path, *args)
        assert done.stderr == "", (args[0], done.stderr)
        assert done.stdout == CliRunner().invoke(main, args).stdout, args[0]


def test_quiet_dependencies_keeps_what_the_user_chose(monkeypatch):
    import logging

    from evapipe.core.quiet import QUIET_ENV, QUIET_LOGGERS, quiet_dependencies

    for key in QUIET_ENV:  # restored after the test
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    chosen, fresh = (logging.getLogger(n) for n in QUIET_LOGGERS[:2])
    monkeypatch.setattr(chosen, "level", logging.INFO)
    monkeypatch.setattr(fresh, "level", logging.NOTSET)
    quiet_dependencies()
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == QUIET_ENV["HF_DATASETS_DISABLE_PROGRESS_BARS"]
    assert chosen.level == logging.INFO and fresh.level == logging.ERROR


def test_both_compute_entry_points_document_the_streams():
    """`evapipe compute` and `python -m evapipe.compute` (the same click command) say where results go."""
    for run_ in (CliRunner().invoke(main, ["compute", "--help"]),
                 CliRunner().invoke(main.commands["compute"], ["--help"], prog_name="python -m evapipe.compute")):
        assert all(word in run_.output for word in ("--json", "--quiet", "stdout", "stderr")), run_.output
