"""model.offload: device_map -- accelerate's big-model inference over CPU and disk gives the in-memory state."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_job
from evapipe import config_from_dict, run_job
from evapipe.core.errors import ConfigError


def _state(llama_dir, out, **model):
    cfg = config_from_dict(tiny_job(llama_dir, model={"name_or_path": llama_dir, **model}, output={"path": str(out)}))
    return run_job(cfg, show_progress=False).state


def test_device_map_with_disk_offload_gives_the_in_memory_state(tmp_path, tiny_llama_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    reference = _state(tiny_llama_dir, tmp_path / "ref.safetensors")
    real = LlamaForCausalLM.from_pretrained.__func__
    loaded = []
    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: loaded.append(real(cls, *a, **kw)) or loaded[-1]))
    on_disk = {"model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"}
    offloaded = _state(tiny_llama_dir, tmp_path / "dm.safetensors", offload="device_map",
                       device_map={"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                                   **on_disk}, offload_folder=str(tmp_path / "offload"))
    placement = loaded[0].hf_device_map
    assert {k: placement[k] for k in on_disk} == on_disk  # a layer with target modules lives on disk
    assert all(p.device.type == "meta" for p in loaded[0].model.layers[1].parameters())
    assert offloaded.ranks == reference.ranks and offloaded.meta["tokens"] == reference.meta["tokens"]
    for name, a in reference.tensors.items():
        torch.testing.assert_close(offloaded.tensors[name], a, atol=1e-4, rtol=1e-4)
    assert offloaded.meta["store_key"] == reference.meta["store_key"]  # how the model is held is not the job


def test_budget_below_one_block_names_both_sizes(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"at most 10\.0 KiB on any device \(cpu\), below one block .*"
                                          r"model\.layers\.\d+, LlamaDecoderLayer: \d+\.\d KiB"):
        _state(tiny_llama_dir, tmp_path / "x.safetensors", offload="device_map", max_memory={"cpu": 10 * 1024})
    assert not (tmp_path / "x.safetensors").exists()


def test_unwritable_offload_folder_is_named(tmp_path, tiny_llama_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"model.offload_folder` {blocker}/sub is not a writable folder"):
        _state(tiny_llama_dir, tmp_path / "x.safetensors", offload="device_map", offload_folder=str(blocker / "sub"))


@pytest.mark.parametrize("model, message", [
    ({"device_map": "auto"}, "model.device_map and model.offload_folder need model.offload: device_map"),
    ({"offload": "device_map", "device_map": "everywhere"}, "model.device_map` 'everywhere' is not a map"),
    ({"offload": "device_map", "max_memory": {"cpu": "lots"}}, "'lots' is not a size"),
])
def test_offload_settings_are_checked(tmp_path, tiny_llama_dir, model, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        _state(tiny_llama_dir, tmp_path / "x.safetensors", **model)
