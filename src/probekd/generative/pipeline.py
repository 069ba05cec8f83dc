"""A generative run: distil solutions into a causal student, each problem weighted by the student's pass rate.

`probekd run CONFIG --out RUN` takes this path when the configuration has a `generate:` section. Stages, each
with its artifact, each skipped when the artifact is there (a rerun resumes):

1. **Solutions to learn from** (`generate.source`): `teacher`, the teacher's sampled solutions of the training
   problems (RUN/solutions/teacher/, a rollout cache; with `correct_only`, the first correct one per problem, and
   problems without one are left out); `gold`, the dataset's worked solutions; `self`, self-distillation: the
   student's own rollouts, scored by the frozen initial student that sees the worked solution in its prompt;
   `on_policy`: the student's own rollouts, scored by the teacher (as in GKD).
2. **Pass rates** (per seed): K rollouts of the initial student on every training problem
   (RUN/rollouts/s<seed>/train/), p = share graded correct. Computed once, before training (the paper's default).
3. **Students** (per cell: seed x loss x weighting): weights w(p) (`none`, `paced`, `hard_filter`, normalized
   to mean 1 over the problems; problems of weight 0 are not trained on), token-level distillation
   (`probekd.generative.seq_train`), then greedy pass@1 on dev and test with a bootstrap interval
   (RUN/students/<cell>/metrics.json), the student kept at RUN/students/<cell>/model/ (LoRA merged), and with
   `generate.histogram_problems` K rollouts of it on the first N training problems (the pass rates after).
4. **Report**: RUN/report/report.md and results.csv: pass@1 per cell and its mean over seeds, the initial
   student's pass@1, and the pass-rate histograms before and after training (pass_rates.png).

With `train.weighting.refresh_epochs` (or `warmup_epochs`), the weights are recomputed during training from
fresh rollouts of the student as it is then (RUN/students/<cell>/rollouts/step-<n>/, cached: a resumed run reads
them), every problem with a solution taking part; the on-policy sources (`on_policy`, `self`) then train on those
fresh rollouts too (replayed from their cache on resume). `generate.forgetting`: each student's accuracy on a
multiple-choice task (option likelihoods) before and after, in metrics.json and the report.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from probekd.atomic import atomic_path, write_json, write_text
from probekd.errors import ProbekdError
from probekd.generative.rollouts import RolloutConfig
from probekd.generative.seq_train import SequenceTrainConfig
from probekd.student.heads import StudentConfig
from probekd.weighting import Scheme

log = logging.getLogger(__name__)


class ForgettingConfig(BaseModel):
    """What the student knew before: its accuracy on a multiple-choice task (each option's length-normalized
    log-likelihood after the question), before and after distillation."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field("arc_easy", description="A multiple-choice task (built-in name, folder or hf:<dataset>).")
    split: str = Field("test", description="Its split.")
    limit: int = Field(200, ge=1, description="Its first N questions.")
    max_length: int = Field(96, ge=8, description="Tokens per (question, option) sequence.")


def mc_accuracy(model: Any, tok: Any, cfg: ForgettingConfig, seed: int = 0) -> dict[str, Any]:
    """The causal model's accuracy (bootstrap 95% interval) on `cfg`'s multiple-choice questions, scored by option
    likelihood (`probekd.student.heads`, the causal option student)."""
    from probekd.data import load_task
    from probekd.predict import accuracy, predict_probs
    from probekd.student.heads import StudentConfig, assemble

    splits = load_task(cfg.task).splits
    if cfg.split not in splits:
        raise ProbekdError(f"generate.forgetting: task {cfg.task!r} has no split {cfg.split!r}")
    examples = splits[cfg.split][: cfg.limit]
    scfg = StudentConfig(model="generative student", kind="causal", formulation="option", max_length=cfg.max_length)
    student = assemble(model, tok, scfg, max(ex.k for ex in examples))
    result = accuracy(examples, predict_probs(student, examples), seed)
    return {"task": cfg.task, "split": cfg.split, **(result or {})}


