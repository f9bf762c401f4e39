"""CorDA preprocessing: PEFT's preprocess_corda (one process) vs evapipe's `method: corda` job on 1 and 2 processes.

    python benchmarks/corda_vs_peft.py                                  # synthetic Llama 4 x 1024, 64 samples
    python benchmarks/corda_vs_peft.py --hidden 512 --layers 2 --samples 16   # a quick look
    python benchmarks/corda_vs_peft.py --json out.json

Same model (a random-init Llama saved with save_pretrained, MiniLM's tokenizer), same samples (the first --samples
rows of the shipped support_intents data, truncated to 128 tokens), every linear layer but the head, r=8, ipm:

    peft        PEFT 0.21: preprocess_corda(model, config, run_model) with run_model feeding one sample per forward
                (its hooks need that), then get_peft_model; the covariance and cache files written as PEFT writes them
    evapipe-1   `python -m evapipe.compute` of a `method: corda` config, batches of 8, one process
    evapipe-2   the same under `torchrun --nproc_per_node 2` (gloo): each process holds the model and its own share of
                the covariances; each decomposes its share
    evapipe-seq one process with model.offload: sequential (rounds of 8 batches, one block in memory at a time; the
                covariances stay whole: sequential onloading divides the weights, processes divide the covariances)

    python benchmarks/corda_vs_peft.py --hidden 2048 --layers 8 --samples 32   # the 2 GB synthetic Llama

Each runs in a fresh process, itself started from a fresh measuring process, so `getrusage(RUSAGE_CHILDREN)` gives
its wall time, CPU seconds and peak resident memory alone (under torchrun: the largest worker's). Both write PEFT's
covariance file; the largest relative difference between PEFT's and evapipe's covariances is printed. On a machine
shared with other work, wall times move; CPU seconds and memory less so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODES = ("peft", "evapipe-1", "evapipe-2", "evapipe-seq")
MAX_LENGTH = 128
R = 8
# every linear layer but the head; PEFT's preprocess_corda does not expand `all-linear` (get_peft_model does)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_run(model_dir: str, samples: int, work: str) -> None:
    """(The `peft` child.) PEFT's own CorDA preprocessing on one sample per forward, then its adapter."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evapipe.core.sources import resolve_data_path

    rows = load_dataset("json", data_files=resolve_data_path("builtin:support_intents"), split="train")
    texts = [r["text"] for r in rows.select(range(samples))]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = LoraConfig(r=R, lora_alpha=R, target_modules=TARGETS, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method="ipm", covariance_file=f"{work}/peft/cov.pt",
                                                 cache_file=f"{work}/peft/cache.pt"))

    def run_model() -> None:
        for text in texts:
            model(**tok(text, max_length=MAX_LENGTH, truncation=True, return_tensors="pt"))

    t0 = time.perf_counter()
    with torch.no_grad():
        preprocess_corda(model, config, run_model=run_model)
    get_peft_model(model, config)
    print(json.dumps({"preprocess_s": time.perf_counter() - t0}))


def evapipe_config(model_dir: str, samples: int, work: Path, mode: str) -> Path:
    import yaml

    model = {"name_or_path": model_dir, "device": "cpu"}
    if mode == "evapipe-seq":
        model |= {"offload": "sequential", "sequential_round": 8}
    cfg = {
        "method": "corda",
        "model": model,
        "data": {"path": "builtin:support_intents", "max_samples": samples, "batch_size": 8,
                 "max_length": MAX_LENGTH, "shuffle": False},
        "corda": {"r": R, "lora_alpha": R, "target_modules": TARGETS, "corda_method": "ipm",
                  "covariance_file": str(work / mode / "cov.pt")},
        "output": {"path": str(work / mode / "corda.safetensors")},
    }
    path = work / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(mode: str, model_dir: str, samples: int, work: Path) -> list[str]:
    if mode == "peft":
        return [sys.executable, __file__, "--peft-child", model_dir, "--samples", str(samples), "--work", str(work)]
    job = ["-m", "evapipe.compute", "--config", str(evapipe_config(model_dir, samples, work, mode)), "--no-progress"]
    if mode != "evapipe-2":
        return [sys.executable, *job]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *job]


def measure(cmd: list[str]) -> None:
    """(Run inside a fresh process.) `cmd` as a child; print its wall time, CPU seconds and peak RSS as JSON."""
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        sys.exit(run.stderr[-3000:] + run.stdout[-3000:])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = json.loads(run.stdout.strip().splitlines()[-1]) if cmd[1] == __file__ else {}
    print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                      "peak_rss_mib": usage.ru_maxrss / 1024} | child))


def max_relative_difference(a: Path, b: Path) -> float:
    import torch

    x, y = torch.load(a), torch.load(b)
    return max(float((x[n] - y[n]).norm() / x[n].norm()) for n in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--model-dir", default=None, help="keep the synthetic model here (built once)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peft-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peft_child:
        return peft_run(args.peft_child, args.samples, args.work)
    if args.measure:
        return measure(json.loads(args.measure))
    sys.path.insert(0, str(Path(__file__).parent))
    from bigmodel import synthetic_llama

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(tempfile.mkdtemp(prefix="evapipe-corda-"))
    model = synthetic_llama(Path(args.model_dir or work / "model"), args.hidden, args.layers)
    print(f"model: {args.layers} x {args.hidden} Llama; {args.samples} samples of up to {MAX_LENGTH} tokens; "
          f"r={R} ipm, every projection; {args.threads} thread(s) per process")
    results = {}
    for mode in args.modes:
        cmd = command(mode, model, args.samples, work)
        out = subprocess.run([sys.executable, __file__, "--measure", json.dumps(cmd)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        extra = f", preprocess {r['preprocess_s']:.1f}s" if "preprocess_s" in r else ""
        print(f"{mode:<10} wall {r['wall_s']:6.1f}s{extra}  cpu {r['cpu_s']:6.1f}s  peak RSS per process "
              f"{r['peak_rss_mib']:7.0f} MiB")
    for mode in [m for m in args.modes if m != "peft"]:
        if "peft" in args.modes:
            diff = max_relative_difference(work / "peft" / "cov.pt", work / mode / "cov.pt")
            results[mode]["max_rel_cov_diff_vs_peft"] = diff
            print(f"{mode}: covariances vs PEFT's, largest relative difference {diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
