"""`probekd report RUN`: the grid's results as tables (mean +- 95% interval over seeds), paired comparisons of
Probe-KD against each other signal, plots, and a plain verdict per setting.

Writes RUN/report/: report.md, results.csv (one row per cell), summary.csv (one row per signal and fraction),
data_efficiency.png, layers.png (the probe layer curve, copied from RUN/probes/).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from probekd.atomic import atomic_path
from probekd.errors import ProbekdError
from probekd.evaluate import bootstrap_ci, mean_ci, normalized_entropy
from probekd.probes.select import chosen_label
from probekd.report.plots import plot_data_efficiency
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
    "test_entropy", "mean_pass_rate", "ess_share", "zero_share", "seconds",
]  # fmt: skip
WEIGHT_STATS = ("mean_pass_rate", "ess_share", "zero_share")  # of a weighted student: mean over its weight passes
NEAR_UNIFORM = 0.99  # a student whose test predictions' normalized entropy is above this is flagged in the report


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
    from probekd.experiment import cell_name, grid_cells, student_dir

    try:
        cfg = RunConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError, ValueError):
        return None
    cells = grid_cells(cfg)
    missing = [c for c in cells if not (student_dir(run, cell_name(*c)) / "metrics.json").exists()]
    if not missing:
        return None
    by_fraction = {f: sum(c[1] == f for c in missing) for f in sorted({c[1] for c in missing})}
    where = ", ".join(f"{n} at fraction {f:g}" for f, n in by_fraction.items())
    return (
        f"Partial: {len(cells) - len(missing)} of the grid's {len(cells)} cells are finished ({where} to go; "
        "`probekd run` resumes them)."
    )


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, fraction): mean test accuracy over seeds and the half-width of its 95% t-interval."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["variant"], c["fraction"]), []).append(c)
    out = []
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
    from probekd.experiment import student_dir

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
) -> dict[str, Any] | None:
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
    from probekd.student.train import TrainConfig

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


def _flag_early_kept(rows: list[dict[str, Any]], cells: list[dict[str, Any]], train: dict[str, Any]) -> None:
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


def _comparison_table(title: str, column: str, verdict: str, rows: list[tuple[dict[str, Any], str]]) -> list[str]:
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
    from probekd.experiment import load_answers

    with contextlib.suppress(ProbekdError):
        return load_answers(run, ("test",))["test"]
    if (run / "teacher" / "test" / "manifest.json").exists():
        return load_cache(run / "teacher" / "test", with_hidden=False)
    return None


def plot_interval(row: dict[str, Any]) -> tuple[float, float]:
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


def write_report(run: Path) -> Path:
    """Write RUN/report/ from the finished cells; returns the path of report.md."""
    cells = load_cells(run)
    if not cells:
        raise ProbekdError(f"no finished students under {run / 'students'}; run `probekd run` first")
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    probes_path = run / "probes" / "summary.json"
    probes = json.loads(probes_path.read_text()) if probes_path.exists() else None
    summary = summarize(cells)
    test = _test_cache(run)
    answers = test.answers if test is not None else None
    chance = float((1 / test.mask.sum(1)).mean()) if test is not None and len(test.mask) else None
    if test is not None:
        _add_test_entropy(run, cells, test.mask)
    fractions = sorted({c["fraction"] for c in cells})
    signals = sorted({c["variant"] for c in cells}, key=_order)
    comparisons = [
        r
        for f in fractions
        for other in signals
        if other != "probe" and " · " not in other
        for r in [compare(cells, "probe", other, f, run, answers)]
        if r is not None
    ]
    # each loss / weighting variant against the default (forward KL, unweighted) student of its signal
    variants = [
        r
        for f in fractions
        for v in signals
        if " · " in v
        for r in [compare(cells, v, v.partition(" · ")[0], f, run, answers)]
        if r is not None
    ]
    if cfg.get("train"):
        _flag_early_kept(variants, cells, cfg["train"])
    lines = [f"# probekd report: {cfg.get('name', run.name)}", ""]
    lines += [
        f"Task `{cfg.get('task', '?')}`, teacher `{cfg.get('teacher', '?')}` "
        f"({cfg.get('extract', {}).get('formulation', '?')} formulation), student "
        f"`{cfg.get('student', {}).get('model', '?')}` ({cfg.get('student', {}).get('kind', '?')}), "
        f"mode `{cfg.get('grid', {}).get('mode', '?')}`, {len(cells)} students.",
        "",
    ]
    partial = unfinished(run)
    if partial:
        lines += [f"**{partial}**", ""]
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
    if chance is not None:
        lines += [f"Chance on test (a uniform guess among each question's options): {chance:.3f}.", ""]
    lines += [
        "## Student test accuracy (mean ± 95% t-interval over seeds)",
        "",
        "| fraction | " + " | ".join(label(s) for s in signals) + " |",
        "|---" * (len(signals) + 1) + "|",
    ]
    by = {(r["variant"], r["fraction"]): r for r in summary}
    for f in fractions:
        row = [f"{f:g}"]
        for s in signals:
            r = by.get((s, f))
            if r and r["accuracy_ci_bootstrap"]:
                lo, hi = r["accuracy_ci_bootstrap"]
                row.append(f"{r['accuracy_mean']:.3f} [{lo:.3f}, {hi:.3f}] (1)")
            else:
                row.append(_pm(r["accuracy_mean"], r["accuracy_ci_half"]) + f" ({r['seeds']})" if r else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "(n) = seeds; with one seed, [a, b] is the bootstrap 95% interval over test questions.",
        "",
        "![accuracy vs labelled fraction](data_efficiency.png)",
        "",
        *near_uniform_note(cells),
    ]
    lines += _comparison_table(
        "Probe-KD against each other signal (paired by seed, test accuracy difference)", "against", "Probe-KD",
        [(r, r["b"]) for r in comparisons],
    )  # fmt: skip
    lines += _comparison_table(
        "Losses and weightings against forward KL, unweighted (same signal, paired by seed)", "variant", "variant",
        [(r, r["a"]) for r in variants],
    )  # fmt: skip
    lines += weights_table(cells, chance)
    lines += [
        "Agreement, ECE and per-cell numbers: `results.csv`; means per setting: `summary.csv`.",
        "",
    ]
    out = run / "report"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for c in cells:  # flatten the interval for the CSV
            c["accuracy_ci_low"], c["accuracy_ci_high"] = c["accuracy_ci"]
        (tmp / "results.csv").write_text(_csv(cells, CELL_COLUMNS))
        (tmp / "summary.csv").write_text(_csv(summary, list(summary[0])))
        curves = {}
        for s in signals:
            rs = [by[(s, f)] for f in fractions if (s, f) in by]
            bands = [plot_interval(r) for r in rs]
            curves[label(s)] = (
                [r["fraction"] for r in rs],
                [r["accuracy_mean"] for r in rs],
                [lo for lo, _ in bands],
                [hi for _, hi in bands],
            )
        refs = {}
        if probes:
            refs = {
                "teacher's own answer, test": probes["teacher_accuracy"]["test"],
                f"probe ({chosen_label(probes)}, all labels), test": probes["probe_accuracy"]["test"],
            }
        if chance is not None:
            refs["chance, test"] = chance
        title = f"{cfg.get('name', run.name)}: students by signal"
        plot_data_efficiency(tmp / "data_efficiency.png", curves, references=refs, title=title)
        if (run / "probes" / "layers.png").exists():
            shutil.copy(run / "probes" / "layers.png", tmp / "layers.png")
        (tmp / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def terminal_table(run: Path) -> str:
    """A short table of mean test accuracy per signal and fraction, for the terminal."""
    summary = summarize(load_cells(run))
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