class GenerateConfig(BaseModel):
    """The `generate:` section: what the student learns from, and how its pass rates are estimated."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["teacher", "gold", "on_policy", "self"] = Field(
        "teacher",
        description="`teacher`: the teacher's sampled solutions; `gold`: the dataset's worked solutions, scored by "
        "the teacher; `on_policy`: the student's own rollouts, scored by the teacher (GKD-style); `self`: the "
        "student's own rollouts, scored by the frozen initial student with the worked solution in its prompt "
        "(self-distillation; needs a LoRA student). The two on-policy sources re-sample their solutions at every "
        "refresh of the pass rates (train.weighting.refresh_epochs).",
    )
    correct_only: bool = Field(
        True, description="`teacher`: keep only solutions graded correct (problems without one are left out)."
    )
    teacher_samples: int = Field(1, ge=1, description="`teacher`: solutions sampled per problem (the first kept).")
    privileged: str = Field(
        "A worked solution, for reference:\n{rationale}\n\n",
        description="`self`: the text put before the question's own text (after the prompt's 'Question: ') in the "
        "teacher's prompt; {rationale} is the worked solution.",
    )
    rollouts: RolloutConfig = Field(
        default_factory=RolloutConfig,  # type: ignore[arg-type]
        description="Sampling of the student's K rollouts (pass rates) and of the teacher's solutions.",
    )
    eval_max_new_tokens: int = Field(256, ge=1, description="Longest greedy solution when scoring pass@1.")
    histogram_problems: int | None = Field(
        64,
        ge=1,
        description="Pass-rate histograms before and after training on the first N training problems (K rollouts "
        "of each trained student on them); null: none.",
    )
    forgetting: ForgettingConfig | None = Field(
        default_factory=ForgettingConfig,  # type: ignore[arg-type]
        description="A multiple-choice check of what the student knew before, scored before and after (null: off).",
    )

    @property
    def on_policy(self) -> bool:
        """Whether the solutions are the student's own rollouts (re-sampled at each refresh)."""
        return self.source in ("on_policy", "self")


class GenerativeGrid(BaseModel):
    """The cells: every (seed, loss, weighting)."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[int] = Field([0, 1, 2], min_length=1, description="Seeds: LoRA init, data order, rollouts.")
    losses: list[str] = Field(["fkl"], min_length=1, description="Token divergences, or `first>second` schedules.")
    weightings: list[Scheme] = Field(["none", "paced"], min_length=1, description="none, paced or hard_filter.")
    unweighted_losses: list[str] = Field(
        [], description="Losses of `losses` trained unweighted only: baselines such as akl, not crossed with PACED."
    )

    @field_validator("losses")
    @classmethod
    def _losses(cls, v: list[str]) -> list[str]:
        for loss in v:
            SequenceTrainConfig(loss=loss)
        return v

    @field_validator("weightings")
    @classmethod
    def _pass_rate_weightings(cls, v: list[Scheme]) -> list[Scheme]:
        for scheme, name in (("influence", "the influence weighting (KD-AIF)"), ("ddk", "the ddk domain mixture")):
            if scheme in v:
                raise ValueError(f"{name} is for multiple-choice students; a generative grid weights by pass rates: "
                                 "none, paced or hard_filter")  # fmt: skip
        return v

    @model_validator(mode="after")
    def _unweighted_are_losses(self) -> GenerativeGrid:
        stray = [x for x in self.unweighted_losses if x not in self.losses]
        if stray:
            raise ValueError(f"grid.unweighted_losses {stray} are not in grid.losses {self.losses}")
        if self.unweighted_losses and "none" not in self.weightings:
            raise ValueError("grid.unweighted_losses needs `none` in grid.weightings")
        return self


class GenerativeRunConfig(BaseModel):
    """A generative run (`probekd run` with a `generate:` section)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("generative run", description="A name for the report's title.")
    task: str = Field("arith:steps=1,digits=2", description="A free-form task: gsm8k, aqua_rat, arith:...")
    teacher: str = Field(
        "smollm2-135m-instruct", description="Causal LM sharing the student's tokenizer (ignored for source self)."
    )
    limit: dict[str, int] = Field({}, description="At most this many problems of a split, e.g. {train: 200}.")
    student: StudentConfig = Field(
        default_factory=lambda: StudentConfig(model="smollm2-135m-instruct", kind="causal", lora=True),
        description="The causal student (kind: causal).",
    )
    train: SequenceTrainConfig = Field(default_factory=SequenceTrainConfig)  # type: ignore[arg-type]
    generate: GenerateConfig = Field(default_factory=GenerateConfig)  # type: ignore[arg-type]
    grid: GenerativeGrid = Field(default_factory=GenerativeGrid)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _fits(self) -> GenerativeRunConfig:
        from probekd.generative.problems import is_freeform

        if not is_freeform(self.task):
            raise ValueError(f"task {self.task!r} is not a free-form task (gsm8k, aqua_rat, arith:...)")
        if self.student.kind != "causal":
            raise ValueError("a generative run needs a causal student (student.kind: causal)")
        t = self.train
        on = [f"train.{k}" for k in ("mixup", "hidden_match", "lelp", "min_steps") if getattr(t, k)]
        if on:
            raise ValueError(f"{', '.join(on)} are for multiple-choice students; a generative run does not read "
                             "them: remove them")  # fmt: skip
        w = self.train.weighting
        if w.pass_rate != "exact" or w.samples != 8:
            raise ValueError("train.weighting.pass_rate and samples are for multiple-choice students; a generative "
                             "run's pass rates are generate.rollouts.k graded rollouts: remove them")  # fmt: skip
        if self.generate.source == "self" and not self.student.lora:
            raise ValueError("generate.source self needs student.lora: true (the frozen initial student is the "
                             "student with its adapters disabled)")  # fmt: skip
        if self.generate.on_policy and self.train.alpha == 0:
            raise ValueError(f"generate.source {self.generate.source} with train.alpha 0 would train the student on "
                             "its own samples with no teacher distribution: set alpha > 0")  # fmt: skip
        return self

    def cells(self) -> list[tuple[int, str, str]]:
        """Every (seed, loss, weighting) to train; a loss of `grid.unweighted_losses` only with `none`."""
        g = self.grid
        return [(s, loss, w) for s in g.seeds for loss in g.losses for w in g.weightings
                if w == "none" or loss not in g.unweighted_losses]  # fmt: skip


