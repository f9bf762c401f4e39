"""A sequential round's PCA copies: given back bit for bit after any later update, their per-feature tensors kept in a
temporary file instead of host memory, and a temporary folder that cannot be written refused with a clear error."""

from __future__ import annotations

import copy
import dataclasses
import tempfile

import pytest
import torch

from conftest import tiny_job
from evapipe import config_from_dict, run_job
from evapipe.core.errors import StorageError
from evapipe.eva import ipca
from evapipe.eva.roundcopies import FILED, RoundCopies


def assert_same(a: ipca.PCAState, b: ipca.PCAState) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def test_copies_come_back_bit_identical_after_later_updates():
    g = torch.Generator().manual_seed(0)
    states = {"a": ipca.new_state(48, 4, None, seed=0), "b": ipca.new_state(20, 3, 2, seed=1)}
    expected: dict[str, list[ipca.PCAState]] = {"a": [], "b": []}
    with RoundCopies() as copies:
        for j in range(4):
            for name, s in states.items():
                ipca.update_many([s], [torch.randn(30, s.n_features, generator=g) * 3 + 1])
                copies.keep(name, j, s)
                expected[name].append(dataclasses.replace(s, **{
                    f.name: getattr(s, f.name).clone() for f in dataclasses.fields(s)
                    if isinstance(getattr(s, f.name), torch.Tensor)}, history=list(s.history)))
        copies.keep("fresh", 0, ipca.new_state(8, 2, None, seed=2))  # not fitted yet: no tensors at all
        for name in states:
            for j in (2, 0, 3, 1):  # any order, any number of times
                got = copies.get(name, j, torch.device("cpu"))
                assert_same(got, expected[name][j])
                got.components.zero_()  # the copy handed out is the caller's own
                assert_same(copies.get(name, j, torch.device("cpu")), expected[name][j])
        assert_same(copies.get("fresh", 0, torch.device("cpu")), ipca.new_state(8, 2, None, seed=2))
        # a PCA fed batches 2 and 3 again (its layer came back mid-round): the new copies replace those of 2 and 3
        s = copy.deepcopy(expected["a"][1])
        for j in (2, 3):
            ipca.update_many([s], [torch.randn(30, s.n_features, generator=g)])
            copies.keep("a", j, s)
        assert_same(copies.get("a", 3, torch.device("cpu")), s)
        assert_same(copies.get("a", 1, torch.device("cpu")), expected["a"][1])


def test_the_per_feature_tensors_wait_in_the_file_not_in_memory():
    s = ipca.new_state(64, 4, None, seed=0)
    ipca.update_many([s], [torch.randn(40, 64, generator=torch.Generator().manual_seed(0))])
    copies = RoundCopies()
    copies.keep("a", 0, s)
    light, filed = copies._kept["a"][0]
    assert set(filed) == set(FILED) and all(getattr(light, f) is None for f in FILED)
    assert light.singular_values is not None and light.similarity is None  # a first update has no similarity yet
    size = copies._spill._file.seek(0, 2)
    assert size == s.components.numel() * 4 + s.mean.numel() * 8
    copies.close()
    assert copies._spill._file is None


def test_an_unwritable_temporary_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    s = ipca.new_state(16, 2, None, seed=0)
    ipca.update_many([s], [torch.randn(10, 16)])
    with pytest.raises(StorageError, match="PCA copies in a temporary file.*missing.*TMPDIR"):
        RoundCopies().keep("a", 0, s)


def test_a_sequential_job_without_room_for_its_copies_stops_with_that_error(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    out = tmp_path / "eva.safetensors"
    cfg = config_from_dict(tiny_job(tiny_llama_dir, model={"offload": "sequential"}, output={"path": str(out)}))
    with pytest.raises(StorageError, match="temporary file"):
        run_job(cfg, show_progress=False)
    assert not out.exists()
