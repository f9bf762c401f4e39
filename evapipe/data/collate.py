"""Rows -> model inputs with labels, one collator per kind of input: TextCollator (plain text, prompt +
completion, chat messages), Seq2SeqCollator (encoder prompt, decoder completion) and ImageCollator (the model's
image processor); `make_collator` picks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.config import DataConfig
from ..core.errors import ConfigError, DataError
from .reading import data_columns


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
