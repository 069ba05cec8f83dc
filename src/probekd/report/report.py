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
from probekd.evaluate import bootstrap_ci, chance_upper, mean_ci, normalized_entropy
from probekd.probes.select import chosen_label
from probekd.report.plots import plots_available
from probekd.teacher.cache import TeacherCache, load_cache

LABELS = {
    "hard": "hard labels",
    "smoothed": "label smoothing",
    "teacher": "logit-KD (teacher)",
    "teacher_calibrated": "calibrated logit-KD",
    "probe": "Probe-KD",
}
CELL_COLUMNS = [
    "signal", "loss", "weighting", "selection", "fraction", "seed", "mode", "n_labelled", "n_dev", "labels_used",
    "n_train_rows", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "ece", "nll", "agreement_teacher",
    "agreement_probe", "wrong_fidelity_teacher", "wrong_fidelity_probe", "kl_teacher", "kl_probe",
    "best_dev_accuracy", "zero_shot_accuracy", "dev_chance_upper", "test_entropy", "failed", "failed_reason",
    "target_accuracy", "target_entropy", "mean_pass_rate", "ess_share", "zero_share", "learning_rate", "epochs",
    "warmup_ratio", "weight_decay", "seconds", "kept_model",
]  # fmt: skip
RECIPE = ("learning_rate", "epochs", "warmup_ratio", "weight_decay")  # the training fields `probekd tune` chooses
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
    failed: int  # how many of those seeds failed to train (`failure`); they are in the mean, and counted
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
    failed_a: int  # seeds of `a` (of those compared) that failed to train
    failed_b: int  # and of `b`


def has_selection(variant: str) -> bool:
    """Whether a variant name carries a label selection (`probe · pcoreset`, `probe · akl · none · pcoreset`)."""
    return len(variant.split(" · ")) in (2, 4)


def twin(variant: str) -> str:
    """What a variant is compared with: a selection variant with the random one of the same signal, loss and
    weighting; a loss / weighting variant with its signal's default student."""
    parts = variant.split(" · ")
    return " · ".join(parts[:-1]) if has_selection(variant) else parts[0]


def label(variant: str) -> str:
    """A variant's name in tables: the signal's label, then the loss and weighting when not the default."""
    signal, _, rest = variant.partition(" · ")
    return LABELS.get(signal, signal) + (f" · {rest}" if rest else "")


def _order(variant: str) -> tuple[int, str]:
    signal = variant.partition(" · ")[0]
    return (list(LABELS).index(signal) if signal in LABELS else len(LABELS), variant)


def load_cells(run: Path) -> list[dict[str, Any]]:
    """Every finished cell's metrics under RUN/students/, each with its `variant`: the signal, plus the loss and
    weighting (`probe · fkl>rkl · paced`) when they are not the default forward KL, unweighted, plus the selection
    of its labelled questions when it is not random (`probe · pcoreset`, `probe · akl · none · pcoreset`)."""
    cells = []
    for path in sorted((run / "students").glob("*/metrics.json")):
        try:
            c = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ProbekdError(f"{path} is not valid JSON ({e}); delete it to rerun that cell") from e
        c.setdefault("cell", path.parent.name)
        loss, weighting = c.setdefault("loss", "fkl"), c.setdefault("weighting", "none")
        selection = c.setdefault("selection", "random")
        default = (loss, weighting) == ("fkl", "none")
        c["variant"] = c["signal"] if default else f"{c['signal']} · {loss} · {weighting}"
        if selection != "random":
            c["variant"] += f" · {selection}"
        for key in WEIGHT_STATS if c.get("weights") else ():
            c[key] = float(np.mean([w[key] for w in c["weights"]]))
        cells.append(c)
    return cells


def unfinished(run: Path) -> str | None:
    """A sentence saying how many of the grid's cells (RUN/config.yaml) have no finished student yet, by fraction;
    None when all have one or the configuration cannot be read (then the report describes what is there)."""
    from probekd.config import RunConfig, recorded_config
    from probekd.layout import metrics_path

    try:
        cfg = RunConfig.model_validate(recorded_config(run / "config.yaml"))
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
                "failed": sum(bool(c.get("failed")) for c in cs),
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


