"""PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from probekd.atomic import atomic_path


def _finish(fig: plt.Figure, ax: plt.Axes, path: Path) -> None:
    """Grid, the legend outside the axes on the right (never over the data), and an atomic PNG write."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_layers(
    path: Path,
    layers: list[int],
    curves: dict[str, list[float]],
    *,
    teacher: float | None,
    chance: float | None,
    chosen: int | None,
    title: str,
    chosen_label: str | None = None,
) -> None:
    """Probe accuracy by layer, one line per curve, the teacher's own accuracy and chance as horizontal lines,
    and the chosen layer marked (`chosen_label` names it in the legend; default "chosen layer (N)")."""
    fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
    for name, ys in curves.items():
        ax.plot(layers, ys, marker="o", markersize=3, label=name)
    if teacher is not None:
        ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label=f"teacher's own answer ({teacher:.3f})")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.3f})")
    if chosen is not None:
        ax.axvline(chosen, color="tab:red", alpha=0.3, linewidth=6, label=chosen_label or f"chosen layer ({chosen})")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    _finish(fig, ax, path)


def plot_data_efficiency(
    path: Path,
    curves: dict[str, tuple[list[float], list[float], list[float], list[float]]],
    *,
    references: dict[str, float],
    title: str,
) -> None:
    """Test accuracy against the labelled fraction: per signal (fractions, means, interval lows, interval highs),
    a line with a band (error bars where there is a single fraction); `references` as horizontal lines."""
    fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
    xs_all = sorted({x for xs, *_ in curves.values() for x in xs})
    offsets = {name: (i - (len(curves) - 1) / 2) * 0.02 for i, name in enumerate(curves)}  # dodge single points
    for name, (xs, means, lows, highs) in curves.items():
        ok = all(v == v for v in [*lows, *highs])
        if len(xs_all) > 1:
            (line,) = ax.plot(xs, means, marker="o", markersize=4, label=name)
            if ok:
                ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15)
        else:
            xd = [x + offsets[name] for x in xs]
            err = [
                [m - lo for m, lo in zip(means, lows, strict=True)],
                [h - m for m, h in zip(means, highs, strict=True)],
            ]
            ax.errorbar(
                xd, means, yerr=err if ok else None, marker="o", markersize=5, capsize=4, linestyle="", label=name
            )
    for (name, value), style in zip(references.items(), ["--", ":", "-."], strict=False):
        ax.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{name} ({value:.3f})")
    if len(xs_all) > 1 and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 8:
        ax.set_xscale("log")
    ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    if len(xs_all) == 1:
        ax.set_xlim(xs_all[0] - 0.1, xs_all[0] + 0.1)
    ax.set_xlabel("labelled fraction of the training split")
    ax.set_ylabel("student test accuracy (95% interval)")
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    _finish(fig, ax, path)
