"""Every model kind, from its example config with a tiny local model: compute -> `evapipe apply` -> one training step.

Each kind's masking is checked on the very batches the job read: padding never counts, prompt tokens do not count
under the label mask, encoder and decoder layers each count their own side's tokens, and no image patch is lost.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import REPO, chat_data, support_rows, write_image_folder, write_jsonl
from evapipe import load_config, load_state, run_job
from evapipe.cli import main as cli
from evapipe.core.config import DataConfig, ModelConfig
from evapipe.data import make_collator, open_rows, rank_batches
from evapipe.data.tables import load_task_data
from evapipe.model.capture import Capture
from evapipe.model.loading import load_model, load_processor

N_ROWS, BATCH = 32, 8
PATCHES = (32 // 8) ** 2  # tiny ViT: 32x32 images, 8x8 patches


def hellaswag_like(tmp):
    """HellaSwag's `ctx` column, support texts as contexts."""
    return write_jsonl(tmp / "ctx.jsonl", [{"ctx": r["text"]} for r in support_rows()[:N_ROWS]])


# example config, tiny architecture, data (None: the config's own builtin data), data overrides
KINDS = {
    "causal-lm": ("llama-hellaswag.yaml", "llama", hellaswag_like, []),
    "conv1d-causal-lm": ("gpt2-causal.yaml", "gpt2", None, []),
    "chat": ("chat-sft.yaml", "llama", chat_data, []),
    "seq2seq": ("t5-seq2seq.yaml", "t5", None, []),
    "seq-cls": ("bert-seq-cls.yaml", "bert-cls", None, []),
    "image-cls": ("vit-image.yaml", "vit", write_image_folder, ["data.image_field=image"]),
}


def job_config(name, tmp, tiny_model_dir):
    config, arch, data, extra = KINDS[name]
    overrides = [
        f"model.name_or_path={tiny_model_dir(arch)}", "model.dtype=float32", "model.device=cpu",
        f"output.path={tmp / 'state.safetensors'}", f"data.max_samples={N_ROWS}", f"data.batch_size={BATCH}",
        "data.max_length=64", "eva.r=4", "eva.max_batches=5", "eva.on_unconverged=warn", *extra,
    ]
    if data is not None:
        overrides.append(f"data.path={data(tmp)}")
    return load_config(REPO / "configs" / config, overrides)


