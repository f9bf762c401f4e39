"""data.streaming vs a table: how long until the first batch, peak memory and cache disk, on a generated corpus.

    python benchmarks/streaming_data.py                 # about 300 MB of JSON lines
    python benchmarks/streaming_data.py --mb 50 --json out.json

Each way runs in a fresh process with an empty `datasets` cache (HF_DATASETS_CACHE in a temp folder), opens the
rows as the compute job does (`data.open_rows`) and collates the first step of 8 rows with MiniLM's tokenizer; then
it reads 200 more steps. It reports the time to the first batch, the time for the 200 steps, the process's peak RSS
and the bytes `datasets` wrote to its cache. A table converts the whole file to Arrow before its first batch; a
stream reads what the steps need.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
STEPS = 200


def corpus(path: Path, mb: int) -> Path:
    """Support-ticket-like lines of random words, `mb` megabytes (seeded)."""
    if path.is_file():
        return path
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)] + ["printer", "refund", "login", "password", "invoice", "delivery"]
    with open(path, "w") as f:
        written = 0
        while written < mb << 20:
            line = json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(20, 120)))}) + "\n"
            f.write(line)
            written += len(line)
    return path


def measure(data: str, streaming: bool) -> None:
    """In a fresh process: open, first batch, STEPS more; print the figures as JSON."""
    start = time.perf_counter()
    from transformers import AutoTokenizer

    from evapipe.core.config import DataConfig
    from evapipe.core.sources import resolve_model_path
    from evapipe.data import make_collator, open_rows, rank_batches

    cfg = DataConfig(path=data, streaming=streaming, batch_size=8, max_length=128, shuffle=False)
    collate = make_collator(AutoTokenizer.from_pretrained(resolve_model_path("builtin:minilm")), cfg, "causal-lm")
    imported = time.perf_counter()
    batches = rank_batches(open_rows(cfg), collate, cfg.batch_size, 1, 0)
    next(batches)
    first = time.perf_counter()
    for _ in range(STEPS):
        next(batches)
    done = time.perf_counter()
    print(json.dumps({"first_batch_s": first - imported, "steps_s": done - first, "import_s": imported - start,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def cache_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="corpus size in MB of JSON lines")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "evapipe-bench-streaming")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--measure", nargs=2, metavar=("DATA", "STREAMING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], args.measure[1] == "1")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    data = corpus(args.work / f"corpus-{args.mb}mb.jsonl", args.mb)
    print(f"corpus: {data} ({data.stat().st_size / 2**20:.0f} MiB)")
    results = {}
    for name, streaming in (("table", False), ("stream", True)):
        with tempfile.TemporaryDirectory(dir=args.work) as cache:
            env = dict(os.environ, HF_DATASETS_CACHE=cache)
            run = subprocess.run([sys.executable, __file__, "--measure", str(data), "1" if streaming else "0"],
                                 capture_output=True, text=True, env=env)
            if run.returncode != 0:
                sys.exit(run.stderr[-3000:])
            results[name] = json.loads(run.stdout.strip().splitlines()[-1]) | {"cache_mib": cache_bytes(Path(cache)) / 2**20}
    print(f"{'':8}{'first batch':>12}{f'{STEPS} steps':>12}{'peak RSS':>12}{'cache':>12}")
    for name, r in results.items():
        print(f"{name:8}{r['first_batch_s']:>11.2f}s{r['steps_s']:>11.2f}s{r['peak_rss_mib']:>8.0f} MiB"
              f"{r['cache_mib']:>8.0f} MiB")
    t, s = results["table"], results["stream"]
    print(f"stream / table: first batch {s['first_batch_s'] / t['first_batch_s']:.3f}x, "
          f"{STEPS} steps {s['steps_s'] / t['steps_s']:.2f}x, peak RSS {s['peak_rss_mib'] / t['peak_rss_mib']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
