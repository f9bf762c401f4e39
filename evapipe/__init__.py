"""evapipe: EVA-initialised LoRA adapters, computed as a (multi-process) pipeline.

Python API (each CLI command wraps one of these):
    compute_eva_state(model, dataloader, EvaSettings(r=8))  -> EvaState   (your model and dataloader)
    run_job(load_config("cfg.yaml"))                          -> JobResult  (the config-driven job)
    load_state(path or URL) / read_metadata(path or URL)       -> EvaState / dict (a URL: cached locally, verified)
    apply_eva_state(model, state)                              -> trainable PeftModel (lora_A = state, lora_B = 0)
    apply_eva_state(model, state, baseline=True)               -> the same adapter, PEFT's default init (A/B baseline)
    apply_to_directory(state_path, output, model)              -> PEFT adapter directory (`evapipe apply`)
    check_adapter_dir(adapter_dir, model)                      -> AdapterFit, or why it would not load (`evapipe check`)
    to_peft_state_dict(state)                                  -> dict for PEFT's initialize_lora_eva_weights
    list_states(store_dir)                                     -> StoreEntry list (`evapipe list`)
    rebudget(state, r, rho) / rebudget_file(src, dst, r, rho)  -> EvaState (`evapipe rebudget`)
    convert_file(src, dst, r=...)                              -> EvaState (`evapipe convert`)
    run_job(cfg with method: corda) / load_corda_state(path)   -> CorDA state (docs/other-methods.md)
    apply_corda_state(model, state) / apply_corda_to_directory -> PeftModel / adapter + residual model
    quiet_dependencies()                                       -> dependencies' own progress bars and warnings off
    push(state, url) / write_card(state, folder)               -> a state published with its card (`evapipe push/card`)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "EvaSettings": "core.config", "JobConfig": "core.config", "load_config": "core.config", "config_from_dict": "core.config",
    "compute_eva_state": "compute", "run_job": "job",
    "EvaState": "states.state", "load_state": "states.statecache", "read_metadata": "states.state",
    "apply_eva_state": "adapters.apply", "apply_to_directory": "adapters.apply", "to_peft_state_dict": "adapters.apply",
    "check_adapter_dir": "adapters.check",
    "list_states": "states.store", "CordaSettings": "core.config", "load_corda_state": "states.corda_state",
    "apply_corda_state": "adapters.corda", "apply_corda_to_directory": "adapters.corda", "rebudget": "states.rebudget", "rebudget_file": "states.rebudget", "convert_file": "adapters.convert",
    "quiet_dependencies": "core.quiet",
    "push": "states.card", "write_card": "states.card",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Lazy exports, so `evapipe --help` and metadata reads do not import torch."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