def cell_name(seed: int, loss: str, weighting: str, source: str) -> str:
    return f"{source}-{loss.replace('>', 'then')}-{weighting}-s{seed}"


def _check_run_dir(run: Path, cfg: GenerativeRunConfig) -> None:
    """Write RUN/config.yaml, or refuse a run folder made with other settings (the grid may change)."""
    from probekd.teacher.cache import differing_fields

    path = run / "config.yaml"
    fields = cfg.model_dump(mode="json")
    if path.exists():
        old = yaml.safe_load(path.read_text())
        # fields added to the schema since (with their defaults) are no difference: the old config is read through
        # the schema first (as written when it no longer validates)
        with contextlib.suppress(ValidationError):
            old = GenerativeRunConfig.model_validate(old).model_dump(mode="json")
        diff = []
        for section in sorted(set(old) | set(fields)):
            a, b = old.get(section), fields.get(section)
            if section in ("grid", "name") or a == b:
                continue
            both = isinstance(a, dict) and isinstance(b, dict)
            diff += [f"{section}.{k}" for k in differing_fields(a, b)] if both else [section]
        if diff:
            raise ProbekdError(f"{run} was made with other settings (differs in: {', '.join(diff)}); use another --out")
    write_text(path, yaml.safe_dump(fields, sort_keys=False))


def _load_causal(name: str, lora: StudentConfig | None = None, seed: int = 0) -> tuple[Any, Any]:
    """A causal LM in float32 and its tokenizer (`load_teacher`), trainable, with LoRA adapters when `lora` asks
    for them (initialized from `seed`), in eval mode."""
    import torch

    from probekd.models import prepare
    from probekd.teacher.extract import load_teacher

    torch.manual_seed(seed)
    loaded = load_teacher(str(prepare(name)), compute_dtype="float32")
    model = loaded.model.requires_grad_(True)  # a student; a teacher is frozen again by the trainer
    if lora is not None and lora.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, target_modules="all-linear", lora_dropout=0.0)
        )
    return model.eval(), loaded.tokenizer


