"""Cross-fitted probes for every layer at once, with the L2 strength chosen by nested cross-validation.

No leakage, by construction: the probability given to a labelled training example comes from a probe fitted on
the other folds, whose L2 strength was chosen by an inner cross-validation that never saw that example's fold
either (the `cross_val_predict(LogisticRegressionCV(...))` semantics). Fold membership is a function of the
example ids only, never of the labels. So changing one example's label cannot change its own probability.

One batched solve per L2 strength (strongest first, each warm-started from the last) covers, per layer:
- the pair models (f, g), f < g, fitted on every fold except f and g; model (f, g) scores fold g for outer fold
  f's inner CV and fold f for outer fold g's;
- the outer models f, fitted on every fold except f: they give fold f its out-of-fold probabilities;
- the full model, fitted on all labelled rows: it scores validation, test and unlabelled rows.
The full model's L2 strength is chosen by the outer CV (the mean held-out log-loss of the outer models).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from probekd.errors import ProbekdError
from probekd.probes.linear import Kind, LinearParams, Standardizer, fit_batched, logits_batched

DEFAULT_L2_GRID = (1e-4, 5e-4, 2.5e-3, 1.25e-2, 6.25e-2, 0.3125, 1.5625)  # x5 steps; on the mean loss


def fold_ids(ids: list[str], n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index of each id: ids ranked by sha256(seed:id), dealt round-robin. Balanced, label-free, and an
    id keeps its rank among any subset of the ids."""
    keys = [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in ids]
    folds = np.empty(len(ids), dtype=np.int64)
    folds[np.argsort(keys, kind="stable")] = np.arange(len(ids)) % n_folds
    return folds


def held_out_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row negative log-likelihood of the gold option; logits [..., K] with -inf for missing options."""
    return -torch.log_softmax(logits, -1).gather(-1, y.clamp_min(0)[..., None].expand(*logits.shape[:-1], 1))[..., 0]


@dataclass
class CrossfitResult:
    """Everything the probe stage keeps per layer (G layers, N training rows, K options, D features)."""

    train_logits: torch.Tensor  # [G, N, K]: out-of-fold for labelled rows, the full model for unlabelled ones
    cv_accuracy: torch.Tensor  # [G] accuracy of the out-of-fold predictions
    cv_nll: torch.Tensor  # [G] mean out-of-fold negative log-likelihood
    fold_l2: torch.Tensor  # [G, F] the L2 strength each outer fold used (from its inner CV)
    full_l2: torch.Tensor  # [G] the L2 strength of the full model
    full: LinearParams  # the full model per layer (S = 1)
    standardizer: Standardizer
    folds: np.ndarray  # [N] fold of each labelled row, -1 for unlabelled
    not_converged: int  # (layer, problem) fits that hit max_iter

    def predict_logits(self, X: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [G, N, K] of each layer's full model on other rows (validation, test, a pool)."""
        return logits_batched(self.full, self.standardizer.transform(X), mask)[:, :, 0]

    @classmethod
    def concat(cls, parts: list[CrossfitResult]) -> CrossfitResult:
        """The results of fits on consecutive groups of layers (same rows, folds and settings), as one result."""
        if len(parts) == 1:
            return parts[0]
        full = [p.full for p in parts]
        intercepts = [p.intercept for p in full]
        return cls(
            train_logits=torch.cat([p.train_logits for p in parts]),
            cv_accuracy=torch.cat([p.cv_accuracy for p in parts]),
            cv_nll=torch.cat([p.cv_nll for p in parts]),
            fold_l2=torch.cat([p.fold_l2 for p in parts]),
            full_l2=torch.cat([p.full_l2 for p in parts]),
            full=LinearParams(
                full[0].kind,
                torch.cat([p.coef for p in full]),
                None if intercepts[0] is None else torch.cat([i for i in intercepts if i is not None]),
                torch.cat([p.n_iter for p in full]),
                torch.cat([p.converged for p in full]),
            ),
            standardizer=Standardizer(
                torch.cat([p.standardizer.mean for p in parts]), torch.cat([p.standardizer.scale for p in parts])
            ),
            folds=parts[0].folds,
            not_converged=sum(p.not_converged for p in parts),
        )