def spy_rows(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Per forward pass of the job: the rows each captured layer handed on to the PCA."""
    steps: list[dict[str, torch.Tensor]] = []
    real = Capture.run

    def run(self, forward, first=False):
        tokens = real(self, forward, first)
        steps.append(tokens)
        return tokens

    monkeypatch.setattr(Capture, "run", run)
    return steps


def expected_rows(name: str, layer: str, batch: dict) -> int:
    """How many rows layer `layer` must count on `batch`: the kind's masking rule, spelled out."""
    if name == "image-cls":
        return batch["pixel_values"].shape[0] * (PATCHES + 1)  # every patch and the class token
    cross_kv = layer.endswith(("EncDecAttention.k", "EncDecAttention.v"))  # keys/values of the encoder's output
    if name == "seq2seq" and layer.startswith("decoder.") and not cross_kv:
        return int((batch["labels"] != -100).sum())  # decoder side: the target's tokens
    if name == "chat":
        return int((batch["labels"] != -100).sum())  # assistant content only
    return int(batch["attention_mask"].sum())  # everything but padding


def train_step(peft_model, batch: dict, name: str) -> float:
    """One optimizer step on the adapter; the base weights stay frozen."""
    if name in ("seq-cls", "image-cls"):
        batch = {**batch, "labels": torch.arange(len(next(iter(batch.values())))) % 3}
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    loss = peft_model(**batch).loss
    loss.backward()
    opt.step()
    return float(loss)


@pytest.mark.parametrize("name", list(KINDS))
def test_kind_compute_apply_train(name, tmp_path, tiny_model_dir, monkeypatch):
    from peft import PeftModel

    cfg = job_config(name, tmp_path, tiny_model_dir)
    steps = spy_rows(monkeypatch)
    result = run_job(cfg, show_progress=False)
    state = load_state(result.path)
    assert state.meta["model"]["kind"] == cfg.model.kind and state.tensors
    n_steps = state.meta["batches"]
    assert len(steps) == n_steps

    # the masking: replay the batches the job read, in its order
    model, kind = load_model(cfg.model, torch.device("cpu"))
    rows = open_rows(cfg.data, kind)
    collate = make_collator(load_processor(cfg.model, kind), cfg.data, kind)
    batches = [b for _, b in zip(range(n_steps), rank_batches(rows, collate, cfg.data.batch_size, 1, 0))]
    for captured, batch in zip(steps, batches):
        assert captured
        for layer, rows in captured.items():
            assert rows.shape[0] == expected_rows(name, layer, batch), (layer, rows.shape)

    # `evapipe apply` -> adapter directory -> trainable PEFT model that starts equal to the base
    adapter = tmp_path / "adapter"
    out = CliRunner().invoke(cli, ["apply", "--state", str(result.path), "--output", str(adapter), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    batch = batches[0]
    with torch.no_grad():
        base_logits = model(**batch).logits
    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True).eval()
    layer = next(iter(state.tensors))
    lora = peft_model.get_base_model().get_submodule(layer)
    assert torch.allclose(lora.lora_A["default"].weight, state.tensors[layer])
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, base_logits, atol=1e-5)  # B = 0

    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert all("lora_" in n or "modules_to_save" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert np.isfinite(train_step(peft_model, batch, name))
    assert any(float(p.abs().sum()) > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if n in frozen)


def test_chat_labels_are_the_assistant_content(tmp_path, tiny_model_dir):
    cfg = job_config("chat", tmp_path, tiny_model_dir)
    tok = load_processor(cfg.model, "causal-lm")
    ds, _ = load_task_data(cfg.data, "causal-lm")
    rows = ds.select(range(BATCH)).to_list()
    batch = make_collator(tok, cfg.data, "causal-lm")(rows)
    for i, row in enumerate(rows):
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        kept = batch["input_ids"][i][batch["labels"][i] != -100]
        expected = [t for text in replies for t in tok(text, add_special_tokens=False)["input_ids"]]
        assert kept.tolist() == expected, (tok.decode(kept), replies)
        # the chat template's own tokens (role markers, <|end|>) are in the input but never labels
        assert (batch["input_ids"][i] == tok.convert_tokens_to_ids("<|assistant|>")).any()


def test_seq2seq_layers_read_their_own_side_when_lengths_match(tiny_model_dir):
    """Encoder and decoder masks of the same (batch, seq) shape but different content: each layer uses its side's."""
    from transformers import T5ForConditionalGeneration

    from evapipe import EvaSettings
    from evapipe.run.engine import EvaRun

    model = T5ForConditionalGeneration.from_pretrained(tiny_model_dir("t5")).eval()
    torch.manual_seed(0)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    target_pad = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]]).bool()
    labels = torch.randint(5, 1000, (2, 6)).masked_fill(target_pad, -100)
    batch = {"input_ids": torch.randint(5, 1000, (2, 6)), "attention_mask": attention_mask, "labels": labels,
             "decoder_attention_mask": (labels != -100).long()}
    enc_q, dec_q = "encoder.block.1.layer.0.SelfAttention.q", "decoder.block.1.layer.0.SelfAttention.q"
    cross_q, cross_k = "decoder.block.1.layer.1.EncDecAttention.q", "decoder.block.1.layer.1.EncDecAttention.k"
    layers = [enc_q, dec_q, cross_q, cross_k]
    seen = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
               for n in layers]
    run = EvaRun(model, EvaSettings(r=2, rho=1.0, target_modules=layers))
    with torch.no_grad():
        tokens = run.source.forward(batch, first=True)
    for h in handles:
        h.remove()
    run.source.close()
    enc, dec = attention_mask.bool(), labels != -100
    assert int(enc.sum()) == 9 and int(dec.sum()) == 10
    assert torch.equal(tokens[enc_q], seen[enc_q][enc])
    assert torch.equal(tokens[dec_q], seen[dec_q][dec])
    assert torch.equal(tokens[cross_q], seen[cross_q][dec])  # cross-attention queries: decoder tokens
    assert torch.equal(tokens[cross_k], seen[cross_k][enc])  # cross-attention keys: the encoder's tokens
    assert run.source.streams.stream == {enc_q: "input", dec_q: "decoder", cross_q: "decoder", cross_k: "input"}


