"""PEFT-style custom hooks, named by import path in a job config, give the state PEFT computes with the same hooks.

The hooks (tests/peft_custom_hooks.py) are written as PEFT's "Customizing EVA" docs show: a forward call, a
prepare_model_inputs_fn that picks token positions once per batch, and a prepare_layer_inputs_fn per layer. PEFT's
get_eva_state_dict runs on the same model, the same batches in the same order and the same settings.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_image_folder
from evapipe import config_from_dict, run_job
from evapipe.core.config import import_callable
from evapipe.data import make_collator, open_rows, rank_batches
from evapipe.model.loading import load_model, load_processor
from evapipe.states.state import strip_peft_prefix

BATCH, N_BATCHES, R, RHO, TAU = 8, 3, 4, 2.0, 0.999
GAP = 0.1  # a component is well defined when its eigenvalue is this far (relative) from its neighbours'


def instruction_data(tmp, support_texts) -> str:
    """Prompt = the first words of a support message, completion = the rest (long enough for the PCA)."""
    rows = []
    for text in support_texts[: BATCH * N_BATCHES]:
        words = text.split()
        rows.append({"prompt": "Continue: " + " ".join(words[:4]), "completion": " " + " ".join(words[4:])})
    path = tmp / "instructions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CASES = {
    # tiny arch, kind, data fields, targets, hooks (functions of tests/peft_custom_hooks.py)
    "lm-label-mask": ("llama", "causal-lm", {"prompt_field": "prompt", "completion_field": "completion"},
                      ["q_proj", "v_proj", "o_proj", "down_proj"],
                      {"forward_fn": "lm_forward", "prepare_model_inputs_fn": "lm_token_indices",
                       "prepare_layer_inputs_fn": "rows_at_indices"}),
    "vit-patches-only": ("vit", "image-cls", {"image_field": "image"}, ["o_proj", "fc2"],
                         {"forward_fn": "vit_forward", "prepare_layer_inputs_fn": "patch_tokens"}),
    # PEFT's own defaults, named by import path: get_eva_state_dict with no hooks given
    "peft-lm-defaults": ("llama", "causal-lm", {"text_field": "prompt"}, ["q_proj", "v_proj", "o_proj", "down_proj"],
                         {"prepare_model_inputs_fn": "peft.tuners.lora.eva:prepare_model_inputs_fn_language_modeling",
                          "prepare_layer_inputs_fn": "peft.tuners.lora.eva:prepare_layer_inputs_fn_language_modeling"}),
}


def hook_spec(name: str) -> str:
    """`module:function`; bare names are functions of tests/peft_custom_hooks.py."""
    return name if ":" in name else f"peft_custom_hooks:{name}"


def well_separated(ratios: list[float], rank: int) -> list[int]:
    """Indices (< rank) of components whose eigenvalue is separated from both neighbours by GAP (relative)."""
    out = []
    for j in range(rank):
        gaps = [ratios[j] - ratios[j + 1]] if j + 1 < len(ratios) else []
        gaps += [ratios[j - 1] - ratios[j]] if j > 0 else []
        if min(gaps) > GAP * ratios[j]:
            out.append(j)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_config_hooks_match_peft(case, tmp_path, tiny_model_dir, support_texts):
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    arch, kind, fields, targets, hook_names = CASES[case]
    data_path = write_image_folder(tmp_path) if kind == "image-cls" else instruction_data(tmp_path, support_texts)
    cfg = config_from_dict({
        "model": {"name_or_path": tiny_model_dir(arch), "kind": kind, "device": "cpu"},
        "data": {"path": data_path, "batch_size": BATCH, "shuffle": False, "max_length": 64, **fields},
        "eva": {"r": R, "lora_alpha": 8, "rho": RHO, "tau": TAU, "target_modules": targets},
        "hooks": {k: hook_spec(v) for k, v in hook_names.items()},
        "output": {"path": str(tmp_path / "state.safetensors")},
    })
    ours = run_job(cfg, show_progress=False).state

    # PEFT on the same model, batches (in the job's order, cycled) and settings
    model, _ = load_model(cfg.model, torch.device("cpu"))
    collate = make_collator(load_processor(cfg.model, kind), cfg.data, kind)
    rows = open_rows(cfg.data, kind)
    assert rows.samples() == BATCH * N_BATCHES
    batches = [b for _, b in zip(range(N_BATCHES), rank_batches(rows, collate, cfg.data.batch_size, 1, 0))]
    lora = LoraConfig(r=R, lora_alpha=8, target_modules=sorted(ours.ranks), eva_config=EvaConfig(rho=RHO, tau=TAU))
    torch.manual_seed(0)
    ref = strip_peft_prefix(get_eva_state_dict(
        model, batches, lora, show_progress_bar=False,
        **{k: import_callable(hook_spec(v), k) for k, v in hook_names.items()},
        **({} if "prepare_model_inputs_fn" in hook_names else {"prepare_model_inputs_fn": None}),
    ))

    assert {k: int(v.shape[0]) for k, v in ref.items()} == ours.ranks  # the same rank distribution
    checked = 0
    for name, a_ref in ref.items():
        rank = int(a_ref.shape[0])
        if rank == 0:
            continue
        a = torch.nn.functional.normalize(ours.tensors[name].double(), dim=1)
        b = torch.nn.functional.normalize(a_ref.double(), dim=1)
        for j in well_separated(ours.meta["explained_variance"][name], rank):
            cos = abs(float(a[j] @ b[j]))
            assert cos >= 0.99, (name, j, cos)
            checked += 1
    assert checked >= len(ref)  # on average at least one well-separated component per layer was compared
    if case == "vit-patches-only":  # the class token was left out: 16 patch tokens per image
        assert ours.meta["tokens"] == ours.meta["batches"] * BATCH * 16