def greedy_pass_at_1(model: Any, tok: Any, problems: list[Any], cfg: GenerateConfig, seed: int = 0) -> dict[str, Any]:
    """Greedy pass@1 with a bootstrap 95% interval, and the per-problem results."""
    from probekd.evaluate import bootstrap_ci
    from probekd.generative.grading import grade
    from probekd.generative.rollouts import encode_prompts, sample_solutions

    rcfg = cfg.rollouts.model_copy(update={"k": 1, "max_new_tokens": cfg.eval_max_new_tokens})
    prompts = encode_prompts(tok, problems, rcfg.prompt)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths together: less padding
    texts: dict[int, str] = {}
    for b in range(0, len(order), rcfg.batch_size):
        idx = order[b : b + rcfg.batch_size]
        for i, sols in zip(
            idx, sample_solutions(model, tok, [prompts[i] for i in idx], rcfg, seed, greedy=True), strict=True
        ):
            texts[i] = sols[0][0]
    right = np.array([grade(texts[i], p.answer or "", p.kind) for i, p in enumerate(problems)], dtype=float)
    mean, lo, hi = bootstrap_ci(right, seed=seed)
    return {"n": len(problems), "pass_at_1": mean, "ci": [lo, hi], "correct": right.astype(int).tolist()}


def _teacher_prompt(cfg: GenerativeRunConfig, problem: Any, tok: Any) -> str:
    prompt = cfg.generate.rollouts.prompt
    if cfg.generate.source != "self":
        return prompt.text(problem, tok)
    if problem.rationale is None:
        raise ProbekdError(f"problem {problem.id!r} has no worked solution for the privileged prompt")
    privileged = cfg.generate.privileged.format(rationale=problem.rationale)
    return prompt.text(dataclasses.replace(problem, question=privileged + problem.question), tok)


def run_generative(cfg: GenerativeRunConfig, run: Path) -> list[dict[str, Any]]:
    """All stages of a generative run into `run` (see the module docstring); returns every cell's metrics."""
    from probekd.generative.problems import load_problems

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    _check_run_dir(run, cfg)
    splits = load_problems(cfg.task).splits
    problems = {s: ps[: cfg.limit[s]] if s in cfg.limit else ps for s, ps in splits.items()}
    teacher, teacher_tok, solutions = _solutions(cfg, run, problems["train"])
    results = []
    for seed in cfg.grid.seeds:
        cells = [c for c in cfg.cells() if c[0] == seed]
        if all(_metrics_path(run, c, cfg).is_file() for c in cells):
            results += [json.loads(_metrics_path(run, c, cfg).read_text()) for c in cells]
            continue
        initial = _initial_student(cfg, run, problems, seed)
        for cell in cells:
            path = _metrics_path(run, cell, cfg)
            if not path.is_file():
                write_json(path, _train_cell(cfg, run, cell, problems, initial, teacher, teacher_tok, solutions))
            results.append(json.loads(path.read_text()))
    write_generative_report(run, cfg, results)
    return results


def _solutions(cfg: GenerativeRunConfig, run: Path, train: list[Any]) -> tuple[Any, Any, dict[str, str]]:
    """The teacher model and tokenizer (None for self-distillation) and the solutions to learn from by problem id
    (empty for the on-policy sources: the student's own rollouts come per seed)."""
    from probekd.generative.rollouts import run_rollouts
    from probekd.generative.seq_train import check_shared_vocabulary

    if cfg.generate.source == "self":
        return None, None, {}
    teacher, teacher_tok = _load_causal(cfg.teacher)
    if cfg.train.alpha > 0:  # token-level distillation compares distributions over one vocabulary
        check_shared_vocabulary(_tokenizer(cfg.student.model), teacher_tok, cfg.student.model, cfg.teacher)
    if cfg.generate.source == "on_policy":
        return teacher, teacher_tok, {}
    if cfg.generate.source == "gold":
        return teacher, teacher_tok, {p.id: p.rationale for p in train if p.rationale}
    tcfg = cfg.generate.rollouts.model_copy(update={"k": cfg.generate.teacher_samples})
    sampled = run_rollouts(teacher, teacher_tok, train, tcfg, run / "solutions" / "teacher", model_id=cfg.teacher)
    solutions = {}
    for pid, rs in zip(sampled.ids, sampled.rollouts, strict=True):
        keep = [r for r in rs if r.correct] if cfg.generate.correct_only else rs
        if keep:
            solutions[pid] = keep[0].text
    log.info("teacher solutions for %d of %d training problems%s", len(solutions), len(train),
             " (graded correct)" if cfg.generate.correct_only else "")  # fmt: skip
    return teacher, teacher_tok, solutions