@pytest.mark.parametrize("arch, kind, cls", [
    ("llama", "causal-lm", "LlamaForCausalLM"), ("gpt2", "causal-lm", "GPT2LMHeadModel"),
    ("t5", "seq2seq", "T5ForConditionalGeneration"), ("bert-cls", "seq-cls", "BertForSequenceClassification"),
    ("vit", "image-cls", "ViTForImageClassification"),
])
def test_auto_kind_follows_the_model_config(arch, kind, cls, tiny_model_dir):
    model, found = load_model(ModelConfig(name_or_path=tiny_model_dir(arch), kind="auto"), torch.device("cpu"))
    assert (found, type(model).__name__) == (kind, cls)


def test_kind_and_data_mismatches_fail_clearly(tmp_path, tiny_model_dir, minilm_path):
    from evapipe import config_from_dict
    from evapipe.core.config import DataConfig
    from evapipe.core.errors import ConfigError, DataError
    from evapipe.model.loading import load_processor

    with pytest.raises(ConfigError, match="seq2seq models need data.prompt_field"):
        make_collator(None, DataConfig(), "seq2seq")
    plain = load_processor(ModelConfig(name_or_path=minilm_path), "encoder")  # MiniLM's tokenizer: no chat template
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        make_collator(plain, DataConfig(messages_field="messages"), "causal-lm")
    with pytest.raises(ConfigError, match="messages_field"):
        config_from_dict({"data": {"messages_field": "m", "prompt_field": "p", "completion_field": "c"}})
    with pytest.raises(ConfigError, match="has no image processor"):
        load_processor(ModelConfig(name_or_path=tiny_model_dir("llama")), "image-cls")
    chat = make_collator(load_processor(ModelConfig(name_or_path=tiny_model_dir("llama")), "causal-lm"),
                         DataConfig(messages_field="messages"), "causal-lm")
    with pytest.raises(DataError, match="role, content"):
        chat([{"messages": "not a conversation"}])


def test_quantized_classifier_keeps_a_trainable_head(tmp_path, tiny_model_dir):
    """`evapipe apply --load-in-8bit` on a classifier whose head has a bias (BERT, RoBERTa, ViT): the head stays full
    precision, so PEFT's SEQ_CLS modules_to_save can train it (a quantized head made apply fail)."""
    from dataclasses import replace

    from peft import PeftModel

    cfg = job_config("seq-cls", tmp_path, tiny_model_dir)
    cfg = replace(cfg, eva=replace(cfg.eva, max_batches=1))
    result = run_job(cfg, show_progress=False)
    adapter = tmp_path / "adapter"
    out = CliRunner().invoke(cli, ["apply", "--state", str(result.path), "--output", str(adapter), "--device", "cpu",
                                   "--load-in-8bit"])
    assert out.exit_code == 0, out.output
    model, kind = load_model(replace(cfg.model, quantization="8bit"), torch.device("cpu"))
    assert type(model.classifier) is torch.nn.Linear  # the head: full precision
    assert type(model.bert.encoder.layer[0].output.dense) is not torch.nn.Linear  # the rest: 8-bit
    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    batch = dict(load_processor(cfg.model, kind)(["card charged twice", "reset my password"], return_tensors="pt",
                                                 padding=True))
    head = peft_model.get_base_model().classifier.modules_to_save["default"].weight
    before = head.detach().clone()
    assert np.isfinite(train_step(peft_model, batch, "seq-cls"))
    assert not torch.equal(head, before)


def test_short_chat_replies_are_not_found_in_role_markers(tiny_model_dir):
    """Replies such as "a" or "end" also occur in a plain-text role marker (`<|im_start|>assistant`, `<|im_end|>`):
    the labels must be the reply's own tokens, not the marker's."""
    tok = load_processor(ModelConfig(name_or_path=tiny_model_dir("llama")), "causal-lm")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    collate = make_collator(tok, DataConfig(messages_field="messages"), "causal-lm")
    for reply in ["a", "end", "start", "im"]:
        chat = [{"role": "user", "content": "pick a or b"}, {"role": "assistant", "content": reply}]
        batch = collate([{"messages": chat}])
        kept = batch["input_ids"][0][batch["labels"][0] != -100]
        assert kept.tolist() == tok(reply, add_special_tokens=False)["input_ids"], (reply, tok.decode(kept))
