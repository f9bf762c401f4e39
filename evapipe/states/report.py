"""Human-readable views of states: the end-of-job summary, the per-layer table and figure, the store listing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def layer_rows(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target layer: rank, alpha, explained variance of its kept components, convergence."""
    rows = []
    for name, rank in meta["ranks"].items():
        ratios = meta["explained_variance"].get(name, [])
        rows.append({
            "layer": name,
            "rank": int(rank),
            "alpha": meta["alpha_pattern"].get(name, meta["lora_alpha"]),
            "explained": float(sum(ratios[:rank])) if ratios else None,  # None: not recorded (a PEFT file)
            "top_ratio": float(ratios[0]) if ratios else 0.0,
            "converged": bool(meta["converged"].get(name, False)),
            "in_features": int(meta["in_features"][name]),
        })
    return rows


def layer_table(meta: dict[str, Any]) -> str:
    rows = layer_rows(meta)
    width = max(len(r["layer"]) for r in rows)
    lines = [f"{'layer':<{width}}  rank  alpha    explained  converged"]
    for r in rows:
        lines.append(
            f"{r['layer']:<{width}}  {r['rank']:>4}  {r['alpha']:>6.2f}  {_ratio(r['explained']):>9}  "
            f"{'yes' if r['converged'] else 'NO'}"
        )
    return "\n".join(lines)


def corda_table(meta: dict[str, Any]) -> str:
    """`evapipe show` of a CorDA state: per layer its rank, shape, samples and the singular values kept."""
    ranks = meta["ranks"]
    width = max(len(n) for n in ranks)
    lines = [f"{'layer':<{width}}  rank  in x out      samples  tokens"]
    for name, rank in ranks.items():
        shape = f"{meta['in_features'][name]} x {meta['out_features'][name]}"
        lines.append(f"{name:<{width}}  {rank:>4}  {shape:<11}  {meta['samples'].get(name, 0):>7}  "
                     f"{meta['layer_tokens'].get(name, 0)}")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def job_summary(meta: dict[str, Any], rank_stats: Sequence[Any], seconds: float, path: Path,
                cached: bool = False) -> str:
    """One screen: LoRA ranks per layer, tokens, each process's work, time, where the file went. "rank" here is
    only ever the LoRA rank; processes are named processes (their torch.distributed rank is the number)."""
    ranks = list(meta["ranks"].values())
    out = ["", layer_table(meta), ""]
    out.append(
        f"total LoRA rank {sum(ranks)} over {len(ranks)} layers (budget {sum(meta['layer_r'].values())}, "
        f"{sum(1 for r in ranks if r == 0)} layers at LoRA rank 0, without an adapter); {meta['tokens']} tokens in "
        f"{meta['batches']} batches"
    )
    skipped = (meta.get("dataset") or {}).get("skipped_null_rows")
    if skipped:
        out.append(f"{skipped} rows with a null text skipped (see data.text_field / prompt_field / messages_field)")
    unrouted = meta.get("unrouted") or []
    if unrouted:
        out.append(f"{len(unrouted)} experts received no token (rank 0): {', '.join(unrouted[:4])}"
                   + (" ..." if len(unrouted) > 4 else ""))
    for st in rank_stats:
        out.append(
            f"process {st.rank}: {st.tokens} tokens, forward {st.forward_s:.2f}s, SVD {st.svd_s:.2f}s "
            f"({len(st.owned)} PCAs, {st.pca_tokens} token rows), comm {st.comm_s:.2f}s"
        )
    out.append(f"{'cache hit' if cached else 'done'} in {seconds:.1f}s -> {path}")
    return "\n".join(out)


def job_record(meta: dict[str, Any], rank_stats: Sequence[Any], seconds: float, path: Path,
               cached: bool = False) -> dict[str, Any]:
    """The job's summary as JSON-able data (`evapipe compute --json`): what a script takes from a run."""
    ranks = {n: int(k) for n, k in meta["ranks"].items()}
    return {
        "path": str(path), "cached": cached, "seconds": round(seconds, 3), "task": meta.get("task"),
        "model": (meta.get("model") or {}).get("id"), "store_key": meta.get("store_key"), "r": meta["r"],
        "rho": meta.get("rho"), "total_rank": sum(ranks.values()), "tokens": meta.get("tokens"),
        "batches": meta.get("batches"), "layers": layer_rows(meta),
        "processes": [{"process": st.rank, "tokens": st.tokens, "forward_s": st.forward_s, "svd_s": st.svd_s,
                       "comm_s": st.comm_s, "pcas": len(st.owned), "pca_tokens": st.pca_tokens} for st in rank_stats],
    }


