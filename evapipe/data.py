"""Task data: load rows, shard each global step across ranks, turn rows into model inputs with labels.

One collator per kind of input: TextCollator (plain text, prompt + completion, chat messages), Seq2SeqCollator
(encoder prompt, decoder completion) and ImageCollator (the model's image processor); `make_collator` picks it.

Step k of the global stream is what one process with batch_size x world_size would see at step k; rank r takes
the r-th slice of it. So N processes x batch B give the same union of samples per step as 1 process x batch N*B,
including the last, uneven step of each pass over the data. Rows come as a table read by index (TableRows, here) or
a stream read in order (streaming.StreamRows, data.streaming); both are TaskRows and give the same steps.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .config import DataConfig
from .errors import ConfigError, DataError
from .sources import FILE_BUILDERS, local_data_files, resolve_data_path

log = logging.getLogger("evapipe")
FINGERPRINT_ROWS = 1024  # rows hashed at a time: the fingerprint's memory does not grow with the dataset


def data_columns(cfg: DataConfig, kind: str) -> list[str]:
    """The columns a model kind reads from the data (checked on load, hashed into the dataset fingerprint)."""
    if kind == "image-cls":
        return [cfg.image_field]
    if kind == "seq2seq" and not cfg.prompt_field:
        raise ConfigError(
            "seq2seq models need data.prompt_field (the encoder input) and data.completion_field (the decoder target)"
        )
    if cfg.messages_field:
        return [cfg.messages_field]
    if cfg.prompt_field:
        return [cfg.prompt_field, cfg.completion_field]
    if cfg.text_field is None:
        raise ConfigError("set data.text_field, data.prompt_field/completion_field or data.messages_field")
    return [cfg.text_field]


@contextmanager
def reading(cfg: DataConfig) -> Iterator[None]:
    """`datasets` raises many types for unreadable input: each becomes one DataError that names the data."""
    try:
        yield
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"cannot read data from `{cfg.path}` (split {cfg.split!r}): {err}") from None


def source_args(cfg: DataConfig) -> tuple[str, dict[str, Any]]:
    """What `datasets.load_dataset` / `load_dataset_builder` are called with: the builder of local files (found
    by suffix, checked to be one kind, empty files dropped) with them as the split, or the hub id with its
    configuration and revision."""
    path = resolve_data_path(cfg.path)
    files = local_data_files(path, cfg.path)
    if files is None:
        return path, {"name": cfg.name, "revision": cfg.revision}
    suffixes = {Path(f).suffix.lower() for f in files}
    builders = {FILE_BUILDERS.get(suffix) for suffix in suffixes}
    if len(builders) != 1 or None in builders:
        raise DataError(f"data files must be all of one kind ({', '.join(FILE_BUILDERS)}); got {sorted(suffixes)}")
    return builders.pop(), {"data_files": {cfg.split: files}}


def missing_columns(cfg: DataConfig, kind: str, columns: Sequence[str]) -> None:
    """A DataError naming the first column `kind` reads that the data does not have."""
    for name in data_columns(cfg, kind):
        if name not in columns:
            raise DataError(f"dataset `{cfg.path}` has no column `{name}`; columns: {', '.join(columns)}")


def load_task_data(cfg: DataConfig, kind: str = "causal-lm") -> tuple[Any, int]:
    """The configured split as a datasets.Dataset, checked non-empty and holding the columns `kind` reads, without
    rows whose used columns are null (which would be read as the text "None"); and how many such rows it skipped.

    Local files go through the matching `datasets` builder; a folder of images through `imagefolder` (one class per
    sub-folder).
    """
    import datasets

    with reading(cfg):
        name, kwargs = source_args(cfg)
        ds = datasets.load_dataset(name, split=cfg.split, **kwargs)
    if cfg.max_samples is not None:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    if len(ds) == 0:
        raise DataError(f"dataset `{cfg.path}` split {cfg.split!r} is empty")
    missing_columns(cfg, kind, ds.column_names)
    return drop_null_rows(ds, data_columns(cfg, kind), cfg.path)


def _arrow_batches(ds: Any, columns: list[str]) -> Iterator[Any]:
    """The used columns as arrow tables of FINGERPRINT_ROWS rows each (one contiguous chunk): bounded memory."""
    yield from ds.select_columns(columns).with_format("arrow").iter(batch_size=FINGERPRINT_ROWS)


def drop_null_rows(ds: Any, columns: list[str], where: str = "data") -> tuple[Any, int]:
    """Rows whose used columns all hold a value, and how many were left out; all rows null is a DataError."""
    import pyarrow.compute as pc

    keep, start = [], 0
    for table in _arrow_batches(ds, columns):
        valid = None
        for name in columns:
            ok = pc.is_valid(table[name])
            valid = ok if valid is None else pc.and_(valid, ok)
        keep += [start + i for i, ok in enumerate(valid.to_pylist()) if ok]
        start += table.num_rows
    skipped = len(ds) - len(keep)
    if not keep:
        raise DataError(f"every row of `{where}` has a null {' or '.join(columns)}: there is no text to read")
    if skipped:
        log.warning("skipping %d of %d rows of %s whose %s is null", skipped, len(ds), where, " or ".join(columns))
        ds = ds.select(keep)
    return ds, skipped


def dataset_fingerprint(ds: Any, columns: list[str]) -> str:
    """Content hash of the columns used, so the same data under another path or clone hashes the same.

    Streamed over fixed-size row blocks, each copied and written as one arrow IPC record batch: the same rows give
    the same bytes whatever the storage's chunking, and memory stays at one block, however large the dataset.
    """
    import pyarrow as pa

    h = hashlib.sha256()
    for table in _arrow_batches(ds, columns):
        table = table.take(pa.array(range(table.num_rows)))  # a fresh copy: no slice offsets in the bytes
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        h.update(sink.getvalue())
    h.update(str(len(ds)).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Shard:
    """Which samples rank `rank` of `world` reads at global step `step`."""

    step: int
    epoch: int
    indices: list[int]


def sharded_steps(
    n_samples: int, batch_size: int, world: int, rank: int, shuffle: bool, seed: int, start_step: int = 0
) -> Iterator[Shard]:
    """Endless global steps (passes over the data repeat, reshuffled per pass), this rank's slice of each."""
    if n_samples == 0:
        raise DataError("no samples to read")
    global_batch = batch_size * world
    per_epoch = math.ceil(n_samples / global_batch)
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        if shuffle:
            order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        else:
            order = list(range(n_samples))
        while k < per_epoch:
            lo = k * global_batch + rank * batch_size
            hi = min(lo + batch_size, (k + 1) * global_batch, n_samples)
            yield Shard(step, epoch, order[lo:hi] if lo < hi else [])
            step += 1
            k += 1


