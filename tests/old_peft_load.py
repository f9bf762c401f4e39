"""Run by tests/parity/test_peft_compat.py in a subprocess whose PYTHONPATH puts the oldest declared PEFT first: load each
adapter directory onto its base model as a user of that PEFT would, and report what PEFT built as JSON.

    python tests/old_peft_load.py '[{"dir": ..., "num_labels": null}, ...]'
"""

from __future__ import annotations

import json
import sys

import peft
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer


def load_one(adapter: str, num_labels: int | None) -> dict:
    base_path = json.loads(open(f"{adapter}/adapter_config.json").read())["base_model_name_or_path"]
    torch.manual_seed(0)
    base = (AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=num_labels) if num_labels
            else AutoModel.from_pretrained(base_path)).eval()
    tok = AutoTokenizer.from_pretrained(base_path)
    batch = dict(tok(["My card was charged twice.", "How do I reset my password?"], padding=True,
                     return_tensors="pt"))
    with torch.no_grad():
        out = base(**batch)
        before = out.logits if num_labels else out.last_hidden_state
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True).eval()
    saved = {k.removeprefix("base_model.model."): v
             for k, v in load_file(f"{adapter}/adapter_model.safetensors").items()}
    layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        out = model(**batch)
        after = out.logits if num_labels else out.last_hidden_state
    model.train()
    out = model(**batch, **({"labels": torch.tensor([0, 1])} if num_labels else {}))
    loss = out.loss if num_labels else out.last_hidden_state.pow(2).mean()
    loss.backward()
    return {
        "type": type(model).__name__,
        "r": {n: m.r["default"] for n, m in layers.items()},
        "scaling": {n: m.scaling["default"] for n, m in layers.items()},
        "dora": sorted(n for n, m in layers.items() if "default" in getattr(m, "lora_magnitude_vector", {})),
        "a_equal": all(torch.equal(m.lora_A["default"].weight, saved[f"{n}.lora_A.weight"]) for n, m in layers.items()),
        "max_output_diff": float((after - before).abs().max()),
        "loss": float(loss),
        "b_grads": all(m.lora_B["default"].weight.grad is not None and m.lora_B["default"].weight.grad.abs().sum() > 0
                       for m in layers.values()),
    }


if __name__ == "__main__":
    jobs = json.loads(sys.argv[1])
    print(json.dumps({"peft": peft.__version__, "peft_file": peft.__file__,
                      "adapters": [load_one(j["dir"], j["num_labels"]) for j in jobs]}))
