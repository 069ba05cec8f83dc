"""Batched L-BFGS: many independent smooth problems minimized together, each with its own line search.

Why by hand: `torch.optim.LBFGS` treats all parameters as one problem, so hundreds of probes (layers x folds x L2
strengths) would share one step size and one curvature history and converge as slowly as the worst of them.
Here every problem keeps its own history, step and convergence test; the work of all problems is done in the same
batched tensor operations, which is what makes fitting every layer's probe at once fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# fun(x [B, M, Q], cols [Q]) -> (f [B, Q], grad [B, M, Q]): B x P independent problems of M parameters each,
# evaluated at the problem columns `cols` (indices into P, increasing); f[b, q] depends on x[b, :, q] only.
# Parameters sit on the middle axis so that callers can lay them out for their matmuls (problems last) without
# copies. Columns whose problems have all stopped are dropped from later calls.
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LbfgsResult:
    x: torch.Tensor  # [B, M, P] solutions
    f: torch.Tensor  # [B, P] objective at x
    n_iter: torch.Tensor  # [B, P] iterations each problem took
    converged: torch.Tensor  # [B, P] bool: gradient max-norm reached gtol
    n_evals: int  # calls of `fun` (each evaluates every problem)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b, dim=1)  # fused: no [B, M, P] temporary


def _e(v: torch.Tensor) -> torch.Tensor:
    """A per-problem [B, P] value broadcast over the parameter axis."""
    return v[:, None, :]


def minimize(
    fun: Objective,
    x0: torch.Tensor,
    *,
    max_iter: int = 100,
    history: int = 10,
    gtol: float = 1e-4,
    ftol: float = 1e-9,
    max_backtracks: int = 12,
    compact_below: float = 0.75,
) -> LbfgsResult:
    """Minimize B x P independent objectives from `x0` [B, M, P].

    A problem stops when the max-norm of its gradient is at most `gtol`, when its relative decrease in one step is
    below `ftol`, or after `max_iter` iterations. Steps use backtracking on the Armijo condition (c1 = 1e-4),
    starting from the unit step (the first iteration from 1 / ||g||, like scipy); curvature pairs with s.y <= 0
    are skipped so the inverse-Hessian estimate stays positive definite. When at most `compact_below` of the
    current columns still hold a running problem, the finished columns are dropped from the work.
    """
    noise = 64 * torch.finfo(x0.dtype).eps  # relative precision of a computed objective

    def accept(ft: torch.Tensor, gt: torch.Tensor, f0: torch.Tensor, g0max: torch.Tensor, tgd: torch.Tensor):
        """Armijo (c1 = 1e-4), or, where the change is below the objective's rounding noise, a smaller gradient
        (Armijo cannot tell such steps apart; refusing them would stall problems that are as good as solved)."""
        armijo = ft <= f0 + 1e-4 * tgd
        flat = (ft <= f0 + noise * f0.abs().clamp_min(1.0)) & (gt.abs().amax(1) < g0max)
        return torch.isfinite(ft) & (armijo | flat)

    x = x0.clone()
    cols = torch.arange(x.shape[2], device=x.device)
    f, g = fun(x, cols)
    n_evals = 1
    x_out, f_out = x.clone(), f.clone()
    # A ring of curvature pairs shared by all problems (slot j written at the same iteration for everyone). A
    # problem that keeps no pair at an iteration stores s = y = 0 with rho = 0, which the two-loop recursion
    # passes through unchanged; so no per-problem indexing (and no copies) is needed.
    S = torch.zeros(history, *x.shape, dtype=x.dtype, device=x.device)
    Y = torch.zeros_like(S)
    rho = torch.zeros(history, *f.shape, dtype=x.dtype, device=x.device)
    gamma = 1.0 / g.norm(dim=1).clamp_min(1e-30)  # initial inverse-Hessian scale per problem
    n_iter = torch.zeros(f.shape, dtype=torch.long, device=x.device)
    gmax = g.abs().amax(1)  # gradient max-norm per problem, kept in step with g
    active = gmax > gtol
    converged = ~active
    for it in range(max_iter):
        if not active.any():
            break
        live = active.any(0)
        if int(live.sum()) <= compact_below * len(cols):  # drop the columns whose problems all stopped
            done = ~live
            x_out[:, :, cols[done]], f_out[:, cols[done]] = x[:, :, done], f[:, done]
            cols = cols[live]
            x, f, g, gamma, active = x[:, :, live], f[:, live], g[:, :, live], gamma[:, live], active[:, live]
            gmax = gmax[:, live]
            S, Y, rho = S[:, :, :, live], Y[:, :, :, live], rho[:, :, live]
        q = g.clone()
        alphas = []
        order = [(it - 1 - j) % history for j in range(min(it, history))]  # newest first
        for j in order:
            a = rho[j] * _dot(S[j], q)
            alphas.append(a)
            q.addcmul_(_e(a), Y[j], value=-1)
        d = q.mul_(_e(gamma))
        for j, a in zip(reversed(order), reversed(alphas), strict=True):
            b = rho[j] * _dot(Y[j], d)
            d.addcmul_(_e(a - b), S[j])
        d.neg_()
        gd = _dot(g, d)
        bad = gd >= 0  # not a descent direction (numerical trouble): restart from steepest descent
        if bad.any():
            d = torch.where(_e(bad), -g / g.norm(dim=1, keepdim=True).clamp_min(1e-30), d)
            gd = _dot(g, d)
            rho[:, bad] = 0.0
            gamma[bad] = 1.0
        d.mul_(_e(active))
        # Line search: the unit step for every problem at once, then backtracking on the columns that still
        # hold a pending problem only (usually a few), so one hard problem does not cost a full evaluation.
        t = torch.ones(f.shape, dtype=x.dtype, device=x.device)
        x_new = torch.addcmul(x, _e(t), d)  # problems not running have d = 0: this is their x
        f_new, g_new = fun(x_new, cols)
        n_evals += 1
        pending = active & ~accept(f_new, g_new, f, gmax, t * gd)
        for _ls in range(max_backtracks):
            if not pending.any():
                break
            pc = pending.any(0).nonzero()[:, 0]
            tp = t[:, pc] * 0.5
            t[:, pc] = tp
            xs = torch.addcmul(x[:, :, pc], _e(tp), d[:, :, pc])
            fs, gs = fun(xs, cols[pc])
            n_evals += 1
            ok = pending[:, pc] & accept(fs, gs, f[:, pc], gmax[:, pc], tp * gd[:, pc])
            x_new[:, :, pc] = torch.where(_e(ok), xs, x_new[:, :, pc])
            f_new[:, pc] = torch.where(ok, fs, f_new[:, pc])
            g_new[:, :, pc] = torch.where(_e(ok), gs, g_new[:, :, pc])
            pending[:, pc] &= ~ok
        if pending.any():  # no acceptable step: these problems stay where they were
            pc = pending.any(0).nonzero()[:, 0]
            keep = pending[:, pc]
            x_new[:, :, pc] = torch.where(_e(keep), x[:, :, pc], x_new[:, :, pc])
            f_new[:, pc] = torch.where(keep, f[:, pc], f_new[:, pc])
            g_new[:, :, pc] = torch.where(_e(keep), g[:, :, pc], g_new[:, :, pc])
        moved = active & ~pending
        stuck = active & pending  # no acceptable step: treat as converged to the precision we can reach
        slot = it % history
        s_new, y_new = torch.sub(x_new, x, out=S[slot]), torch.sub(g_new, g, out=Y[slot])
        sy, yy = _dot(s_new, y_new), _dot(y_new, y_new)
        store = moved & (sy > 1e-10 * yy.clamp_min(1e-30))
        if not bool(store.all()):
            s_new.mul_(_e(store))
            y_new.mul_(_e(store))
        rho[slot] = torch.where(store, 1.0 / sy.clamp_min(1e-30), 0.0)
        gamma = torch.where(store, sy / yy.clamp_min(1e-30), gamma)
        small_gain = moved & ((f - f_new) <= ftol * torch.maximum(f.abs(), f_new.abs()).clamp_min(1.0))
        x, f, g = x_new, f_new, g_new
        n_iter[:, cols] += active.long()
        gmax = g.abs().amax(1)
        gconv = gmax <= gtol
        converged[:, cols] |= active & gconv
        active = active & ~gconv & ~stuck & ~small_gain
    x_out[:, :, cols], f_out[:, cols] = x, f
    return LbfgsResult(x=x_out, f=f_out, n_iter=n_iter, converged=converged, n_evals=n_evals)
