"""data.streaming: a datasets IterableDataset read row by row gives a table's steps (unshuffled), shares each
step over ranks alike, shuffles through its buffer the same on every rank, resumes at the right row, keys and
fingerprints the data in bounded memory, and fails clearly on bad data."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil

import pytest
import torch
from test_distributed import compute, torchrun
from test_kinds import job_config

from conftest import tiny_job, write_config
from evapipe import config_from_dict, load_state, run_job
from evapipe.core.config import DataConfig
from evapipe.core.errors import DataError
from evapipe.data import open_rows
from evapipe.data.streaming import StreamRows, global_steps
from evapipe.data.tables import sharded_steps
from evapipe.states.checkpoint import checkpoint_dir, latest
from evapipe.states.store import job_key, key_parts


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def texts(share):
    return [r["text"] for r in share]


def first_steps(rows, batch, world, rank, n, start=0):
    it = rows.steps(batch, world, rank, start)
    return [texts(next(it)) for _ in range(n)]


# -- grouping rows into steps (pure) ----------------------------------------------------------------------------
@pytest.mark.parametrize("n, batch, world", [(10, 2, 1), (10, 2, 2), (11, 3, 2), (7, 2, 3), (3, 4, 2)])
def test_stream_steps_are_a_tables_steps_unshuffled(n, batch, world):
    tables = [sharded_steps(n, batch, world, r, shuffle=False, seed=0) for r in range(world)]
    steps = global_steps(lambda epoch: iter(range(n)), batch * world)
    for _ in range(3 * -(-n // (batch * world))):  # three passes, the uneven last step of each included
        chunk = next(steps)
        assert [chunk[r * batch:(r + 1) * batch] for r in range(world)] == [next(t).indices for t in tables]


def test_a_pass_without_rows_is_an_error_not_an_endless_loop():
    with pytest.raises(DataError, match="yielded no row"):
        next(global_steps(lambda epoch: iter([]), 4))
    steps = global_steps(lambda epoch: iter(range(3) if epoch == 0 else []), 2)
    assert [next(steps), next(steps)] == [[0, 1], [2]]
    with pytest.raises(DataError, match="ran dry in pass 1"):
        next(steps)


# -- a real stream against the table of the same file ------------------------------------------------------------
@pytest.fixture
def data_file(tmp_path):
    rows = [{"text": f"row {i}"} if i % 7 != 3 else {"text": None} for i in range(23)]  # 3 null rows
    return jsonl(tmp_path / "d.jsonl", rows)


def test_unshuffled_stream_reads_the_tables_rows_per_rank_and_step(data_file):
    cfg = DataConfig(path=str(data_file), shuffle=False)
    table, stream = open_rows(cfg), open_rows(dataclasses.replace(cfg, streaming=True))
    assert isinstance(stream, StreamRows) and stream.samples() is None and stream.pass_steps(4) is None
    for world in (1, 2, 3):
        for rank in range(world):
            assert first_steps(stream, 3, world, rank, 9) == first_steps(table, 3, world, rank, 9)
            assert first_steps(stream, 3, world, rank, 4, start=5) == first_steps(table, 3, world, rank, 4, start=5)
    assert stream.samples() == table.samples() == 20 and stream.skipped == table.skipped == 3
    assert stream.pass_steps(6) == table.pass_steps(6) == 4


def test_shuffled_stream_is_the_same_on_every_rank_and_reshuffled_per_pass(data_file):
    cfg = DataConfig(path=str(data_file), streaming=True, shuffle=True, seed=5, shuffle_buffer=8)
    one = first_steps(open_rows(cfg), 4, 1, 0, 10)  # two passes of 5 steps
    ranks = [first_steps(open_rows(cfg), 2, 2, r, 10) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == one  # each rank's share of the one stream
    first, second = sum(one[:5], []), sum(one[5:], [])
    assert sorted(first) == sorted(second) == sorted(f"row {i}" for i in range(23) if i % 7 != 3)
    assert first != second and first != sorted(first, key=lambda t: int(t.split()[1]))
    assert first_steps(open_rows(dataclasses.replace(cfg, seed=6)), 4, 1, 0, 5) != one[:5]


def test_a_stream_is_never_converted_to_arrow(data_file, monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError("download_and_prepare: the stream was converted to Arrow")

    monkeypatch.setattr(datasets.builder.DatasetBuilder, "download_and_prepare", refuse)
    rows = open_rows(DataConfig(path=str(data_file), streaming=True, shuffle=False))
    steps = first_steps(rows, 4, 1, 0, 6)
    assert steps[4:] == [["row 19", "row 20", "row 21", "row 22"], ["row 0", "row 1", "row 2", "row 4"]]


def test_fingerprint_and_key_follow_the_content_not_the_path(data_file, tmp_path, tiny_llama_dir):
    cfg = DataConfig(path=str(data_file), streaming=True)
    copy = tmp_path / "elsewhere" / "other.jsonl"
    copy.parent.mkdir()
    shutil.copy(data_file, copy)
    fp = open_rows(cfg).fingerprint()
    assert open_rows(dataclasses.replace(cfg, path=str(copy))).fingerprint() == fp
    assert open_rows(dataclasses.replace(cfg, max_samples=5)).fingerprint() != fp
    jsonl(copy, [{"text": "changed"}])
    assert open_rows(dataclasses.replace(cfg, path=str(copy))).fingerprint() != fp

    def key(**data):
        return job_key(config_from_dict(tiny_job(tiny_llama_dir, data={"path": str(data_file), **data},
                                                 output={"path": "o.safetensors"})))

    # unshuffled, a stream's steps are the table's: one key (a state computed either way is a cache hit)
    assert key(shuffle=False, streaming=True) == key(shuffle=False) == key(shuffle=False, streaming=True,
                                                                           shuffle_buffer=3)
    assert key(streaming=True) != key() and key(streaming=True, shuffle_buffer=3) != key(streaming=True)
    parts = key_parts(config_from_dict(tiny_job(tiny_llama_dir, data={"path": str(data_file)},
                                                output={"path": "o.safetensors"})))
    assert {"streaming", "shuffle_buffer", "revision"}.isdisjoint(parts["data"])  # earlier keys still hit


@pytest.mark.parametrize("rows, message", [
    ([{"other": "x"}], "has no column `text`; columns: other"),
    ([{"text": None}, {"text": None}], "every row of .* has a null text"),
])
def test_bad_streams_fail_clearly(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        rows = open_rows(DataConfig(path=str(jsonl(tmp_path / "d.jsonl", rows)), streaming=True))
        next(rows.steps(2, 1, 0))


def test_a_bad_line_deep_in_the_stream_is_a_data_error(tmp_path):
    path = tmp_path / "corpus"
    path.mkdir()
    jsonl(path / "a.jsonl", [{"text": f"row {i}"} for i in range(30)])
    (path / "b.jsonl").write_text('{"text": "cut off\n')
    steps = open_rows(DataConfig(path=str(path), streaming=True, shuffle=False)).steps(4, 1, 0)
    assert [len(next(steps)) for _ in range(7)] == [4] * 7  # the good rows come first
    with pytest.raises(DataError, match=f"cannot read data from `{path}`"):
        list(itertools.islice(steps, 3))


def test_an_unreachable_hub_dataset_is_a_data_error():
    with pytest.raises(DataError, match="cannot read data from `no-such-org/no-such-dataset`"):
        open_rows(DataConfig(path="no-such-org/no-such-dataset", streaming=True))


# -- jobs --------------------------------------------------------------------------------------------------------
def _job(tmp_path, llama_dir, out, **data):
    return tiny_job(llama_dir, data={"max_samples": 20, **data}, eva={"tau": 1.0, "max_batches": 6},
                    output={"path": str(tmp_path / out)})


@pytest.mark.parametrize("offload", ["none", "sequential"])
def test_unshuffled_streaming_job_gives_the_table_jobs_state(offload, tmp_path, tiny_llama_dir):
    table = run_job(config_from_dict(_job(tmp_path, tiny_llama_dir, "t.safetensors", shuffle=False)),
                    show_progress=False).state
    job = _job(tmp_path, tiny_llama_dir, "s.safetensors", shuffle=False, streaming=True)
    job["model"] |= {"offload": offload, "sequential_round": 4}
    stream = run_job(config_from_dict(job), show_progress=False).state
    assert stream.ranks == table.ranks and stream.meta["tokens"] == table.meta["tokens"]
    for name, x in table.tensors.items():
        assert torch.equal(stream.tensors[name], x), name
    data = stream.meta["dataset"]
    assert data["streaming"] is True and data["samples"] == 20 and len(data["fingerprint"]) == 16


@pytest.mark.parametrize("kind", ["chat", "seq2seq", "image-cls"])
def test_every_data_kind_streams_to_the_table_state(kind, tmp_path, tiny_model_dir):
    """Chat conversations, prompt/completion pairs for an encoder-decoder, an image folder: the same state."""
    cfg = job_config(kind, tmp_path, tiny_model_dir)
    states = [run_job(config_from_dict(dataclasses.asdict(cfg), [f"output.path={tmp_path / f'{s}.safetensors'}",
                                                                 "data.shuffle=false", f"data.streaming={s}"]),
                      show_progress=False).state for s in ("false", "true")]
    assert states[0].ranks == states[1].ranks and states[0].meta["tokens"] == states[1].meta["tokens"]
    for name, x in states[0].tensors.items():
        assert torch.equal(states[1].tensors[name], x), name


def test_shuffled_stream_resumes_at_the_row_it_stopped(tmp_path, tiny_llama_dir, caplog):
    """6 steps of 4 over a 20-row stream: the resumed job re-reads the stream (past a reshuffled pass end) to the
    checkpoint's step and continues bit-identically."""
    cfg = _job(tmp_path, tiny_llama_dir, "eva.safetensors", streaming=True, shuffle_buffer=7)
    first = run_job(config_from_dict(cfg | {"output": {**cfg["output"], "checkpoint_every": 2,
                                                       "keep_checkpoint": True}}), show_progress=False)
    out = tmp_path / "eva.safetensors"
    assert latest(checkpoint_dir(out))[1]["loop"]["progress"]["step"] == 4
    again = run_job(config_from_dict(cfg | {"output": {**cfg["output"], "checkpoint_every": 2}}), show_progress=False)
    assert "at batch 4" in caplog.text and "reading the stream up to step 4" in caplog.text
    for name, x in first.state.tensors.items():
        assert torch.equal(again.state.tensors[name], x), name


def test_two_processes_share_one_shuffled_stream(tmp_path, tiny_llama_dir):
    """2 processes x batch 2 read the steps 1 process x batch 4 reads: the same shuffled stream on both ranks."""
    job = _job(tmp_path, tiny_llama_dir, "two.safetensors", streaming=True, batch_size=2, shuffle_buffer=5)
    one = run_job(config_from_dict(job | {"data": {**job["data"], "batch_size": 4},
                                          "output": {"path": str(tmp_path / "one.safetensors")}}),
                  show_progress=False).state
    two = torchrun(*compute(write_config(tmp_path / "job.yaml", **job)))
    assert two.returncode == 0, two.stdout[-3000:]
    state = load_state(tmp_path / "two.safetensors")
    assert state.meta["world_size"] == 2 and state.ranks == one.ranks and state.meta["tokens"] == one.meta["tokens"]
    for name, x in one.tensors.items():
        y = state.tensors[name]
        cos = (x * y).sum(1).abs() / (x.norm(dim=1) * y.norm(dim=1))
        assert float(cos.min()) >= 0.99, (name, cos)