def _initial_student(cfg: GenerativeRunConfig, run: Path, problems: dict[str, list[Any]], seed: int) -> dict[str, Any]:
    """What the untrained student does (per seed): its rollouts on train (the pass rates and, for `self`, the
    solutions) and its greedy pass@1 on test, each cached."""
    from probekd.generative.rollouts import run_rollouts

    model, tok = _load_causal(cfg.student.model, cfg.student, seed)
    rcfg = cfg.generate.rollouts.model_copy(update={"seed": cfg.generate.rollouts.seed + seed})
    folder = run / "rollouts" / f"s{seed}"
    ro = run_rollouts(model, tok, problems["train"], rcfg, folder / "train", model_id=f"{cfg.student.model} (initial)")
    test_path, mc_path = folder / "initial_test.json", folder / "initial_forgetting.json"
    if not test_path.is_file():
        write_json(test_path, greedy_pass_at_1(model, tok, problems["test"], cfg.generate, seed))
    if cfg.generate.forgetting is not None and not mc_path.is_file():
        write_json(mc_path, mc_accuracy(model, tok, cfg.generate.forgetting, seed))
    return {
        "pass_rates": ro.pass_rates,
        "own": {pid: rs[0].text for pid, rs in zip(ro.ids, ro.rollouts, strict=True)},
        "test": json.loads(test_path.read_text()),
        "forgetting": json.loads(mc_path.read_text()) if cfg.generate.forgetting is not None else None,
    }


