"""Mixture-of-experts PCAs at the speed of the forward: forward time vs PCA time, and each expert's captured
variance, for this tree's evapipe against an older commit's, on the same model and batches.

    python benchmarks/moe_speed.py                               # gpt-oss-shaped, about 1.5 GB, 4 batches
    python benchmarks/moe_speed.py --layers 2 --hidden 256 --batches 3        # a quick look
    python benchmarks/moe_speed.py --modes none sequential --old none        # offload modes, this tree only
    python benchmarks/moe_speed.py --dense                       # a random Llama instead (nothing regressed)

The model is a random-init gpt-oss (16 experts, top-4, alternating sliding/full attention, gate_up stored
transposed with biases) with MiniLM's tokenizer, saved once. Each run is the real job (`python -m evapipe.compute`)
in a fresh process measured from its own parent (benchmarks/bigmodel.py's `--measure`: wall time, peak RSS from
`getrusage(RUSAGE_CHILDREN)`, and the job summary's forward / SVD seconds). The older implementation is the
`evapipe/` of `--old-commit` (default 1700438, before the batched expert update), exported with `git archive` and put
first on PYTHONPATH. A random model's spectra are nearly flat, so every run takes eva.max_batches batches.

Captured variance per expert: the share of its own tokens' variance its top components explain (the state's
explained_variance ratios, summed over the first r); the same tokens reach both implementations, so the ratio
new / old compares the components themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bigmodel

REPO = Path(__file__).resolve().parent.parent
R = 8


def synthetic_gpt_oss(folder: Path, hidden: int, layers: int, experts: int, dtype: str = "float32",
                      **shape_overrides: int) -> str:
    """A random gpt-oss (MiniLM's tokenizer and vocabulary), saved in sharded safetensors once; `shape_overrides`
    replace config fields (num_attention_heads, sliding_window, ...)."""
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, GptOssConfig, GptOssForCausalLM

    from evapipe.core.sources import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:minilm"))
    torch.manual_seed(0)
    shape = dict(
        vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 512), head_dim=64,
        num_local_experts=experts, num_experts_per_tok=4, sliding_window=32, max_position_embeddings=512,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
    ) | shape_overrides
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        model = GptOssForCausalLM(GptOssConfig(**shape))
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # random init leaves some parameters empty-initialised: give every one a scale
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(folder, max_shard_size="500MB")
    tok.save_pretrained(folder)
    return str(folder)


def job_config(model: str, mode: str, args: argparse.Namespace, out: Path) -> dict:
    model_cfg: dict = {"name_or_path": model, "device": "cpu", "offload": mode}
    if mode == "sequential":
        model_cfg["sequential_round"] = args.batches
    eva = {"r": R, "rho": 2.0, "tau": 0.99, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "max_batches": args.batches, "on_unconverged": "warn"}
    if not args.dense:
        eva["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    return {"model": model_cfg, "eva": eva, "output": {"path": str(out)},
            "data": {"path": "builtin:support_intents", "batch_size": args.batch_size, "max_length": 64,
                     "shuffle": False}}


def old_tree(commit: str, work: Path) -> Path:
    """The evapipe package of `commit`, exported (no worktree: nothing in the repository changes)."""
    dest = work / f"old-{commit}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "evapipe"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def run(cfg: Path, pythonpath: Path) -> dict:
    env = os.environ | {"PYTHONPATH": str(pythonpath)}
    # `python -m` puts the working folder first on sys.path: run from the tree measured, or the caller's checkout
    # (the usual working folder) would shadow an older tree's evapipe
    proc = subprocess.run([sys.executable, bigmodel.__file__, "--measure", str(cfg)], capture_output=True, text=True,
                          env=env, cwd=pythonpath)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr).strip()[-600:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def captured(path: Path) -> dict[str, float]:
    """Per PCA owner: the variance share its first r components explain on its own tokens."""
    from evapipe import load_state

    ev = load_state(str(path)).meta["explained_variance"]
    return {k: sum(v[:R]) for k, v in ev.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (= expert intermediate size)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4, help="eva.max_batches (and the sequential round)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dense", action="store_true", help="a random Llama (bigmodel.py's) instead of gpt-oss")
    parser.add_argument("--modes", nargs="+", default=["none"], choices=["none", "sequential"],
                        help="model.offload modes run with this tree's evapipe")
    parser.add_argument("--old", nargs="*", default=["none"], choices=["none", "sequential"],
                        help="modes also run with --old-commit's evapipe (none: skip the old code)")
    parser.add_argument("--old-commit", default="1700438")
    parser.add_argument("--model-dir", default=None, help="keep the synthetic model here (built once)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (OMP_NUM_THREADS)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import yaml

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(tempfile.mkdtemp(prefix="evapipe-moe-speed-"))
    folder = Path(args.model_dir or work / "model")
    model = (bigmodel.synthetic_model(folder, args.hidden, args.layers) if args.dense
             else synthetic_gpt_oss(folder, args.hidden, args.layers, args.experts))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
    print(f"model: {'Llama' if args.dense else f'gpt-oss, {args.experts} experts'}, {args.layers} x {args.hidden}, "
          f"{size:.2f} GiB; {args.batches} batches of {args.batch_size} x 64 tokens; {args.threads} thread(s)")
    runs = [("new", m, REPO) for m in args.modes]
    if args.old:
        old = old_tree(args.old_commit, work)
        runs += [(f"old {args.old_commit}", m, old) for m in args.old]
    results: dict[str, dict] = {}
    for impl, mode, path in runs:
        name = f"{impl} {mode}"
        out = work / f"{name.replace(' ', '-')}.safetensors"
        cfg = work / f"{name.replace(' ', '-')}.yaml"
        cfg.write_text(yaml.safe_dump(job_config(model, mode, args, out)))
        r = results[name] = run(cfg, path) | {"state": str(out)}
        if "error" in r:
            print(f"{name:>16}: failed: {r['error'].splitlines()[-1]}", flush=True)
            continue
        ratio = r["svd_s"] / r["forward_s"] if r.get("forward_s") else float("nan")
        print(f"{name:>16}: {r['wall_s']:7.1f} s wall, forward {r['forward_s']:6.1f} s, PCA {r['svd_s']:6.1f} s "
              f"(PCA / forward {ratio:.2f}), peak RSS {r['peak_rss_mib']:6.0f} MiB", flush=True)
    base = next((n for n in results if n.startswith("old") and "error" not in results[n]), None)
    for name, r in results.items():
        if base is None or name == base or "error" in r:
            continue
        new, ref = captured(Path(r["state"])), captured(Path(results[base]["state"]))
        ratios = [new[k] / ref[k] for k in ref if k in new and ref[k] > 0]
        experts = [new[k] / ref[k] for k in ref if k in new and ref[k] > 0 and k.endswith("]")]
        r["captured_vs_old"] = {"min": min(ratios), "median": statistics.median(ratios),
                                "experts_min": min(experts, default=None), "n": len(ratios)}
        print(f"{name:>16} vs {base}: captured variance (top {R}) per PCA new/old: min {min(ratios):.4f}, median "
              f"{statistics.median(ratios):.4f}" + (f", experts min {min(experts):.4f}" if experts else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
