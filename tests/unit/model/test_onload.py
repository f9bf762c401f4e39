"""Sequential onloading parts: blocks run one at a time from the checkpoint equal the in-memory model's blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evapipe.core.errors import ConfigError
from evapipe.model.onload import BlockModel, block_list, empty_model, refuse_unsupported


def _tiny(kind: str, path) -> tuple[nn.Module, dict]:
    """A tiny random model of `kind` saved to `path`, and one batch of its inputs."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    text = dict(input_ids=ids, attention_mask=mask)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2))
        model.save_pretrained(path, max_shard_size="200KB")  # sharded: model.safetensors.index.json
        return model.eval(), text
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=64, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0))
        model.save_pretrained(path)
        return model.eval(), text
    model = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               image_size=32, patch_size=8))
    model.save_pretrained(path)
    return model.eval(), dict(pixel_values=torch.randn(2, 3, 32, 32))


def _block_outputs(model: nn.Module, inputs: dict) -> list[torch.Tensor]:
    """Every block's output in the ordinary in-memory forward pass."""
    _, blocks = block_list(model)
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)) for b in blocks]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return outs


def _materialised(bm: BlockModel) -> int:
    return sum(any(p.device.type != "meta" for p in b.parameters()) for b in bm.blocks)


def _run_sequentially(bm: BlockModel, inputs: dict) -> tuple[list[torch.Tensor], list[int]]:
    with torch.no_grad():
        with bm.head() as model:
            assert _materialised(bm) == 0
            call = bm.block_inputs(lambda: model(**inputs))
        outs, live = [], []
        for i in range(len(bm.blocks)):
            with bm.onloaded(i) as block:
                live.append(_materialised(bm))
                hidden = bm.call(block, call)
            outs.append(hidden)
            call = type(call)(hidden, call.args, call.kwargs)
    return outs, live


@pytest.mark.parametrize("kind", ["llama", "gpt2", "vit"])
def test_blocks_one_at_a_time_equal_the_full_model(kind, tmp_path):
    model, inputs = _tiny(kind, tmp_path)
    if kind == "llama":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    bm = BlockModel(empty_model(type(model), model.config, torch.float32), tmp_path, torch.device("cpu"), torch.float32)
    assert _materialised(bm) == 0
    outs, live = _run_sequentially(bm, inputs)
    ref = _block_outputs(model, inputs)
    assert len(outs) == len(ref) == len(bm.blocks)
    for got, want in zip(outs, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert live == [1] * len(bm.blocks)  # exactly one block holds weights while it runs
    assert _materialised(bm) == 0


def test_minilm_blocks_and_recomputed_buffers(minilm, minilm_path):
    model, tok = minilm
    inputs = dict(tok(["a short one", "a somewhat longer second sentence here"], padding=True, return_tensors="pt"))
    bm = BlockModel(empty_model(type(model), model.config, torch.float32), minilm_path, torch.device("cpu"),
                    torch.float32)
    assert bm.blocks_name == "encoder.layer"
    outs, live = _run_sequentially(bm, inputs)
    for got, want in zip(outs, _block_outputs(model, inputs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert live == [1] * 6


def test_rotary_buffers_are_computed_not_loaded(tmp_path):
    model, _ = _tiny("llama", tmp_path)
    bm = BlockModel(empty_model(type(model), model.config, torch.float32), tmp_path, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(bm.model.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    with bm.head():
        torch.testing.assert_close(bm.model.model.embed_tokens.weight, model.model.embed_tokens.weight)
        assert bm.model.lm_head.weight.device.type == "meta"  # untied output head: never read
    assert bm.model.model.embed_tokens.weight.device.type == "meta"  # released while the blocks run
    assert bm.model.model.rotary_emb.inv_freq.device.type == "cpu"  # computed buffers stay


def test_checkpoint_without_safetensors_is_refused(tmp_path):
    model, _ = _tiny("gpt2", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="safetensors.*pytorch_model.bin"):
        BlockModel(empty_model(type(model), model.config, torch.float32), tmp_path, torch.device("cpu"), torch.float32)


def test_model_without_block_list_is_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="repeated block list.*Flat"):
        block_list(Flat())


def test_encoder_decoder_is_refused_and_mixed_layer_types_are_not():
    from transformers import LlamaConfig, T5Config

    with pytest.raises(ConfigError, match="encoder-decoder"):
        refuse_unsupported(T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64))
    cfg = LlamaConfig(num_hidden_layers=2)
    cfg.layer_types = ["sliding_attention", "full_attention"]
    refuse_unsupported(cfg)  # each block gets its own call (test_layer_types.py)
    cfg.quantization_config = {"quant_method": "mxfp4"}
    with pytest.raises(ConfigError, match=r"checkpoint is quantized \(mxfp4\); use a bf16/fp16 copy"):
        refuse_unsupported(cfg)
