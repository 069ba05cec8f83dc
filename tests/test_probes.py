"""Probes: the batched L-BFGS, the probes against scikit-learn, cross-fitting without leakage, layer choice,
temperature calibration, and the probe stage on a tiny random Llama's real cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from probekd.errors import ProbekdError
from probekd.probes import lbfgs
from probekd.probes.calibrate import fit_temperature
from probekd.probes.crossfit import crossfit, fold_ids, held_out_nll
from probekd.probes.linear import LinearProbe, Standardizer, fit_batched
from probekd.probes.select import choose_layer


def problem(n: int = 300, d: int = 12, k: int = 4, seed: int = 0, signal: float = 1.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.2, 5.0, size=d) + rng.normal(size=d)
    W = rng.normal(size=(d, k))
    y = (signal * (X - X.mean(0)) / X.std(0) @ W + rng.gumbel(size=(n, k))).argmax(1)
    return X.astype(np.float32), y


def test_lbfgs_solves_independent_quadratics_each_to_its_own_minimum() -> None:
    rng = np.random.default_rng(1)
    P, M = 4, 8
    A = []
    for p in range(P):  # condition numbers from 1 to 10^3
        Q, _ = np.linalg.qr(rng.normal(size=(M, M)))
        A.append(Q @ np.diag(np.logspace(0, p, M)) @ Q.T)
    A_t = torch.tensor(np.stack(A))
    b = torch.tensor(rng.normal(size=(P, M)))

    def fun(x: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xp = x[0].T  # x [1, M, Q]: parameters on the middle axis, problems `cols` on the last
        Ax = torch.einsum("pij,pj->pi", A_t[cols], xp)
        return (0.5 * (xp * Ax).sum(-1) - (b[cols] * xp).sum(-1))[None], (Ax - b[cols]).T[None]

    res = lbfgs.minimize(fun, torch.zeros(1, M, P, dtype=torch.float64), max_iter=500, gtol=1e-6, ftol=0)
    expected = torch.linalg.solve(A_t, b)
    assert res.converged.all()
    torch.testing.assert_close(res.x[0].T, expected, atol=1e-5, rtol=0)
    assert res.n_iter[0, 0] < res.n_iter[0, -1]  # each problem stops on its own


def test_multinomial_probe_matches_sklearn() -> None:
    X, y = problem()
    C = 0.3
    Xs = StandardScaler().fit_transform(X)
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(Xs, y)
    ours = LinearProbe(l2=1 / (C * len(y)), tol=1e-7, max_iter=1000).fit(X, y)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(Xs), atol=2e-4)
    assert ours.score(X, y) == pytest.approx(ref.score(Xs, y))
    X2, _ = problem(seed=5)
    np.testing.assert_array_equal(ours.predict(X2), ref.predict(StandardScaler().fit(X).transform(X2)))


def test_conditional_logit_with_two_options_is_logistic_regression_on_the_difference() -> None:
    rng = np.random.default_rng(2)
    n, d = 400, 6
    X = rng.normal(size=(n, 2, d)).astype(np.float32)
    w = rng.normal(size=d)
    y = ((X[:, 1] - X[:, 0]) @ w + rng.logistic(size=n) > 0).astype(int)
    C = 0.5
    ref = LogisticRegression(C=C, fit_intercept=False, tol=1e-10, max_iter=5000).fit(X[:, 1] - X[:, 0], y)
    ours = LinearProbe(l2=1 / (C * n), kind="conditional", standardize=False, tol=1e-7, max_iter=1000).fit(X, y)
    np.testing.assert_allclose(ours.params_.coef[0, 0].numpy(), ref.coef_[0], atol=1e-4)
    np.testing.assert_allclose(ours.predict_proba(X)[:, 1], ref.predict_proba(X[:, 1] - X[:, 0])[:, 1], atol=1e-4)


def test_missing_options_get_zero_probability_and_do_not_move_the_fit() -> None:
    X, y = problem(k=3)
    mask = np.ones((len(y), 4), dtype=bool)
    mask[:, 3] = False  # a fourth option nobody has: same model as K = 3
    a = LinearProbe(l2=1e-2).fit(X, y)
    b = LinearProbe(l2=1e-2).fit(X, y, option_mask=mask)
    pb = b.predict_proba(X, option_mask=mask)
    assert (pb[:, 3] == 0).all()
    np.testing.assert_allclose(pb[:, :3], a.predict_proba(X), atol=1e-5)


def test_batched_fit_equals_separate_fits() -> None:
    Xa, y = problem(n=200, d=10, seed=3)
    Xb, _ = problem(n=200, d=10, seed=4)
    X = torch.tensor(np.stack([Xa, Xb]))
    std = Standardizer.fit(X)
    Xs = std.transform(X).double()
    yt = torch.tensor(y)
    mask = torch.ones(200, 4, dtype=torch.bool)
    halves = torch.zeros(3, 200)
    halves[0, :100] = 1 / 100
    halves[1, 100:] = 1 / 100
    halves[2] = 1 / 200
    l2 = torch.tensor([1e-3, 1e-2, 1e-1])
    params = fit_batched(Xs, yt, mask, halves.double(), l2.double(), "multinomial", max_iter=1000, tol=1e-9)
    for g in range(2):
        for s, rows in enumerate([slice(0, 100), slice(100, 200), slice(0, 200)]):
            n = len(yt[rows])
            one = fit_batched(
                Xs[g : g + 1, rows],
                yt[rows],
                mask[rows],
                torch.full((1, n), 1.0 / n, dtype=torch.float64),
                l2[s : s + 1].double(),
                "multinomial",
                max_iter=1000,
                tol=1e-9,
            )
            torch.testing.assert_close(params.coef[g, s], one.coef[0, 0], atol=1e-6, rtol=0)


def _cf_data(n: int = 150, k: int = 4, seed: int = 0, masked: bool = True):
    X1, y = problem(n=n, d=8, k=k, seed=seed, signal=1.5)
    X0 = np.random.default_rng(seed + 10).normal(size=X1.shape).astype(np.float32)
    X = torch.tensor(np.stack([X0, X1]))
    mask = torch.ones(n, k, dtype=torch.bool)
    y = torch.tensor(y)
    if masked:  # every fifth question lacks its last option
        mask[::5, k - 1] = False
        y[::5] = y[::5] % (k - 1)
    return X, y, mask, [f"q{i}" for i in range(n)]


@settings(max_examples=6, deadline=None)
@given(i=st.integers(0, 149), shift=st.integers(1, 2))
def test_changing_one_label_never_changes_that_examples_own_out_of_fold_probability(i: int, shift: int) -> None:
    X, y, mask, ids = _cf_data()
    a = crossfit(X, y, mask, ids, "multinomial", n_folds=3, l2_grid=(1e-3, 1e-2, 1e-1), max_iter=50)
    y2 = y.clone()
    y2[i] = (y[i] + shift) % int(mask[i].sum())
    assert y2[i] != y[i]
    b = crossfit(X, y2, mask, ids, "multinomial", n_folds=3, l2_grid=(1e-3, 1e-2, 1e-1), max_iter=50)
    # Nothing in i's fold moves (its probes never saw i), up to float noise: the batched solver multiplies
    # matrices of other widths when other problems stop at other times. A leak would move them by far more.
    same_fold = torch.from_numpy(a.folds == a.folds[i])
    torch.testing.assert_close(a.train_logits[:, same_fold], b.train_logits[:, same_fold], atol=1e-5, rtol=0)
    # the label does reach the targets of the other folds
    assert (a.train_logits[:, ~same_fold] - b.train_logits[:, ~same_fold]).abs().nan_to_num().max() > 1e-3


def test_out_of_fold_logits_come_from_a_probe_fitted_on_the_other_folds() -> None:
    X, y, mask, ids = _cf_data(masked=False)
    grid = (1e-3, 1e-2, 1e-1)
    r = crossfit(X, y, mask, ids, "multinomial", n_folds=3, l2_grid=grid, max_iter=300, tol=1e-6)
    Xs = r.standardizer.transform(X)
    g = 1  # the informative layer
    for f in range(3):
        train, held = r.folds != f, r.folds == f
        n = int(train.sum())
        ref = LogisticRegression(C=1 / (float(r.fold_l2[g, f]) * n), tol=1e-10, max_iter=5000)
        ref.fit(Xs[g][train].numpy(), y[train].numpy())
        expected = torch.tensor(ref.predict_proba(Xs[g][held].numpy()), dtype=torch.float32)
        torch.testing.assert_close(torch.softmax(r.train_logits[g, held], -1), expected, atol=2e-3, rtol=0)
    assert r.cv_accuracy[1] > r.cv_accuracy[0] + 0.2  # the informative layer is found
    assert set(r.full_l2.tolist()) <= set(grid)


def test_non_nested_crossfit_uses_the_outer_cv_strength_for_every_fold() -> None:
    """`nested=False` (LogisticRegressionCV's semantics): the full model and its strength are the nested run's (the
    same outer CV chooses it), every fold's out-of-fold probabilities use that one strength, and they come from a
    probe fitted on the other folds at it (sklearn); the pair models are not fitted."""
    X, y, mask, ids = _cf_data(masked=False)
    grid = (1e-3, 1e-2, 1e-1)
    kw = dict(n_folds=3, l2_grid=grid, max_iter=300, tol=1e-6)
    nested = crossfit(X, y, mask, ids, "multinomial", **kw)
    flat = crossfit(X, y, mask, ids, "multinomial", nested=False, **kw)
    assert torch.equal(flat.full_l2, nested.full_l2)
    torch.testing.assert_close(flat.full.coef, nested.full.coef, atol=1e-4, rtol=0)
    assert torch.equal(flat.fold_l2, flat.full_l2[:, None].expand(-1, 3))
    Xs = flat.standardizer.transform(X)
    g = 1
    for f in range(3):
        train, held = flat.folds != f, flat.folds == f
        ref = LogisticRegression(C=1 / (float(flat.full_l2[g]) * int(train.sum())), tol=1e-10, max_iter=5000)
        ref.fit(Xs[g][train].numpy(), y[train].numpy())
        expected = torch.tensor(ref.predict_proba(Xs[g][held].numpy()), dtype=torch.float32)
        torch.testing.assert_close(torch.softmax(flat.train_logits[g, held], -1), expected, atol=2e-3, rtol=0)
    # where the nested inner CV chose the full model's strength for a fold, both give that fold the same logits
    for f in range(3):
        same = nested.fold_l2[:, f] == nested.full_l2
        held = torch.from_numpy(nested.folds == f)
        torch.testing.assert_close(flat.train_logits[same][:, held], nested.train_logits[same][:, held], atol=1e-3,
                                   rtol=0)  # fmt: skip


def test_unlabelled_rows_get_the_full_model_and_count_nowhere() -> None:
    X, y, mask, ids = _cf_data()
    y_pool = y.clone()
    y_pool[100:] = -1
    r = crossfit(X, y_pool, mask, ids, "multinomial", n_folds=3, l2_grid=(1e-2,), max_iter=300)
    assert (r.folds[100:] == -1).all() and (r.folds[:100] >= 0).all()
    full = r.predict_logits(X[:, 100:], mask[100:])
    torch.testing.assert_close(r.train_logits[:, 100:], full)
    # the pool's features only standardize; its (hidden) labels play no part
    r2 = crossfit(X, y_pool, mask, ids, "multinomial", n_folds=3, l2_grid=(1e-2,), max_iter=300)
    torch.testing.assert_close(r.train_logits, r2.train_logits)


def test_conditional_crossfit_runs_and_finds_the_signal() -> None:
    rng = np.random.default_rng(7)
    n, k, d = 160, 4, 6
    w = rng.normal(size=d)
    X1 = rng.normal(size=(n, k, d)).astype(np.float32)
    y = (X1 @ w * 2 + rng.gumbel(size=(n, k))).argmax(1)
    X = torch.tensor(np.stack([rng.normal(size=(n, k, d)).astype(np.float32), X1]))
    mask = torch.ones(n, k, dtype=torch.bool)
    r = crossfit(X, torch.tensor(y), mask, [str(i) for i in range(n)], "conditional", n_folds=4)
    assert r.cv_accuracy[1] > 0.6 > r.cv_accuracy[0]
    assert r.full.coef.shape == (2, 1, d) and r.full.intercept is None


def test_folds_are_balanced_deterministic_and_seeded() -> None:
    ids = [f"id{i}" for i in range(103)]
    f = fold_ids(ids, 5)
    assert sorted(np.bincount(f).tolist()) == [20, 20, 21, 21, 21]
    assert not np.array_equal(f, fold_ids(ids, 5, seed=1))
    np.testing.assert_array_equal(f, fold_ids(list(ids), 5))  # deterministic


def test_crossfit_input_errors() -> None:
    X, y, mask, ids = _cf_data(n=20)
    with pytest.raises(ProbekdError, match="at least 3"):
        crossfit(X, y, mask, ids, "multinomial", n_folds=2)
    with pytest.raises(ProbekdError, match="labelled"):
        crossfit(X, torch.full_like(y, -1), mask, ids, "multinomial")
    with pytest.raises(ProbekdError, match="ids"):
        crossfit(X, y, mask, ids[:-1], "multinomial")
    bad = y.clone()
    bad[0] = 3
    m = mask.clone()
    m[0, 3] = False
    with pytest.raises(ProbekdError, match="does not have"):
        crossfit(X, bad, m, ids, "multinomial", n_folds=3)
    with pytest.raises(ProbekdError, match="dims"):
        fit_batched(X[0], y, mask, torch.ones(1, 20) / 20, torch.tensor([1.0]), "multinomial")


def test_temperature_recovers_the_generating_temperature_and_keeps_the_argmax() -> None:
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(size=(20000, 4)) * 3)
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(torch.softmax(z / 2.5, -1), 1, generator=g)[:, 0]
    t = fit_temperature(z.float(), y)
    assert t == pytest.approx(2.5, rel=0.05)
    grid = np.linspace(0.5, 5, 451)
    brute = grid[np.argmin([float(held_out_nll(z / s, y).mean()) for s in grid])]
    assert t == pytest.approx(brute, abs=0.02)


def test_choose_layer_by_accuracy_then_log_loss() -> None:
    assert choose_layer(np.array([0.3, 0.5, 0.5, 0.4]), np.array([1.0, 1.2, 1.1, 0.9])) == 2
    assert choose_layer(np.array([0.6, 0.5]), np.array([2.0, 0.1])) == 0


def test_sklearn_shape_get_params_and_clone() -> None:
    from sklearn.base import clone

    p = LinearProbe(l2=0.1, kind="conditional")
    assert clone(p).get_params() == {
        "l2": 0.1,
        "kind": "conditional",
        "max_iter": 100,
        "tol": 1e-4,
        "standardize": True,
    }


def test_scipy_reference_for_the_masked_multinomial_objective() -> None:
    """The objective the probe minimizes, written independently in numpy and solved by scipy, has the same optimum."""
    X, y = problem(n=120, d=5, k=4, seed=9)
    mask = np.ones((120, 4), dtype=bool)
    mask[::3, 3] = False
    y = np.where(mask[np.arange(120), y], y, y % 3)
    l2 = 0.02
    Xs = (X - X.mean(0)) / X.std(0)

    def obj(theta: np.ndarray) -> float:
        W, b = theta[:20].reshape(5, 4), theta[20:]
        z = np.where(mask, Xs @ W + b, -np.inf)
        logp = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
        return float(-logp[np.arange(120), y].mean() + 0.5 * l2 * (W**2).sum())

    ref = minimize(obj, np.zeros(24), method="BFGS", options={"gtol": 1e-9})
    ours = LinearProbe(l2=l2, tol=1e-7, max_iter=1000).fit(X, y, option_mask=mask)
    theta = np.concatenate([ours.params_.coef[0, 0].numpy().ravel(), ours.params_.intercept[0, 0].numpy()])
    assert obj(theta) == pytest.approx(ref.fun, abs=1e-6)


# --- the probe stage on a real (tiny, random) teacher cache -------------------------------------------------------


def test_probe_stage_writes_complete_consistent_artifacts(tiny_run: Path) -> None:
    from probekd.probes.pipeline import ProbeConfig, run_probes
    from probekd.teacher.cache import load_cache

    cfg = ProbeConfig(n_folds=3, l2_grid=[1e-2, 1e-1])
    s = run_probes(tiny_run, cfg)
    out = tiny_run / "probes"
    assert {p.name for p in out.iterdir()} == {
        "summary.json",
        "layers.csv",
        "layers.png",
        "weights.safetensors",
        "train.npz",
        "dev.npz",
        "test.npz",
    }
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert s["layers"] == [0, 1, 2] and s["chosen_layer"] in s["layers"]
    dev_acc = [r["dev_accuracy"] for r in s["table"]]
    assert s["table"][s["layers"].index(s["chosen_layer"])]["dev_accuracy"] == max(dev_acc)
    for split in ("train", "dev", "test"):
        z = np.load(out / f"{split}.npz")
        c = load_cache(tiny_run / "teacher" / split)
        assert z["ids"].tolist() == c.ids
        np.testing.assert_allclose(z["probs"].sum(1), 1.0, atol=1e-5)
        k = c.mask.shape[1]  # splits may have fewer options than the run's widest split
        np.testing.assert_array_equal(z["mask"][:, :k], c.mask)
        assert not z["mask"][:, k:].any() and (z["probs"][~z["mask"]] == 0).all()
        assert z["layer_logits"].shape == (3, len(c.ids), z["mask"].shape[1])
        acc = float((z["probs"].argmax(1) == c.answers).mean())
        assert s["probe_accuracy"][split] == pytest.approx(acc)
        assert s["teacher_accuracy"][split] == pytest.approx(c.teacher_accuracy())
        gain = s["probe_minus_teacher"][split]  # the paired difference, its interval around it
        assert gain["diff"] == pytest.approx(acc - c.teacher_accuracy(), abs=1e-4)
        assert gain["ci95"][0] <= gain["diff"] <= gain["ci95"][1]
    assert (np.load(out / "train.npz")["folds"] >= 0).all()
    # a rerun with the same inputs is a no-op; other settings are refused without --overwrite
    mtime = (out / "summary.json").stat().st_mtime_ns
    assert run_probes(tiny_run, cfg) == s and (out / "summary.json").stat().st_mtime_ns == mtime
    with pytest.raises(ProbekdError, match="overwrite"):
        run_probes(tiny_run, ProbeConfig(n_folds=4, l2_grid=[1e-2]))
    assert run_probes(tiny_run, ProbeConfig(n_folds=4, l2_grid=[1e-2]), overwrite=True)["config"]["n_folds"] == 4
    with pytest.raises(ProbekdError, match=r"layers \[7\]"):
        run_probes(tiny_run, ProbeConfig(layers=[7]), overwrite=True)


def test_probe_stage_needs_train_and_labelled_dev(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    from probekd.probes.pipeline import ProbeConfig, run_probes

    shutil.copytree(tiny_run / "teacher" / "train", tmp_path / "teacher" / "train")
    with pytest.raises(ProbekdError, match="'dev'"):
        run_probes(tmp_path, ProbeConfig())


def test_feature_auto_probes_both_states_and_chooses_the_pair_on_dev(tiny_option_run: Path, tmp_path: Path) -> None:
    """`feature: auto` is the last-token and the mean probes side by side (each group fitted as if alone), with the
    (feature, layer) pair chosen on dev, and the targets stage reads the same pair."""
    import json

    from safetensors import safe_open

    from probekd.probes.pipeline import ProbeConfig, load_inputs, run_probes
    from probekd.probes.select import chosen_label
    from probekd.targets import signal_targets

    summaries = {}
    for feature in ("last", "mean", "auto"):
        run = tmp_path / feature
        run.mkdir()
        (run / "teacher").symlink_to(tiny_option_run / "teacher")
        summaries[feature] = run_probes(run, ProbeConfig(feature=feature, n_folds=3, l2_grid=[1e-2, 1.0]))
    s = summaries["auto"]
    assert s["features"] == ["last", "mean"] and s["layers"] == [0, 1, 2]
    assert [(r["feature"], r["layer"]) for r in s["table"]] == [(f, x) for f in ("last", "mean") for x in (0, 1, 2)]
    for r in s["table"]:  # each group as in its own single-feature run
        alone = next(a for a in summaries[r["feature"]]["table"] if a["layer"] == r["layer"])
        assert r["dev_accuracy"] == pytest.approx(alone["dev_accuracy"], abs=1e-6)
        assert r["cv_accuracy"] == pytest.approx(alone["cv_accuracy"], abs=1e-6)
    best = choose_layer(np.array([r["dev_accuracy"] for r in s["table"]]), np.array([r["dev_nll"] for r in s["table"]]))
    assert (s["chosen_feature"], s["chosen_layer"]) == (s["table"][best]["feature"], s["table"][best]["layer"])
    assert chosen_label(s) == f"layer {s['chosen_layer']}, {s['chosen_feature']} state"
    assert chosen_label(summaries["last"]) == f"layer {summaries['last']['chosen_layer']}"
    out = tmp_path / "auto" / "probes"
    dev = np.load(out / "dev.npz")
    assert dev["layer_logits"].shape[0] == 6
    expected = torch.softmax(torch.from_numpy(dev["layer_logits"][best]) / s["temperature"], -1).numpy()
    np.testing.assert_allclose(dev["probs"], expected, atol=1e-6)
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["features"]) == ["last"] * 3 + ["mean"] * 3
        assert f.get_tensor("coef").shape[0] == 6
    # the targets stage fits the same (feature, layer) groups; with every label it makes the probe stage's targets
    cfg = ProbeConfig(feature="auto", n_folds=3, l2_grid=[1e-2, 1.0])
    caches, _, layer_idx = load_inputs(tmp_path / "auto", cfg)
    targets = signal_targets("probe", caches, np.ones(len(caches["train"].ids), bool), cfg, layer_idx)
    assert (targets["dev"].meta["feature"], targets["dev"].meta["layer"]) == (s["chosen_feature"], s["chosen_layer"])
    np.testing.assert_allclose(targets["dev"].probs, dev["probs"], atol=1e-5)


@pytest.mark.parametrize("run_fixture", ["tiny_run", "tiny_option_run"])
def test_probes_fitted_in_passes_equal_one_pass(run_fixture: str, request: pytest.FixtureRequest) -> None:
    """Fitting the groups a few at a time (each pass reading only its layers from disk) gives the probes, logits,
    L2 strengths, layer choice and temperature of one pass over every group: the passes only bound the memory. Equal
    up to the float32 solver's precision: rounding differs with the batch's shape, and a probe may stop one L-BFGS
    iteration earlier or later (logits within 1e-3 here; a group out of place would be off by far more)."""
    from probekd.probes.pipeline import LayerFeatures, ProbeConfig, fit_layers, load_inputs

    run = request.getfixturevalue(run_fixture)
    cfg = ProbeConfig(feature="auto", n_folds=3, l2_grid=[1e-2, 1.0])
    caches, _, layer_idx = load_inputs(run, cfg)
    kmax = max(c.mask.shape[1] for c in caches.values())
    features = LayerFeatures(caches, layer_idx, cfg.feature, kmax)
    y = torch.from_numpy(caches["train"].answers).long()
    y[::4] = -1  # some unlabelled rows: they get the full-data probe
    whole = fit_layers(features, "multinomial" if run_fixture == "tiny_run" else "conditional", cfg, y)
    per_group = features.group_bytes("train")
    for pass_bytes in (per_group, 2 * per_group, 1):  # one group, two groups, less than a group: still one
        parts = fit_layers(features, whole.crossfit.full.kind, cfg, y, pass_bytes=pass_bytes)
        assert parts.best == whole.best and parts.temperature == pytest.approx(whole.temperature, rel=1e-5)
        for split in caches:
            torch.testing.assert_close(parts.layer_logits[split], whole.layer_logits[split], rtol=0, atol=5e-3)
        torch.testing.assert_close(parts.crossfit.full.coef, whole.crossfit.full.coef, rtol=0, atol=5e-3)
        torch.testing.assert_close(parts.crossfit.standardizer.scale, whole.crossfit.standardizer.scale)
        assert torch.equal(parts.crossfit.full_l2, whole.crossfit.full_l2)


def test_feature_auto_on_letter_caches_is_the_single_state(tiny_run: Path, tmp_path: Path) -> None:
    from probekd.probes.pipeline import ProbeConfig, run_probes

    (tmp_path / "teacher").symlink_to(tiny_run / "teacher")
    s = run_probes(tmp_path, ProbeConfig(feature="auto", n_folds=3, l2_grid=[1e-2]))
    assert s["features"] == ["last"] and len(s["table"]) == len(s["layers"]) == 3


def test_probe_stage_computes_then_saves(tiny_run: Path, tmp_path: Path) -> None:
    """`compute_probes` returns the probe stage's results without writing anything; `save_probes` writes exactly
    those (`run_probes` is the two); a rerun finds them up to date."""
    import json

    from probekd.probes.pipeline import ProbeConfig, ProbeResults, compute_probes, run_probes, save_probes

    (tmp_path / "teacher").symlink_to(tiny_run / "teacher")
    cfg = ProbeConfig(n_folds=3, l2_grid=[1e-2, 1e-1])
    res = compute_probes(tmp_path, cfg)
    assert isinstance(res, ProbeResults) and not (tmp_path / "probes").exists()
    assert res.layers == [0, 1, 2] and res.features == ("last",) and res.kind == "multinomial"
    assert (res.chosen_feature, res.chosen_layer) == (res.table[res.best]["feature"], res.table[res.best]["layer"])
    assert res.table[res.best]["dev_accuracy"] == max(r["dev_accuracy"] for r in res.table)
    summary = save_probes(tmp_path, res)
    assert summary == res.summary() and json.loads((tmp_path / "probes" / "summary.json").read_text()) == summary
    assert summary["chosen_layer"] == res.chosen_layer and summary["temperature"] == res.temperature
    assert (tmp_path / "probes" / "layers.csv").read_text().splitlines()[0] == ",".join(res.table[0])
    for split, p in res.splits.items():
        with np.load(tmp_path / "probes" / f"{split}.npz") as z:
            for key in ("probs", "layer_logits", "mask", "answers", "folds"):
                np.testing.assert_array_equal(z[key], getattr(p, key))
            assert z["ids"].tolist() == p.ids
        assert summary["probe_accuracy"][split] == pytest.approx(float((p.probs.argmax(1) == p.answers).mean()))
    mtime = (tmp_path / "probes" / "summary.json").stat().st_mtime_ns
    assert run_probes(tmp_path, cfg) == summary and (tmp_path / "probes" / "summary.json").stat().st_mtime_ns == mtime