def _train_cell(
    cfg: GenerativeRunConfig,
    run: Path,
    cell: tuple[int, str, str],
    problems: dict[str, list[Any]],
    initial: dict[str, Any],
    teacher: Any,
    teacher_tok: Any,
    solutions: dict[str, str],
) -> dict[str, Any]:
    """Train one cell's student from the initial one, score it, keep it; returns its metrics."""
    from probekd.generative.pass_rate_weights import RolloutPassRateWeights
    from probekd.generative.rollouts import run_rollouts
    from probekd.generative.seq_train import SequenceRows, distill_sequences
    from probekd.weighting import normalize, scheme_weights

    seed, loss, weighting = cell
    name = cell_name(seed, loss, weighting, cfg.generate.source)
    log.info("generative cell %s", name)
    t0 = time.perf_counter()
    train, p = problems["train"], initial["pass_rates"]
    model, tok = _load_causal(cfg.student.model, cfg.student, seed)  # the initial student (same LoRA init)
    wcfg = cfg.train.weighting.model_copy(update={"scheme": weighting})
    # refreshed (or warmed-up) weights can bring back a problem whose first weight is 0: all problems take part
    dynamic = weighting != "none" and (wcfg.refresh_epochs > 0 or wcfg.warmup_epochs > 0)
    resample = cfg.generate.on_policy and wcfg.refresh_epochs > 0  # fresh own rollouts become the solutions
    raw = scheme_weights(wcfg, p)
    source = initial["own"] if cfg.generate.on_policy else solutions
    # (an empty solution, e.g. a rollout that ended at once, has nothing to distil)
    keep = [i for i, pr in enumerate(train) if (dynamic or raw[i] > 0) and source.get(pr.id, "").strip()]
    first = np.ones(len(keep)) if wcfg.warmup_epochs > 0 else raw[keep]
    keep = keep if first.sum() > 0 else []
    base = {"cell": name, "seed": seed, "loss": loss, "weighting": weighting, "source": cfg.generate.source,
            "trained_problems": len(keep), "train_problems": len(train),
            "pass_rates": {"mean": float(p.mean()), "never": float((p == 0).mean()), "always": float((p == 1).mean())},
            "initial_test": {k: initial["test"][k] for k in ("pass_at_1", "ci", "n")}}  # fmt: skip
    if not keep:  # e.g. PACED when the student solves every problem always or never: nothing to train on
        reason = "no training problem has both a solution and a nonzero weight"
        log.warning("cell %s skipped: %s", name, reason)
        return {**base, "skipped": reason}
    prompt = cfg.generate.rollouts.prompt
    own_template = teacher_tok is None or cfg.train.alpha == 0  # self-distillation, or alpha 0 (teacher prompt unused)
    rows = SequenceRows(
        tok,
        [prompt.text(train[i], tok) for i in keep],
        [_teacher_prompt(cfg, train[i], tok if own_template else teacher_tok) for i in keep],
        [source[train[i].id] for i in keep],
        normalize(first).tolist(),
        prompt_special_tokens=prompt.resolved_style(tok) == "plain",  # a chat template brings its own
    )
    folder = run / "students" / name
    teacher = teacher if cfg.train.alpha > 0 else None  # alpha 0: cross-entropy on the solutions only
    weigher = None
    rcfg = cfg.generate.rollouts
    if dynamic or resample:
        problems_kept = [train[i] for i in keep]

        def pass_rates(m: Any, step: int) -> np.ndarray:
            if step == 0:  # the initial student's, already sampled
                return p[keep]
            ro = run_rollouts(m, tok, problems_kept, rcfg.model_copy(update={"seed": rcfg.seed + seed + step}),
                              folder / "rollouts" / f"step-{step}", model_id=f"{name} at step {step}")  # fmt: skip
            if resample:  # a problem whose new first rollout is empty keeps its previous solution
                for j, rs in enumerate(ro.rollouts):
                    if rs[0].text.strip():
                        rows.replace_solution(j, rs[0].text)
            return ro.pass_rates

        weigher = RolloutPassRateWeights(rows.rows, pass_rates, wcfg, math.ceil(len(rows) / cfg.train.batch_size),
                                         seed, replay_on_resume=resample)  # fmt: skip
    history = distill_sequences(model, teacher, rows, cfg.train.model_copy(update={"loss": loss}),
                                folder / "checkpoints", seed, description=name,
                                callbacks=[weigher] if weigher else None)  # fmt: skip
    model.eval()
    metrics = {
        **base,
        "dev": greedy_pass_at_1(model, tok, problems["dev"], cfg.generate, seed),
        "test": greedy_pass_at_1(model, tok, problems["test"], cfg.generate, seed),
        "final_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
        "weighting_stats": weigher.stats if weigher else [],
    }  # fmt: skip
    if cfg.generate.forgetting is not None:
        metrics["forgetting"] = {"before": initial["forgetting"],
                                 "after": mc_accuracy(model, tok, cfg.generate.forgetting, seed)}  # fmt: skip
    if cfg.generate.histogram_problems is not None:
        n = min(cfg.generate.histogram_problems, len(train))
        after = run_rollouts(model, tok, train[:n], rcfg.model_copy(update={"seed": rcfg.seed + seed}),
                             folder / "rollouts" / "after", model_id=f"{name} (trained)").pass_rates  # fmt: skip
        metrics["pass_rate_histogram"] = {"problems": n, "k": rcfg.k, "before": solved_counts(p[:n], rcfg.k),
                                          "after": solved_counts(after, rcfg.k)}  # fmt: skip
    _keep_model(model, tok, folder / "model")
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    return metrics


def solved_counts(pass_rates: np.ndarray, k: int) -> list[int]:
    """How many problems have 0, 1, ..., k of their k rollouts graded correct (the pass-rate histogram)."""
    return np.bincount(np.rint(np.asarray(pass_rates) * k).astype(int), minlength=k + 1).tolist()


def _tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    from probekd.models import prepare

    return AutoTokenizer.from_pretrained(str(prepare(name)))


