"""Divided SVD work: per-rank SVD time of the compute job with 1 process vs 2, on the same global batches.

    python benchmarks/distributed_svd.py                                  # MiniLM, global batch 16 x 128, 24 steps
    python benchmarks/distributed_svd.py --case llama --hidden 1024 --layers 4 --threads 4
    python benchmarks/distributed_svd.py --nproc 4 --threads 2 --json out.json

Both runs are the real job (`run_job`, gloo on the CPU, launched with torchrun for N > 1): 1 process reads batch
B per step, N processes batch B/N each, so every step's union of samples is the same, and both run the same fixed
number of steps (eva.tau = 1: no layer stops early, so the PCA work is identical). Every process gets the same
number of threads, so a rank's SVD time is comparable to the single process's. Printed per rank: tokens read,
forward / SVD / communication seconds, PCAs owned and token rows folded into them; then the ratio of the slowest
rank's SVD time to the single process's (1/N is a perfectly divided workload) and a check that both runs produced
the same state (rank distribution, |cos| of the components).

In PEFT's get_eva_state_dict every rank all-gathers every layer's inputs and runs every SVD, so its per-rank SVD
time stays at the single-process time whatever N is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MINILM_TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]  # output.dense: attention.output.dense too


def tiny_llama(folder: Path, hidden: int, layers: int, tokenizer: str) -> str:
    """A random Llama of the given width and depth with `tokenizer` (a MiniLM-like one), saved once to `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from evapipe.core.sources import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def job(args: argparse.Namespace, model: str, batch_size: int, out: Path) -> dict:
    return {
        "model": {"name_or_path": model, "device": "cpu"},
        "data": {"path": "builtin:support_intents", "batch_size": batch_size, "max_length": args.max_length,
                 "shuffle": True, "seed": 0},
        "eva": {"r": args.r, "rho": 2.0, "tau": 1.0, "max_batches": args.steps, "on_unconverged": "warn",
                **({"target_modules": MINILM_TARGETS} if args.case == "minilm" else {})},
        "output": {"path": str(out)},
    }


def worker(config: str, stats: str, threads: int) -> None:
    """One rank of the job; rank 0 writes every rank's stats (RankStats) and the wall time as JSON."""
    import torch

    torch.set_num_threads(threads)
    from evapipe import load_config, run_job

    start = time.perf_counter()
    result = run_job(load_config(config), show_progress=False)
    if result.path is not None:
        rows = [dataclasses.asdict(s) for s in result.rank_stats]
        Path(stats).write_text(json.dumps({"wall_s": time.perf_counter() - start, "ranks": rows}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, config: Path, stats: Path, threads: int) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", str(config), str(stats), "--threads", str(threads)]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *me]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{nproc}-process run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(stats.read_text())


def same_state(one: Path, many: Path) -> tuple[bool, float]:
    from evapipe import load_state

    a, b = load_state(one), load_state(many)
    worst = min(float((x * b.tensors[n]).sum(1).abs().min()) for n, x in a.tensors.items())
    return a.meta["ranks"] == b.meta["ranks"], worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=["minilm", "llama"], default="minilm")
    p.add_argument("--model", default="builtin:minilm", help="minilm case: the MiniLM folder to load")
    p.add_argument("--hidden", type=int, default=1024, help="llama case: hidden size")
    p.add_argument("--layers", type=int, default=4, help="llama case: decoder layers")
    p.add_argument("--tokenizer", default="builtin:minilm", help="llama case: tokenizer folder (WordPiece, BERT-like)")
    p.add_argument("--nproc", type=int, default=2, help="processes to compare with one")
    p.add_argument("--batch", type=int, default=16, help="global batch (samples per step, over all processes)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (the same in both runs)")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "STATS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker, args.threads)
    if args.batch % args.nproc:
        sys.exit("--batch must be a multiple of --nproc")

    import yaml

    work = Path(tempfile.mkdtemp(prefix="evapipe-dist-svd-"))
    if args.case == "minilm":
        model = args.model
    else:
        model = tiny_llama(work / "model", args.hidden, args.layers, args.tokenizer)
    runs = {}
    for n in (1, args.nproc):
        config = work / f"job-{n}.yaml"
        config.write_text(yaml.safe_dump(job(args, model, args.batch // n, work / f"state-{n}.safetensors")))
        runs[n] = launch(n, config, work / f"stats-{n}.json", args.threads)
    same_ranks, worst_cos = same_state(work / "state-1.safetensors", work / f"state-{args.nproc}.safetensors")

    print(f"{args.case}: global batch {args.batch} x {args.max_length} tokens, {args.steps} steps, r={args.r}, "
          f"{args.threads} thread(s) per process")
    print(f"{'run':<9} {'rank':>4} {'tokens':>7} {'forward s':>9} {'SVD s':>7} {'comm s':>6} {'PCAs':>4} {'rows':>8}")
    for n, run in runs.items():
        for s in run["ranks"]:
            print(f"{n} proc{'s' if n > 1 else ' '}  {s['rank']:>4} {s['tokens']:>7} {s['forward_s']:>9.2f} "
                  f"{s['svd_s']:>7.2f} {s['comm_s']:>6.2f} {len(s['owned']):>4} {s['pca_tokens']:>8}")
        print(f"{'':<9} wall {run['wall_s']:.1f}s")
    svd_one = runs[1]["ranks"][0]["svd_s"]
    svd_many = [s["svd_s"] for s in runs[args.nproc]["ranks"]]
    ratio = max(svd_many) / svd_one
    print(f"per-rank SVD time, {args.nproc} processes / 1 process: slowest rank {ratio:.2f}, "
          f"mean {sum(svd_many) / len(svd_many) / svd_one:.2f} (perfect division: {1 / args.nproc:.2f})")
    print(f"same state: rank distribution {'identical' if same_ranks else 'DIFFERENT'}, worst |cos| {worst_cos:.5f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "svd_ratio_slowest": ratio,
                                               "same_ranks": same_ranks, "worst_cos": worst_cos}, indent=2))


if __name__ == "__main__":
    main()
