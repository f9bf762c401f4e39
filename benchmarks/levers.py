"""Each performance lever of evapipe, measured: time and component quality with the lever off or changed.

    python benchmarks/levers.py                          # MiniLM, the bench_eva.py default case
    python benchmarks/levers.py --case llama-bigvocab    # the large-vocabulary Llama

One run builds bench_eva.py's case once, then runs evapipe's engine (each variant in a fresh process, --repeat
times) as shipped and with one lever switched off or one constant changed, and prints, per variant: wall time (the
fastest run), batches to converge, peak memory, time relative to the shipped engine, and the captured variance of
its components on the whole data as a fraction of the exact top-k PCA of the whole data (the same measure as
bench_eva.py). A lever that does not pay in this table has no place in evapipe.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_eva  # noqa: E402
import torch  # noqa: E402

VARIANTS: list[tuple[str, dict]] = [  # (label, bench_eva.py options that differ from the shipped defaults)
    ("shipped", {}),
    ("no early stop (forward to the logits)", {"ablate": ["early-stop"]}),
    ("capture converged layers too", {"ablate": ["skip-converged"]}),
    ("no duplicate-input detection", {"ablate": ["dedup"]}),
    ("one layer at a time (no batched algebra)", {"ablate": ["batched"]}),
    ("1 power iteration per warm update", {"ablate": ["warm-power"]}),
    ("no power iteration on the cold start", {"knob": ["ipca.FIRST_POWER_ITERATIONS=0"]}),
    ("no extra power iteration while young", {"knob": ["ipca.YOUNG_SHARE=1.0"]}),
    ("no fresh directions (EXTRA_RANDOM_DIRECTIONS=0)", {"knob": ["ipca.EXTRA_RANDOM_DIRECTIONS=0"]}),
    ("track only r*rho components (oversample 0, as PEFT)", {"oversample": 0}),
    ("oversample 3 x r*rho (4 x tracked)", {"oversample": "3x"}),
    ("eva.refine_converged: true", {"refine": True}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["minilm", "llama-bigvocab"], default="minilm")
    p.add_argument("--text", choices=["python-docs", "support-intents"], default="python-docs")
    p.add_argument("--batches", type=int, default=None, help="batches in the data (default: bench_eva's)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3, help="runs per variant; the fastest is shown (timing noise)")
    args = p.parse_args()
    base = bench_eva_args(args)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="evapipe-levers-") as tmp:
        work = Path(tmp)
        case = bench_eva.build_case(base, work)
        results: dict[str, dict] = {}
        for label, options in VARIANTS:
            run_args = copy.copy(base)
            for key, value in options.items():
                setattr(run_args, key, 3 * int(case["r"] * case["rho"]) if value == "3x" else value)
            runs = [bench_eva.spawn("evapipe", run_args, work) for _ in range(args.repeat)]
            results[label] = min(runs, key=lambda r: r["seconds"])  # the least disturbed run; results are seeded
            print(f"  ran: {label}", file=sys.stderr, flush=True)
        model, batches, _ = bench_eva.load_case(work, args.device)
        groups = results["shipped"]["groups"]
        qual = bench_eva.quality(model, batches, groups, results, args.device)
    shipped = results["shipped"]["seconds"]
    print(f"case {case['case']}: {case['data']}, {case['n_batches']} batches of {case['batch_size']} x "
          f"{case['seq_len']}, r={case['r']} rho={case['rho']} tau={case['tau']}, {args.device}, {args.threads} threads, "
          f"fastest of {args.repeat} runs")
    print("captured = variance the components capture on the whole data / exact top-k of the whole data")
    print("| variant | wall s | vs shipped | batches | peak MB | captured mean | captured worst |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, res in results.items():
        frac = list(qual[label].values())
        print(f"| {label} | {res['seconds']:.2f} | {res['seconds'] / shipped:.2f}x | {res['batches']} | "
              f"{res['peak_mb']:.0f} | {sum(frac) / len(frac):.4f} | {min(frac):.4f} |")


def bench_eva_args(args: argparse.Namespace) -> argparse.Namespace:
    """bench_eva.py's defaults for everything levers.py does not set."""
    argv = ["--case", args.case, "--text", args.text, "--threads", str(args.threads), "--device", args.device]
    if args.batches:
        argv += ["--batches", str(args.batches)]
    return bench_eva.parser().parse_args(argv)


if __name__ == "__main__":
    main()
