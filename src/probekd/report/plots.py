"""PNG plots, drawn on a bare `matplotlib.figure.Figure` and saved with the Agg renderer (no display needed).

Importing this module does not import matplotlib, and nothing here imports pyplot or calls `matplotlib.use`:
probekd never changes the caller's matplotlib backend or pyplot state. matplotlib is optional (the `plots` extra):
check `plots_available()` before plotting; the plot functions raise MissingExtraError without it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probekd.atomic import atomic_path
from probekd.extras import available, require

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Curve = tuple[list[float], list[float], list[float], list[float]]  # fractions, means, interval lows, highs


def plots_available() -> bool:
    """Whether matplotlib (the `plots` extra) is installed, so that the plot functions can draw; checked without
    importing it. Without it, a report is written without its PNGs."""
    return available("matplotlib")


def _figure(**kwargs: Any) -> Figure:
    """A new bare Figure (not registered with pyplot, so nothing to close), or MissingExtraError."""
    require("matplotlib", "plots", "drawing the report plots")
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig: Figure, path: Path) -> None:
    """Tight layout and an atomic PNG write (savefig picks the Agg canvas for PNG, whatever the global backend)."""
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")


def _decorate(ax: Axes) -> None:
    """Grid, and the legend outside the axes on the right (never over the data)."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


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
    fig = _figure(figsize=(9, 4), dpi=120)
    ax = fig.subplots()
    for name, ys in curves.items():
        ax.plot(layers, ys, marker="o", markersize=3, label=name)
    if teacher is not None:
        ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label=f"teacher's own answer ({teacher:.3f})")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.3f})")
    if chosen is not None:
        ax.axvline(chosen, color="tab:red", alpha=0.3, linewidth=6, label=chosen_label or f"chosen layer ({chosen})")
    ax.set_xlabel("layer (0 = embeddings)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    _decorate(ax)
    _save(fig, path)


def _panels(curves: dict[str, Curve]) -> dict[str, dict[str, Curve]]:
    """Curves grouped for plotting: one group of all when no name has a loss/weighting part (`signal · loss ·
    weighting`); otherwise one group per signal, holding its plain curve (labelled `fkl · none`) and its variants
    (labelled by their loss and weighting), so that no panel has more lines than the colour cycle has colours."""
    if not any(" · " in name for name in curves):
        return {"": curves}
    panels: dict[str, dict[str, Curve]] = {}
    for name, curve in curves.items():
        signal, _, variant = name.partition(" · ")
        panels.setdefault(signal, {})[variant or "fkl · none"] = curve
    return panels


def _draw(ax: Axes, curves: dict[str, Curve], xs_all: list[float], references: dict[str, float]) -> None:
    """One panel: a line with a band per curve (error bars, dodged, where there is a single fraction)."""
    offsets = {name: (i - (len(curves) - 1) / 2) * 0.02 for i, name in enumerate(curves)}
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
    ax.set_ylabel("student test accuracy (95% interval)")


def plot_data_efficiency(
    path: Path,
    curves: dict[str, Curve],
    *,
    references: dict[str, float],
    title: str,
) -> None:
    """Test accuracy against the labelled fraction: per signal (fractions, means, interval lows, interval highs),
    a line with a band (error bars where there is a single fraction); `references` as horizontal lines. A grid
    with loss/weighting variants gets one panel per signal (shared y axis), see `_panels`."""
    panels = _panels(curves)
    fig = _figure(figsize=(9, 4 + 3 * (len(panels) - 1)), dpi=120)
    axes = fig.subplots(len(panels), 1, sharey=True, squeeze=False)
    xs_all = sorted({x for xs, *_ in curves.values() for x in xs})
    for ax, (signal, group) in zip(axes[:, 0], panels.items(), strict=True):
        _draw(ax, group, xs_all, references)
        if signal:
            ax.set_title(signal, fontsize=9)
        _decorate(ax)
    axes[-1, 0].set_xlabel("labelled fraction of the training split")
    fig.suptitle(textwrap.fill(title, 80), fontsize=9)
    _save(fig, path)


def plot_pass_rate_histograms(
    path: Path, k: int, before: list[int], after: dict[str, list[int]], *, title: str
) -> None:
    """The share of problems with j of `k` rollouts graded correct (j = 0..k): the initial student's (`before`)
    and each trained variant's (`after`, by label), as side-by-side bars."""
    fig = _figure(figsize=(9, 4), dpi=120)
    ax = fig.subplots()
    series = {"initial student": before, **after}
    width = 0.8 / len(series)
    for n, (label, counts) in enumerate(series.items()):
        total = max(1, sum(counts))
        xs = [j + (n - (len(series) - 1) / 2) * width for j in range(k + 1)]
        ax.bar(xs, [c / total for c in counts], width=width, label=label)
    ax.set_xticks(range(k + 1), [f"{j}/{k}" for j in range(k + 1)])
    ax.set_xlabel("pass rate (rollouts graded correct)")
    ax.set_ylabel("share of problems")
    _decorate(ax)
    fig.suptitle(textwrap.fill(title, 80), fontsize=9)
    _save(fig, path)