def _add_test_columns(run: Path, cells: list[dict[str, Any]], test: TeacherCache) -> None:
    """From each cell's saved test probabilities (read once; the columns are None without them): `test_entropy`
    (`normalized_entropy`), and `wrong_fidelity_<ref>` and `kl_<ref>` (`probekd.fidelity`) to the teacher's own
    answer distribution and to the probe's test probabilities. Its `agreement_<ref>` was recorded when it was
    trained."""
    from probekd.evaluate import option_softmax
    from probekd.fidelity import fidelity

    refs = {"teacher": option_softmax(test.scores, test.mask)}
    probe_path = run / "probes" / "test.npz"
    if probe_path.exists():
        with np.load(probe_path) as z:
            if z["probs"].shape == test.mask.shape and list(z["ids"]) == list(test.ids):
                refs["probe"] = z["probs"]
    for c in cells:
        probs = _test_probs(run, c)
        ok = probs is not None and probs.shape == test.mask.shape
        c["test_entropy"] = round(normalized_entropy(probs, test.mask), 4) if ok else None
        for name in ("teacher", "probe"):
            f = fidelity(probs, refs[name], test.answers, test.mask) if ok and name in refs else {}
            c[f"wrong_fidelity_{name}"] = _rounded(f.get("wrong_fidelity"))
            c[f"kl_{name}"] = _rounded(f.get("kl"))


def _rounded(x: float | None) -> float | None:
    return None if x is None or x != x else round(x, 4)


def fidelity_table(cells: list[dict[str, Any]]) -> list[str]:
    """Report lines: per fraction and variant, the students' mean fidelity to the teacher and to the probe on test
    (agreement, same choice where both are wrong, KL(reference || student)); none known: no lines."""
    known = [c for c in cells if c.get("kl_teacher") is not None]
    if not known:
        return []
    lines = [
        "## Fidelity to the teacher and to the probe (test)",
        "",
        "Mean over seeds. Agreement: the student's answer is the reference's; both wrong: among the questions both "
        "get wrong, the share where they choose the same wrong option; KL(reference || student) in nats, the "
        "teacher's own answer distribution at temperature 1. A student can beat its teacher's accuracy while "
        "agreeing with it little: what it learned is then not the teacher's judgement (`probekd.fidelity`).",
        "",
        "| fraction | variant | teacher: agreement / both wrong / KL | probe: agreement / both wrong / KL | seeds |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for c in known:
        groups.setdefault((c["fraction"], c["variant"]), []).append(c)

    def mean(cs: list[dict[str, Any]], key: str) -> str:
        xs = [c[key] for c in cs if c.get(key) is not None]
        return f"{np.mean(xs):.3f}" if xs else "-"

    for (f, v), cs in sorted(groups.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]))):
        per_ref = [
            " / ".join(mean(cs, f"{k}_{ref}") for k in ("agreement", "wrong_fidelity", "kl"))
            for ref in ("teacher", "probe")
        ]
        lines.append(f"| {f:g} | {label(v)} | {per_ref[0]} | {per_ref[1]} | {len(cs)} |")
    return [*lines, ""]


def failure(cell: Mapping[str, Any], dev_chance: float | None, n_dev: int | None) -> str:
    """Why a student counts as failed to train ("" when it does not): its best dev accuracy (over epochs) is at or
    below the upper end of the 95% binomial interval of a uniform guess on its `n_dev` dev questions
    (`probekd.evaluate.chance_upper`; mean chance `dev_chance`), or its test predictions are near uniform (normalized
    entropy above `NEAR_UNIFORM`). Such a student did not learn: it is counted, not averaged in silently."""
    reasons = []
    best = cell.get("best_dev_accuracy")
    if best is not None and dev_chance is not None and n_dev:
        upper = chance_upper(dev_chance, n_dev)
        if best <= upper + 1e-9:
            reasons.append(
                f"dev accuracy never left chance (best {best:.3f}, chance {dev_chance:.3f}, 95% upper end {upper:.3f} "
                f"on {n_dev} questions)"
            )
    entropy = cell.get("test_entropy")
    if entropy is not None and entropy > NEAR_UNIFORM:
        reasons.append(f"near-uniform test predictions (normalized entropy {entropy:.3f})")
    return "; ".join(reasons)


