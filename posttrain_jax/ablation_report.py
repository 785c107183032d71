"""Tables and plots of the loss-aggregation ablation (`posttrain_jax.ablation`).

From the rows of `results.jsonl`: the gradient difference per split, the
held-out exact match of every cell as mean +- standard deviation over seeds,
and the split effect: for one aggregation, learning rate and seed, how far the
held-out metric moves (max - min) when only the split of the global batch over
devices and accumulation steps changes. Same seed means same initialisation
and same global batches, so for `sum` and `token_mean` the runs differ only by
fp32 reduction order and the split effect measures that noise floor.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

METRICS = (("eval_exact_match", "all"), ("eval_exact_match_short", "short"), ("eval_exact_match_long", "long"))


def cell_key(aggregation: str, learning_rate: float, accum: int, devices: int, seed: int) -> str:
    return f"{aggregation}-lr{learning_rate:g}-accum{int(accum)}-dev{int(devices)}-seed{int(seed)}"


def _split_label(row: dict) -> str:
    return f"{row['devices']}dev x {row['accum_steps']}acc ({row['micro_batch_rows']} rows)"


def _mean_std(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _present(runs: list[dict], metrics) -> tuple:
    """The metrics every run has a value for (a cell without an eval set, or without reply styles, has fewer)."""
    return tuple(m for m in metrics if runs and all(r.get(m[0]) is not None for r in runs))


def summarize(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(cells, split_effects): per (aggregation, lr, split) the seed mean/std of each metric; per
    (aggregation, lr) the mean over seeds of each metric's range across splits, and the seed spread."""
    runs = [r for r in rows if r["kind"] == "train"]
    by_cell, by_seed = defaultdict(list), defaultdict(list)
    for r in runs:
        by_cell[(r["aggregation"], r["learning_rate"], r["devices"], r["accum_steps"])].append(r)
        by_seed[(r["aggregation"], r["learning_rate"], r["seed"])].append(r)
    cells = []
    for (agg, lr, devices, accum), group in sorted(by_cell.items()):
        cell = {"aggregation": agg, "learning_rate": lr, "devices": devices, "accum_steps": accum,
                "micro_batch_rows": group[0]["micro_batch_rows"], "seeds": len(group), "split": _split_label(group[0])}
        for metric, _ in _present(runs, METRICS + (("eval_loss", "loss"), ("final_loss_per_token", "train"))):
            cell[metric] = _mean_std([r[metric] for r in group])
        cells.append(cell)
    effects = defaultdict(lambda: defaultdict(list))
    for (agg, lr, _seed), group in by_seed.items():
        if len(group) < 2:
            continue
        for metric, _ in _present(runs, METRICS):
            values = [r[metric] for r in group]
            effects[(agg, lr)][metric].append(max(values) - min(values))
    split_effects = []
    for (agg, lr), per_metric in sorted(effects.items()):
        row = {"aggregation": agg, "learning_rate": lr}
        for metric, _ in _present(runs, METRICS):
            row[metric] = _mean_std(per_metric[metric])
            # The seed-to-seed spread at a fixed split, averaged over splits: the noise scale to compare with.
            spreads = [c[metric][1] for c in cells if c["aggregation"] == agg and c["learning_rate"] == lr]
            row[metric + "_seed_std"] = float(np.mean(spreads)) if spreads else 0.0
        split_effects.append(row)
    return cells, split_effects


def _pct(mean_std) -> str:
    mean, std = mean_std
    return f"{mean:.1%} ± {std:.1%}"