class TextCollator:
    """Rows -> padded model inputs; `labels` (causal LMs, instruction and chat data) drive the label mask.

    Labels are -100 on padding and on every token outside the spans that count (the completion, or the assistant
    turns' content). The spans are found from the tokenizer's character offsets, so special tokens a tokenizer adds
    around a prompt on its own ([SEP], EOS) never shift the boundary, whichever side it pads.
    """

    def __init__(self, tokenizer: Any, cfg: DataConfig, kind: str):
        self.tok, self.cfg, self.kind = tokenizer, cfg, kind
        self.labelled = bool(cfg.prompt_field or cfg.messages_field)
        if self.labelled and not getattr(tokenizer, "is_fast", False):
            raise ConfigError("prompt/completion and chat data need a fast tokenizer (it gives character offsets)")
        if cfg.messages_field and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "data.messages_field needs a tokenizer with a chat template; this tokenizer has none "
                "(use an instruct/chat model's tokenizer, or prompt_field/completion_field)"
            )

    def _text(self, row: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
        """The text to tokenize and the character spans whose tokens are labels."""
        cfg = self.cfg
        if cfg.messages_field:
            return render_chat(self.tok, row[cfg.messages_field])
        if cfg.prompt_field:
            prompt, completion = str(row[cfg.prompt_field]), str(row[cfg.completion_field])
            return prompt + completion, [(len(prompt), len(prompt) + len(completion))]
        return str(row[cfg.text_field]), []

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts, spans = zip(*(self._text(r) for r in rows))
        enc = dict(self.tok(
            list(texts), max_length=self.cfg.max_length, truncation=True, padding=True, return_tensors="pt",
            add_special_tokens=not self.cfg.messages_field,  # a chat template writes its own special tokens
            return_offsets_mapping=self.labelled,
        ))
        offsets = enc.pop("offset_mapping", None)
        if self.kind == "causal-lm" or self.labelled:
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            if offsets is not None:
                labels = labels.masked_fill(~in_spans(offsets, spans), -100)
            enc["labels"] = labels
        return enc


def in_spans(offsets: torch.Tensor, spans: Sequence[Sequence[tuple[int, int]]]) -> torch.Tensor:
    """(batch, seq) bool: tokens (character offsets (batch, seq, 2)) that overlap one of their row's spans."""
    start, end = offsets[..., 0], offsets[..., 1]
    keep = torch.zeros(start.shape, dtype=torch.bool)
    for i, row_spans in enumerate(spans):
        for a, b in row_spans:
            keep[i] |= (start[i] < b) & (end[i] > a) & (end[i] > start[i])
    return keep


def render_chat(tokenizer: Any, messages: Any) -> tuple[str, list[tuple[int, int]]]:
    """A conversation as the tokenizer's chat template writes it, and the character spans of the assistant content.

    Every message's content is looked up in order in the rendered text (templates may trim it), so an assistant
    reply that repeats an earlier user message is still found at its own place. An assistant reply is looked up
    after the template's own header for it (see _reply_start), so a short reply ("a", "end") is never found inside
    a role marker such as `<|im_start|>assistant`.
    """
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in messages
    ):
        raise DataError(f"chat data must be lists of {{role, content}} messages (text content): {str(messages)[:60]!r}")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"].strip()
        if m["role"] == "assistant":
            cursor = _reply_start(tokenizer, messages[:i], text, cursor)
        at = text.find(content, cursor) if content else -1
        if at < 0:
            if m["role"] == "assistant" and content:
                raise DataError(f"assistant content {content[:40]!r} does not appear in the chat template's output")
            continue
        cursor = at + len(content)
        if m["role"] == "assistant":
            spans.append((at, cursor))
    return text, spans


