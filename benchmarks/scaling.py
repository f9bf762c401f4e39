"""What one batch costs evapipe's PCA side, as a function of tokens per batch, in_features and target layers.

    python benchmarks/scaling.py                 # the table in docs/performance.md (2 threads, r=8, rho=2)
    python benchmarks/scaling.py --r 16 --rho 2  # your own settings

A model's EVA cost per batch is its forward pass up to the deepest target layer (see bench_eva.py's floor) plus, for
every PCA still running, one incremental update on that batch's tokens. This script measures the second part alone,
so users can add it to the forward cost of a model they know: each row runs in a fresh process, warms the PCAs up on
a few batches (the first update is a cold start and costs more), then times steady-state updates of `layers` PCAs of
width `in_features` on `tokens` rows each (what `ipca.update_many` receives after capture and masking), with a
planted decaying spectrum like real layer inputs. Memory: the process's peak RSS during the updates above what the
inputs already hold (the PCA states and the updates' working memory; Linux only).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

GRID = [  # (tokens per batch, in_features, target layers): vary one at a time around MiniLM's 1024 x 384 x 6
    (256, 384, 6), (1024, 384, 6), (4096, 384, 6), (16384, 384, 6),
    (1024, 256, 6), (1024, 1024, 6), (1024, 4096, 6),
    (1024, 384, 1), (1024, 384, 24), (1024, 384, 96),
]


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Reset the process's peak RSS (Linux >= 4.0), so the peak seen next is the timed updates' own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def batches(tokens: int, width: int, layers: int, count: int, seed: int) -> list[list[torch.Tensor]]:
    """`count` steps of `layers` inputs (tokens x width) with a decaying spectrum and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(width, width, generator=g)).Q
    sd = 1.0 / torch.arange(1, width + 1).float().sqrt()
    mean = torch.randn(width, generator=g)
    return [[(torch.randn(tokens, width, generator=g) * sd) @ basis.T + mean for _ in range(layers)] for _ in range(count)]


def measure(tokens: int, width: int, layers: int, r: int, rho: float, warmup: int, timed: int) -> dict[str, float]:
    from evapipe.eva import ipca

    data = batches(tokens, width, layers, warmup + timed, seed=0)
    states = [ipca.new_state(width, int(r * rho), None, seed=i) for i in range(layers)]
    gc.collect()
    base = rss_mb()
    reset_peak()
    times = []
    for i, step in enumerate(data):
        t0 = time.perf_counter()
        ipca.update_many(states, step)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "added_mb": max(0.0, peak_mb() - base),
            "input_mb": tokens * width * layers * 4 / 2**20,
            "state_mb": sum(s.n_track * width * 4 + width * 8 for s in states) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--warmup", type=int, default=3, help="updates before timing (the cold start is not typical)")
    p.add_argument("--timed", type=int, default=5, help="timed updates per row (the median is shown)")
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.row:
        tokens, width, layers = (int(v) for v in args.row.split(","))
        print(json.dumps(measure(tokens, width, layers, args.r, args.rho, args.warmup, args.timed)))
        return
    print(f"evapipe PCA update per batch: r={args.r} rho={args.rho} ({int(args.r * args.rho)} components, "
          f"{2 * int(args.r * args.rho)} tracked), {args.threads} threads, torch {torch.__version__}, "
          f"median of {args.timed} warm updates")
    print("| tokens/batch | in_features | layers | ms/batch | ms/layer/1k tokens | inputs MB | state MB | added MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tokens, width, layers in GRID:
        cmd = [sys.executable, __file__, "--row", f"{tokens},{width},{layers}", "--r", str(args.r), "--rho",
               str(args.rho), "--threads", str(args.threads), "--warmup", str(args.warmup), "--timed", str(args.timed)]
        m = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        ms = m["seconds"] * 1000
        print(f"| {tokens} | {width} | {layers} | {ms:.1f} | {ms / layers / (tokens / 1000):.2f} | "
              f"{m['input_mb']:.1f} | {m['state_mb']:.2f} | {m['added_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
