"""LELP (`train.lelp`): the per-row term is the joint (option x subclass) KL minus the option KL (checked against
torch's `kl_div` on the joint), the classifier direction is recovered and removed, the subclasses follow scikit-learn's
principal directions of what is left, and the trainer adds the term through a head that is trained and removed
before the student is saved; in a grid, the subclasses come from the cell's probe targets and layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.decomposition import PCA

from probekd.config import Cell, load_config
from probekd.errors import ProbekdError
from probekd.experiment import _probe_layer_states, lelp_subclasses, run_experiment
from probekd.student import lelp
from probekd.student.heads import StudentConfig, biencoder_embeddings, biencoder_scores, build_student
from probekd.student.train import Rows, distill_loss, make_trainer, train_student
from probekd.student.train_config import TrainConfig
from probekd.targets import SoftTargets
from probekd.teacher.cache import load_cache
from test_experiment import tiny_config
from test_student import mammal_task, rows_for


def _random_mask(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Options present left to right, 2..k per row."""
    counts = rng.integers(2, k + 1, size=n)
    return np.arange(k)[None] < counts[:, None]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), s2=st.sampled_from([2, 4, 6]))
def test_the_term_is_the_joint_kl_minus_the_option_kl(seed: int, s2: int) -> None:
    """sum_k p_k KL(q_k || h_k) = KL(p x q || softmax(s) x h) - KL(p || softmax(s)), the joint KL by torch."""
    rng = np.random.default_rng(seed)
    b, k = 5, 4
    mask = torch.from_numpy(_random_mask(rng, b, k))
    p = torch.from_numpy(rng.dirichlet(np.ones(k), size=b)).float() * mask
    p = p / p.sum(1, keepdim=True)
    q = torch.from_numpy(rng.dirichlet(np.ones(s2), size=(b, k))).float()
    head = torch.from_numpy(rng.normal(size=(b, k, s2))).float()
    s = torch.from_numpy(rng.normal(size=(b, k))).float().masked_fill(~mask, float("-inf"))
    logp_s = torch.log_softmax(s, -1)
    joint_t = (p[..., None] * q).reshape(b, -1)
    joint_s = (logp_s[..., None] + torch.log_softmax(head, -1)).reshape(b, -1)
    keep = joint_t > 0  # absent options: no teacher mass (and -inf student log-probabilities)
    joint_kl = torch.stack([torch.nn.functional.kl_div(joint_s[i][keep[i]], joint_t[i][keep[i]], reduction="sum")
                            for i in range(b)])  # fmt: skip
    option_kl = torch.stack([torch.nn.functional.kl_div(logp_s[i][mask[i]], p[i][mask[i]], reduction="sum")
                             for i in range(b)])  # fmt: skip
    got = lelp.subclass_loss(head, q, p, mask)
    torch.testing.assert_close(got, joint_kl - option_kl, rtol=1e-4, atol=1e-5)
    assert (lelp.subclass_loss(torch.log(q), q, p, mask).abs() < 1e-5).all()  # the head reproduces q: zero


def _planted(rng: np.random.Generator, n: int = 300, k: int = 4, h: int = 8) -> tuple[np.ndarray, ...]:
    """States whose logits follow w* (plus a per-question constant), with one large direction e1 outside w* that
    varies between a question's options, and a larger one, e3, shared by all options of a question."""
    mask = _random_mask(rng, n, k)
    scale = np.ones(h)
    scale[1] = 6.0  # e1: the widest direction of what tells options apart once w* is taken out
    states = rng.normal(size=(n, k, h)) * scale
    states[..., 3] += rng.normal(size=(n, 1)) * 20.0  # e3: the question, the same for its options
    w = np.zeros(h)
    w[0], w[2] = 3.0, 4.0  # the classifier: (0.6, 0, 0.8, 0...) once normalized
    logits = states @ w + rng.normal(size=(n, 1)) * 5  # a question's logits up to a constant
    return states, mask, logits, w / np.linalg.norm(w)


def test_the_classifier_direction_is_recovered_and_removed() -> None:
    rng = np.random.default_rng(0)
    states, mask, logits, w = _planted(rng)
    u = lelp.classifier_direction(states, mask, logits)
    assert abs(float(u @ w)) > 0.999
    with pytest.raises(ValueError, match="constant within every question"):
        lelp.classifier_direction(states, mask, np.repeat(rng.normal(size=(len(mask), 1)), 4, 1))