def failed_note(cells: list[dict[str, Any]]) -> list[str]:
    """Report lines counting and naming the students that failed to train (`failure`), with their reasons."""
    failed = sorted((c["cell"], c["failed_reason"]) for c in cells if c.get("failed"))
    if not failed:
        return [
            "No student failed to train (each left chance on its dev questions and none answers near-uniformly).",
            "",
        ]
    return [
        f"**{len(failed)} of {len(cells)} students failed to train** (their dev accuracy never left chance, or their "
        "test predictions are near uniform; columns `failed` and `failed_reason` of `results.csv`). They are counted "
        "as failed in the tables, not left out: " + "; ".join(f"`{name}`: {reason}" for name, reason in failed) + ".",
        "",
    ]


def _span(values: list[Any], fmt: str = "{}") -> str:
    """`a` when every value is the same, else `low-high` ("-" without values)."""
    xs = sorted({v for v in values if v is not None})
    if not xs:
        return "-"
    return fmt.format(xs[0]) if len(xs) == 1 else f"{fmt.format(xs[0])}-{fmt.format(xs[-1])}"


def label_budget_table(cells: list[dict[str, Any]]) -> list[str]:
    """Report lines: per labelled fraction, the labels a cell depends on (its training labels and the dev labels that
    chose its layer, temperatures, calibration and epoch) and their sum (none: no lines)."""
    fractions = sorted({c["fraction"] for c in cells})
    if not fractions:
        return []
    lines = [
        "## Labels used per cell (train + dev)",
        "",
        "Every label a student depends on: its labelled training rows and the dev labels that chose its probe layer, "
        "temperatures, calibration and best epoch (column `labels_used` of `results.csv`).",
        "",
        "| fraction | train labels | dev labels | labels used |",
        "|---|---|---|---|",
    ]
    for f in fractions:
        cs = [c for c in cells if c["fraction"] == f]
        lines.append(
            f"| {f:g} | {_span([c.get('n_labelled') for c in cs])} | {_span([c.get('n_dev') for c in cs])} | "
            f"{_span([c.get('labels_used') for c in cs])} |"
        )
    return [*lines, ""]