def _metrics_path(run: Path, cell: tuple[int, str, str], cfg: GenerativeRunConfig) -> Path:
    return run / "students" / cell_name(*cell, cfg.generate.source) / "metrics.json"


def _keep_model(model: Any, tok: Any, folder: Path) -> None:
    """The trained student as a plain causal-LM folder (LoRA merged), written atomically."""
    plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    with atomic_path(folder) as tmp:
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))


def write_generative_report(run: Path, cfg: GenerativeRunConfig, results: list[dict[str, Any]]) -> Path:
    """RUN/report/report.md (pass@1 per cell, means over seeds) and RUN/report/results.csv."""
    from probekd.evaluate import mean_ci

    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    fields = ["cell", "source", "loss", "weighting", "seed", "test_pass_at_1", "test_ci_low", "test_ci_high",
              "dev_pass_at_1", "initial_test_pass_at_1", "trained_problems", "mean_pass_rate", "seconds",
              "mc_before", "mc_after"]  # fmt: skip
    rows = [{"cell": r["cell"], "source": r["source"], "loss": r["loss"], "weighting": r["weighting"],
             "seed": r["seed"], "test_pass_at_1": r["test"]["pass_at_1"], "test_ci_low": r["test"]["ci"][0],
             "test_ci_high": r["test"]["ci"][1], "dev_pass_at_1": r["dev"]["pass_at_1"],
             "initial_test_pass_at_1": r["initial_test"]["pass_at_1"], "trained_problems": r["trained_problems"],
             "mean_pass_rate": r["pass_rates"]["mean"], "seconds": r["seconds"],
             "mc_before": (r.get("forgetting") or {}).get("before", {}).get("accuracy"),
             "mc_after": (r.get("forgetting") or {}).get("after", {}).get("accuracy")}
            for r in results if "skipped" not in r]  # fmt: skip
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "results.csv", buf.getvalue())
    teacher = f", teacher `{cfg.teacher}`" if cfg.generate.source != "self" else ""
    fc = cfg.generate.forgetting
    mc_header = f"{fc.task} {fc.split}[:{fc.limit}] before -> after" if fc is not None else "forgetting check"
    lines = [
        f"# {cfg.name}",
        "",
        f"Task `{cfg.task}`, student `{cfg.student.model}` (LoRA: {cfg.student.lora}), source "
        f"`{cfg.generate.source}`{teacher}; {cfg.generate.rollouts.k} rollouts per problem for the pass rates. "
        "Greedy pass@1.",
        "",
        "| cell | test pass@1 [95% CI] | dev | initial student (test) | problems trained | " + mc_header + " |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['cell']} | skipped: {r['skipped']} | | {r['initial_test']['pass_at_1']:.3f} | 0 | |")
    for r in rows:
        ci = f"[{r['test_ci_low']:.3f}, {r['test_ci_high']:.3f}]"
        mc = f"{r['mc_before']:.3f} -> {r['mc_after']:.3f}" if r["mc_after"] is not None else "-"
        lines.append(f"| {r['cell']} | {r['test_pass_at_1']:.3f} {ci} | {r['dev_pass_at_1']:.3f} | "
                     f"{r['initial_test_pass_at_1']:.3f} | {r['trained_problems']} | {mc} |")  # fmt: skip
    lines += [
        "",
        "Mean over seeds (95% t-interval):",
        "",
        "| loss | weighting | test pass@1 | seeds |",
        "|---|---|---|---|",
    ]
    for loss in cfg.grid.losses:
        for w in cfg.grid.weightings:
            vals = [r["test_pass_at_1"] for r in rows if r["loss"] == loss and r["weighting"] == w]
            if vals:
                m, half = mean_ci(vals)
                lines.append(f"| {loss} | {w} | {m:.3f} ± {half:.3f} | {len(vals)} |")
    lines += comparison_lines(cfg, results)
    lines += _histogram_lines(out, cfg, results)
    write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def comparison_lines(cfg: GenerativeRunConfig, results: list[dict[str, Any]]) -> list[str]:
    """Report lines: each weighting against the unweighted student of its loss, and each loss (unweighted) against
    the first loss of the grid (unweighted), test pass@1 paired by seed: the mean difference with a t-interval over
    seeds and a paired bootstrap over test problems of the seed-averaged correctness, and the verdict (the
    multiple-choice report's rule: every available interval must exclude 0)."""
    from probekd.evaluate import bootstrap_ci, mean_ci
    from probekd.report.report import verdict

    by = {(r["loss"], r["weighting"], r["seed"]): r for r in results if "skipped" not in r}
    first = cfg.grid.losses[0]
    pairs = [((loss, w), (loss, "none")) for loss in cfg.grid.losses for w in cfg.grid.weightings if w != "none"]
    pairs += [((loss, "none"), (first, "none")) for loss in cfg.grid.losses[1:]]
    rows = []
    for a, b in pairs:
        seeds = sorted(s for s in cfg.grid.seeds if (*a, s) in by and (*b, s) in by)
        if not seeds:
            continue
        diffs = [by[(*a, s)]["test"]["pass_at_1"] - by[(*b, s)]["test"]["pass_at_1"] for s in seeds]
        mean, half = mean_ci(diffs)
        per = np.mean([np.subtract(by[(*a, s)]["test"]["correct"], by[(*b, s)]["test"]["correct"]) for s in seeds], 0)
        _, lo, hi = bootstrap_ci(per)
        intervals = ([(mean - half, mean + half)] if half == half else []) + [(lo, hi)]
        t = f" ± {half:.3f}" if half == half else ""
        rows.append(f"| {a[0]}, {a[1]} | {b[0]}, {b[1]} | {mean:+.3f}{t} | [{lo:+.3f}, {hi:+.3f}] | {len(seeds)} | "
                    f"{verdict(intervals)} |")  # fmt: skip
    if not rows:
        return []
    head = ("Comparisons, test pass@1 paired by seed (difference ± 95% t-interval over seeds; paired bootstrap "
            "over test problems of the seed-averaged correctness):")  # fmt: skip
    return ["", head, "", "| student | against | difference | bootstrap | seeds | verdict |",
            "|---|---|---|---|---|---|", *rows]  # fmt: skip