def test_subclasses_split_along_sklearns_principal_directions_outside_the_classifier() -> None:
    """q = softmax over (+a, -a) / T of the standardized projections on the top principal directions of the states
    with the classifier's direction removed and centred within each question (scikit-learn's PCA of those residuals,
    up to each direction's sign): the planted option-level direction comes first, the larger question-level one is
    not picked; rows are distributions over 2S subclasses, absent options are 0, a lower temperature is sharper."""
    rng = np.random.default_rng(1)
    states, mask, logits, _ = _planted(rng)
    q = lelp.subclass_targets(states, mask, logits, directions=2, temperature=1.0)
    assert q.shape == (*mask.shape, 4) and q.dtype == np.float32
    np.testing.assert_allclose(q[mask].sum(-1), 1.0, atol=1e-5)
    assert (q[~mask] == 0).all()
    u = lelp.classifier_direction(states, mask, logits)
    r = states - (states @ u)[..., None] * u
    assert abs(PCA(n_components=1).fit(r[mask]).components_[0][3]) > 0.99  # uncentred, the question's e3 would win
    r = (r - (r * mask[..., None]).sum(1, keepdims=True) / mask.sum(1)[:, None, None]) * mask[..., None]
    pca = PCA(n_components=2).fit(r[mask])
    # sklearn centres over the rows (their mean is 0 here already) and scales by n - 1: back to the population sd
    a = pca.transform(r[mask]) / np.sqrt(pca.explained_variance_ * (mask.sum() - 1) / mask.sum())
    assert abs(pca.components_[0][1]) > 0.99  # centred within questions, the option-level e1 comes first
    # q's log-odds between the two half-axes of direction s are 2 a_s / T: equal to sklearn's up to the sign
    log_odds = np.log(q[mask][:, :2]) - np.log(q[mask][:, 2:])
    for d in range(2):
        sign = np.sign(np.dot(log_odds[:, d], a[:, d]))
        np.testing.assert_allclose(log_odds[:, d], sign * 2 * a[:, d], rtol=1e-3, atol=1e-3)
    sharp = lelp.subclass_targets(states, mask, logits, directions=2, temperature=0.25)
    assert np.abs(np.log(sharp[mask][:, :2] / sharp[mask][:, 2:])).mean() > 3.9 * np.abs(log_odds).mean()
    with pytest.raises(ValueError, match="at least one direction"):
        lelp.subclass_targets(states, mask, logits, directions=0)