def targets_table(cells: list[dict[str, Any]]) -> list[str]:
    """Report lines: per signal and fraction, the mean over seeds of the targets' accuracy (argmax against the gold
    option) and mean normalized entropy on the labelled training rows (none known: no lines)."""
    per: dict[tuple[str, float, int], dict[str, Any]] = {}
    for c in cells:  # the loss / weighting variants of one cell share its targets; a selection has its own
        if c.get("target_accuracy") is not None:
            selection = c.get("selection", "random")
            signal = c["signal"] if selection == "random" else f"{c['signal']} · {selection}"
            per.setdefault((signal, c["fraction"], c["seed"]), c)
    if not per:
        return []
    signals = sorted({s for s, _, _ in per}, key=_order)
    fractions = sorted({f for _, f, _ in per})
    lines = [
        "## Targets on train: accuracy and mean normalized entropy per signal and fraction",
        "",
        "On each cell's labelled training rows (the probe's and the calibrated teacher's out-of-fold), mean over "
        "seeds: accuracy of the targets' argmax against the gold option / mean normalized entropy (0 = one-hot, "
        "1 = uniform). Label smoothing is as soft as the probe's targets but always right: what Probe-KD adds over "
        "it is the probe's knowledge, not its softness.",
        "",
        "| fraction | " + " | ".join(label(s) for s in signals) + " |",
        "|---" * (len(signals) + 1) + "|",
    ]
    for f in fractions:
        row = [f"{f:g}"]
        for s in signals:
            cs = [c for (sig, fr, _), c in per.items() if sig == s and fr == f]
            if not cs:
                row.append("-")
                continue
            acc = float(np.mean([c["target_accuracy"] for c in cs]))
            ent = float(np.mean([c["target_entropy"] for c in cs]))
            row.append(f"{acc:.3f} / {ent:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


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
    return {
        "a": a, "b": b, "fraction": fraction, "seeds": len(seeds), "diff": mean, "half": half,
        "bootstrap": boot, "verdict": verdict(intervals),
        "failed_a": sum(bool(by[(a, s)].get("failed")) for s in seeds),
        "failed_b": sum(bool(by[(b, s)].get("failed")) for s in seeds),
    }  # fmt: skip


def verdict(intervals: Sequence[tuple[float, float]]) -> str:
    """The verdict on a difference a - b from its available 95% intervals (low, high): `wins` when every one lies
    above 0, `loses` when every one lies below 0, `ties (an interval includes 0)` otherwise (one crossing 0, or two
    on opposite sides), `no interval` without any. One favourable interval is never enough while another is there."""
    if not intervals:
        return "no interval"
    if all(lo > 0 for lo, _ in intervals):
        return "wins"
    if all(hi < 0 for _, hi in intervals):
        return "loses"
    return "ties (an interval includes 0)"


def kept_before_variant(cell: dict[str, Any], train: dict[str, Any]) -> bool:
    """Whether the student kept for `cell` (its best dev epoch) was saved before its loss or weighting first made it
    differ from the forward-KL, unweighted student of the same cell (`train`: the run's `train` config): then it
    *is* that student, and comparing the two tests nothing (PACED's warm-up epoch, the first half of `fkl>rkl`)."""
    from probekd.student.train_config import TrainConfig

    dev = cell.get("dev_accuracy_by_epoch") or []
    if not dev or "n_train_rows" not in cell:
        return False
    cfg = TrainConfig(**{**train, **cell.get("train", {}), "loss": cell.get("loss", "fkl")})
    steps_per_epoch = math.ceil(cell["n_train_rows"] / cfg.batch_size)
    first = cfg.first_changed_step(cell.get("weighting", "none"), steps_per_epoch)
    if first is None:
        return False
    kept_at = min((int(np.argmax(dev)) + 1) * steps_per_epoch, cfg.total_steps(steps_per_epoch))
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


def _comparison_table(
    title: str, column: str, verdict: str, rows: list[tuple[Comparison, str]], first: str, second: str
) -> list[str]:
    """Markdown lines of a table of `compare` results, each row named by the given variant (none: no lines), with
    how many compared seeds of `a` (`first`) and `b` (`second`) failed to train."""
    if not rows:
        return []
    lines = [
        f"## {title}",
        "",
        f"| fraction | {column} | difference ± t-interval over seeds | bootstrap over test questions | seeds | "
        f"failed seeds ({first} / {second}) | {verdict} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r, name in rows:
        boot = f"[{r['bootstrap'][0]:+.3f}, {r['bootstrap'][1]:+.3f}]" if r["bootstrap"] else "-"
        lines.append(
            f"| {r['fraction']:g} | {label(name)} | {_pm(r['diff'], r['half'], signed=True)} | {boot} | {r['seeds']} | "
            f"{r.get('failed_a', 0)} / {r.get('failed_b', 0)} | {r['verdict']} |"
        )
    return [*lines, ""]


def _split_cache(run: Path, split: str) -> TeacherCache | None:
    """A split's gold answers and option mask (no hidden states): from RUN/targets/ (present wherever students were
    trained), else from the teacher cache; None without either."""
    from probekd.layout import load_answers

    with contextlib.suppress(ProbekdError):
        return load_answers(run, (split,))[split]
    if (run / "teacher" / split / "manifest.json").exists():
        return load_cache(run / "teacher" / split)
    return None


def _test_cache(run: Path) -> TeacherCache | None:
    """The test split's gold answers and option mask, for the paired bootstrap and the chance level."""
    return _split_cache(run, "test")


def _target_stats(run: Path, cell: dict[str, Any], train: TeacherCache | None, seen: dict[str, Any]) -> dict[str, Any]:
    """The cell's targets' `target_accuracy` and `target_entropy` on its labelled training rows: from its metrics
    (the targets' meta), else computed from RUN/targets/ (cells made before the meta held them); {} when neither."""
    meta = cell.get("targets") or {}
    if "target_accuracy" in meta:
        return {k: meta.get(k) for k in ("target_accuracy", "target_entropy")}
    if train is None:
        return {}
    from probekd.experiment import labelled_rows
    from probekd.layout import Cell, targets_path
    from probekd.targets import SoftTargets, target_stats

    name = Cell(cell["signal"], cell["fraction"], cell["seed"], selection=cell.get("selection", "random")).targets_name
    if name not in seen:
        seen[name] = {}
        path = targets_path(run, name)
        if path.exists():
            with contextlib.suppress(ProbekdError):
                targets = SoftTargets.load(path)
                keep = labelled_rows(train, cell["fraction"], cell["seed"], cell.get("selection", "random"))
                answers = np.where(keep, train.answers, -1)
                seen[name] = target_stats(targets, train.ids, answers, train.padded_mask(targets.k))
    return seen[name]


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
    test split's option mask is known), `n_dev` and `labels_used` (cells made before they were recorded used the
    whole dev split), `dev_chance_upper`, `failed` and `failed_reason` (`failure`), `target_accuracy` and
    `target_entropy`, `kept_model`."""
    cells = load_cells(run)
    if test is not None:
        _add_test_columns(run, cells, test)
    dev = _split_cache(run, "dev")
    train = _split_cache(run, "train")
    full_n, full_chance = None, None
    if dev is not None and (dev.answers >= 0).any():
        lab = dev.answers >= 0
        full_n, full_chance = int(lab.sum()), float(np.mean(1.0 / dev.mask[lab].sum(1)))
    seen: dict[str, Any] = {}
    for c in cells:
        c["accuracy_ci_low"], c["accuracy_ci_high"] = c["accuracy_ci"]
        if c.get("n_dev") is None:
            c["n_dev"] = full_n
        if c.get("labels_used") is None and c["n_dev"] is not None and c.get("n_labelled") is not None:
            c["labels_used"] = c["n_labelled"] + c["n_dev"]
        chance = c.get("dev_chance", full_chance if c["n_dev"] == full_n else None)
        c["dev_chance_upper"] = round(chance_upper(chance, c["n_dev"]), 4) if chance and c["n_dev"] else None
        c["failed_reason"] = failure(c, chance, c["n_dev"])
        c["failed"] = bool(c["failed_reason"])
        c.update(_target_stats(run, c, train, seen))
        c["kept_model"] = _kept_model(run, c["cell"])
        c["zero_shot_accuracy"] = (c.get("zero_shot") or {}).get("test_accuracy")
        c.update({k: v for k, v in (c.get("train") or {}).items() if k in RECIPE})
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
    from probekd.config import recorded_config

    cfg = recorded_config(run / "config.yaml") if (run / "config.yaml").exists() else {}
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
    # each loss / weighting variant against the default (forward KL, unweighted) student of its signal, and each
    # selection variant against its random twin (same signal, loss and weighting)
    variant_comparisons = [
        r
        for f in fractions
        for v in variants
        if " · " in v
        for r in [compare(cells, v, twin(v), f, run, answers)]
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


def zero_shot_note(cells: list[dict[str, Any]]) -> list[str]:
    """Report lines on the student before any training (its zero-shot test accuracy, recorded by runs since
    2026-12) and how many trained students end below it (they unlearned what the pretrained model knew)."""
    zs = [c for c in cells if c.get("zero_shot_accuracy") is not None]
    if not zs:
        return []
    values = sorted({round(c["zero_shot_accuracy"], 4) for c in zs})
    where = f"{values[0]:.3f}" if len(values) == 1 else f"{values[0]:.3f} to {values[-1]:.3f} over seeds"
    below = [c["cell"] for c in zs if c["accuracy"] < c["zero_shot_accuracy"]]
    tail = (
        f"{len(below)} of {len(zs)} trained students end below it: " + ", ".join(f"`{b}`" for b in below[:10])
        + (" ..." if len(below) > 10 else "") + "."
        if below
        else f"every one of the {len(zs)} trained students ends above it."
    )  # fmt: skip
    return [f"The student before any training (its own zero-shot answer) scores {where} on test; {tail}", ""]


def recipe_table(run: Path, cells: list[dict[str, Any]], config: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the training recipe each signal's students used, and where it came from: `probekd tune`
    in this run folder (RUN/tune/summary.json: on dev, never test), else the configuration's `train_by_signal`
    entry of the signal (e.g. a recipe tuned elsewhere) or its `train` section."""
    recipes: dict[str, set[tuple[Any, ...]]] = {}
    for c in cells:
        if c.get("train"):
            recipes.setdefault(c["signal"], set()).add(tuple(c["train"].get(k) for k in RECIPE))
    if not recipes:
        return []
    path = run / "tune" / "summary.json"
    tuned = json.loads(path.read_text()) if path.exists() else {"signals": {}}
    lines = [
        "## Training recipe per signal",
        "",
        "| signal | learning rate | epochs | warm-up | weight decay | chosen by |",
        "|---|---|---|---|---|---|",
    ]
    for signal in sorted(recipes, key=_order):
        t = tuned["signals"].get(signal)
        for r in sorted(recipes[signal], key=str):
            own = signal in (config.get("train_by_signal") or {})
            how = f"the configuration's `train_by_signal.{signal}`" if own else "the configuration's `train`"
            if t and tuple(t["recipe"].get(k) for k in RECIPE) == r:
                how = (
                    f"`probekd tune`: best mean dev accuracy of {len(t['trials'])} trials at fraction "
                    f"{tuned['fraction']:g}, seeds {tuned['seeds']}"
                )
            lines.append(f"| {signal} | {r[0]:.3g} | {r[1]:g} | {r[2]:g} | {r[3]:g} | {how} |")
    return [*lines, ""]


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
            if not r:
                row.append("-")
                continue
            n = f"({r['seeds']}; {r['failed']} failed)" if r.get("failed") else f"({r['seeds']})"
            if r["accuracy_ci_bootstrap"]:
                lo, hi = r["accuracy_ci_bootstrap"]
                row.append(f"{r['accuracy_mean']:.3f} [{lo:.3f}, {hi:.3f}] {n}")
            else:
                row.append(f"{_pm(r['accuracy_mean'], r['accuracy_ci_half'])} {n}")
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
    lines += zero_shot_note(cells)
    lines += _accuracy_table(report)
    lines += [
        "",
        "(n) = seeds; with one seed, [a, b] is the bootstrap 95% interval over test questions; (n; m failed): m of the "
        "n seeds failed to train (see below): they are in the mean, not left out.",
        "",
        "![accuracy vs labelled fraction](data_efficiency.png)"
        if plots_available()
        else "(plots need matplotlib: `pip install 'probekd[plots]'`)",
        "",
        *failed_note(cells),
    ]
    lines += recipe_table(report.run, cells, cfg)
    lines += label_budget_table(cells)
    lines += targets_table(cells)
    lines += fidelity_table(cells)
    lines += _comparison_table(
        "Probe-KD against each other signal (paired by seed, test accuracy difference)", "against", "Probe-KD",
        [(r, r["b"]) for r in report.comparisons], "Probe-KD", "other",
    )  # fmt: skip
    lines += _comparison_table(
        "Losses and weightings against forward KL, unweighted (same signal, paired by seed)", "variant", "variant",
        [(r, r["a"]) for r in report.variant_comparisons if not has_selection(r["a"])], "variant", "default",
    )  # fmt: skip
    lines += _comparison_table(
        "Label selection against random (same signal, loss and weighting; same number of labels; paired by seed)",
        "variant", "variant", [(r, r["a"]) for r in report.variant_comparisons if has_selection(r["a"])],
        "selection", "random",
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
