"""Models bigger than memory: wall time and peak memory of the compute job held three ways, on the same batches.

    python benchmarks/bigmodel.py                         # synthetic Llama, 8 x 2048 wide (about 2 GB float32)
    python benchmarks/bigmodel.py --layers 2 --hidden 512 --batches 4        # a quick look
    python benchmarks/bigmodel.py --json out.json
    python benchmarks/bigmodel.py --modes none sequential --repeat 3      # medians of 3 interleaved runs
    python benchmarks/bigmodel.py --rho 1 --modes none sequential   # ranks cannot move: one round takes every step
    python benchmarks/bigmodel.py --arch gemma3 --modes none sequential   # Gemma-3-shaped: 5 sliding : 1 full layers

The model is a random-init Llama (or, with --arch gemma3, a Gemma-3-shaped model: five sliding-window layers to one
full-attention layer, window 64 of the 128 tokens, one rotary embedding per layer type, so every block gets its own
type's call) saved with `save_pretrained` in sharded safetensors (500 MB shards). Each mode runs
the real job (`python -m evapipe.compute`) in a fresh process, itself started from a fresh measuring process, so
`resource.getrusage(RUSAGE_CHILDREN)` gives that job's peak resident memory and CPU seconds alone (CPU seconds are
less sensitive than wall time to other work on a shared machine):

    none        the whole model in memory (today's behaviour)
    sequential  model.offload: sequential, model.sequential_round = all the batches (one block in memory at a time);
                the steps each round took are printed: where a layer that had stopped (its rank budgeted to 0) is
                needed again, its block runs again on its parked inputs and the round goes on
    device_map  model.offload: device_map, the first half of the blocks on the CPU, the rest (and the head) on disk

A random model's activation spectra are nearly flat, so no layer passes the cosine test: every mode runs eva.max_batches batches
(tau = 0.99, on_unconverged: warn), and the states are compared (ranks, |cos| of every component).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODES = ("none", "sequential", "device_map")


def synthetic_model(folder: Path, hidden: int, layers: int, arch: str = "llama", dtype: str = "float32",
                    **shape_overrides: int) -> str:
    """A random Llama or Gemma-3-shaped model (MiniLM's tokenizer and vocabulary), saved in sharded safetensors once;
    `shape_overrides` replace config fields (intermediate_size, num_key_value_heads, ...)."""
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    import transformers as tf

    from evapipe.core.sources import resolve_model_path

    tok = tf.AutoTokenizer.from_pretrained(resolve_model_path("builtin:minilm"))
    torch.manual_seed(0)
    shape = dict(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                 num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 256,
                 max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                 eos_token_id=tok.sep_token_id) | shape_overrides
    torch.set_default_dtype(getattr(torch, dtype))  # built in the saved dtype: no float32 copy of a big model
    try:
        if arch == "gemma3":
            types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
            model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**shape, head_dim=128, sliding_window=64,
                                                             layer_types=types))
        else:
            model = tf.LlamaForCausalLM(tf.LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, max_shard_size="500MB")
    tok.save_pretrained(folder)
    return str(folder)


def job_config(model: str, mode: str, args: argparse.Namespace, work: Path) -> dict:
    layers = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    model_cfg: dict = {"name_or_path": model, "device": "cpu", "offload": mode}
    if mode == "sequential":
        model_cfg["sequential_round"] = args.batches
    if mode == "device_map":
        on_cpu = ["model.embed_tokens", "model.rotary_emb"] + [f"model.layers.{i}" for i in range(layers // 2)]
        on_disk = [f"model.layers.{i}" for i in range(layers // 2, layers)] + ["model.norm", "lm_head"]
        model_cfg |= {"device_map": {**{m: "cpu" for m in on_cpu}, **{m: "disk" for m in on_disk}},
                      "offload_folder": str(work / "offload")}
    return {
        "model": model_cfg,
        "data": {"path": "builtin:support_intents", "batch_size": args.batch_size, "max_length": 128, "shuffle": False},
        "eva": {"r": 8, "rho": args.rho, "tau": 0.99, "target_modules": "all-linear", "max_batches": args.batches,
                "on_unconverged": "warn"},
        "output": {"path": str(work / f"{mode}.safetensors")},
    }


def measure(config: str) -> None:
    """(Run inside a fresh process.) The job as a child; print its wall time and peak RSS as JSON."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "evapipe.compute", "--config", config, "--no-progress"],
                         capture_output=True, text=True, env=os.environ)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        sys.exit(run.stderr[-3000:])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    split = re.search(r"forward ([\d.]+)s, SVD ([\d.]+)s", run.stdout + run.stderr)  # the summary (stdout; stderr before #21)
    rounds = [int(n) for n in re.findall(r"sequential round at step \d+: .*?, (\d+) step", run.stderr)]
    print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
                      "forward_s": float(split[1]) if split else None, "svd_s": float(split[2]) if split else None,
                      "round_steps": rounds}))


