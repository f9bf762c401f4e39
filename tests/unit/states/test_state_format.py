"""The state file format: every shipped version reads (committed fixtures), newer/unknown/corrupt files fail clearly,
and writes are atomic even under SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO
from evapipe.core.errors import StateError
from evapipe.states.metadata import FORMAT_VERSION, MIGRATIONS
from evapipe.states.state import read_metadata, spectrum_path
from evapipe.states.statecache import load_state

FIXTURES = REPO / "tests" / "fixtures"
V1, V2 = FIXTURES / "state_v1.safetensors", FIXTURES / "state_v2.safetensors"


def raw_metadata(path) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))["__metadata__"]


def rewrite(src, dst, **changes) -> None:
    """Copy a state with some raw metadata strings changed (None removes the key)."""
    raw = {**raw_metadata(src), **changes}
    save_file(load_file(str(src)), str(dst), metadata={k: v for k, v in raw.items() if v is not None})


def test_every_shipped_version_has_a_fixture_and_a_migration():
    for version in range(1, FORMAT_VERSION + 1):
        path = FIXTURES / f"state_v{version}.safetensors"
        assert path.is_file() and spectrum_path(path).is_file(), f"no fixture for format_version {version}"
        assert json.loads(raw_metadata(path)["format_version"]) == version
        assert path.stat().st_size < 8192
        if version < FORMAT_VERSION:
            assert version in MIGRATIONS


def test_v1_fixture_migrates_to_what_v2_records():
    raw = raw_metadata(V1)
    assert "store_key" not in raw and "layer_alpha" not in raw  # really the old layout
    old, new = load_state(V1), load_state(V2)
    assert old.meta["format_version"] == new.meta["format_version"] == FORMAT_VERSION
    assert old.meta["store_key"] is None and old.meta["spectrum_id"] is None
    # alpha before rank scaling, recovered from v1's scaled alpha_pattern, is what v2 records directly
    assert old.meta["layer_alpha"] == new.meta["layer_alpha"] == {n: 4.0 for n in new.ranks}
    assert old.ranks == new.ranks and old.meta["layer_r"] == new.meta["layer_r"]
    assert old.meta["shared_inputs"] == new.meta["shared_inputs"] == [["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"]]
    for name, a in new.tensors.items():
        assert torch.allclose(old.tensors[name], a, atol=1e-5)
    assert set(old.spectrum) == set(new.spectrum) and old.spectrum


def test_v2_save_load_round_trip(tmp_path):
    state = load_state(V2)
    out = state.save(tmp_path / "s.safetensors")
    back = load_state(out)
    assert {k: v for k, v in back.meta.items() if k != "spectrum_id"} == {
        k: v for k, v in load_state(V2).meta.items() if k != "spectrum_id"}
    assert back.meta["spectrum_id"] == raw_metadata(spectrum_path(out))["spectrum_id"].strip('"')
    assert all(torch.equal(back.tensors[k], v) for k, v in state.tensors.items())
    assert all(torch.equal(back.spectrum[k], v) for k, v in state.spectrum.items())
    mode = out.stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask(), oct(mode)  # not the private mode of a temporary file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("version, message", [
    ("4", "format_version 4, newer than this evapipe reads \\(format_version 3\\)"),
    ("99", "format_version 99, newer"),
    ("0", "unknown format_version 0; this evapipe reads format_version 1, 2, 3"),
    ('"2"', "unknown format_version '2'"),
    ("true", "unknown format_version True"),
    ("null", "unknown format_version None"),
    (None, "unknown format_version None"),
])
def test_newer_or_unknown_versions_are_refused_naming_both(tmp_path, version, message):
    path = tmp_path / "s.safetensors"
    rewrite(V2, path, format_version=version)
    with pytest.raises(StateError, match=message):
        read_metadata(path)
    with pytest.raises(StateError, match=message):
        load_state(path)


def test_every_truncation_is_a_clear_error(tmp_path):
    data = V2.read_bytes()
    path = tmp_path / "cut.safetensors"
    for n in [0, 1, 7, 8, 9, *range(16, len(data), 61), len(data) - 1]:
        path.write_bytes(data[:n])
        with pytest.raises(StateError, match="truncated or corrupt"):
            load_state(path)


@pytest.mark.parametrize("content, message", [
    (b"", "truncated or corrupt"),
    (b"\x00" * 64, "truncated or corrupt"),
    (bytes(random.Random(0).randrange(256) for _ in range(512)), "truncated or corrupt"),
    (struct.pack("<Q", 5) + b"[1,2]", "header is not a JSON object"),
    (struct.pack("<Q", 12) + b"{not json!!}", "truncated or corrupt"),
    (b"GIF89a" + b"\x00" * 100, "truncated or corrupt"),
])
def test_garbage_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(StateError, match=message):
        load_state(path)


def test_foreign_and_broken_metadata(tmp_path):
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "weights.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StateError, match="not an evapipe EVA state \\(format='pt'\\)"):
        load_state(tmp_path / "weights.safetensors")
    rewrite(V2, tmp_path / "json.safetensors", ranks="{oops")
    with pytest.raises(StateError, match="metadata is corrupt"):
        read_metadata(tmp_path / "json.safetensors")
    rewrite(V2, tmp_path / "lacks.safetensors", layer_alpha=None)
    with pytest.raises(StateError, match="metadata lacks layer_alpha"):
        read_metadata(tmp_path / "lacks.safetensors")
    rewrite(V1, tmp_path / "v1lacks.safetensors", ranks=None)
    with pytest.raises(StateError, match="format_version 1 metadata is incomplete"):
        read_metadata(tmp_path / "v1lacks.safetensors")
    ranks = json.loads(raw_metadata(V2)["ranks"])
    rewrite(V2, tmp_path / "shape.safetensors", ranks=json.dumps({n: k + 1 for n, k in ranks.items()}))
    with pytest.raises(StateError, match="disagrees with the metadata's ranks"):
        load_state(tmp_path / "shape.safetensors")
    with pytest.raises(StateError, match="not found"):
        load_state(tmp_path / "missing.safetensors")


def test_a_sidecar_from_another_write_is_not_used(tmp_path, caplog):
    a = load_state(V2).save(tmp_path / "a.safetensors")
    b = load_state(V2).save(tmp_path / "b.safetensors")
    spectrum_path(a).write_bytes(spectrum_path(b).read_bytes())
    state = load_state(a)
    assert state.spectrum == {} and "not the spectrum written with" in caplog.text
    spectrum_path(a).write_bytes(b"junk")
    with pytest.raises(StateError, match="truncated or corrupt"):
        load_state(a)


KILL_DURING_WRITE = """
import os, signal, sys
import safetensors.torch as st
from evapipe.states.statecache import load_state
target, which = sys.argv[1], sys.argv[2]
real = st.save_file
def dying_save(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    if (which == "spectrum") == (metadata.get("format") == "evapipe.eva.spectrum"):
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)  # half written
        os.kill(os.getpid(), signal.SIGKILL)
st.save_file = dying_save
state = load_state(sys.argv[3])
state.meta["task"] = "new"
state.save(target)
"""


@pytest.mark.parametrize("which", ["spectrum", "state"])
def test_sigkill_during_the_final_write_keeps_the_old_state(tmp_path, which):
    target = load_state(V2).save(tmp_path / "eva.safetensors")
    before, side_before = target.read_bytes(), spectrum_path(target).read_bytes()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(target), which, str(V2)], env=env,
                         capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert target.read_bytes() == before and spectrum_path(target).read_bytes() == side_before
    state = load_state(target)
    assert state.meta["task"] == "fixture" and state.spectrum
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers  # a SIGKILL cannot clean up; the temporary files are harmless and never read
    from evapipe.states.store import list_states

    assert [e.task for e in list_states(tmp_path)] == ["fixture"]
