"""`probekd report RUN`: the grid's results as tables (mean +- 95% interval over seeds), paired comparisons of
Probe-KD against each other signal, plots, and a plain verdict per setting.

Writes RUN/report/: report.md, results.csv (one row per cell), summary.csv (one row per signal and fraction),
data_efficiency.png, layers.png (the probe layer curve, copied from RUN/probes/).

In three steps, each usable alone (the Python API returns the computed objects): `compute_report` reads the run
folder and returns a `Report` (cells, summary rows, comparisons, probes, chance level); `render_markdown` and
`render_terminal` turn it into text; `save_report` writes the folder. `write_report` does all three;
`results_table` is the per-cell table alone, as plain dicts.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import yaml

from probekd.atomic import atomic_path
from probekd.errors import ProbekdError
from probekd.evaluate import bootstrap_ci, mean_ci, normalized_entropy
from probekd.probes.select import chosen_label
from probekd.report.plots import plots_available
from probekd.teacher.cache import TeacherCache, load_cache

LABELS = {
    "hard": "hard labels",
    "teacher": "logit-KD (teacher)",
    "teacher_calibrated": "calibrated logit-KD",
    "probe": "Probe-KD",
}
CELL_COLUMNS = [
    "signal", "loss", "weighting", "fraction", "seed", "mode", "n_labelled", "n_train_rows", "accuracy",
    "accuracy_ci_low", "accuracy_ci_high", "ece", "nll", "agreement_teacher", "agreement_probe", "best_dev_accuracy",
    "test_entropy", "mean_pass_rate", "ess_share", "zero_share", "seconds", "kept_model",
]  # fmt: skip
WEIGHT_STATS = ("mean_pass_rate", "ess_share", "zero_share")  # of a weighted student: mean over its weight passes
NEAR_UNIFORM = 0.99  # a student whose test predictions' normalized entropy is above this is flagged in the report


class SummaryRow(TypedDict):
    """One row of summary.csv: the students of one variant at one labelled fraction, over their seeds."""

    variant: str  # the signal, plus the loss and weighting when not the default (`probe · fkl>rkl · paced`)
    fraction: float  # the labelled fraction
    seeds: int  # how many seeds (students) are finished
    accuracy_mean: float  # mean test accuracy over the seeds
    accuracy_ci_half: float | str  # half-width of its 95% t-interval over seeds ("" with one seed)
    accuracy_ci_bootstrap: list[float] | str  # one seed: its bootstrap 95% interval over test questions, else ""
    ece_mean: float  # mean expected calibration error on test
    agreement_teacher_mean: float  # mean agreement of the students' test answers with the teacher's own
    agreement_probe_mean: float  # and with the probe's


class Comparison(TypedDict):
    """Variant `a` against variant `b` at one fraction, paired by seed (`compare`)."""

    a: str
    b: str
    fraction: float
    seeds: int  # seeds finished for both
    diff: float  # mean over seeds of a's test accuracy minus b's
    half: float  # half-width of its 95% t-interval over seeds (NaN with one seed)
    bootstrap: tuple[float, float] | None  # paired bootstrap 95% interval over test questions (None without the
    # students' saved test predictions)
    verdict: str  # `wins`, `loses`, `ties (an interval includes 0)`, `no interval`, or an untested note


def label(variant: str) -> str:
    """A variant's name in tables: the signal's label, then the loss and weighting when not the default."""
    signal, _, rest = variant.partition(" · ")
    return LABELS.get(signal, signal) + (f" · {rest}" if rest else "")


def _order(variant: str) -> tuple[int, str]:
    signal = variant.partition(" · ")[0]
    return (list(LABELS).index(signal) if signal in LABELS else len(LABELS), variant)


def load_cells(run: Path) -> list[dict[str, Any]]:
    """Every finished cell's metrics under RUN/students/, each with its `variant`: the signal, plus the loss and
    weighting (`probe · fkl>rkl · paced`) when they are not the default forward KL, unweighted."""
    cells = []
    for path in sorted((run / "students").glob("*/metrics.json")):
        try:
            c = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ProbekdError(f"{path} is not valid JSON ({e}); delete it to rerun that cell") from e
        c.setdefault("cell", path.parent.name)
        loss, weighting = c.setdefault("loss", "fkl"), c.setdefault("weighting", "none")
        default = (loss, weighting) == ("fkl", "none")
        c["variant"] = c["signal"] if default else f"{c['signal']} · {loss} · {weighting}"
        for key in WEIGHT_STATS if c.get("weights") else ():
            c[key] = float(np.mean([w[key] for w in c["weights"]]))
        cells.append(c)
    return cells


def unfinished(run: Path) -> str | None:
    """A sentence saying how many of the grid's cells (RUN/config.yaml) have no finished student yet, by fraction;
    None when all have one or the configuration cannot be read (then the report describes what is there)."""
    from probekd.config import RunConfig
    from probekd.layout import metrics_path

    try:
        cfg = RunConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError, ValueError):
        return None
    cells = cfg.cells()
    missing = [c for c in cells if not metrics_path(run, c.name).exists()]
    if not missing:
        return None
    by_fraction = {f: sum(c.fraction == f for c in missing) for f in sorted({c.fraction for c in missing})}
    where = ", ".join(f"{n} at fraction {f:g}" for f, n in by_fraction.items())
    return (
        f"Partial: {len(cells) - len(missing)} of the grid's {len(cells)} cells are finished ({where} to go; "
        "`probekd run` resumes them)."
    )


def _csv(rows: Sequence[Mapping[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def summarize(cells: list[dict[str, Any]]) -> list[SummaryRow]:
    """Per (variant, fraction): mean test accuracy over seeds and the half-width of its 95% t-interval."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["variant"], c["fraction"]), []).append(c)
    out: list[SummaryRow] = []
    for (variant, fraction), cs in sorted(groups.items(), key=lambda kv: (kv[0][1], _order(kv[0][0]))):
        mean, half = mean_ci([c["accuracy"] for c in cs])
        out.append(
            {
                "variant": variant,
                "fraction": fraction,
                "seeds": len(cs),
                "accuracy_mean": round(mean, 4),
                "accuracy_ci_half": round(half, 4) if half == half else "",
                # one seed: the test-question bootstrap interval of that student instead
                "accuracy_ci_bootstrap": [round(x, 4) for x in cs[0]["accuracy_ci"]] if len(cs) == 1 else "",
                "ece_mean": round(float(np.mean([c["ece"] for c in cs])), 4),
                "agreement_teacher_mean": round(float(np.mean([c["agreement_teacher"] for c in cs])), 4),
                "agreement_probe_mean": round(float(np.mean([c["agreement_probe"] for c in cs])), 4),
            }
        )
    return out