def table_markdown(rows: list[dict]) -> str:
    grads = [r for r in rows if r["kind"] == "gradient"]
    cells, effects = summarize(rows)
    lines = ["## Gradient difference vs the first split (max relative)", "",
             "| aggregation | split (devices x accum x micro) | max rel diff |", "| --- | --- | --- |"]
    lines += [f"| {r['aggregation']} | {'x'.join(map(str, r['split']))} | {r['max_rel_diff']:.2e} |" for r in grads]
    runs = [r for r in rows if r["kind"] == "train"]
    shown = _present(runs, METRICS)
    names = {"all": "exact match", "short": "short replies", "long": "long replies"}
    if cells:
        extra = [m for m in ("eval_loss", "final_loss_per_token") if m in cells[0]]
        lines += ["", "## Held-out metrics per cell (mean ± std over seeds)", "",
                  "| aggregation | lr | split | seeds | " + " | ".join(names[n] for _, n in shown + ()) +
                  "".join(f" | {m.replace('_', ' ')}" for m in extra) + " |",
                  "| --- " * (4 + len(shown) + len(extra)) + "|"]
        lines += [f"| {c['aggregation']} | {c['learning_rate']:g} | {c['split']} | {c['seeds']} | " +
                  " | ".join(_pct(c[m]) for m, _ in shown) +
                  "".join(f" | {c[m][0]:.4f} ± {c[m][1]:.4f}" for m in extra) + " |" for c in cells]
    if effects and shown:
        lines += ["", "## Split effect: change of the held-out metric when only the split changes", "",
                  "Per seed, max - min over the splits (same init, same batches); mean ± std over seeds. "
                  "`seed std` is the spread between seeds at a fixed split, for scale.", "",
                  "| aggregation | lr | " + " | ".join(names[n] for _, n in shown) + " | seed std (exact match) |",
                  "| --- " * (3 + len(shown)) + "|"]
        lines += [f"| {e['aggregation']} | {e['learning_rate']:g} | " + " | ".join(_pct(e[m]) for m, _ in shown) +
                  f" | {e[shown[0][0] + '_seed_std']:.1%} |" for e in effects]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> bool:
    """Gradient panel, held-out exact match per cell with error bars (one panel per learning rate), split effect."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: wrote the table only (pip install matplotlib for the plot)")
        return False
    grads = [r for r in rows if r["kind"] == "gradient"]
    cells, effects = summarize(rows)
    rates = sorted({c["learning_rate"] for c in cells})
    aggs = sorted({r["aggregation"] for r in grads} | {c["aggregation"] for c in cells})
    fig, axes = plt.subplots(1, 2 + len(rates), figsize=(5 * (2 + len(rates)), 4.2), squeeze=False)
    axes = axes[0]
    for agg in sorted({r["aggregation"] for r in grads}):
        pts = [r for r in grads if r["aggregation"] == agg]
        axes[0].plot(["x".join(map(str, r["split"])) for r in pts], [max(r["max_rel_diff"], 1e-9) for r in pts],
                     "o-", label=agg, color=f"C{aggs.index(agg)}")
    axes[0].set_yscale("log")
    axes[0].set(title="gradient vs first split", xlabel="devices x accum x micro", ylabel="max relative difference")
    axes[0].legend(fontsize=7)
    for ax, lr in zip(axes[1:], rates):
        mine = [c for c in cells if c["learning_rate"] == lr]
        splits = sorted({(c["devices"], c["accum_steps"], c["split"]) for c in mine})
        trained = sorted({c["aggregation"] for c in mine})  # only what was trained gets a bar and a legend entry
        width = 0.8 / max(len(trained), 1)
        for i, agg in enumerate(trained):
            points = {(c["devices"], c["accum_steps"]): c["eval_exact_match"] for c in mine
                      if c["aggregation"] == agg and "eval_exact_match" in c}
            xs = [j + i * width for j, (d, a, _) in enumerate(splits) if (d, a) in points]
            vals = [points[(d, a)] for d, a, _ in splits if (d, a) in points]
            ax.bar(xs, [v[0] for v in vals], width, yerr=[v[1] for v in vals], capsize=3, label=agg,
                   color=f"C{aggs.index(agg)}")  # the gradient panel's colour for the same aggregation
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(splits))], [s[2] for s in splits], fontsize=7,
                      rotation=15)
        ax.set(title=f"held-out exact match, lr {lr:g} (mean ± std over seeds)", ylabel="exact match", ylim=(0, 1))
        ax.legend(fontsize=7)
    ax = axes[-1]
    shown = _present([r for r in rows if r["kind"] == "train"], METRICS)
    if effects and shown:
        labels = [f"{e['aggregation']}\nlr {e['learning_rate']:g}" for e in effects]
        width = 0.8 / len(shown)
        for i, (metric, name) in enumerate(shown):
            ax.bar([j + i * width for j in range(len(effects))], [e[metric][0] for e in effects], width,
                   yerr=[e[metric][1] for e in effects], capsize=3, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(effects))], labels, fontsize=7)
        ax.set(title="change when only the split changes (same seed)", ylabel="max - min exact match over splits")
        ax.legend(fontsize=7)
    else:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out_dir: str, rows: list[dict]) -> None:
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table_markdown(rows))
    plot(rows, os.path.join(out_dir, "ablation.png"))