def _reply_start(tokenizer: Any, history: list[dict[str, Any]], text: str, cursor: int) -> int:
    """Where an assistant reply after `history` can start in `text`: past the template's rendering of the history
    with the generation prompt (the reply's own header), when that rendering is a prefix of `text`; else `cursor`."""
    try:
        head = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template may refuse a partial conversation (an empty one, or one ending in a user turn)
        return cursor
    return max(cursor, len(head)) if isinstance(head, str) and text.startswith(head) else cursor


class Seq2SeqCollator:
    """Encoder-decoder inputs: the prompt is the encoder input, the completion the decoder target.

    `labels` are the completion's tokens (-100 on padding) and `decoder_attention_mask` marks them, so decoder-side
    layers count completion tokens and encoder-side layers the prompt's (the engine tells the two apart per layer).
    The model derives its decoder inputs from the labels, in EVA's forward pass as in training.
    """

    def __init__(self, tokenizer: Any, cfg: DataConfig):
        self.tok, self.cfg = tokenizer, cfg

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        kw = dict(max_length=cfg.max_length, truncation=True, padding=True, return_tensors="pt")
        enc = dict(self.tok([str(r[cfg.prompt_field]) for r in rows], **kw))
        target = self.tok(text_target=[str(r[cfg.completion_field]) for r in rows], **kw)
        enc["labels"] = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
        enc["decoder_attention_mask"] = target["attention_mask"]
        return enc