def _histogram_lines(out: Path, cfg: GenerativeRunConfig, results: list[dict[str, Any]]) -> list[str]:
    """Report lines (and RUN/report/pass_rates.png where matplotlib is there): per (loss, weighting), the pass-rate
    histograms of its students before and after training, each summed over the same seeds."""
    from probekd.report.plots import plot_pass_rate_histograms, plots_available

    hists = [r for r in results if "pass_rate_histogram" in r]
    if not hists:
        return []
    h0 = hists[0]["pass_rate_histogram"]
    k, n = h0["k"], h0["problems"]
    before: dict[str, list[int]] = {}
    after: dict[str, list[int]] = {}
    for r in hists:
        key, h = f"{r['loss']}, {r['weighting']}", r["pass_rate_histogram"]
        before[key] = np.add(before.get(key, [0] * (k + 1)), h["before"]).tolist()
        after[key] = np.add(after.get(key, [0] * (k + 1)), h["after"]).tolist()

    def mean_rate(counts: list[int]) -> float:
        return float(np.dot(counts, np.arange(k + 1)) / (k * max(1, sum(counts))))

    head = (
        f"Pass rates on the first {n} training problems ({k} rollouts each, drawn with the initial rollouts' "
        f"sampling seed): problems with 0, 1, ..., {k} rollouts correct, summed over each variant's seeds."
    )
    lines = ["", head, "", "| student | before (j = 0..k) | after | mean pass rate before -> after |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {key} | {' '.join(map(str, before[key]))} | {' '.join(map(str, c))} | "
              f"{mean_rate(before[key]):.3f} -> {mean_rate(c):.3f} |" for key, c in after.items()]  # fmt: skip
    if plots_available():
        initial = {r["seed"]: r["pass_rate_histogram"]["before"] for r in hists}  # one per seed
        plot_pass_rate_histograms(out / "pass_rates.png", k, np.sum(list(initial.values()), axis=0).tolist(), after,
                                  title=f"{cfg.name}: pass rates before and after training")  # fmt: skip
        lines += ["", "![pass rates before and after](pass_rates.png)"]
    return lines
