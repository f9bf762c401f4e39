"""EVA init vs PEFT's default LoRA init: the same adapter trained twice on the embedded task, only lora_A differs.

    python benchmarks/eva_vs_default_init.py                  # 3 seeds x 2 runs x 80 steps: ~2.5 min on 2 CPU cores
    python benchmarks/eva_vs_default_init.py --seeds 0 --steps 150 --lr 5e-4

Task: all-MiniLM-L6-v2 (the packaged copy) as a 6-way sequence classifier (AutoModelForSequenceClassification,
new classifier head trained in modules_to_save) on evapipe's support_intents.jsonl (360 messages); accuracy and
loss on support_intents_heldout.jsonl (120 messages, no overlap).

Both runs share everything but lora_A: the same base and head init (same seed), the same adapter (EVA's
per-layer ranks and alphas, so the same trainable parameters), the same batches in the same order, the same dropout
draws, optimizer (AdamW, constant lr) and steps. EVA run: A = the EVA components (`apply_eva_state(model, state)`).
Default run: A = PEFT's Kaiming-uniform init (`apply_eva_state(model, state, baseline=True)`, what
`evapipe apply --baseline` writes). B = 0 in both, so both start from the same outputs.
The EVA state is computed once, first, with the settings of configs/default.yaml (r=8, rho=2, tau=0.99, the six
attention/MLP linears of every layer) on the training texts, on the same classifier model (the head, which is not
a target and comes after every target, does not change it). Seeds vary the head init, batch order and dropout.

Prints the training-loss curves (per step, and a 10-step running mean), held-out loss/accuracy at every
--eval-every steps and at the end, the area under the held-out accuracy curve (AUC: its mean over the steps, by the
trapezoid rule) and the final accuracy; writes a PNG plot of both curves (training loss, held-out accuracy) and the
raw numbers (JSON) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from evapipe.core.quiet import quiet_dependencies  # noqa: E402

quiet_dependencies()  # before transformers / peft are imported
REPO = Path(__file__).resolve().parent.parent
SMOOTH = 10  # running-mean window for the printed curves


def load_task(tok: Any, max_length: int) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(label names, tokenized train set, tokenized held-out set); labels as class indices."""
    from evapipe.core.sources import resolve_data_path

    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in Path(resolve_data_path(f"builtin:{name}")).read_text().splitlines()]

    train, heldout = read("support_intents"), read("support_intents_heldout")
    labels = sorted({r["label"] for r in train})

    def encode(rows: list[dict]) -> dict[str, torch.Tensor]:
        enc = dict(tok([r["text"] for r in rows], max_length=max_length, truncation=True, padding=True,
                       return_tensors="pt"))
        enc["labels"] = torch.tensor([labels.index(r["label"]) for r in rows])
        return enc

    return labels, encode(train), encode(heldout)


def classifier(path: str, labels: list[str], seed: int) -> torch.nn.Module:
    """MiniLM with a fresh 6-way head; the same seed gives the same head in every run."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )


def eva_state(path: str, labels: list[str], seed: int) -> Any:
    """EVA on the classifier's backbone with configs/default.yaml's data and EVA settings."""
    from transformers import AutoTokenizer

    from evapipe import compute_eva_state, load_config
    from evapipe.data import make_collator, open_rows, rank_batches

    cfg = load_config(REPO / "configs" / "default.yaml")
    model = classifier(path, labels, seed)
    rows = open_rows(cfg.data, "seq-cls")
    collate = make_collator(AutoTokenizer.from_pretrained(path), cfg.data, "seq-cls")
    batches = rank_batches(rows, collate, cfg.data.batch_size, 1, 0)
    return compute_eva_state(model, batches, cfg.eva, show_progress=False)


def slice_batch(data: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    batch = {k: v[idx] for k, v in data.items()}
    keep = int(batch["attention_mask"].sum(1).max())  # trim padding columns
    return {k: (v[:, :keep] if v.ndim == 2 else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: dict[str, torch.Tensor], batch_size: int = 60) -> tuple[float, float]:
    """(mean loss, accuracy) on a tokenized set."""
    model.eval()
    n, loss, correct = len(data["labels"]), 0.0, 0
    for lo in range(0, n, batch_size):
        batch = slice_batch(data, torch.arange(lo, min(lo + batch_size, n)))
        out = model(**batch)
        loss += float(out.loss) * len(batch["labels"])
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    model.train()
    return loss / n, correct / n


def train(model: torch.nn.Module, train_set: dict, heldout: dict, args: argparse.Namespace, seed: int) -> dict:
    """Plain AdamW loop (constant lr): per-step training loss and held-out (loss, accuracy) every eval_every."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws
    n = len(train_set["labels"])
    perm, pos = torch.randperm(n, generator=order), 0
    losses, evals = [], {0: evaluate(model, heldout)}
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=order), 0
        batch = slice_batch(train_set, perm[pos : pos + args.batch_size])
        pos += args.batch_size
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            evals[step] = evaluate(model, heldout)
    return {"train_loss": losses, "heldout": evals, "seconds": time.perf_counter() - start,
            "trainable": sum(p.numel() for p in params)}


