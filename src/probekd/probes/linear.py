"""L2-regularized linear probes on hidden states: many at once (layers x problems), and one sklearn-shaped estimator.

Two kinds, one objective shape: mean cross-entropy over a problem's weighted rows + (l2 / 2) ||coef||^2.
- `multinomial` (the `letter` formulation): features X [N, D]; logits = X @ W + b over K classes (the option
  letters); missing options are masked out of the softmax. Equivalent to scikit-learn's
  `LogisticRegression(C=1 / (l2 * n))` on n training rows.
- `conditional` (the `option` formulation, a conditional-logit model): features X [N, K, D], one vector per
  option; option k scores X[n, k] @ w with one w shared by all options, softmaxed over the question's options. No
  intercept: it would cancel in the softmax.

`fit_batched` fits G feature groups (the layers) x S problems (folds x L2 strengths) with one batched L-BFGS run;
every (group, problem) pair is an independent problem with its own sample weights and L2 strength.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from probekd.errors import ProbekdError
from probekd.probes import lbfgs

Kind = Literal["multinomial", "conditional"]


@dataclass
class LinearParams:
    """Fitted parameters of G x S probes, in the standardized feature space."""

    kind: Kind
    coef: torch.Tensor  # multinomial [G, S, D, K]; conditional [G, S, D]
    intercept: torch.Tensor | None  # multinomial [G, S, K]; conditional None
    n_iter: torch.Tensor  # [G, S]
    converged: torch.Tensor  # [G, S]


def logits_batched(params: LinearParams, X: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits [G, N, S, K] of every probe on every row of X (multinomial [G, N, D], conditional [G, N, K, D]);
    -inf where `mask` [N, K] says the option is missing."""
    if params.kind == "multinomial":
        G, N, D = X.shape
        S, K = params.coef.shape[1], params.coef.shape[3]
        W = params.coef.permute(0, 2, 1, 3).reshape(G, D, S * K)
        out = torch.bmm(X, W).view(G, N, S, K)
        assert params.intercept is not None
        out = out + params.intercept[:, None]
        return out.masked_fill(~mask[None, :, None, :], float("-inf"))
    G, N, K, D = X.shape
    S = params.coef.shape[1]
    out = torch.bmm(X.reshape(G, N * K, D), params.coef.transpose(1, 2)).view(G, N, K, S).permute(0, 1, 3, 2)
    return out.masked_fill(~mask[None, :, None, :], float("-inf"))


