"""EVA cost and quality: evapipe's job vs PEFT's get_eva_state_dict vs the bare forward passes (the floor).

    python benchmarks/bench_eva.py                          # MiniLM, batch 8 x 128 tokens, r=8, rho=2, 36 linears
    python benchmarks/bench_eva.py --case llama-bigvocab    # tiny random Llama, 128k vocabulary, 28 linears
    python benchmarks/bench_eva.py --text support-intents   # MiniLM on the shipped support messages, packed

One run builds the batches once (saved to a work folder) and times, each in a fresh process so peak memory is its
own: (a) evapipe's `compute_eva_state` engine, (b) PEFT's `get_eva_state_dict`, (c) the floor: the bare forward
passes over the batches evapipe needed, cut at the input of the deepest target layer (what EVA must compute at the
least), plus the full forward (logits included) for reference. All three read the same batches in the same order
(cycled, as both implementations do, if a job needs more batches than the data has).

Quality: for every target layer, the variance its components (its assigned rank k) capture on the *whole* data, as
a fraction of what the exact top-k principal components of the whole data capture (float64 eigh of the centred
covariance of every counted token); the same for the exact top-k PCA of just the tokens each job read.

MiniLM text: `python-docs` (default) is the Python Language Reference topics that every CPython ships
(`pydoc_data.topics`, ~128k MiniLM tokens of English technical prose), tokenized, concatenated and packed into
sequences of --seq-len tokens, shuffled with a fixed seed; `support-intents` packs evapipe's 360 shipped support
messages the same way (~9k tokens: 9 batches, so both jobs cycle them). The Llama case uses random token ids.

`--knob ipca.FIRST_POWER_ITERATIONS=0` sets a module constant in the evapipe process (for lever measurements: see
benchmarks/levers.py); `--ablate NAME` switches a lever off (early-stop, skip-converged, dedup, batched) and
`--ablate warm-power` adds one power iteration to every warm update.
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

MINILM_TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]  # output.dense: attention.output.dense too
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ABLATIONS = ("early-stop", "skip-converged", "dedup", "batched", "warm-power")


# -- the case: model + batches, built once and saved so every process reads the same ones ---------------------------
def packed_text_ids(tokenizer: Any, text: str, seq_len: int, seed: int) -> torch.Tensor:
    """(n, seq_len) token ids: documents tokenized, joined by [SEP], cut into [CLS] chunk [SEP] rows, shuffled."""
    if text == "python-docs":
        from pydoc_data.topics import topics

        docs = [topics[k] for k in sorted(topics)]
    else:
        from evapipe.core.sources import resolve_data_path

        lines = Path(resolve_data_path("builtin:support_intents")).read_text().splitlines()
        docs = [json.loads(line)["text"] for line in lines]
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    body = seq_len - 2
    rows = [[tokenizer.cls_token_id, *ids[i : i + body], tokenizer.sep_token_id] for i in range(0, len(ids) - body + 1, body)]
    random.Random(seed).shuffle(rows)
    return torch.tensor(rows)


def build_case(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Write the model folder (random Llama) and batches.pt to `work`; return the case description."""
    torch.manual_seed(args.seed)
    if args.case == "minilm":
        from transformers import AutoTokenizer

        from evapipe.core.sources import resolve_model_path

        model_path = resolve_model_path("builtin:minilm")
        ids = packed_text_ids(AutoTokenizer.from_pretrained(model_path), args.text, args.seq_len, args.seed)
        if args.batches:
            ids = ids[: args.batches * args.batch_size]
        targets, data = MINILM_TARGETS, f"{args.text} text, packed"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=128256, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
        model_path = str(work / "model")
        LlamaForCausalLM(cfg).save_pretrained(model_path)
        n = (args.batches or 160) * args.batch_size
        ids = torch.randint(0, cfg.vocab_size, (n, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
        targets, data = LLAMA_TARGETS, "random token ids"
    n_batches = ids.shape[0] // args.batch_size
    batches = []
    for i in range(n_batches):
        chunk = ids[i * args.batch_size : (i + 1) * args.batch_size]
        batch = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        if args.case == "minilm":
            batch["token_type_ids"] = torch.zeros_like(chunk)
        batches.append(batch)
    torch.save(batches, work / "batches.pt")
    case = {"case": args.case, "model_path": model_path, "targets": targets, "data": data, "n_batches": n_batches,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "r": args.r, "rho": args.rho, "tau": args.tau}
    (work / "case.json").write_text(json.dumps(case))
    return case


def load_case(work: Path, device: str) -> tuple[Any, list[dict], dict]:
    from transformers import AutoModel, AutoModelForCausalLM

    case = json.loads((work / "case.json").read_text())
    cls = AutoModel if case["case"] == "minilm" else AutoModelForCausalLM
    model = cls.from_pretrained(case["model_path"]).to(device).eval()
    batches = [{k: v.to(device) for k, v in b.items()} for b in torch.load(work / "batches.pt")]
    return model, batches, case


def cycled(batches: list, n: int) -> list:
    return [batches[i % len(batches)] for i in range(n)]


# -- memory ------------------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


class Meter:
    """Wall time and peak memory of one phase: process RSS on CPU, allocator peak on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> Meter:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = rss_mb()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else peak_rss_mb()

    def report(self) -> dict[str, float]:
        return {"seconds": self.seconds, "peak_mb": self.peak, "added_mb": max(0.0, self.peak - self.base)}


# -- the three phases, each in its own process -------------------------------------------------------------------------
def execution_order(model: Any, batch: dict, names: list[str]) -> list[str]:
    """Target layers in the order a forward pass reaches them (not module order)."""
    from evapipe.model.capture import Capture

    cap = Capture(model, names)
    with torch.no_grad():
        cap.run(lambda: model(**batch), first=True)
    cap.remove()
    return cap.order


def apply_knobs(knobs: list[str], ablate: list[str]) -> None:
    """Set evapipe module constants (`ipca.FIRST_POWER_ITERATIONS=0`) and switch levers off, in this process only."""
    import importlib

    from evapipe.eva import ipca, planning
    from evapipe.model import capture, forward

    for knob in knobs:
        target, _, value = knob.partition("=")
        module_name, _, attr = target.rpartition(".")
        module = importlib.import_module(f"evapipe.{module_name}")
        if not hasattr(module, attr):
            raise SystemExit(f"--knob {knob}: evapipe.{module_name} has no {attr}")
        setattr(module, attr, json.loads(value))
    if "early-stop" in ablate:
        plan = capture.Capture.plan
        capture.Capture.plan = lambda self, step: (plan(self, step), setattr(self, "stop_at", None))
    if "skip-converged" in ablate:
        keep_stop = capture.Capture.plan  # every layer captured, the pass cut after the deepest target
        capture.Capture.plan = lambda self, step: keep_stop(self, planning.StepPlan(frozenset(self.names)))
    if "dedup" in ablate:
        forward.shared_input_groups = lambda raw, names: [[n] for n in names if n in raw]
    if "warm-power" in ablate:
        iterations = ipca.power_iterations
        ipca.power_iterations = lambda layers: iterations(layers) + (layers[0].prev is not None)
    if "batched" in ablate:
        update = ipca.update_many
        ipca.update_many = lambda states, inputs: [update([s], [x]) for s, x in zip(states, inputs)] and None


def phase_evapipe(model: Any, batches: list, case: dict, args: argparse.Namespace) -> dict[str, Any]:
    from evapipe import EvaSettings
    from evapipe.model.forward import cycle_batches
    from evapipe.run.engine import EvaRun

    apply_knobs(args.knob, args.ablate)
    settings = EvaSettings(r=case["r"], rho=case["rho"], tau=case["tau"], target_modules=case["targets"],
                           oversample=args.oversample, max_batches=args.max_batches, on_unconverged="warn",
                           refine_converged=args.refine)
    with Meter(args.device) as meter, torch.no_grad():
        run = EvaRun(model, settings)
        run.run(cycle_batches(batches), show_progress=False)
        state = run.result()
    comps = {n: a.cpu() for n, a in state.tensors.items()}
    return {**meter.report(), "batches": state.meta["batches"], "ranks": state.ranks, "components": comps,
            "forward_s": run.source.forward_s, "svd_s": run.pool.svd_s, "groups": run.progress.layout.groups,
            "converged": all(state.meta["converged"].values())}


def phase_peft(model: Any, batches: list, case: dict, args: argparse.Namespace) -> dict[str, Any]:
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    from evapipe.states.state import strip_peft_prefix

    cfg = LoraConfig(r=case["r"], lora_alpha=case["r"], target_modules=case["targets"],
                     eva_config=EvaConfig(rho=case["rho"], tau=case["tau"]))
    calls = {"n": 0}

    def forward(m: Any, inputs: dict) -> Any:
        calls["n"] += 1
        return m(**inputs)

    torch.manual_seed(0)
    with Meter(args.device) as meter:
        sd = strip_peft_prefix(get_eva_state_dict(model, batches, cfg, forward_fn=forward, show_progress_bar=False))
    comps = {n: a.float().cpu() for n, a in sd.items() if a.shape[0] > 0}
    # PEFT's forward calls: one to hash inputs, then one per SVD step
    return {**meter.report(), "batches": calls["n"] - 1, "ranks": {n: int(a.shape[0]) for n, a in sd.items()},
            "components": comps}


def phase_floor(model: Any, batches: list, case: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Bare forward passes over the first `--floor-batches` batches, cut at the deepest target layer's input."""
    from evapipe.model.capture import StopForward

    deepest = execution_order(model, batches[0], [t.name for t in _targets(model, case)])[-1]
    module = model.get_submodule(deepest)

    def stop(mod: Any, inputs: Any) -> None:
        raise StopForward

    counts, times = [int(c) for c in args.floor_batches.split(",")], {}
    handle = module.register_forward_pre_hook(stop)
    with Meter(args.device) as meter, torch.no_grad():
        for i, batch in enumerate(cycled(batches, max(counts)), 1):
            try:
                model(**batch)
            except StopForward:
                pass
            if i in counts:
                _sync(args.device)
                times[i] = time.perf_counter() - meter.t0
    handle.remove()
    n_full = min(args.full_batches, len(batches))
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in batches[:n_full]:
            model(**batch)
    _sync(args.device)
    full = (time.perf_counter() - t0) / max(n_full, 1)
    return {**meter.report(), "deepest": deepest, "times": times, "full_per_batch": full, "full_batches": n_full}


def _targets(model: Any, case: dict) -> list:
    from evapipe.model.targets import resolve_targets

    return resolve_targets(model, case["targets"])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


PHASES = {"evapipe": phase_evapipe, "peft": phase_peft, "floor": phase_floor}


def run_phase(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    model, batches, case = load_case(work, args.device)
    with torch.no_grad():  # warm-up: the first pass pays for lazy initialisation, for every phase alike
        model(**batches[0])
    result = PHASES[args.phase](model, batches, case, args)
    torch.save(result, work / f"{args.phase}.pt")


def spawn(phase: str, args: argparse.Namespace, work: Path, extra: list[str] = ()) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", phase, "--work", str(work), "--device", args.device,
           "--threads", str(args.threads), *extra]
    cmd += [x for k in args.knob for x in ("--knob", k)] + [x for a in args.ablate for x in ("--ablate", a)]
    if args.oversample is not None:
        cmd += ["--oversample", str(args.oversample)]
    if args.max_batches is not None:
        cmd += ["--max-batches", str(args.max_batches)]
    if args.refine:
        cmd += ["--refine"]
    subprocess.run(cmd, check=True)
    return torch.load(work / f"{phase}.pt", weights_only=False)


# -- quality --------------------------------------------------------------------------------------------------------------
class Moments:
    """Count, mean and centred scatter (float64) of one layer's counted tokens, merged batch by batch (Chan et al.)."""

    def __init__(self, n: int, device: str):
        self.count = 0
        self.mean = torch.zeros(n, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(n, n, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        m = x.shape[0]
        mean_b = x.sum(0, dtype=torch.float64) / m
        centred = x.float() - mean_b.float()
        delta = mean_b - self.mean
        total = self.count + m
        self.scatter += (centred.T @ centred).double() + torch.outer(delta, delta) * (self.count * m / total)
        self.mean += delta * (m / total)
        self.count = total

    def copy(self) -> Moments:
        other = Moments.__new__(Moments)
        other.count, other.mean, other.scatter = self.count, self.mean.clone(), self.scatter.clone()
        return other


def layer_moments(model: Any, batches: list, owners: list[str], prefixes: list[int], device: str) -> tuple[dict, dict]:
    """Moments of each owner layer's tokens over the whole data, and over the first n batches for each n in prefixes."""
    from evapipe.model.capture import Capture, TokenSelector
    from evapipe.model.layout import StepPlan

    widths = {t.name: t.in_features for t in _targets(model, {"targets": owners})}
    cap = Capture(model, owners)
    cap.order = execution_order(model, batches[0], owners)
    cap.plan(StepPlan(frozenset(owners)))
    acc = {n: Moments(widths[n], device) for n in owners}
    whole, at = None, {}
    with torch.no_grad():
        for i, batch in enumerate(cycled(batches, max([len(batches), *prefixes])), 1):
            cap.select(TokenSelector({"input": batch["attention_mask"].bool()}))
            for name, x in cap.run(lambda batch=batch: model(**batch)).items():
                acc[name].add(x)
            if i == len(batches):
                whole = {n: m.copy() for n, m in acc.items()}
            if i in prefixes:
                at[i] = {n: m.copy() for n, m in acc.items()}
    cap.remove()
    return whole, at


def top_eig(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(cov)
    return vals.flip(0), vecs.flip(1).T


def captured(cov: torch.Tensor, exact_vals: torch.Tensor, comps: torch.Tensor) -> float:
    """Variance the span of `comps` (k rows) captures under `cov`, over what the exact top-k captures."""
    q, _ = torch.linalg.qr(comps.to(cov).T)
    k = comps.shape[0]
    return float(torch.trace(q.T @ cov @ q) / exact_vals[:k].sum())


def quality(model: Any, batches: list, groups: list[list[str]], results: dict[str, dict], device: str) -> dict[str, dict]:
    """Per-method {layer: captured fraction}; methods: evapipe, peft, and exact PCA of each job's own tokens."""
    owner_of = {n: g[0] for g in groups for n in g}
    owners = [g[0] for g in groups]
    prefixes = sorted({r["batches"] for r in results.values()})
    whole, at = layer_moments(model, batches, owners, prefixes, device)
    spectra = {o: top_eig(whole[o].scatter) for o in owners}
    out: dict[str, dict] = {}
    for method, res in results.items():
        out[method] = {n: captured(whole[owner_of[n]].scatter, spectra[owner_of[n]][0], a)
                       for n, a in res["components"].items()}
        exact = {}
        for n, rank in res["ranks"].items():
            if rank > 0:
                prefix_vecs = top_eig(at[res["batches"]][owner_of[n]].scatter)[1][:rank]
                exact[n] = captured(whole[owner_of[n]].scatter, spectra[owner_of[n]][0], prefix_vecs)
        out[f"exact PCA of {method}'s {res['batches']} batches"] = exact
    return out


# -- the report -----------------------------------------------------------------------------------------------------------
def rank_agreement(a: dict[str, int], b: dict[str, int]) -> str:
    same = sum(a[n] == b.get(n) for n in a)
    moved = sum(abs(a[n] - b.get(n, 0)) for n in a) // 2
    return f"{same}/{len(a)} layers equal, {moved} of {sum(a.values())} rank units moved"


def summary(frac: dict[str, float]) -> str:
    v = list(frac.values())
    return f"mean {sum(v) / len(v):.4f}  worst {min(v):.4f}  ({len(v)} layers with rank > 0)"


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (benchmarks/levers.py reuses them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["minilm", "llama-bigvocab"], default="minilm")
    p.add_argument("--text", choices=["python-docs", "support-intents"], default="python-docs", help="MiniLM text")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batches", type=int, default=None, help="batches in the data (default: all the text; Llama 160)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--tau", type=float, default=0.99)
    p.add_argument("--oversample", type=int, default=None, help="eva.oversample for evapipe")
    p.add_argument("--max-batches", type=int, default=None, help="eva.max_batches for evapipe")
    p.add_argument("--refine", action="store_true", help="eva.refine_converged for evapipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--full-batches", type=int, default=8, help="batches timed for the full forward (logits)")
    p.add_argument("--knob", action="append", default=[], help="evapipe constant, e.g. ipca.FIRST_POWER_ITERATIONS=0")
    p.add_argument("--ablate", action="append", default=[], choices=ABLATIONS, help="switch an evapipe lever off")
    p.add_argument("--skip-peft", action="store_true", help="time evapipe and the floor only")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--floor-batches", default="1", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.phase:
        run_phase(args)
        return
    torch.set_num_threads(args.threads)
    print(report(args))


def report(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="evapipe-bench-") as tmp:
        work = Path(tmp)
        case = build_case(args, work)
        results = {"evapipe": spawn("evapipe", args, work)}
        if not args.skip_peft:
            results["peft"] = spawn("peft", args, work)
        counts = ",".join(str(r["batches"]) for r in results.values())
        floor = spawn("floor", args, work, ["--floor-batches", counts, "--full-batches", str(args.full_batches)])
        model, batches, _ = load_case(work, args.device)
        qual = quality(model, batches, results["evapipe"]["groups"], results, args.device)
    ev = results["evapipe"]
    floor_s = floor["times"][ev["batches"]]
    lines = [
        f"case {case['case']}: {case['data']}, {case['n_batches']} batches of {case['batch_size']} x {case['seq_len']} "
        f"tokens, r={case['r']} rho={case['rho']} tau={case['tau']}, {len(ev['ranks'])} target linears, "
        f"{args.device}, {args.threads} threads, torch {torch.__version__}",
        f"knobs {args.knob or '-'}  ablated {args.ablate or '-'}  oversample {args.oversample}  "
        f"refine_converged {args.refine}",
        "",
        f"{'':34s}{'wall s':>9s}{'batches':>9s}{'peak MB':>9s}{'+MB':>8s}",
    ]
    for name, res in results.items():
        label = "evapipe compute_eva_state" if name == "evapipe" else "PEFT get_eva_state_dict"
        lines.append(f"{label:34s}{res['seconds']:9.2f}{res['batches']:9d}{res['peak_mb']:9.0f}{res['added_mb']:8.0f}")
    for res in results.values():
        n = res["batches"]
        lines.append(f"{'floor: ' + str(n) + ' forwards to ' + floor['deepest'].split('.', 1)[-1]:34s}"
                     f"{floor['times'][n]:9.2f}{n:9d}")
    lines.append(f"{'full forward (logits), per batch':34s}{floor['full_per_batch']:9.3f}"
                 f"{'':9s}   (mean of {floor['full_batches']} batches)")
    lines.append(f"evapipe breakdown: forward+capture {ev['forward_s']:.2f} s, PCA updates {ev['svd_s']:.2f} s; "
                 f"all converged: {ev['converged']}")
    lines.append("")
    lines.append(f"evapipe / floor: {ev['seconds'] / floor_s:.2f}x")
    if "peft" in results:
        pf = results["peft"]
        lines.append(f"evapipe / PEFT: {ev['seconds'] / pf['seconds']:.3f}x   "
                     f"(PEFT / its own floor: {pf['seconds'] / floor['times'][pf['batches']]:.2f}x)")
        lines.append(f"peak memory evapipe / PEFT: {ev['peak_mb'] / pf['peak_mb']:.2f}x")
        lines.append(f"rank distribution vs PEFT: {rank_agreement(ev['ranks'], pf['ranks'])}")
    lines.append("")
    lines.append("captured variance on the whole data / exact top-k of the whole data (k = each layer's rank):")
    for method, frac in qual.items():
        lines.append(f"  {method:44s} {summary(frac)}")
    if args.json:
        keep = {m: {k: v for k, v in r.items() if k != "components"} for m, r in results.items()}
        Path(args.json).write_text(json.dumps({"case": case, "results": keep, "floor": floor, "quality": qual,
                                               "args": vars(args)}, indent=1, default=str))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