def running_mean(xs: list[float], k: int = SMOOTH) -> list[float]:
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def accuracy_auc(heldout: dict[int, tuple[float, float]]) -> float:
    """Area under held-out accuracy over steps, divided by the steps (trapezoid rule): 1.0 is right from the start."""
    steps = sorted(heldout)
    area = sum((b - a) * (heldout[a][1] + heldout[b][1]) / 2 for a, b in zip(steps, steps[1:]))
    return area / (steps[-1] - steps[0])


def mean_std(xs: list[float]) -> str:
    mean = sum(xs) / len(xs)
    std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def first_below(curve: list[float], level: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v < level), None)


def one_seed(path: str, labels: list[str], state: Any, train_set: dict, heldout: dict, args: argparse.Namespace,
             seed: int) -> dict:
    from evapipe.adapters.apply import apply_eva_state

    runs, heads = {}, []
    for name in ("eva", "default"):
        model = classifier(path, labels, seed)
        heads.append(model.classifier.weight.detach().clone())
        # the very same adapter; baseline=True keeps PEFT's own A init (`evapipe apply --baseline`)
        model = apply_eva_state(model, state, baseline=name == "default")
        runs[name] = train(model, train_set, heldout, args, seed)
        final = runs[name]["heldout"][args.steps]
        print(f"seed {seed}: {name:>7} init trained {args.steps} steps in {runs[name]['seconds']:.1f}s; "
              f"held-out loss {final[0]:.4f}, accuracy {final[1]:.3f}", flush=True)
    assert torch.equal(heads[0], heads[1]), "both runs must start from the same classifier head"
    return runs