def _test_probs(run: Path, cell: dict[str, Any]) -> np.ndarray | None:
    """A finished student's probabilities on the test questions [N, K], None if it saved none."""
    from probekd.layout import student_dir

    path = student_dir(run, cell["cell"]) / "test_probs.npy"
    return np.load(path) if path.exists() else None


def _add_test_entropy(run: Path, cells: list[dict[str, Any]], mask: np.ndarray) -> None:
    """Each cell's `test_entropy` (`normalized_entropy` of its test probabilities; None without them)."""
    for c in cells:
        probs = _test_probs(run, c)
        c["test_entropy"] = (
            round(normalized_entropy(probs, mask), 4) if probs is not None and probs.shape == mask.shape else None
        )


def near_uniform_note(cells: list[dict[str, Any]]) -> list[str]:
    """Report lines naming the students whose test predictions are almost a uniform guess (none: no lines)."""
    flat = sorted(c["cell"] for c in cells if (c.get("test_entropy") or 0) > NEAR_UNIFORM)
    if not flat:
        return []
    return [
        f"**{len(flat)} of {len(cells)} students answer almost uniformly** (normalized entropy of their test "
        f"predictions above {NEAR_UNIFORM}; 1 is a uniform guess, column `test_entropy` of `results.csv`): "
        + ", ".join(f"`{n}`" for n in flat)
        + ". They have barely moved from a uniform guess (under-trained; collapsed where their accuracy is near "
        "chance too): their accuracy rests on small differences between nearly equal scores.",
        "",
    ]