def _check(X: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, kind: Kind) -> None:
    want = 3 if kind == "multinomial" else 4
    if X.dim() != want:
        raise ProbekdError(
            f"{kind} probe features must have {want} dims (groups, rows, ...), got shape {tuple(X.shape)}"
        )
    N = X.shape[1]
    if y.shape != (N,) or mask.shape[0] != N:
        raise ProbekdError(
            f"probe inputs disagree on the number of rows: X {tuple(X.shape)}, y {tuple(y.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    if kind == "conditional" and X.shape[2] != mask.shape[1]:
        raise ProbekdError(f"features have {X.shape[2]} options per row but the mask has {mask.shape[1]}")


def fit_batched(
    X: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    l2: torch.Tensor,
    kind: Kind,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    init: LinearParams | None = None,
) -> LinearParams:
    """Fit G x S probes: group g uses features X[g]; problem s weights row n by weights[s, n] (rows of `weights`
    sum to 1: the loss is a weighted mean) and has L2 strength l2[s]. y [N] holds the gold option of each row
    (any value where every weight is 0); mask [N, K] the options present. `init` starts the solver from other
    probes' parameters (a warm start along an L2 path)."""
    _check(X, y, mask, kind)
    X = X if X.dtype == torch.float64 else X.float()  # float64 is kept (tests use it for tight comparisons)
    G, N = X.shape[:2]
    S = weights.shape[0]
    K = mask.shape[1]
    D = X.shape[-1]
    y = y.clamp_min(0).long()
    onehot = torch.nn.functional.one_hot(y, K).to(X.dtype)  # [N, K]
    w = weights.to(X.dtype)
    lam = l2.to(X.dtype)
    # Rows no problem uses cost nothing: drop them.
    used = (w > 0).any(0)
    if not bool(used.all()):
        X, y, onehot, mask, w = X[:, used], y[used], onehot[used], mask[used], w[:, used]
        N = X.shape[1]
    masked = not bool(mask.all())
    w_nks = w.T[:, None, :].expand(N, K, S).contiguous()  # row weights, broadcast over options
    onehot_w = onehot[:, :, None] * w_nks  # [N, K, S]
    y_k = y.view(1, N, 1, 1)
    per_col: dict[str, torch.Tensor] = {}

    def columns(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w [Q, N], w_nks, onehot_w, lam [1, 1, Q]) of the problems still running (recomputed on compaction)."""
        if per_col.get("cols") is not cols:
            full = len(cols) == S
            per_col.update(
                cols=cols,
                w=w if full else w[cols],
                w_nks=w_nks if full else w_nks[:, :, cols].contiguous(),
                onehot_w=onehot_w if full else onehot_w[:, :, cols].contiguous(),
                lam=lam.view(1, 1, S) if full else lam[cols].view(1, 1, -1),
            )
        return per_col["w"], per_col["w_nks"], per_col["onehot_w"], per_col["lam"]

    def loss_and_residual(z: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From logits z [G, N, K, Q]: the weighted mean NLL [G, Q], the residual (p - onehot) * weight
        [G, N, K, Q] (d loss / d z), and the problems' L2 strengths [1, 1, Q]."""
        wq, w_q, ow_q, lam_q = columns(cols)
        if masked:
            z.masked_fill_(~mask[None, :, :, None], float("-inf"))
        logp = torch.log_softmax(z, 2)
        nll = -logp.gather(2, y_k.expand(G, N, 1, z.shape[3]))[:, :, 0]  # [G, N, Q]
        return torch.einsum("gnq,qn->gq", nll, wq), logp.exp_().mul_(w_q).sub_(ow_q), lam_q

    # Parameters are laid out [G, M, S] (problems last) so that both matmuls read them without copies.
    if kind == "multinomial":
        Xt = X.transpose(1, 2).contiguous()  # [G, D, N]
        M = D * K + K

        def fun(theta: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            Q = theta.shape[2]
            W = theta[:, : D * K]  # [G, D*K, Q], i.e. [G, D, K, Q]
            z = torch.bmm(X, W.reshape(G, D, K * Q)).view(G, N, K, Q) + theta[:, D * K :][:, None]
            f, R, lam_q = loss_and_residual(z, cols)
            dW = torch.bmm(Xt, R.view(G, N, K * Q)).view(G, D * K, Q).addcmul_(W, lam_q)
            return f + 0.5 * lam_q[0] * torch.linalg.vecdot(W, W, dim=1), torch.cat([dW, R.sum(1)], 1)
    else:
        Xf = X.reshape(G, N * K, D)
        Xft = Xf.transpose(1, 2).contiguous()  # [G, D, N*K]
        M = D

        def fun(theta: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            Q = theta.shape[2]
            f, R, lam_q = loss_and_residual(torch.bmm(Xf, theta).view(G, N, K, Q), cols)  # theta: [G, D, Q]
            dW = torch.bmm(Xft, R.view(G, N * K, Q)).addcmul_(theta, lam_q)
            return f + 0.5 * lam_q[0] * torch.linalg.vecdot(theta, theta, dim=1), dW

    if init is None:
        theta0 = torch.zeros(G, M, S, dtype=X.dtype)
    elif kind == "multinomial":
        assert init.intercept is not None
        theta0 = torch.cat([init.coef.permute(0, 2, 3, 1).reshape(G, D * K, S), init.intercept.transpose(1, 2)], 1)
    else:
        theta0 = init.coef.transpose(1, 2)
    res = lbfgs.minimize(fun, theta0.to(X.dtype).contiguous(), max_iter=max_iter, gtol=tol)
    th = res.x
    if kind == "multinomial":
        coef = th[:, : D * K].reshape(G, D, K, S).permute(0, 3, 1, 2).contiguous()
        intercept: torch.Tensor | None = th[:, D * K :].transpose(1, 2).contiguous()
    else:
        coef, intercept = th.transpose(1, 2).contiguous(), None
    return LinearParams(kind, coef, intercept, res.n_iter, res.converged)


@dataclass
class Standardizer:
    """Per-group feature mean and scale, from the rows (and, for `conditional`, the present options) given."""

    mean: torch.Tensor  # [G, D]
    scale: torch.Tensor  # [G, D]

    @classmethod
    def fit(cls, X: torch.Tensor, mask: torch.Tensor | None = None) -> Standardizer:
        Xf = X.float()
        if Xf.dim() == 4:  # [G, N, K, D]: use the present options only
            assert mask is not None
            Xf = Xf[:, mask]
        mean = Xf.mean(1)
        scale = Xf.std(1, correction=0)
        scale = torch.where(scale > 1e-8 * scale.amax(-1, keepdim=True).clamp_min(1e-30), scale, 1.0)
        return cls(mean, scale)

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        if X.dim() == 4:
            return (X.float() - self.mean[:, None, None]) / self.scale[:, None, None]
        return (X.float() - self.mean[:, None]) / self.scale[:, None]


def _as_mask(option_mask: np.ndarray | None, n: int, k: int) -> torch.Tensor:
    if option_mask is None:
        return torch.ones(n, k, dtype=torch.bool)
    m = torch.as_tensor(np.asarray(option_mask), dtype=torch.bool)
    if m.shape != (n, k):
        raise ProbekdError(f"option_mask has shape {tuple(m.shape)}, expected {(n, k)}")
    return m


class LinearProbe(ClassifierMixin, BaseEstimator):
    """One probe with the scikit-learn estimator shape (`fit`, `predict_proba`, `predict`, `score`).

    `kind="multinomial"`: X [n, d], y in 0..K-1 (K = `option_mask.shape[1]`, else max(y) + 1).
    `kind="conditional"`: X [n, K, d], one row per option. `option_mask` [n, K] marks present options in both.
    Features are standardized on the training rows unless `standardize=False`. `l2` is the strength on the
    mean loss; `LogisticRegression(C=c)` on n rows corresponds to `l2 = 1 / (c * n)`.
    """

    def __init__(
        self,
        l2: float = 1e-3,
        kind: Kind = "multinomial",
        max_iter: int = 100,
        tol: float = 1e-4,
        standardize: bool = True,
    ) -> None:
        self.l2 = l2
        self.kind = kind
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize

    def _k(self, X: np.ndarray, y: np.ndarray | None, option_mask: np.ndarray | None) -> int:
        if option_mask is not None:
            return int(np.asarray(option_mask).shape[1])
        if self.kind == "conditional":
            return int(X.shape[1])
        assert y is not None
        return int(np.max(y)) + 1

    def fit(self, X: np.ndarray, y: np.ndarray, option_mask: np.ndarray | None = None) -> LinearProbe:
        Xt = torch.as_tensor(np.asarray(X), dtype=torch.float32)[None]
        yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
        k = self._k(X, y, option_mask)
        mask = _as_mask(option_mask, Xt.shape[1], k)
        self.standardizer_ = Standardizer.fit(Xt, mask) if self.standardize else None
        Xs = self.standardizer_.transform(Xt) if self.standardizer_ else Xt
        n = Xt.shape[1]
        w = torch.full((1, n), 1.0 / n)
        self.params_ = fit_batched(
            Xs, yt, mask, w, torch.tensor([self.l2]), self.kind, max_iter=self.max_iter, tol=self.tol
        )
        self.classes_ = np.arange(k)
        self.n_iter_ = int(self.params_.n_iter.item())
        return self

    def decision_function(self, X: np.ndarray, option_mask: np.ndarray | None = None) -> np.ndarray:
        Xt = torch.as_tensor(np.asarray(X), dtype=torch.float32)[None]
        Xs = self.standardizer_.transform(Xt) if self.standardizer_ else Xt
        mask = _as_mask(option_mask, Xt.shape[1], len(self.classes_))
        return logits_batched(self.params_, Xs, mask)[0, :, 0].numpy()

    def predict_proba(self, X: np.ndarray, option_mask: np.ndarray | None = None) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.decision_function(X, option_mask)), -1).numpy()

    def predict(self, X: np.ndarray, option_mask: np.ndarray | None = None) -> np.ndarray:
        return self.decision_function(X, option_mask).argmax(-1)

    def score(self, X: np.ndarray, y: np.ndarray, option_mask: np.ndarray | None = None) -> float:  # type: ignore[override]
        return float((self.predict(X, option_mask) == np.asarray(y)).mean())
