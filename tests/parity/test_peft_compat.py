"""The oldest PEFT that pyproject.toml declares loads adapters written by evapipe with the newest: every layer's
rank and scaling as the state says, lora_A as written, outputs equal to the base, gradients into lora_B.

`make setup` installs that PEFT (`pip install --no-deps --target .venv/peft-oldest peft==<minimum>.*`); the check
runs in a subprocess that puts it in front of the venv's own PEFT.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO, job_state
from evapipe import load_state
from evapipe.cli import main

OLDEST = Path(os.environ.get("EVAPIPE_PEFT_OLDEST", Path(sys.prefix) / "peft-oldest"))


def declared_minimum() -> str:
    return re.search(r'"peft>=([0-9.]+)"', (REPO / "pyproject.toml").read_text())[1]


def expected(state, rslora: bool) -> tuple[dict, dict]:
    meta = state.meta
    ranks = {n: k for n, k in state.ranks.items() if k > 0}
    root = (lambda x: math.sqrt(x)) if rslora else (lambda x: x)
    scaling = {n: meta["layer_alpha"][n] / root(meta["layer_r"][n]) for n in ranks}  # adjust_scaling_factors on
    return ranks, scaling


@pytest.mark.skipif(not (OLDEST / "peft").is_dir(), reason=f"no oldest PEFT at {OLDEST}: run `make setup`")
def test_oldest_declared_peft_loads_the_adapters(tmp_path):
    state_path = job_state(tmp_path, "eva.max_batches=3", "eva.alpha_pattern={'value': 16}")
    state = load_state(state_path)
    jobs, wants = [], []
    for name, flags, num_labels, rslora in (("plain", [], None, False), ("dora-rslora", ["--use-dora", "--use-rslora"],
                                            None, True), ("classifier", ["--kind", "seq-cls", "--num-labels", "2"], 2,
                                            False)):
        out = tmp_path / name
        result = CliRunner().invoke(main, ["apply", "--state", str(state_path), "--output", str(out), "--device",
                                           "cpu", *flags])
        assert result.exit_code == 0, result.output
        config = json.loads((out / "adapter_config.json").read_text())
        assert not [k for k in config if "eva" in k.lower()] and config["init_lora_weights"] is True
        jobs.append({"dir": str(out), "num_labels": num_labels})
        prefix = "bert." if num_labels else ""
        ranks, scaling = expected(state, rslora)
        wants.append(({prefix + n: k for n, k in ranks.items()}, {prefix + n: s for n, s in scaling.items()},
                      bool(flags and flags[0] == "--use-dora")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(OLDEST), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(REPO / "tests" / "old_peft_load.py"), json.dumps(jobs)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["peft"].startswith(declared_minimum()) and report["peft_file"].startswith(str(OLDEST))
    assert len(set(state.ranks.values())) > 2  # uneven ranks: rank_pattern must work in the old PEFT too
    for got, (ranks, scaling, dora) in zip(report["adapters"], wants):
        assert got["r"] == ranks
        assert got["scaling"] == pytest.approx(scaling)
        assert bool(got["dora"]) is dora and (not dora or set(got["dora"]) == set(ranks))
        assert got["a_equal"] and got["b_grads"] and math.isfinite(got["loss"])
        assert got["max_output_diff"] == 0.0
    assert [a["type"] for a in report["adapters"]] == ["PeftModelForFeatureExtraction"] * 2 + [
        "PeftModelForSequenceClassification"]