class ImageCollator:
    """Images -> `pixel_values` from the model's image processor; there is no mask, so every patch token counts."""

    def __init__(self, processor: Any, cfg: DataConfig):
        self.processor, self.cfg = processor, cfg

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [_rgb(r[self.cfg.image_field]) for r in rows]
        return {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}


def _rgb(value: Any) -> Any:
    """A decoded image or an image path -> an RGB PIL image (grey or RGBA images too); arrays pass as they are."""
    from PIL import Image

    if isinstance(value, (str, Path)):
        try:
            value = Image.open(value)
        except OSError as err:
            raise DataError(f"cannot read image {value}: {err}") from None
    return value.convert("RGB") if isinstance(value, Image.Image) else value


def make_collator(processor: Any, cfg: DataConfig, kind: str) -> Any:
    """The collator for a model kind; `processor` is its tokenizer, or its image processor for image-cls."""
    data_columns(cfg, kind)  # fails early on a kind / field mismatch
    if kind == "image-cls":
        return ImageCollator(processor, cfg)
    if kind == "seq2seq":
        return Seq2SeqCollator(processor, cfg)
    return TextCollator(processor, cfg, kind)


def rows_at(ds: Any, indices: list[int]) -> list[dict[str, Any]]:
    """Rows in order, decoded (image columns as PIL images, not stored bytes)."""
    columns = ds[indices]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


class TaskRows(Protocol):
    """The task's rows as a job reads them, step by step: a table (TableRows) or a stream (streaming.StreamRows).

    Step k of the global stream holds `batch_size x world` rows; rank r reads its r-th slice (see the module
    docstring), so both kinds give the same steps on the same rows in the same order.
    """

    skipped: int  # rows left out because a used column is null (so far, for a stream)

    def samples(self) -> int | None:
        """Rows in one pass over the data; None while a stream has not been read to its end."""

    def pass_steps(self, global_batch: int) -> int | None:
        """Steps in one pass over the data; None while a stream has not been read to its end."""

    def fingerprint(self) -> str:
        """What identifies the data read, in bounded memory (the state's provenance)."""

    def steps(self, batch_size: int, world: int, rank: int, start_step: int = 0) -> Iterator[list[dict[str, Any]]]:
        """This rank's rows for every global step from `start_step` on, endlessly (an empty share is [])."""


@dataclass
class TableRows:
    """A datasets.Dataset read by index: shuffled as a whole per pass (seeded), any step reachable at once."""

    ds: Any
    columns: list[str]
    shuffle: bool
    seed: int
    skipped: int = 0

    def samples(self) -> int:
        return len(self.ds)

    def pass_steps(self, global_batch: int) -> int:
        return math.ceil(len(self.ds) / global_batch)

    def fingerprint(self) -> str:
        return dataset_fingerprint(self.ds, self.columns)

    def steps(self, batch_size: int, world: int, rank: int, start_step: int = 0) -> Iterator[list[dict[str, Any]]]:
        for shard in sharded_steps(len(self.ds), batch_size, world, rank, self.shuffle, self.seed, start_step):
            yield rows_at(self.ds, shard.indices) if shard.indices else []


def open_rows(cfg: DataConfig, kind: str = "causal-lm") -> TaskRows:
    """The task's rows, checked (not empty, the columns `kind` reads): a stream with data.streaming, else a table."""
    if cfg.streaming:
        from .streaming import open_stream

        return open_stream(cfg, kind)
    ds, skipped = load_task_data(cfg, kind)
    return TableRows(ds, data_columns(cfg, kind), cfg.shuffle, cfg.seed, skipped)


def rank_batches(rows: TaskRows, collate: Any, batch_size: int, world: int, rank: int,
                 start_step: int = 0) -> Iterator[Any]:
    """This rank's batch (None for an empty share) for every global step from `start_step` on."""
    for share in rows.steps(batch_size, world, rank, start_step):
        yield collate(share) if share else None
