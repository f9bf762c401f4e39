"""The GPU check of big models: model.offload: sequential end to end on CUDA, against the model in memory and (dense
model) PEFT's get_eva_state_dict, on the same batches.

    python benchmarks/gpu_check.py                                # a GPU machine: 8B-shaped Llama and MoE, bf16
    python benchmarks/gpu_check.py --models llama --layers 8      # fewer blocks (same widths), for a short lease
    python benchmarks/gpu_check.py --size tiny --device cpu       # the same script on toy shapes, anywhere

Models (random init, bf16, saved once in sharded safetensors; --model-dir keeps them between calls):
    llama   Llama-3-8B-shaped: 32 blocks x 4096, 14336 intermediate, 32 heads / 8 key-value heads (about 15 GB)
    moe     gpt-oss-shaped: 12 blocks x 2880, 16 experts (top 4) with fused gate_up/down, sliding and full attention
            layers alternating (about 10 GB); the experts' fused parameters are targets too (eva.target_parameters)

Modes, each in a fresh process (its peak memory its own: torch.cuda.max_memory_allocated on CUDA, else the
process's peak RSS; the wall time includes reading the model):
    none        evapipe, the model in memory on --device
    sequential  evapipe, model.offload: sequential on --device (one block at a time, a round of all batches)
    peft        PEFT's get_eva_state_dict on the model in memory, the job's own batches (dense model only)

A random model's spectra are nearly flat, so no layer converges: every run takes --batches batches (tau 0.99) and
the states are compared: sequential vs none (same ranks, min |cos| per component), peft vs none (ranks in common).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bigmodel  # noqa: E402  (benchmarks/ is the script's folder)
import moe_speed  # noqa: E402

SHAPES = {  # (hidden, intermediate, blocks, heads, key-value heads, experts)
    ("llama", "full"): (4096, 14336, 32, 32, 8, 0),
    ("moe", "full"): (2880, 2880, 12, 64, 8, 16),
    ("llama", "tiny"): (256, 704, 4, 4, 2, 0),
    ("moe", "tiny"): (256, 256, 4, 4, 2, 4),
}
R, RHO = 8, 2.0
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
DENSE = ATTENTION + ["gate_proj", "up_proj", "down_proj"]  # named: PEFT's EVA does not resolve "all-linear"


def build(kind: str, size: str, layers: int | None, folder: Path) -> str:
    """The random bf16 model, saved once (bigmodel.py's and moe_speed.py's builders, at these shapes)."""
    hidden, inter, blocks, heads, kv, experts = SHAPES[kind, size]
    shape = dict(intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv)
    if kind == "llama":
        return bigmodel.synthetic_model(folder, hidden, layers or blocks, dtype="bfloat16", **shape)
    return moe_speed.synthetic_gpt_oss(folder, hidden, layers or blocks, experts, dtype="bfloat16",
                                       sliding_window=64, **shape)


def job_config(model: str, kind: str, mode: str, args: argparse.Namespace, out: Path) -> dict:
    eva = {"r": R, "rho": RHO, "tau": 0.99, "target_modules": DENSE, "max_batches": args.batches,
           "on_unconverged": "warn"}
    if kind == "moe":
        eva |= {"target_modules": ATTENTION,
                "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    model_cfg = {"name_or_path": model, "device": args.device, "dtype": "bfloat16",
                 "offload": "sequential" if mode == "sequential" else "none", "sequential_round": args.batches}
    return {"model": model_cfg, "eva": eva, "output": {"path": str(out)},
            "data": {"path": "builtin:support_intents", "batch_size": args.batch_size, "max_length": 128,
                     "shuffle": False}}


def peak_memory(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(mode: str, config: str) -> None:
    """(In a fresh process.) One mode of one model; prints its figures as JSON."""
    import torch

    from evapipe import load_config, run_job

    cfg = load_config(config)
    t0 = time.perf_counter()
    if mode == "peft":
        peft_state(cfg)
    else:
        run_job(cfg, show_progress=False)
    if cfg.model.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(json.dumps({"wall_s": time.perf_counter() - t0, "peak_mib": peak_memory(cfg.model.device)}))


def peft_state(cfg) -> None:
    """PEFT's get_eva_state_dict on the job's own batches (evapipe's data API), saved beside the job's state."""
    import torch
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora.eva import get_eva_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evapipe.data import make_collator, open_rows, rank_batches
    from evapipe.states.state import strip_peft_prefix

    path = cfg.model.name_or_path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(cfg.model.device).eval()
    collate = make_collator(AutoTokenizer.from_pretrained(path), cfg.data, "causal-lm")
    batches = []
    for batch in rank_batches(open_rows(cfg.data, "causal-lm"), collate, cfg.data.batch_size, 1, 0):
        batches.append({k: v.to(cfg.model.device) for k, v in batch.items()})
        if len(batches) == cfg.eva.max_batches:
            break
    lora = LoraConfig(r=R, lora_alpha=R, target_modules=DENSE, eva_config=EvaConfig(rho=RHO, tau=0.99))
    sd = strip_peft_prefix(get_eva_state_dict(model, batches, lora, show_progress_bar=False))
    if not sd:
        raise SystemExit("PEFT's get_eva_state_dict returned no layer")
    save_file({k: v.float().contiguous().cpu() for k, v in sd.items()}, cfg.output.path)


def peft_ranks(path: str, evapipe_state: str) -> str:
    from safetensors.torch import load_file

    from evapipe import load_state

    theirs = {k: int(v.shape[0]) for k, v in load_file(path).items()}
    ours = load_state(evapipe_state).ranks
    same = sum(theirs.get(k) == r for k, r in ours.items())
    return f"ranks equal on {same} of {len(ours)} layers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama", "moe"], choices=["llama", "moe"])
    parser.add_argument("--modes", nargs="+", default=["none", "sequential", "peft"],
                        choices=["none", "sequential", "peft"])
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: toy shapes, a smoke run")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: the shape's own)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, default=8, help="eva.max_batches (and the sequential round)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--model-dir", default=None, help="keep the models here (built once)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--phase", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return phase(*args.phase)
    import yaml

    work = Path(tempfile.mkdtemp(prefix="evapipe-gpu-check-"))
    models = Path(args.model_dir or work)
    results: dict[str, dict] = {}
    for kind in args.models:
        model = build(kind, args.size, args.layers, models / f"{kind}-{args.size}-{args.layers or 'all'}")
        gib = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 2**30
        print(f"{kind}: {gib:.2f} GiB of bf16 safetensors; {args.batches} batches of {args.batch_size} x 128 tokens; "
              f"device {args.device}", flush=True)
        for mode in args.modes:
            if mode == "peft" and kind == "moe":
                continue  # PEFT's EVA does not target experts' fused parameters
            out = work / f"{kind}-{mode}.safetensors"
            cfg = work / f"{kind}-{mode}.yaml"
            cfg.write_text(yaml.safe_dump(job_config(model, kind, mode, args, out)))
            run = subprocess.run([sys.executable, __file__, "--phase", mode, str(cfg)], capture_output=True, text=True)
            if run.returncode != 0:
                print(f"{kind} {mode:>10}: failed: {run.stderr.strip()[-800:]}", flush=True)
                continue
            r = results[f"{kind} {mode}"] = json.loads(run.stdout.strip().splitlines()[-1]) | {"state": str(out)}
            print(f"{kind} {mode:>10}: {r['wall_s']:7.1f} s, peak memory {r['peak_mib']:8.0f} MiB", flush=True)
        base = results.get(f"{kind} none")
        for mode in ("sequential", "peft"):
            r = results.get(f"{kind} {mode}")
            if base is None or r is None:
                continue
            ratio = f"wall {r['wall_s'] / base['wall_s']:.2f}x, peak memory {r['peak_mib'] / base['peak_mib']:.2f}x"
            same = (bigmodel.compare(base["state"], r["state"]) if mode == "sequential"
                    else {"ranks": peft_ranks(r["state"], base["state"])})
            r |= same
            print(f"{kind} {mode:>10} vs none: {ratio}; {same}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
