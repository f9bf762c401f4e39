"""Unit tests of evapipe.data: step sharding across ranks, the collators' labels, null rows, offsets in spans.

Plain lists and a tokenizer only (no model, no process group); every number is checked against a direct
construction of what the module docstring promises.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from evapipe.core.config import DataConfig
from evapipe.core.errors import DataError
from evapipe.data.collate import TextCollator, in_spans
from evapipe.data.tables import drop_null_rows, sharded_steps


def take(n_samples, batch_size, world, rank, steps, shuffle=False, seed=0, start_step=0):
    it = sharded_steps(n_samples, batch_size, world, rank, shuffle, seed, start_step)
    return list(itertools.islice(it, steps))


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_together_read_what_one_process_reads(shuffle):
    """N ranks x batch B give, step by step, the samples one process with batch N*B gets (the uneven last step of
    each pass included), each rank its own slice in rank order."""
    n, b, world, steps = 23, 3, 4, 6  # 23 samples, global batch 12: passes of 2 steps, the second one 11 samples
    one = take(n, b * world, 1, 0, steps, shuffle, seed=7)
    shards = [take(n, b, world, r, steps, shuffle, seed=7) for r in range(world)]
    for k in range(steps):
        assert [s[k].step for s in shards] == [k] * world
        assert sum((s[k].indices for s in shards), []) == one[k].indices
        assert all(len(s[k].indices) <= b for s in shards)
    assert [len(x.indices) for x in one] == [12, 11] * 3
    assert [x.epoch for x in one] == [0, 0, 1, 1, 2, 2]
    for epoch in range(3):  # every pass reads every sample once
        assert sorted(one[2 * epoch].indices + one[2 * epoch + 1].indices) == list(range(n))


def test_shuffle_is_seeded_per_pass_and_resumes_at_any_step():
    first = take(10, 5, 1, 0, 6, shuffle=True, seed=3)
    assert first == take(10, 5, 1, 0, 6, shuffle=True, seed=3)  # deterministic
    expected = [torch.randperm(10, generator=torch.Generator().manual_seed(3 + e)).tolist() for e in range(3)]
    assert [x.indices for x in first] == [p[i:i + 5] for p in expected for i in (0, 5)]
    assert take(10, 5, 1, 0, 2, shuffle=True, seed=3, start_step=4) == first[4:]  # a resumed job's steps
    assert take(10, 5, 1, 0, 2, shuffle=False) == take(10, 5, 1, 0, 2, shuffle=False, seed=99)


def test_a_rank_past_the_end_of_a_short_step_gets_an_empty_share_and_no_samples_is_an_error():
    shards = [take(5, 2, 4, r, 1)[0].indices for r in range(4)]
    assert shards == [[0, 1], [2, 3], [4], []]
    with pytest.raises(DataError, match="no samples"):
        take(0, 2, 1, 0, 1)


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def test_plain_text_labels_are_the_input_ids_without_padding(tokenizer):
    cfg = DataConfig(path="x", text_field="text", max_length=16)
    rows = [{"text": "where is my parcel"}, {"text": "a much longer message about a refund that never came"}]
    enc = TextCollator(tokenizer, cfg, "causal-lm")(rows)
    manual = tokenizer([r["text"] for r in rows], max_length=16, truncation=True, padding=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], manual["input_ids"])
    assert torch.equal(enc["labels"], manual["input_ids"].masked_fill(manual["attention_mask"] == 0, -100))
    assert "labels" not in TextCollator(tokenizer, cfg, "encoder")(rows)  # an encoder reads every unpadded token


def test_prompt_completion_labels_are_the_completion_tokens_only(tokenizer):
    cfg = DataConfig(path="x", prompt_field="prompt", completion_field="completion", max_length=32)
    rows = [{"prompt": "question: where is my parcel?", "completion": " answer: it ships today"},
            {"prompt": "hi", "completion": " refund please"}]
    enc = TextCollator(tokenizer, cfg, "causal-lm")(rows)
    for i, r in enumerate(rows):
        counted = enc["input_ids"][i][enc["labels"][i] != -100]
        assert torch.equal(enc["labels"][i][enc["labels"][i] != -100], counted)
        # the counted tokens are exactly the completion's own tokens (no prompt, no [SEP]/[CLS], no padding)
        assert counted.tolist() == tokenizer(r["completion"], add_special_tokens=False)["input_ids"]


def test_in_spans_marks_tokens_that_overlap_a_span():
    offsets = torch.tensor([[[0, 0], [0, 3], [3, 5], [5, 9], [9, 9]]])  # a special token, 3 words, padding
    assert in_spans(offsets, [[(3, 9)]]).tolist() == [[False, False, True, True, False]]
    assert in_spans(offsets, [[(4, 6)]]).tolist() == [[False, False, True, True, False]]  # partial overlaps count
    assert in_spans(offsets, [[]]).tolist() == [[False] * 5]


def test_null_rows_are_skipped_and_counted_and_all_null_is_an_error():
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["a", None, "c", "d"], "completion": ["1", "2", None, "4"],
                                     "other": [None] * 4})
    kept, skipped = drop_null_rows(ds, ["prompt", "completion"])
    assert skipped == 2 and kept["prompt"] == ["a", "d"] and kept["completion"] == ["1", "4"]
    same, none = drop_null_rows(ds, ["prompt"])  # only the used columns count
    assert none == 1 and same["prompt"] == ["a", "c", "d"]
    with pytest.raises(DataError, match="every row of `data` has a null other"):
        drop_null_rows(ds, ["other"])