def compare(a: str, b: str) -> dict:
    from evapipe import load_state

    x, y = load_state(a), load_state(b)
    worst = 1.0
    for name, t in x.tensors.items():
        cos = (t * y.tensors[name]).sum(1).abs() / (t.norm(dim=1) * y.tensors[name].norm(dim=1))
        worst = min(worst, float(cos.min()))
    same = all(bool((t == y.tensors[n]).all()) for n, t in x.tensors.items())
    return {"same_ranks": x.ranks == y.ranks, "min_cos": worst, "bit_identical": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="llama", choices=["llama", "gemma3"],
                        help="llama, or gemma3: sliding-window and full-attention layers (5:1), each called its own way")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8, help="eva.max_batches (and the sequential round)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rho", type=float, default=2.0,
                        help="eva.rho; 1 keeps every layer at rank r, so no layer stops and no round ends early")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--model-dir", default=None, help="keep the synthetic model here (built once)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per job (OMP_NUM_THREADS); 1 keeps CPU seconds free of spin-waiting "
                             "on a machine shared with other work")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every mode this many times, interleaved, and compare the median runs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    import yaml

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(tempfile.mkdtemp(prefix="evapipe-bigmodel-"))
    folder = Path(args.model_dir or work / "model")
    model = synthetic_model(folder, args.hidden, args.layers, args.arch)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
    print(f"model: {args.layers} x {args.hidden} {args.arch}, {size:.2f} GiB of safetensors in "
          f"{len(list(folder.glob('*.safetensors')))} shards; {args.batches} batches of {args.batch_size} x 128 tokens; "
          f"rho {args.rho:g}; {args.threads} thread(s)")
    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for k in range(args.repeat):  # modes interleaved, so that a slow spell of the machine hits each alike
        for mode in args.modes:
            cfg = work / f"{mode}.yaml"
            cfg.write_text(yaml.safe_dump(job_config(model, mode, args, work)))
            run = subprocess.run([sys.executable, __file__, "--measure", str(cfg)], capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"{mode} failed:\n{run.stderr[-3000:]}")
            r = json.loads(run.stdout.strip().splitlines()[-1])
            runs[mode].append(r)
            rounds = f", rounds of {' + '.join(map(str, r['round_steps']))} steps" if r["round_steps"] else ""
            print(f"{mode:>11}: {r['wall_s']:7.1f} s wall, {r['cpu_s']:7.1f} s CPU, peak RSS {r['peak_rss_mib']:7.0f} "
                  f"MiB{rounds}" + (f" (run {k + 1} of {args.repeat})" if args.repeat > 1 else ""), flush=True)
    # each mode's median run by wall time (the others' walls kept beside it)
    results = {mode: sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2] | {"walls": [r["wall_s"] for r in rs]}
               for mode, rs in runs.items()}
    if "none" in results:
        base = results["none"]
        for mode in results:
            if mode != "none":
                results[mode] |= {"wall_vs_none": results[mode]["wall_s"] / base["wall_s"],
                                  "cpu_vs_none": results[mode]["cpu_s"] / base["cpu_s"],
                                  "rss_vs_none": results[mode]["peak_rss_mib"] / base["peak_rss_mib"],
                                  **compare(str(work / "none.safetensors"), str(work / f"{mode}.safetensors"))}
                r = results[mode]
                print(f"{mode:>11} vs none: wall {r['wall_vs_none']:.2f}x, CPU {r['cpu_vs_none']:.2f}x, peak RSS {r['rss_vs_none']:.2f}x, same ranks "
                      f"{r['same_ranks']}, min |cos| {r['min_cos']:.5f}, bit-identical {r['bit_identical']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