def test_trainer_adds_the_subclass_term_and_saves_the_plain_encoder(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The trainer's loss is mean_i [distill_i + lelp x term_i] with the head's logits on the option embeddings (by
    hand); evaluation adds nothing; training moves the head; the trained student has no head left; the term needs a
    bi-encoder and rows with subclass targets."""
    exs = mammal_task(8) + mammal_task(4, k=3, seed=5)  # some 3-option rows: batches narrower than the run's K
    student = build_student(StudentConfig(model=str(tiny_bert_dir), head="biencoder"), k=4, seed=0)
    plain = rows_for(student, exs, 4)
    m = np.stack([r["option_mask"].numpy() for r in plain.rows])
    soft = np.stack([r["targets"].numpy() for r in plain.rows])
    y = np.array([r["labels"] for r in plain.rows])
    q = np.random.default_rng(0).dirichlet(np.ones(6), size=(12, 4)).astype(np.float32) * m[..., None]
    rows = Rows([student.encode(e) for e in exs], m, y, soft, subclass_targets=q)
    batch = student.collate([rows[i] for i in range(len(rows))])
    three = student.collate([rows[i] for i in range(8, 12)])  # a batch of 3-option rows only
    assert three["option_ids"].shape[1] == 3 and three["subclass_targets"].shape[1] == 4
    cfg = TrainConfig(alpha=0.5, temperature=2.0, lelp=0.7)
    trainer = make_trainer(student, rows, None, cfg, tmp_path / "t", 0)
    head = getattr(student.model, lelp.HEAD)
    assert (head.in_features, head.out_features) == (student.model.config.hidden_size, 6)
    student.model.train()
    with torch.no_grad():
        got = float(trainer.compute_loss(student.model, dict(batch)))
        qe, o = biencoder_embeddings(student.model, batch["input_ids"], batch["attention_mask"], batch["option_ids"],
                                     batch["option_attention"])  # fmt: skip
        logits = biencoder_scores(student.model, qe, o, batch["option_mask"])
        per = distill_loss(logits, batch["targets"], batch["labels"], batch["option_mask"], alpha=0.5, temperature=2.0)
        term = lelp.subclass_loss(head(o), batch["subclass_targets"], batch["targets"], batch["option_mask"])
        assert float(term.mean()) > 0
        assert got == pytest.approx(float((per + 0.7 * term).mean()), rel=1e-5)
        qe, o = biencoder_embeddings(student.model, three["input_ids"], three["attention_mask"],
                                     three["option_ids"], three["option_attention"])  # fmt: skip
        per3 = distill_loss(biencoder_scores(student.model, qe, o, three["option_mask"]), three["targets"],
                            three["labels"], three["option_mask"], alpha=0.5, temperature=2.0)  # fmt: skip
        term3 = lelp.subclass_loss(head(o), three["subclass_targets"][:, :3], three["targets"][:, :3],
                                   three["option_mask"][:, :3])  # fmt: skip
        got3 = float(trainer.compute_loss(student.model, dict(three)))
        assert got3 == pytest.approx(float((per3 + 0.7 * term3).mean()), rel=1e-5)
        student.model.eval()
        assert float(trainer.compute_loss(student.model, dict(batch))) == pytest.approx(float(per.mean()), rel=1e-5)
    cfg = TrainConfig(epochs=2, learning_rate=1e-2, batch_size=4, lelp=1.0)
    before = head.weight.detach().clone()
    make_trainer(student, rows, None, cfg, tmp_path / "steps", 0).train()
    assert not torch.allclose(getattr(student.model, lelp.HEAD).weight, before)  # the head is trained
    train_student(student, rows, rows_for(student, mammal_task(8, seed=1), 4), cfg, tmp_path / "ck", 0)
    assert all(lelp.HEAD not in n for n, _ in student.model.named_parameters())  # the deployed student is plain
    cross = build_student(StudentConfig(model=str(tiny_bert_dir), head="cross"), k=4, seed=0)
    with pytest.raises(ProbekdError, match="train.lelp works on the bi-encoder's embeddings"):
        make_trainer(cross, rows_for(cross, exs, 4), None, TrainConfig(lelp=1.0), tmp_path / "cross", 0)
    with pytest.raises(ProbekdError, match="train.lelp needs the pseudo-subclass targets in the training rows"):
        make_trainer(student, plain, None, TrainConfig(lelp=1.0), tmp_path / "none", 0)


def test_a_grid_cell_takes_its_subclasses_from_its_own_probe(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """`train.lelp` in a run: the subclasses of a cell's rows are those of the states at its own probe's layer and
    its probe's logits (the cell's labels only); the kept student has no head; a grid without the probe signal is
    refused naming the missing targets file."""
    base = tiny_config(tiny_llama_dir, tiny_bert_dir, fractions=[0.5], seeds=[0], signals=["hard", "probe"])
    base["train"] |= {"lelp": 1.0, "lelp_directions": 2}
    run = tmp_path / "lelp"
    results = run_experiment(load_config(None, base=base), run)
    assert sorted(r["cell"] for r in results) == ["hard-f0.5-s0", "probe-f0.5-s0"]
    cell = Cell("hard", 0.5, 0)
    kmax = max(load_cache(run / "teacher" / s).mask.shape[1] for s in ("train", "dev", "test"))
    states, cache = _probe_layer_states(run, kmax, cell, "lelp")
    mask = cache.padded_mask(kmax)
    probs = SoftTargets.load(run / "targets" / "probe-f0.5-s0.npz").align(cache.ids, mask)
    want = lelp.subclass_targets(states, mask, np.log(np.clip(probs, 1e-8, None)), 2)
    rows = np.array([5, 1, 9])
    np.testing.assert_array_equal(lelp_subclasses(run, rows, kmax, cell, 2, 1.0), want[rows])
    # the training rows prepare_cell hands the trainer carry the subclasses of their own questions
    from probekd.experiment import examples_by_id, prepare_cell
    from probekd.layout import load_answers

    cfg = load_config(None, base=base)
    _, train_rows, _, info = prepare_cell(run, cfg, cell, load_answers(run), examples_by_id(cfg, ("train", "dev")))
    hard_ids = set(SoftTargets.load(run / "targets" / "hard-f0.5-s0.npz").ids)  # the cell's labelled questions
    labelled = [i for i, x in enumerate(cache.ids) if x in hard_ids]
    assert len(train_rows) == len(labelled) == info["n_labelled"]
    got = np.stack([r["subclass_targets"].numpy() for r in train_rows.rows])
    np.testing.assert_array_equal(got, want[labelled])
    from safetensors import safe_open

    for f in (run / "students" / "probe-f0.5-s0" / "model").glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            assert not [k for k in sf.keys() if lelp.HEAD in k]  # noqa: SIM118
    base["grid"]["signals"] = ["hard"]
    with pytest.raises(ProbekdError, match=r"probe targets of this cell's labels .*probe-f0.5-s0.npz"):
        run_experiment(load_config(None, base=base), tmp_path / "no-probe")
