"""Report plots: the grouping of curves into panels, and the PNGs they give."""

from __future__ import annotations

from pathlib import Path

import pytest

from probekd.report.plots import _panels, plot_data_efficiency

CURVE = ([0.1, 1.0], [0.3, 0.4], [0.25, 0.35], [0.35, 0.45])


def test_plain_grid_is_one_panel() -> None:
    curves = {"hard labels": CURVE, "Probe-KD": CURVE}
    assert _panels(curves) == {"": curves}


def test_variants_get_one_panel_per_signal() -> None:
    names = [
        "logit-KD (teacher)",
        "logit-KD (teacher) · akl · none",
        "Probe-KD",
        "Probe-KD · fkl · paced",
        "Probe-KD · fkl>rkl · hard_filter",
    ]
    panels = _panels(dict.fromkeys(names, CURVE))
    assert {k: list(v) for k, v in panels.items()} == {
        "logit-KD (teacher)": ["fkl · none", "akl · none"],
        "Probe-KD": ["fkl · none", "fkl · paced", "fkl>rkl · hard_filter"],
    }


def test_panels_make_a_taller_png(tmp_path: Path) -> None:
    mpimg = pytest.importorskip("matplotlib.image")  # the optional `plots` extra
    refs = {"chance, test": 0.25}
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    plot_data_efficiency(one, {"hard labels": CURVE, "Probe-KD": CURVE}, references=refs, title="t")
    plot_data_efficiency(two, {"Probe-KD": CURVE, "Probe-KD · fkl · paced": CURVE, "hard labels": CURVE},
                         references=refs, title="t")  # fmt: skip
    h1, w1 = mpimg.imread(one).shape[:2]
    h2, w2 = mpimg.imread(two).shape[:2]
    assert w1 == w2 and h2 > 1.5 * h1  # two panels stacked: the figure grows by a panel's height
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically
