"""Turn every results history in bench/results/*.json into PNGs beside it (matplotlib, no display needed).

    python bench/plot.py                   # every file; prints what it wrote
    python bench/plot.py bench/results/sft_e2e-cpu.json

For each `<name>.json` (a list of run records, see bench/common.py):
    <name>.png            the latest run: every provider side by side, per shape or config
    <name>-history.png    when the file holds two or more runs: each run's headline figures in date order
                          (one line per provider and shape), so a regression or a noisy run stands out
A file whose benchmark has no plotter here (a newer benchmark) is listed and left alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(record: dict, what: str) -> str:
    commit = (record.get("git_commit") or "?")[:8]
    load = (record.get("loadavg") or {}).get("start")
    load_text = f", load {load[0]:.1f}" if load else ""
    return f"{what}\n{record['device']}, {record['date'][:10]}, commit {commit}{load_text}"


def _grouped_bars(ax, groups: list, providers: list, value, ylabel: str, log: bool = False):
    """One group of bars per entry of `groups`, one bar per provider; value(group, provider) -> float | None."""
    width = 0.8 / max(1, len(providers))
    for k, provider in enumerate(providers):
        xs, ys = [], []
        for i, group in enumerate(groups):
            y = value(group, provider)
            if y is not None:
                xs.append(i + k * width)
                ys.append(y)
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(groups))],
                  [str(g) for g in groups], fontsize=7)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


# ----------------------------------------------------------------------------------------------------
# The latest run, per benchmark
# ----------------------------------------------------------------------------------------------------


def plot_cross_entropy(record: dict, path: Path) -> None:
    """Median forward+backward time and extra memory per provider and shape (also the GRPO loss's layout)."""
    plt = _pyplot()
    rows = [r for r in record["results"] if "time_ms" in r]
    shapes = list(dict.fromkeys((r["N"], r["d"], r["V"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    by = {(r["N"], r["d"], r["V"], r["provider"]): r for r in rows}
    labels = [f"N={n}\nd={d}\nV={v}" for n, d, v in shapes]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.6 * len(shapes) * len(providers)), 7))
    panels = ((axes[0], "time", "forward+backward, median ms"), (axes[1], "extra_mib", "extra memory, MiB"))
    for ax, key, ylabel in panels:
        def value(label, provider, key=key):
            row = by.get((*shapes[labels.index(label)], provider))
            if row is None:
                return None
            return row["time_ms"]["median"] if key == "time" else row["extra_mib"]

        _grouped_bars(ax, labels, providers, value, ylabel, log=True)
    what = "LM head + GRPO loss" if record.get("benchmark") == "grpo" else "linear cross-entropy"
    axes[0].set_title(_title(record, f"{what}, {record.get('dtype')}"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(record: dict, path: Path) -> None:
    """TFLOP/s against total tokens, one panel per (head dim, GQA, mode), one line per provider."""
    plt = _pyplot()
    rows = [r for r in record["results"] if "tflops" in r]
    panels = sorted({(r["head_dim"], r["heads_q"] // r["heads_kv"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4 * max(1, len(panels)), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        head_dim, gqa, mode = panel
        for provider in sorted({r["provider"] for r in rows}):
            points = sorted(
                (r["total_tokens"], r["tflops"]) for r in rows
                if r["provider"] == provider and (r["head_dim"], r["heads_q"] // r["heads_kv"], r["mode"]) == panel
            )  # fmt: skip
            if points:
                ax.plot(*zip(*points), marker="o", label=provider)
        ax.set(title=f"hd{head_dim} GQA{gqa} {mode}", xlabel="total tokens", ylabel="TFLOP/s", xscale="log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(_title(record, "varlen causal attention"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sft_e2e(record: dict, path: Path) -> None:
    """Tokens/s (median, with min-max whiskers) and peak memory per provider and config."""
    plt = _pyplot()
    rows = [r for r in record["results"] if "tokens_per_s" in r]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    by = {(r["config"], r["provider"]): r for r in rows}
    cuda = any("peak_memory_gib" in r for r in rows)
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.9 * len(configs) * len(providers)), 7))

    def tokens(config, provider):
        row = by.get((config, provider))
        return None if row is None else row["tokens_per_s"]["median"]

    def memory(config, provider):
        row = by.get((config, provider))
        if row is None:
            return None
        return row["peak_memory_gib"] if cuda else row["peak_rss_mib"]

    _grouped_bars(axes[0], configs, providers, tokens, "tokens/s (median step)")
    _grouped_bars(axes[1], configs, providers, memory, "peak allocated, GiB" if cuda else "peak RSS, MiB")
    width = 0.8 / max(1, len(providers))
    for k, provider in enumerate(providers):  # min-max whiskers and MFU labels on the throughput bars
        for i, config in enumerate(configs):
            row = by.get((config, provider))
            if row is None:
                continue
            t = row["tokens_per_s"]
            axes[0].errorbar(i + k * width, t["median"], yerr=[[t["median"] - t["min"]], [t["max"] - t["median"]]],
                             color="black", capsize=2, lw=0.8)
            if row.get("mfu") is not None:
                axes[0].annotate(f"{100 * row['mfu']:.0f}%", (i + k * width, t["median"]), fontsize=6, ha="center",
                                 va="bottom", xytext=(0, 3), textcoords="offset points")
    axes[0].set_title(_title(record, f"one SFT step end to end, {record.get('precision')} (labels: MFU vs measured "
                                     "matmul rate)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_demo_sft(record: dict, path: Path) -> None:
    """The demo's validation loss curve and its tokens/s spread."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    curve = sorted((int(step), loss) for step, loss in (record.get("val_loss") or {}).items())
    if curve:
        axes[0].plot(*zip(*curve), marker="o")
        axes[0].set(xlabel="step", ylabel="validation loss", yscale="log")
    t = record.get("tokens_per_s") or {}
    if t:
        axes[1].bar([0], [t["median"]], yerr=[[t["median"] - t["min"]], [t["max"] - t["median"]]], capsize=4)
        axes[1].set_xticks([0], ["fastmath SFT loop"])
        axes[1].set_ylabel("tokens/s (logged steps)")
    after = ((record.get("summary") or {}).get("after") or {}).get("heldout") or {}
    accuracy = f", held-out accuracy {100 * after['accuracy']:.1f}%" if "accuracy" in after else ""
    fig.suptitle(f"demo SFT ({record.get('config')}){accuracy}\n{record['device']}, {record['date'][:10]}, "
                 f"commit {str(record.get('git_commit'))[:8]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_floor(record: dict, path: Path) -> None:
    plt = _pyplot()
    floor = record["results"][-1]
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    axes[0].bar([0], [floor["matmul"]["tflops"]])
    axes[0].set(ylabel="TFLOP/s", xticks=[0], xticklabels=[f"matmul {floor['matmul']['shape'][0]}^3 "
                                                           f"{floor['matmul']['dtype']}"])
    axes[1].bar([0], [floor["copy"]["gbps"]])
    axes[1].set(ylabel="GB/s", xticks=[0], xticklabels=[f"copy {floor['copy']['bytes'] / 2**20:.0f} MiB"])
    fig.suptitle(_title(record, "the floor: measured rates"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grpo(record: dict, path: Path) -> None:
    """bench/bench_grpo.py's own plot when it has one (so the two never disagree), else the cross-entropy layout."""
    try:
        from bench_grpo import plot as own_plot
    except ImportError:
        own_plot = plot_cross_entropy
    own_plot(record, path)


PLOTTERS = {"cross_entropy": plot_cross_entropy, "grpo": plot_grpo, "varlen_attention": plot_attention,
            "sft_e2e": plot_sft_e2e, "demo_sft": plot_demo_sft, "floor": plot_floor}


# ----------------------------------------------------------------------------------------------------
# History: each run's headline figures, in date order
# ----------------------------------------------------------------------------------------------------


def headline(record: dict) -> tuple[str, dict[str, float]]:
    """(what the numbers are, {series: value}) for one run."""
    benchmark, rows = record.get("benchmark"), record.get("results") or []
    if benchmark in ("cross_entropy", "grpo"):
        return "fwd+bwd median ms", {f"{r['provider']} {r['N']}x{r['d']}x{r['V']}": r["time_ms"]["median"]
                                     for r in rows if "time_ms" in r}
    if benchmark == "varlen_attention":
        return "fwd+bwd TFLOP/s", {f"{r['provider']} T={r['total_tokens']} hd{r['head_dim']} "
                                   f"GQA{r['heads_q'] // r['heads_kv']}": r["tflops"]
                                   for r in rows if r.get("mode") == "fwd+bwd" and "tflops" in r}
    if benchmark == "sft_e2e":
        return "tokens/s (median step)", {f"{r['provider']} {r['config']}": r["tokens_per_s"]["median"]
                                          for r in rows if "tokens_per_s" in r}
    if benchmark == "demo_sft":
        return "tokens/s (median logged step)", {"fastmath demo": (record.get("tokens_per_s") or {}).get("median")}
    if benchmark == "floor" and rows:
        return "measured rate", {"matmul TFLOP/s": rows[-1]["matmul"]["tflops"], "copy GB/s": rows[-1]["copy"]["gbps"]}
    return "", {}


def plot_history(records: list[dict], path: Path) -> None:
    plt = _pyplot()
    def label(r):
        load = (r.get("loadavg") or {}).get("start")
        return (f"{r['date'][:10]}\n{str(r.get('git_commit'))[:7]}\n{r.get('threads', '?')} thr"
                + (f", load {load[0]:.1f}" if load else ""))

    labels = [label(r) for r in records]
    unit, _ = headline(records[-1])
    series: dict[str, list] = {}
    for i, record in enumerate(records):
        for name, value in headline(record)[1].items():
            series.setdefault(name, [None] * len(records))[i] = value
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(records)), 4))
    for name, values in series.items():
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xticks(range(len(records)), labels, fontsize=7)
    ax.set_ylabel(unit)
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    ax.set_title(f"{records[-1].get('benchmark')} history, {records[-1]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_file(path: Path) -> list[Path]:
    """Write the PNGs of one results file; returns their paths (none for an unknown benchmark)."""
    records = common.load_records(path)
    if not records:
        return []
    plotter = PLOTTERS.get(records[-1].get("benchmark"))
    if plotter is None:
        return []
    written = [path.with_suffix(".png")]
    plotter(records[-1], written[0])
    if len(records) > 1 and headline(records[-1])[1]:
        written.append(path.with_name(path.stem + "-history.png"))
        plot_history(records, written[-1])
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="results files (default: bench/results/*.json)")
    args = parser.parse_args()
    for path in args.files or sorted(common.RESULTS.glob("*.json")):
        written = plot_file(path)
        if written:
            print(f"{path.name}: " + ", ".join(p.name for p in written))
        else:
            print(f"{path.name}: no plotter for this benchmark; left alone")


if __name__ == "__main__":
    main()