def corda_record(meta: dict[str, Any], rank_stats: Sequence[Any], seconds: float, path: Path,
                 cached: bool = False) -> dict[str, Any]:
    """A CorDA job's summary as JSON-able data (`evapipe compute --json` with method: corda)."""
    return {
        "path": str(path), "cached": cached, "seconds": round(seconds, 3), "method": "corda", "task": meta.get("task"),
        "model": (meta.get("model") or {}).get("id"), "store_key": meta.get("store_key"), "r": meta["r"],
        "corda_method": meta.get("corda_method"), "tokens": meta.get("tokens"), "batches": meta.get("batches"),
        "layers": [{"layer": n, "rank": int(k), "in_features": int(meta["in_features"][n]),
                    "out_features": int(meta["out_features"][n]), "samples": meta["samples"].get(n)}
                   for n, k in meta["ranks"].items()],
        "processes": [{"process": st.rank, "forward_s": st.forward_s, "covariance_s": st.add_s, "comm_s": st.comm_s,
                       "decompose_s": st.decompose_s, "covariances": len(st.owned)} for st in rank_stats],
    }


def store_table(entries: Sequence[Any]) -> str:
    """`evapipe list`: one line per state (store.StoreEntry), unreadable ones with their error."""
    if not entries:
        return "no states found"
    head = ("task", "model", "r", "rho", "total rank", "tokens", "created", "size", "method", "path")
    rows = []
    for e in entries:
        if e.error:
            rows.append(("?", "?", "", "", "", "", "", _size(e.size), "", f"{e.path}  UNREADABLE: {e.error}"))
            continue
        rows.append((e.task, e.model, e.r, "" if e.rho is None else f"{e.rho:g}", e.total_rank,
                     "" if e.tokens is None else e.tokens, e.created or "", _size(e.size), e.method, e.path))
    cells = [[str(c) for c in row] for row in [head, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]) for row in cells)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def plot_layers(meta: dict[str, Any], out: str | Path) -> Path:
    """A figure of a state: rank per layer (with each layer's r) and the explained variance its rank keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layer_rows(meta)
    x = list(range(len(rows)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 0.18 * len(rows)), 7), sharex=True)
    top.bar(x, [r["rank"] for r in rows], color="tab:blue", label="rank")
    top.scatter(x, [meta["layer_r"].get(r["layer"], meta["r"]) for r in rows], marker="_", s=120, color="black",
                label="r (before redistribution)", zorder=3)
    top.set_ylabel("rank")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(f"{meta['task']} on {(meta.get('model') or {}).get('id')}: r={meta['r']}, rho={meta.get('rho')}, "
                  f"total rank {sum(r['rank'] for r in rows)}")
    colors = ["tab:green" if r["converged"] else "tab:red" for r in rows]
    bottom.bar(x, [r["explained"] or 0.0 for r in rows], color=colors)
    bottom.set_ylabel("explained variance kept\n(red: not converged)")
    step = max(1, len(rows) // 60)
    bottom.set_xticks(x[::step], [r["layer"] for r in rows][::step], rotation=90, fontsize=6)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def corda_summary(meta: dict[str, Any], rank_stats: Sequence[Any], seconds: float, path: Path,
                  cached: bool = False) -> str:
    """The end-of-job lines of a CorDA job: what was computed and each process's share."""
    samples = max(meta["samples"].values())
    out = ["", corda_table(meta), "",
           f"CorDA {meta['corda_method']} r={meta['r']} over {len(meta['ranks'])} layers: {samples} samples, "
           f"{meta['tokens']} tokens in {meta['batches']} batches"]
    for st in rank_stats:
        out.append(f"process {st.rank}: forward {st.forward_s:.2f}s, covariance sums {st.add_s:.2f}s "
                   f"({len(st.owned)} covariances), comm {st.comm_s:.2f}s, decomposition {st.decompose_s:.2f}s")
    out.append(f"{'cache hit' if cached else 'done'} in {seconds:.1f}s -> {path}")
    return "\n".join(out)
