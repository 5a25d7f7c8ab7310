"""The comparison's plots (matplotlib, imported only when drawing): accuracy vs N', vs alpha, score histograms."""

from __future__ import annotations

import io
import math

import numpy as np

from ray_pipeline.graded_run import GradedRun
from ray_pipeline.metrics import ALPHA_GRID, MethodResult, curve_sizes
from ray_pipeline.storage import StoragePath

PLOTS = {
    "accuracy_vs_n": "accuracy_vs_n.png",
    "accuracy_vs_alpha": "accuracy_vs_alpha.png",
    "score_histograms": "score_histograms.png",
}


def shown_sizes(n: int) -> list[int]:
    """The N' a table or an axis names: the curves' sizes (every one up to 16, else the powers of two and N)."""
    return curve_sizes(n)


def _save(fig, target: StoragePath) -> None:
    """Render into memory, then write the bytes: a store takes whole objects, not matplotlib's file."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    target.write_bytes(png.getvalue())


def _floats(values) -> list[float]:
    """Accuracies as plotted: None (no problem graded) as NaN, which matplotlib leaves out."""
    return [math.nan if v is None else v for v in values]


def write_plots(run_dir: StoragePath, run: GradedRun, results: dict[str, MethodResult], comparison: dict) -> None:
    """Accuracy vs N', accuracy vs alpha, and per-method score histograms of correct vs wrong candidates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = comparison["candidates_per_problem"]
    sizes = shown_sizes(n)
    # A colour of its own for each of the (more than ten) methods.
    colors = dict(zip(comparison["methods"], plt.get_cmap("tab20").colors))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, m in comparison["methods"].items():
        ax.plot(sizes, _floats(m["accuracy_by_n"][k] for k in sizes), marker="o", color=colors[name], label=name)
    ax.plot(sizes, _floats(comparison["pass_at_n_by_n"][k] for k in sizes), "k--", label="pass@N'")
    if n > 16:
        ax.set_xscale("log", base=2)
    ticks = shown_sizes(n)
    ax.set(xlabel="N' (candidates per question)", ylabel="accuracy", title="Accuracy vs N'")
    ax.set_xticks(ticks, labels=[str(k) for k in ticks])
    # A fixed legend place and layout: matplotlib's "best" place and tight_layout measure every text again and again.
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.93)
    _save(fig, run_dir / PLOTS["accuracy_vs_n"])

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in comparison["accuracy_by_alpha"].items():
        ax.plot(ALPHA_GRID, _floats(row[str(a)] for a in ALPHA_GRID), marker="o", color=colors[name], label=name)
    ax.set(xlabel="alpha (1 = token level, 0 = step level)", ylabel="accuracy", title="Accuracy vs alpha")
    ax.legend(fontsize=8, loc="upper left")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.93)
    _save(fig, run_dir / PLOTS["accuracy_vs_alpha"])

    # Candidates of problems without a gold answer are neither correct nor wrong: left out of the histograms.
    graded = np.repeat(run.has_gold, run.sizes)
    masked = {name: np.where(graded, r.picks.scores, np.nan) for name, r in results.items()}
    scored = {name: r for name, r in results.items() if not np.isnan(masked[name]).all()}
    cols = 4
    rows = max(1, math.ceil(len(scored) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    labels = run.values["correct"] & graded
    for ax, name in zip(axes.flat, scored):
        scores = masked[name]
        finite = scores[~np.isnan(scores)]
        low, high = float(finite.min()), float(finite.max())
        # Shared bins, so the two histograms line up (a single value gets one bin around it).
        edges = np.linspace(low, high, 21) if high > low else np.array([low - 0.5, low + 0.5])
        # Densities: correct candidates are usually far fewer than wrong ones.
        for want, color in ((True, "tab:green"), (False, "tab:red")):
            values = scores[(labels == want) & ~np.isnan(scores)]
            if len(values):
                density, _ = np.histogram(values, bins=edges, density=True)
                label = f"{'correct' if want else 'wrong'} ({len(values)})"
                ax.stairs(density, edges, fill=True, alpha=0.5, color=color, label=label)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    for ax in list(axes.flat)[len(scored) :]:
        ax.axis("off")
    fig.suptitle("Per-candidate score: correct vs wrong candidates")
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.05, top=0.93, wspace=0.25, hspace=0.45)
    _save(fig, run_dir / PLOTS["score_histograms"])