def weights_table(cells: list[dict[str, Any]], chance: float | None) -> list[str]:
    """Report lines: per fraction and weighted variant, the range over seeds of the students' mean pass rate,
    effective sample size and zero-weight share (none: no lines). Pass rates near chance mean the student was still
    near-uniform when weighted, so the weights vary little beyond the sampling noise of the pass rates."""
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for c in cells:
        if "mean_pass_rate" in c:
            groups.setdefault((c["fraction"], c["variant"]), []).append(c)
    if not groups:
        return []

    def span(cs: list[dict[str, Any]], key: str) -> str:
        lo, hi = min(c[key] for c in cs), max(c[key] for c in cs)
        return f"{lo:.3f}" if round(lo, 3) == round(hi, 3) else f"{lo:.3f}-{hi:.3f}"

    lines = [
        "## Weights of the weighted students (range over seeds)",
        "",
        "Each student's mean over its weight computations: pass rate on the training rows, effective sample size "
        "(share of the rows) and share of rows at weight zero."
        + (f" A pass rate near chance ({chance:.3f}) means a near-uniform student." if chance is not None else ""),
        "",
        "| fraction | variant | mean pass rate | effective sample size | zero weight | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for (f, v), cs in sorted(groups.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]))):
        stats = " | ".join(span(cs, key) for key in WEIGHT_STATS)
        lines.append(f"| {f:g} | {label(v)} | {stats} | {len(cs)} |")
    return [*lines, ""]


def _correct(run: Path, cell: dict[str, Any], answers: np.ndarray) -> np.ndarray | None:
    probs = _test_probs(run, cell)
    if probs is None:
        return None
    lab = answers >= 0
    return (probs[lab].argmax(1) == answers[lab]).astype(np.float64)


def compare(
    cells: list[dict[str, Any]],
    a: str,
    b: str,
    fraction: float,
    run: Path | None = None,
    answers: np.ndarray | None = None,
) -> Comparison | None:
    """Test accuracy of variant `a` minus `b` at `fraction`, paired by seed, with two 95% intervals: a t-interval
    over seeds (training noise; needs 2+ seeds) and a paired bootstrap over test questions of the seed-averaged
    correctness (test-set noise; needs the cells' saved test predictions). The verdict needs every available
    interval to exclude 0."""
    by = {(c["variant"], c["seed"]): c for c in cells if c["fraction"] == fraction}
    seeds = sorted({s for (sig, s) in by if sig == a} & {s for (sig, s) in by if sig == b})
    if not seeds:
        return None
    diffs = [by[(a, s)]["accuracy"] - by[(b, s)]["accuracy"] for s in seeds]
    mean, half = mean_ci(diffs)
    boot = None
    if run is not None and answers is not None:
        per = [(_correct(run, by[(a, s)], answers), _correct(run, by[(b, s)], answers)) for s in seeds]
        if all(x is not None and y is not None for x, y in per):
            d = np.mean([x - y for x, y in per], axis=0)  # type: ignore[operator]
            _, lo, hi = bootstrap_ci(d)
            boot = (lo, hi)
    intervals = [(mean - half, mean + half)] if half == half else []
    intervals += [boot] if boot else []
    if not intervals:
        verdict = "no interval"
    elif all(lo > 0 for lo, _ in intervals):
        verdict = "wins"
    elif all(hi < 0 for _, hi in intervals):
        verdict = "loses"
    else:
        verdict = "ties (an interval includes 0)"
    return {
        "a": a, "b": b, "fraction": fraction, "seeds": len(seeds), "diff": mean, "half": half,
        "bootstrap": boot, "verdict": verdict,
    }  # fmt: skip


def kept_before_variant(cell: dict[str, Any], train: dict[str, Any]) -> bool:
    """Whether the student kept for `cell` (its best dev epoch) was saved before its loss or weighting first made it
    differ from the forward-KL, unweighted student of the same cell (`train`: the run's `train` config): then it
    *is* that student, and comparing the two tests nothing (PACED's warm-up epoch, the first half of `fkl>rkl`)."""
    from probekd.student.train_config import TrainConfig

    dev = cell.get("dev_accuracy_by_epoch") or []
    if not dev or "n_train_rows" not in cell:
        return False
    cfg = TrainConfig(**{**train, "loss": cell.get("loss", "fkl")})
    steps_per_epoch = math.ceil(cell["n_train_rows"] / cfg.batch_size)
    first = cfg.first_changed_step(cell.get("weighting", "none"), steps_per_epoch)
    if first is None:
        return False
    kept_at = min((int(np.argmax(dev)) + 1) * steps_per_epoch, math.ceil(cfg.epochs * steps_per_epoch))
    return kept_at <= first


def _flag_early_kept(rows: list[Comparison], cells: list[dict[str, Any]], train: dict[str, Any]) -> None:
    """Mark the variant comparisons whose kept students predate the variant (see `kept_before_variant`)."""
    for r in rows:
        same = [c for c in cells if c["variant"] == r["a"] and c["fraction"] == r["fraction"]]
        kept = [kept_before_variant(c, train) for c in same]
        if kept and all(kept):
            r["verdict"] = "untested: every seed kept an epoch from before the variant acted"
        elif any(kept):
            r["verdict"] += f" ({sum(kept)} of {len(kept)} seeds kept an epoch from before the variant acted)"


def _pm(mean: float, half: Any, signed: bool = False) -> str:
    """`mean ± half` (just `mean` without an interval); `signed` writes the sign of a difference, `+0.004`."""
    m = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return m if half in ("", None) or half != half else f"{m} ± {half:.3f}"


def _comparison_table(title: str, column: str, verdict: str, rows: list[tuple[Comparison, str]]) -> list[str]:
    """Markdown lines of a table of `compare` results, each row named by the given variant (none: no lines)."""
    if not rows:
        return []
    lines = [
        f"## {title}",
        "",
        f"| fraction | {column} | difference ± t-interval over seeds | bootstrap over test questions | seeds | "
        f"{verdict} |",
        "|---|---|---|---|---|---|",
    ]
    for r, name in rows:
        boot = f"[{r['bootstrap'][0]:+.3f}, {r['bootstrap'][1]:+.3f}]" if r["bootstrap"] else "-"
        lines.append(
            f"| {r['fraction']:g} | {label(name)} | {_pm(r['diff'], r['half'], signed=True)} | {boot} | {r['seeds']} | "
            f"{r['verdict']} |"
        )
    return [*lines, ""]


def _test_cache(run: Path) -> TeacherCache | None:
    """The test split's gold answers and option mask (no hidden states), for the paired bootstrap and the chance
    level: from RUN/targets/ (present wherever students were trained), else from the teacher cache."""
    from probekd.layout import load_answers

    with contextlib.suppress(ProbekdError):
        return load_answers(run, ("test",))["test"]
    if (run / "teacher" / "test" / "manifest.json").exists():
        return load_cache(run / "teacher" / "test", with_hidden=False)
    return None


def plot_interval(row: Mapping[str, Any]) -> tuple[float, float]:
    """The band plotted for one summary row: the bootstrap interval of a single seed, else the t-interval over
    seeds cut to [0, 1] (an accuracy; two seeds' t-interval is often wider than that); NaN when there is neither."""
    if row["accuracy_ci_bootstrap"]:
        lo, hi = row["accuracy_ci_bootstrap"]
        return lo, hi
    if row["accuracy_ci_half"] == "":
        return float("nan"), float("nan")
    return max(0.0, row["accuracy_mean"] - row["accuracy_ci_half"]), min(
        1.0, row["accuracy_mean"] + row["accuracy_ci_half"]
    )


@dataclass(frozen=True)
class Report:
    """Everything RUN/report/ shows, computed from a run folder (`compute_report`); `render_markdown` makes report.md
    from it, `save_report` writes the folder."""

    run: Path  # the run folder
    config: dict[str, Any]  # RUN/config.yaml as written ({} when absent)
    cells: list[dict[str, Any]]  # the finished cells: metrics.json, `variant`, and the derived results.csv columns
    summary: list[SummaryRow]  # per (variant, fraction): mean over seeds (`summarize`)
    fractions: list[float]  # the labelled fractions with a finished cell, ascending
    variants: list[str]  # the variants with a finished cell, in table order (`probe`, `teacher · fkl>rkl · paced`)
    comparisons: list[Comparison]  # Probe-KD against each other signal's default student, per fraction
    variant_comparisons: list[Comparison]  # each loss / weighting variant against its signal's default student
    probes: dict[str, Any] | None  # RUN/probes/summary.json (None without it)
    chance: float | None  # a uniform guess's test accuracy (None without the test split's answers)
    partial: str | None  # the `unfinished` sentence (None when the grid is complete or its config unreadable)
    without_model: list[str]  # names of finished cells with no kept model folder (`probekd.layout.model_dir`)

    @property
    def name(self) -> str:
        """The run's name: the configuration's, else the run folder's."""
        return str(self.config.get("name", self.run.name))


def _kept_model(run: Path, name: str) -> bool:
    """Whether the cell's student was kept: its model folder (`probekd.student.kept`) holds `probekd.json`."""
    from probekd.layout import model_dir

    return (model_dir(run, name) / "probekd.json").exists()


def _finished_cells(run: Path, test: TeacherCache | None) -> list[dict[str, Any]]:
    """`load_cells` with the derived columns of results.csv: `accuracy_ci_low`/`_high`, `test_entropy` (when the
    test split's option mask is known), `kept_model`."""
    cells = load_cells(run)
    if test is not None:
        _add_test_entropy(run, cells, test.mask)
    for c in cells:
        c["accuracy_ci_low"], c["accuracy_ci_high"] = c["accuracy_ci"]
        c["kept_model"] = _kept_model(run, c["cell"])
    return cells


def results_table(run: Path) -> list[dict[str, Any]]:
    """One plain dict per finished cell of run folder `run` (in results.csv's order): the cell's name (`cell`), then
    the `CELL_COLUMNS` fields (None where results.csv leaves the field empty). Empty when no cell is finished."""
    if not Path(run).is_dir():
        raise ProbekdError(f"{run} is not a run folder")
    cells = _finished_cells(Path(run), _test_cache(Path(run)))
    return [{"cell": c["cell"], **{k: c.get(k) for k in CELL_COLUMNS}} for c in cells]


def compute_report(run: Path) -> Report:
    """What the report of run folder `run` shows, from its finished cells (and its config, probes and test answers
    where present); writes nothing."""
    run = Path(run)
    test = _test_cache(run)
    cells = _finished_cells(run, test)
    if not cells:
        raise ProbekdError(f"no finished students under {run / 'students'}; run `probekd run` first")
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    probes_path = run / "probes" / "summary.json"
    probes = json.loads(probes_path.read_text()) if probes_path.exists() else None
    answers = test.answers if test is not None else None
    chance = float((1 / test.mask.sum(1)).mean()) if test is not None and len(test.mask) else None
    fractions = sorted({c["fraction"] for c in cells})
    variants = sorted({c["variant"] for c in cells}, key=_order)
    comparisons = [
        r
        for f in fractions
        for other in variants
        if other != "probe" and " · " not in other
        for r in [compare(cells, "probe", other, f, run, answers)]
        if r is not None
    ]
    # each loss / weighting variant against the default (forward KL, unweighted) student of its signal
    variant_comparisons = [
        r
        for f in fractions
        for v in variants
        if " · " in v
        for r in [compare(cells, v, v.partition(" · ")[0], f, run, answers)]
        if r is not None
    ]
    if cfg.get("train"):
        _flag_early_kept(variant_comparisons, cells, cfg["train"])
    return Report(
        run=run,
        config=cfg,
        cells=cells,
        summary=summarize(cells),
        fractions=fractions,
        variants=variants,
        comparisons=comparisons,
        variant_comparisons=variant_comparisons,
        probes=probes,
        chance=chance,
        partial=unfinished(run),
        without_model=sorted(c["cell"] for c in cells if not c["kept_model"]),
    )


def kept_model_note(report: Report) -> list[str]:
    """Report lines saying how many finished cells have no kept model folder (all have one: no lines)."""
    if not report.without_model:
        return []
    return [
        f"{len(report.without_model)} of {len(report.cells)} finished cells have no kept model folder "
        "(`students/<cell>/model/`: made before probekd kept students, or left out by `grid.keep_students`; column "
        "`kept_model` of `results.csv`).",
        "",
    ]


def _accuracy_table(report: Report) -> list[str]:
    """Markdown lines of the student test accuracy table: a row per fraction, a column per variant."""
    lines = [
        "## Student test accuracy (mean ± 95% t-interval over seeds)",
        "",
        "| fraction | " + " | ".join(label(s) for s in report.variants) + " |",
        "|---" * (len(report.variants) + 1) + "|",
    ]
    by = {(r["variant"], r["fraction"]): r for r in report.summary}
    for f in report.fractions:
        row = [f"{f:g}"]
        for s in report.variants:
            r = by.get((s, f))
            if r and r["accuracy_ci_bootstrap"]:
                lo, hi = r["accuracy_ci_bootstrap"]
                row.append(f"{r['accuracy_mean']:.3f} [{lo:.3f}, {hi:.3f}] (1)")
            else:
                row.append(_pm(r["accuracy_mean"], r["accuracy_ci_half"]) + f" ({r['seeds']})" if r else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render_markdown(report: Report) -> str:
    """The text of report.md."""
    cfg, probes, cells = report.config, report.probes, report.cells
    lines = [f"# probekd report: {report.name}", ""]
    lines += [
        f"Task `{cfg.get('task', '?')}`, teacher `{cfg.get('teacher', '?')}` "
        f"({cfg.get('extract', {}).get('formulation', '?')} formulation), student "
        f"`{cfg.get('student', {}).get('model', '?')}` ({cfg.get('student', {}).get('kind', '?')}), "
        f"mode `{cfg.get('grid', {}).get('mode', '?')}`, {len(cells)} students.",
        "",
    ]
    if report.partial:
        lines += [f"**{report.partial}**", ""]
    lines += kept_model_note(report)
    if probes:
        t = probes["teacher_accuracy"]
        p = probes["probe_accuracy"]
        lines += [
            "## Teacher and probes (all labelled training data)",
            "",
            f"| split | teacher's own answer | probe ({chosen_label(probes)}) |",
            "|---|---|---|",
            *[f"| {s} | {t[s]:.3f} | {p[s]:.3f} |" for s in t],
            "",
            "Probe accuracy on train is out-of-fold. ![probe accuracy by layer](layers.png)",
            "",
        ]
    if report.chance is not None:
        lines += [f"Chance on test (a uniform guess among each question's options): {report.chance:.3f}.", ""]
    lines += _accuracy_table(report)
    lines += [
        "",
        "(n) = seeds; with one seed, [a, b] is the bootstrap 95% interval over test questions.",
        "",
        "![accuracy vs labelled fraction](data_efficiency.png)"
        if plots_available()
        else "(plots need matplotlib: `pip install 'probekd[plots]'`)",
        "",
        *near_uniform_note(cells),
    ]
    lines += _comparison_table(
        "Probe-KD against each other signal (paired by seed, test accuracy difference)", "against", "Probe-KD",
        [(r, r["b"]) for r in report.comparisons],
    )  # fmt: skip
    lines += _comparison_table(
        "Losses and weightings against forward KL, unweighted (same signal, paired by seed)", "variant", "variant",
        [(r, r["a"]) for r in report.variant_comparisons],
    )  # fmt: skip
    lines += weights_table(cells, report.chance)
    lines += [
        "Agreement, ECE and per-cell numbers: `results.csv`; means per setting: `summary.csv`.",
        "",
    ]
    return "\n".join(lines)


def plot_report(path: Path, report: Report) -> None:
    """data_efficiency.png: mean test accuracy against the labelled fraction per variant, with its interval
    (`plot_interval`), the teacher's, the probe's and chance's test accuracy as references."""
    from probekd.report.plots import plot_data_efficiency

    by = {(r["variant"], r["fraction"]): r for r in report.summary}
    curves = {}
    for s in report.variants:
        rs = [by[(s, f)] for f in report.fractions if (s, f) in by]
        bands = [plot_interval(r) for r in rs]
        curves[label(s)] = (
            [r["fraction"] for r in rs],
            [r["accuracy_mean"] for r in rs],
            [lo for lo, _ in bands],
            [hi for _, hi in bands],
        )
    refs = {}
    if report.probes:
        refs = {
            "teacher's own answer, test": report.probes["teacher_accuracy"]["test"],
            f"probe ({chosen_label(report.probes)}, all labels), test": report.probes["probe_accuracy"]["test"],
        }
    if report.chance is not None:
        refs["chance, test"] = report.chance
    title = f"{report.name}: students by signal"
    plot_data_efficiency(path, curves, references=refs, title=title)


def save_report(report: Report) -> Path:
    """Write RUN/report/ (report.md, results.csv, summary.csv, data_efficiency.png, layers.png) from `report`, all
    together (complete or absent); returns the path of report.md."""
    run = report.run
    out = run / "report"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "results.csv").write_text(_csv(report.cells, CELL_COLUMNS))
        (tmp / "summary.csv").write_text(_csv(report.summary, list(report.summary[0])))
        if plots_available():  # the `plots` extra; without it the report is written without its PNGs
            plot_report(tmp / "data_efficiency.png", report)
        if (run / "probes" / "layers.png").exists():
            shutil.copy(run / "probes" / "layers.png", tmp / "layers.png")
        (tmp / "report.md").write_text(render_markdown(report))
    return out / "report.md"


def write_report(run: Path) -> Path:
    """Write RUN/report/ from the finished cells (`compute_report`, then `save_report`); returns the path of
    report.md."""
    return save_report(compute_report(run))


def render_terminal(summary: list[SummaryRow]) -> str:
    """A short table of mean test accuracy per variant (rows) and fraction (columns), for the terminal."""
    fractions = sorted({r["fraction"] for r in summary})
    signals = sorted({r["variant"] for r in summary}, key=_order)
    by = {(r["variant"], r["fraction"]): r for r in summary}
    rows = [["signal", *[f"f={f:g}" for f in fractions]]]
    for s in signals:
        rows.append(
            [
                label(s),
                *[
                    _pm(by[(s, f)]["accuracy_mean"], by[(s, f)]["accuracy_ci_half"]) if (s, f) in by else "-"
                    for f in fractions
                ],
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def terminal_table(run: Path) -> str:
    """A short table of mean test accuracy per signal and fraction, for the terminal (`render_terminal` of the
    run's finished cells)."""
    return render_terminal(summarize(load_cells(run)))
