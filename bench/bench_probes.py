"""Probe fitting: every layer's probe with cross-validated L2, probekd against scikit-learn on the same features.

Baseline (what a user writes): per layer, `StandardScaler` then `LogisticRegressionCV` (lbfgs, multinomial) with the
same L2 grid (C = 1 / (l2 * n_fit)), the same folds, log-loss scoring, max_iter=100, tol=1e-4; then its
validation accuracy (both sides pick the most probable option among those the question has). Ours:
`probekd.probes.crossfit` as the probe stage runs it, which does more than the baseline: nested CV (each fold's
L2 chosen without that fold), out-of-fold probabilities, and the full-data refit; with `--non-nested` the baseline's
own semantics (one strength per layer from the outer CV; `probe.nested: false`).

Features: the letter-formulation teacher cache of a run directory (`--run RUN`, train and dev), or, by default,
synthetic features shaped like SmolLM2's (576 dims, a few outlier dimensions, signal that rises then falls with
depth). The last line is `probes ratio: <sklearn seconds / probekd seconds>`.

    python bench/bench_probes.py --quick                     # < 1 minute, synthetic
    python bench/bench_probes.py --non-nested                # the same work as the baseline
    python bench/bench_probes.py --run runs/arc_easy-smollm2-135m-instruct-letter
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import PredefinedSplit
from sklearn.preprocessing import StandardScaler

from probekd.allocator import reuse_freed_memory
from probekd.probes.crossfit import DEFAULT_L2_GRID, crossfit
from probekd.probes.pipeline import LayerFeatures
from probekd.teacher.cache import load_cache


def synthetic(n_layers: int, n_train: int, n_dev: int, dim: int = 576, k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = n_train + n_dev
    y = rng.integers(0, k, size=n)
    proto = rng.normal(size=(k, dim))
    X = np.empty((n_layers, n, dim), dtype=np.float32)
    scale = np.ones(dim)
    scale[rng.choice(dim, 4, replace=False)] = 50.0  # residual-stream outlier dimensions
    for layer in range(n_layers):
        strength = 0.08 * np.sin(np.pi * (layer + 1) / (n_layers + 1))
        X[layer] = (rng.normal(size=(n, dim)) + strength * proto[y]) * scale
    mask = np.ones((n, k), dtype=bool)
    return X[:, :n_train], y[:n_train], mask[:n_train], X[:, n_train:], y[n_train:], mask[n_train:]


def from_run(run: Path, layers_every: int):
    tr, dv = load_cache(run / "teacher" / "train"), load_cache(run / "teacher" / "dev")
    if tr.manifest["formulation"] != "letter":
        raise SystemExit("the sklearn baseline is multinomial: give a run with a letter-formulation cache")
    keep = list(range(0, len(tr.layers), layers_every))
    features = LayerFeatures({"train": tr, "dev": dv}, keep, "last", max(tr.mask.shape[1], dv.mask.shape[1]))
    groups = range(len(keep))
    Xtr, mask = features("train", groups)  # exactly what the probe stage fits on
    Xdv, mask_dv = features("dev", groups)
    return (Xtr.numpy(), tr.answers, mask.numpy(), Xdv.numpy(), dv.answers, mask_dv.numpy()), tr.ids


def main() -> None:
    reuse_freed_memory()  # as the CLI does; it speeds up both sides
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer layers and rows: under a minute")
    ap.add_argument("--run", type=Path, help="run directory with letter teacher caches (default: synthetic)")
    ap.add_argument("--layers-every", type=int, default=1, help="use every n-th cached layer")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument(
        "--non-nested",
        action="store_true",
        help="ours without the nested CV (`probe.nested: false`): the baseline's semantics and amount of work",
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # sklearn 1.9's notices about LogisticRegressionCV
    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # max_iter=100 on both sides, by design
    if args.run:
        (Xtr, ytr, mask, Xdv, ydv, mask_dv), ids = from_run(args.run, args.layers_every)
        source = f"teacher cache {args.run}"
    else:
        n_layers, n_train, n_dev = (8, 500, 200) if args.quick else (31, 2251, 570)
        Xtr, ytr, mask, Xdv, ydv, mask_dv = synthetic(n_layers, n_train, n_dev)
        ids = [f"q{i}" for i in range(len(ytr))]
        source = "synthetic features (576 dims)"
    G, N, D = Xtr.shape
    grid = DEFAULT_L2_GRID
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{source}: {G} layers x {N} train x {D} dims, {len(ydv)} dev; L2 grid {list(grid)}, {args.folds} folds")

    t0 = time.perf_counter()
    r = crossfit(
        torch.from_numpy(Xtr),
        torch.from_numpy(ytr).long(),
        torch.from_numpy(mask),
        list(ids),
        "multinomial",
        n_folds=args.folds,
        l2_grid=grid,
        nested=not args.non_nested,
    )
    dev_logits = r.predict_logits(torch.from_numpy(Xdv), torch.from_numpy(mask_dv))  # absent options: -inf
    ours_acc = (dev_logits.argmax(-1).numpy() == ydv[None]).mean(1)
    t_ours = time.perf_counter() - t0
    mode = "non-nested CV" if args.non_nested else "nested CV"
    print(f"probekd ({mode}): {t_ours:.1f} s ({r.not_converged} fits stopped before the gradient tolerance)")

    t0 = time.perf_counter()
    sk_acc = np.empty(G)
    n_fit = N * (args.folds - 1) / args.folds
    for g in range(G):
        sc = StandardScaler().fit(Xtr[g])
        clf = LogisticRegressionCV(
            Cs=[1 / (l2 * n_fit) for l2 in grid],
            cv=PredefinedSplit(r.folds),
            scoring="neg_log_loss",
            max_iter=100,
            tol=1e-4,
        )
        clf.fit(sc.transform(Xtr[g]), ytr)
        # the same rule as ours: the most probable option among those the question has
        proba = np.full(mask_dv.shape, -np.inf)
        proba[:, clf.classes_] = clf.predict_proba(sc.transform(Xdv[g]))
        sk_acc[g] = float((np.where(mask_dv, proba, -np.inf).argmax(1) == ydv).mean())
    t_sk = time.perf_counter() - t0
    print(f"sklearn LogisticRegressionCV per layer: {t_sk:.1f} s")
    diff = np.abs(ours_acc - sk_acc)
    print(
        f"dev accuracy, best layer: probekd {ours_acc.max():.3f} (layer index {ours_acc.argmax()}), "
        f"sklearn {sk_acc.max():.3f} (layer index {sk_acc.argmax()}); per-layer |difference| mean {diff.mean():.4f}, "
        f"max {diff.max():.4f}"
    )
    print(f"probes ratio: {t_sk / t_ours:.2f}")


if __name__ == "__main__":
    main()