def report(results: dict[int, dict], args: argparse.Namespace) -> None:
    for seed, runs in results.items():
        eva, dflt = runs["eva"]["train_loss"], runs["default"]["train_loss"]
        se, sd = running_mean(eva), running_mean(dflt)
        print(f"\nseed {seed}: training loss per step (raw | {SMOOTH}-step running mean)")
        print(f"{'step':>5} {'EVA':>8} {'default':>8} | {'EVA':>8} {'default':>8}")
        every = max(1, args.steps // 20)
        for i in range(len(eva)):
            if (i + 1) % every == 0 or i == 0:
                print(f"{i + 1:>5} {eva[i]:>8.4f} {dflt[i]:>8.4f} | {se[i]:>8.4f} {sd[i]:>8.4f}")
        print(f"\nseed {seed}: held-out loss / accuracy")
        print(f"{'step':>5} {'EVA':>16} {'default':>16}")
        for step, (le, ae) in runs["eva"]["heldout"].items():
            ld, ad = runs["default"]["heldout"][step]
            print(f"{step:>5} {le:>8.4f} / {ae:.3f} {ld:>8.4f} / {ad:.3f}")
        print(f"mean training loss over all steps: EVA {sum(eva) / len(eva):.4f}, default {sum(dflt) / len(dflt):.4f}")
        for level in (1.0, 0.5):
            print(f"first step with {SMOOTH}-step mean loss < {level}: EVA {first_below(se, level)}, "
                  f"default {first_below(sd, level)}")
    runs = list(results.values())
    print(f"\nheld-out accuracy over {len(runs)} seed(s), mean ± std: AUC over steps 0-{args.steps} | final")
    for name in ("eva", "default"):
        aucs = [accuracy_auc(r[name]["heldout"]) for r in runs]
        finals = [r[name]["heldout"][args.steps][1] for r in runs]
        print(f"{name:>7}: AUC {mean_std(aucs)} (per seed {', '.join(f'{a:.3f}' for a in aucs)}) | final "
              f"{mean_std(finals)}; trainable parameters {runs[0][name]['trainable']}")
    if len(results) > 1:
        print(f"\nmean over {len(runs)} seeds: held-out loss / accuracy")
        print(f"{'step':>5} {'EVA':>16} {'default':>16}")
        for step in runs[0]["eva"]["heldout"]:
            cells = []
            for name in ("eva", "default"):
                vals = [r[name]["heldout"][step] for r in runs]
                cells.append(f"{sum(v[0] for v in vals) / len(vals):>8.4f} / {sum(v[1] for v in vals) / len(vals):.3f}")
            print(f"{step:>5} {cells[0]} {cells[1]}")
        for name in ("eva", "default"):
            means = [sum(r[name]["train_loss"]) / args.steps for r in runs]
            print(f"{name:>7}: mean training loss {sum(means) / len(means):.4f} (per seed "
                  f"{', '.join(f'{m:.4f}' for m in means)}); first step with {SMOOTH}-step mean < 1.0 per seed: "
                  f"{[first_below(running_mean(r[name]['train_loss']), 1.0) for r in runs]}")


def plot(results: dict[int, dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'evapipe[plot]'): no plot written")
        return
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    runs = list(results.values())
    for name, color in (("eva", "tab:blue"), ("default", "tab:orange")):
        label = "EVA init" if name == "eva" else "PEFT default init (--baseline)"
        for i, r in enumerate(runs):
            curve = r[name]["train_loss"]
            loss_ax.plot(range(1, len(curve) + 1), running_mean(curve), color=color, alpha=0.7,
                         label=label if i == 0 else None)
            steps = sorted(r[name]["heldout"])
            acc_ax.plot(steps, [r[name]["heldout"][s][1] for s in steps], color=color, alpha=0.25, linewidth=0.8)
        steps = sorted(runs[0][name]["heldout"])
        mean = [sum(r[name]["heldout"][s][1] for r in runs) / len(runs) for s in steps]
        acc_ax.plot(steps, mean, color=color, marker="o", label=f"{label}, mean of {len(runs)} seeds")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel(f"training loss ({SMOOTH}-step running mean)")
    loss_ax.legend()
    acc_ax.set_xlabel("step")
    acc_ax.set_ylabel("held-out accuracy")
    acc_ax.legend()
    fig.suptitle(f"MiniLM + LoRA on support intents: EVA vs PEFT default init (seeds {list(results)})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pair of runs per seed")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=20, help="held-out evaluation every N steps")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "eva_vs_default_init",
                        help="folder for the PNG plot and the JSON results")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from evapipe.core.sources import resolve_model_path

    path = resolve_model_path("builtin:minilm")
    labels, train_set, heldout = load_task(AutoTokenizer.from_pretrained(path), args.max_length)
    print(f"MiniLM, {len(labels)} labels, {len(train_set['labels'])} train / {len(heldout['labels'])} held-out; "
          f"{args.steps} steps x batch {args.batch_size}, AdamW lr {args.lr}, seeds {args.seeds}", flush=True)
    t0 = time.perf_counter()
    state = eva_state(path, labels, args.seeds[0])
    print(f"EVA state in {time.perf_counter() - t0:.1f}s ({state.meta['batches']} batches, "
          f"ranks {min(state.ranks.values())}-{max(state.ranks.values())}, total {state.total_rank()})", flush=True)
    results = {seed: one_seed(path, labels, state, train_set, heldout, args, seed) for seed in args.seeds}
    report(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results}, indent=1))
    plot(results, args.out / "loss_curves.png")


if __name__ == "__main__":
    main()
