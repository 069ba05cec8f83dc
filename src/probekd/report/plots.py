"""PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from probekd.atomic import atomic_path


def plot_layers(
    path: Path,
    layers: list[int],
    curves: dict[str, list[float]],
    *,
    teacher: float | None,
    chance: float | None,
    chosen: int | None,
    title: str,
) -> None:
    """Probe accuracy by layer, one line per curve, the teacher's own accuracy and chance as horizontal lines,
    and the chosen layer marked."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, ys in curves.items():
        ax.plot(layers, ys, marker="o", markersize=3, label=name)
    if teacher is not None:
        ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label=f"teacher's own answer ({teacher:.3f})")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.3f})")
    if chosen is not None:
        ax.axvline(chosen, color="tab:red", alpha=0.3, linewidth=6, label=f"chosen layer ({chosen})")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_data_efficiency(
    path: Path,
    curves: dict[str, tuple[list[float], list[float], list[float]]],
    *,
    references: dict[str, float],
    title: str,
) -> None:
    """Test accuracy against the labelled fraction: per signal (fractions, means, interval half-widths), a line
    with a band; `references` (e.g. the teacher's own accuracy) as horizontal lines."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, (xs, means, halves) in curves.items():
        (line,) = ax.plot(xs, means, marker="o", markersize=4, label=name)
        lo = [m - h for m, h in zip(means, halves, strict=True) if h == h]
        hi = [m + h for m, h in zip(means, halves, strict=True) if h == h]
        if len(lo) == len(xs):
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    for (name, value), style in zip(references.items(), ["--", ":", "-."], strict=False):
        ax.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{name} ({value:.3f})")
    xs_all = sorted({x for xs, _, _ in curves.values() for x in xs})
    if len(xs_all) > 1 and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 8:
        ax.set_xscale("log")
    ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    ax.set_xlabel("labelled fraction of the training split")
    ax.set_ylabel("student test accuracy (mean over seeds, 95% band)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
