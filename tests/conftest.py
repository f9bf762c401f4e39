"""Shared fixtures: the packaged MiniLM, a tiny random Llama saved to disk, the shipped task texts, job configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "evapipe" / "assets"
# where a job in a subprocess finds the tests' helpers and the test modules its config names as hooks
TEST_PATHS = [str(REPO / "tests" / d) for d in ("", "e2e", "parity")]
MINILM_TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]  # output.dense: attention.output.dense too


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from evapipe.core.sources import resolve_model_path

    return resolve_model_path("builtin:minilm")


@pytest.fixture(scope="session")
def minilm(minilm_path):
    """(model, tokenizer) of the packaged all-MiniLM-L6-v2, eval mode."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    return AutoModel.from_pretrained(minilm_path).eval(), AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def support_texts() -> list[str]:
    return [json.loads(line)["text"] for line in (ASSETS / "support_intents.jsonl").read_text().splitlines()]


def text_batches(tokenizer, texts: list[str], batch_size: int, n_batches: int, max_length: int = 64) -> list[dict]:
    """Tokenized, padded batches in a fixed order (the same order for every implementation compared)."""
    out = []
    for i in range(n_batches):
        chunk = texts[i * batch_size : (i + 1) * batch_size]
        out.append(dict(tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")))
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, minilm_path) -> str:
    """A 2-layer random Llama (hidden 64) saved with save_pretrained, with MiniLM's tokenizer beside it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_config(path: Path, **sections) -> Path:
    """A job config YAML from nested dicts (task, model, data, eva, output ...)."""
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tiny_tokenizer(minilm_path: str):
    """MiniLM's vocabulary with chat tokens and a chat template; inputs are input_ids + attention_mask only."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path, model_input_names=["input_ids", "attention_mask"])
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _tiny_model(arch: str, tok):
    import transformers as tf

    small = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
               eos_token_id=tok.sep_token_id)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**small, **ids, num_key_value_heads=2, max_position_embeddings=256))
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(**ids, n_embd=32, n_layer=2, n_head=4, n_positions=256))
    if arch == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(
            **ids, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=tok.pad_token_id))
    if arch == "bert-cls":
        return tf.BertForSequenceClassification(tf.BertConfig(**small, **ids, num_labels=3))
    if arch == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(
            **ids, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
            intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256))
    if arch == "qwen2-moe":
        return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            **ids, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
            intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=256))
    if arch == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(**small, image_size=32, patch_size=8, num_labels=3))
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_path):
    """tiny_model_dir(arch) -> a folder with a random 2-layer model (hidden 32) saved with save_pretrained, beside
    its tokenizer (MiniLM's vocabulary + a chat template) or, for vit, a ViTImageProcessor for 32x32 images.
    arch: llama, gpt2, t5, bert-cls (BertForSequenceClassification), vit (ViTForImageClassification), mixtral and
    qwen2-moe (4 experts, top-2, fused expert parameters; Qwen2-MoE adds a shared expert of nn.Linear layers)."""
    made: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in made:
            from transformers import ViTImageProcessor

            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            tok = _tiny_tokenizer(minilm_path)
            _tiny_model(arch, tok).save_pretrained(path)
            if arch == "vit":
                ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
            else:
                tok.save_pretrained(path)
            made[arch] = str(path)
        return made[arch]

    return make


def write_image_folder(root: Path, n: int = 24) -> str:
    """An image folder (one sub-folder per class: cat, dog, bird) of small random PNGs of varying sizes, one grey."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "images" / ["cat", "dog", "bird"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((rng.random((20 + i % 5, 24, 3)) * 255).astype("uint8"))
        (image.convert("L") if i == 5 else image).save(folder / f"{i}.png")
    return str(root / "images")


def tiny_job(llama_dir: str, task: str = "t", **sections) -> dict:
    """Sections of a fast job config on the tiny Llama (a few batches of the shipped data, fixed length, never an
    error for unconverged layers); `sections` update them, e.g. eva={"r": 4}, output={"store": ...}."""
    job = {
        "task": task,
        "model": {"name_or_path": llama_dir},
        "data": {"path": "builtin:support_intents", "max_samples": 48, "batch_size": 4, "max_length": 32},
        "eva": {"r": 2, "rho": 2.0, "target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"], "max_batches": 4,
                "on_unconverged": "warn"},
        "output": {"path": None},
    }
    for name, values in sections.items():
        job[name] = {**job.get(name, {}), **values} if isinstance(values, dict) else values
    return job


def job_state(tmp_path: Path, *overrides: str) -> Path:
    """A small MiniLM state from the default job config (few batches; unconverged layers kept with a warning)."""
    from evapipe import load_config, run_job

    out = tmp_path / "eva.safetensors"
    cfg = load_config(REPO / "configs" / "default.yaml", [
        f"output.path={out}", "data.max_samples=64", "data.max_length=48", "eva.r=4", "eva.max_batches=6",
        "eva.on_unconverged=warn", *overrides,
    ])
    run_job(cfg, show_progress=False)
    return out


def support_rows() -> list[dict]:
    return [json.loads(line) for line in (ASSETS / "support_intents.jsonl").read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


N_CHAT_ROWS = 32


def chat_data(tmp: Path) -> str:
    """Conversations; one assistant reply repeats its user's message word for word, one has two assistant turns."""
    rows = []
    for i, r in enumerate(support_rows()[:N_CHAT_ROWS]):
        messages = [{"role": "system", "content": "You sort support messages."},
                    {"role": "user", "content": r["text"][:80]},
                    {"role": "assistant", "content": f"This is about {r['label']}."}]
        if i % 4 == 0:
            messages += [{"role": "user", "content": r["label"]}, {"role": "assistant", "content": r["label"]}]
        rows.append({"messages": messages})
    return write_jsonl(tmp / "chat.jsonl", rows)


def exact_pca(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues desc, components rows) of the centred covariance, float64."""
    x = tokens.double()
    x = x - x.mean(0)
    s, v = torch.linalg.eigh(x.T @ x)
    return s.flip(0), v.flip(1).T


CORDA_JOB = (24, 32, 4)  # samples, max_length, r of the CorDA jobs the tests compare with PEFT


def corda_job(model_dir: str, tmp: Path, targets: list[str], method: str = "ipm", **sections) -> dict:
    """Sections of a small `method: corda` job (PEFT's files written beside the state under tmp/ours)."""
    n_samples, max_length, r = CORDA_JOB
    job = {
        "task": "t", "method": "corda",
        "model": {"name_or_path": model_dir},
        "data": {"path": "builtin:support_intents", "max_samples": n_samples, "batch_size": 4,
                 "max_length": max_length},
        "corda": {"r": r, "lora_alpha": 8, "target_modules": targets, "corda_method": method,
                  "covariance_file": str(tmp / "ours" / "cov.pt"), "cache_file": str(tmp / "ours" / "cache.pt")},
        "output": {"path": str(tmp / "corda.safetensors")},
    }
    for name, values in sections.items():
        job[name] = {**job.get(name, {}), **values}
    return job