def crossfit(
    X: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    ids: list[str],
    kind: Kind,
    *,
    n_folds: int = 5,
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-4,
    nested: bool = True,
) -> CrossfitResult:
    """Fit every layer's probes on the training rows. X [G, N, D] (multinomial) or [G, N, K, D] (conditional);
    y [N] with -1 for unlabelled rows; mask [N, K]; ids [N] (they decide the folds).

    `nested=False` drops the pair models: every outer fold uses the strength the outer CV chose for the full model
    (`LogisticRegressionCV`'s semantics), 6 of 16 fits per strength at 5 folds, at the price of a second-order leak
    (the strength of a row's out-of-fold probability was chosen with that row's fold among the held-out ones)."""
    if n_folds < 3:
        raise ProbekdError(f"n_folds must be at least 3 for nested cross-validation, got {n_folds}")
    if not l2_grid or min(l2_grid) <= 0:
        raise ProbekdError(f"the L2 grid must hold positive strengths, got {list(l2_grid)}")
    N, K = mask.shape
    if len(ids) != N:
        raise ProbekdError(f"{len(ids)} ids for {N} rows")
    labelled = (y >= 0).numpy()
    n_lab = int(labelled.sum())
    if n_lab < 2 * n_folds:
        raise ProbekdError(
            f"only {n_lab} labelled training examples; {n_folds}-fold cross-fitting needs at least {2 * n_folds}"
        )
    if bool((y[torch.from_numpy(labelled)] >= mask.sum(1)[torch.from_numpy(labelled)]).any()):
        raise ProbekdError("a training label points at an option the example does not have")
    folds = np.full(N, -1, dtype=np.int64)
    folds[labelled] = fold_ids([i for i, lab in zip(ids, labelled, strict=True) if lab], n_folds, seed)
    F, C = n_folds, len(l2_grid)
    pairs = list(itertools.combinations(range(F), 2)) if nested else []
    # Model m leaves out the folds left_out[m] (pairs, then single folds, then none = the full model); its
    # weights are uniform over the labelled rows it trains on.
    left_out: list[tuple[int, ...]] = [*pairs, *[(f,) for f in range(F)], ()]
    n_models = len(left_out)
    in_fold = torch.stack([torch.from_numpy(folds == f) for f in range(F)])  # [F, N]
    lab_t = torch.from_numpy(labelled)
    train_rows = torch.stack([lab_t & ~in_fold[list(lo)].any(0) if lo else lab_t for lo in left_out])  # [M, N]
    weights = train_rows.float() / train_rows.sum(1, keepdim=True).float()
    std = Standardizer.fit(X, mask)
    Xs = std.transform(X)
    # The L2 path, strongest first, each strength warm-started from the previous one's solution of the same
    # model (as LogisticRegressionCV does): far fewer iterations than cold starts.
    stages: list[LinearParams | None] = [None] * C
    prev = None
    for c in sorted(range(C), key=lambda c: -l2_grid[c]):
        prev = fit_batched(
            Xs, y, mask, weights, torch.full((n_models,), l2_grid[c]), kind, max_iter=max_iter, tol=tol, init=prev
        )
        stages[c] = prev
    fitted = [p for p in stages if p is not None]
    logits = torch.stack([logits_batched(p, Xs, mask) for p in fitted], 2)  # [G, N, C, M, K]
    G = logits.shape[0]
    nll = held_out_nll(logits, y[None, :, None, None].expand(G, N, C, n_models))  # [G, N, C, M]
    outer = torch.stack([nll[:, in_fold[f], :, len(pairs) + f].mean(1) for f in range(F)]).mean(0)  # [G, C]
    full_c = outer.argmin(-1)  # [G]
    if nested:
        # Inner CV: for outer fold f and strength c, the mean held-out NLL of pair models on the other folds.
        pair_index = {p: m for m, p in enumerate(pairs)}
        inner = torch.zeros(G, F, C)
        for f in range(F):
            parts = []
            for g in range(F):
                if g == f:
                    continue
                m = pair_index[(min(f, g), max(f, g))]
                parts.append(nll[:, in_fold[g], :, m].mean(1))  # [G, C]
            inner[:, f] = torch.stack(parts).mean(0)
        best_c = inner.argmin(-1)  # [G, F]
    else:
        best_c = full_c[:, None].expand(G, F)
    train_logits = torch.empty(G, N, K)
    for f in range(F):
        m = len(pairs) + f
        chosen = logits[:, :, :, m][torch.arange(G), :, best_c[:, f]]  # [G, N, K]
        train_logits[:, in_fold[f]] = chosen[:, in_fold[f]]
    full_m = n_models - 1
    full_logits = logits[:, :, :, full_m][torch.arange(G), :, full_c]  # [G, N, K]
    unl = torch.from_numpy(~labelled)
    train_logits[:, unl] = full_logits[:, unl]
    lab_logits = train_logits[:, lab_t]
    y_lab = y[lab_t]
    cv_acc = (lab_logits.argmax(-1) == y_lab[None]).float().mean(1)
    cv_nll = held_out_nll(lab_logits, y_lab[None].expand(G, -1)).mean(1)
    rows = torch.arange(G)
    coef = torch.stack([p.coef[:, full_m] for p in fitted], 1)[rows, full_c]  # [G, ...] at each layer's choice
    intercept = None
    if kind == "multinomial":
        intercept = torch.stack([p.intercept[:, full_m] for p in fitted if p.intercept is not None], 1)[rows, full_c]
    full = LinearParams(
        kind,
        coef[:, None].contiguous(),
        None if intercept is None else intercept[:, None].contiguous(),
        torch.stack([p.n_iter[:, full_m] for p in fitted], 1)[rows, full_c][:, None],
        torch.stack([p.converged[:, full_m] for p in fitted], 1)[rows, full_c][:, None],
    )
    grid = torch.tensor(l2_grid, dtype=torch.float64)  # exact grid values in the outputs
    return CrossfitResult(
        train_logits=train_logits,
        cv_accuracy=cv_acc,
        cv_nll=cv_nll,
        fold_l2=grid[best_c],
        full_l2=grid[full_c],
        full=full,
        standardizer=std,
        folds=folds,
        not_converged=sum(int((~p.converged).sum()) for p in fitted),
    )
