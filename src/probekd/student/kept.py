"""The kept student: what a user takes away from a run, as a standard Hugging Face folder.

    MODEL_DIR/config.json, model.safetensors   `AutoModelForMultipleChoice` (cross-encoder), `AutoModel` (bi-encoder;
                                                its learned scale `probekd_logit_scale` is a tensor of the weights
                                                file) or `AutoModelForCausalLM` (causal; LoRA merged) loads it
    MODEL_DIR/modules.json, 1_Pooling/, ...    bi-encoder only: the sentence-transformers files (mean pooling,
                                                normalized), so `SentenceTransformer(MODEL_DIR)` embeds with it
    MODEL_DIR/tokenizer files                  `AutoTokenizer` loads them
    MODEL_DIR/adapter/                         LoRA students only: the adapter alone, a `peft` folder
    MODEL_DIR/probekd.json                     how to ask it (`KeptManifest`): kind, formulation, prompt template,
                                               number of options, and how it was made and how well it does
    MODEL_DIR/README.md                        the model card

The folder is written aside and renamed into place (`probekd.atomic`), so a kill while saving never leaves a
folder that looks complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from probekd.atomic import atomic_path, write_text
from probekd.data.prompts import PromptTemplate
from probekd.errors import ProbekdError
from probekd.student.heads import LOGIT_SCALE, Student, StudentConfig, assemble, load_hf_model, recorded_student

MANIFEST = "probekd.json"
FORMAT_VERSION = 1


class KeptMetrics(BaseModel):
    """How well the kept student does, and its teacher and probe on the same test questions."""

    test_accuracy: float | None = None
    test_accuracy_ci: list[float] | None = Field(None, description="Bootstrap 95% interval over test questions.")
    n_test: int | None = None
    dev_accuracy: float | None = Field(None, description="Best dev accuracy over its epochs (the one kept).")
    teacher_test_accuracy: float | None = Field(None, description="The teacher's own answer on the same questions.")
    probe_test_accuracy: float | None = Field(None, description="The chosen probe on the same questions.")


class KeptManifest(BaseModel):
    """`probekd.json`: everything needed to ask the student a question, and its provenance."""

    model_config = ConfigDict(extra="allow")

    format: int = Field(FORMAT_VERSION, description="Version of this file's layout.")
    probekd_version: str = ""
    student: StudentConfig = Field(description="Kind, formulation, max_length, base model, LoRA settings.")
    template: PromptTemplate | None = Field(None, description="The prompt template of a causal student.")
    num_options: int = Field(ge=2, description="Options per question it was trained for (at most).")
    eval_batch_size: int = Field(32, ge=1, description="Questions per forward pass in its evaluation.")
    task: str = ""
    cell: str = Field("", description="The grid cell it comes from.")
    run_name: str = ""
    signal: str = Field("", description="What it was trained on: hard, smoothed, teacher, teacher_calibrated, probe.")
    teacher: str = ""
    teacher_formulation: str = ""
    probe: str | None = Field(None, description="The probe's layer and state (`layer 17`), if probes were fitted.")
    fraction: float | None = None
    seed: int | None = None
    loss: str = "fkl"
    weighting: str = "none"
    selection: str = Field("random", description="How its labelled training questions were chosen (random, pcoreset).")
    n_labelled: int | None = Field(None, description="Labelled training questions it used.")
    n_dev: int | None = Field(None, description="Labelled dev questions used for choosing its epoch.")
    metrics: KeptMetrics = Field(default_factory=KeptMetrics)  # type: ignore[arg-type]
    exported: dict[str, Any] | None = Field(None, description="Set by `probekd export`: which cell and why.")

    @field_validator("student", mode="before")
    @classmethod
    def _recorded(cls, v: Any) -> Any:
        return recorded_student(v) if isinstance(v, dict) else v


def save_kept(student: Student, folder: Path, manifest: KeptManifest, adapter_dir: Path | None = None) -> Path:
    """Write `student` (LoRA already merged, see `Student.merge_lora`) as a kept-student folder at `folder`, with
    `manifest` and a model card; `adapter_dir` (the LoRA adapter saved before merging) is moved in as `adapter/`."""
    if hasattr(student.model, "merge_and_unload"):
        raise ProbekdError("merge the LoRA adapters first (Student.merge_lora): the kept folder holds plain weights")
    with atomic_path(Path(folder)) as tmp:
        student.model.save_pretrained(str(tmp))
        student.tokenizer.save_pretrained(str(tmp))
        if manifest.student.kind == "encoder" and manifest.student.head == "biencoder":
            _write_sentence_transformers_files(tmp, student.model.config.hidden_size, manifest.student.max_length)
        if adapter_dir is not None and Path(adapter_dir).is_dir():
            shutil.move(str(adapter_dir), str(tmp / "adapter"))
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(manifest), encoding="utf-8")
    return Path(folder)


def _write_sentence_transformers_files(folder: Path, hidden_size: int, max_length: int) -> None:
    """The module list of a sentence-transformers model (transformer, mean pooling, normalization): the bi-encoder
    embeds exactly this way, so `SentenceTransformer(folder).encode(texts)` gives its embeddings (the cosine of two
    of them times exp(`probekd_logit_scale`) is its score). Plain JSON: sentence-transformers is not needed here."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_length, "do_lower_case": False}, indent=2) + "\n", encoding="utf-8"
    )
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n", encoding="utf-8")
    (folder / "2_Normalize").mkdir()


# How to score with a kept bi-encoder with transformers alone (the model card shows it; a test runs it).
BIENCODER_SNIPPET = """\
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

folder = "THIS_FOLDER"
tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
scale = load_file(f"{folder}/model.safetensors")["probekd_logit_scale"].exp()  # learned in training

def embed(texts):  # mean of the token states, normalized
    enc = tok(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)

def probabilities(question, options):
    return (scale * embed([question]) @ embed(options).T).softmax(-1)[0]
"""


def read_manifest(folder: Path) -> KeptManifest:
    """The `probekd.json` of a kept student; a clear error when `folder` is not one."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ProbekdError(f"{folder} is not a folder (a kept student is RUN/students/<cell>/model/)")
    if not path.is_file():
        raise ProbekdError(
            f"{folder} is not a kept probekd student: it has no {MANIFEST} (a kept student is "
            "RUN/students/<cell>/model/, or a folder made by `probekd export`)"
        )
    try:
        manifest = KeptManifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as e:
        raise ProbekdError(f"{path} is not a valid kept-student manifest: {e}") from None
    if manifest.format > FORMAT_VERSION:
        raise ProbekdError(f"{path} has format {manifest.format}; this probekd reads up to {FORMAT_VERSION}: upgrade")
    return manifest


def load_kept(folder: Path, device: str = "cpu") -> tuple[Student, KeptManifest]:
    """A kept student, ready to predict (`probekd.predict`), and its manifest."""
    from transformers import AutoTokenizer

    manifest = read_manifest(folder)
    model = load_hf_model(folder, manifest.student).to(device)
    tok = AutoTokenizer.from_pretrained(str(folder))
    student = assemble(model, tok, manifest.student, manifest.num_options, manifest.template)
    model.eval()
    return student, manifest


def write_manifest(folder: Path, manifest: KeptManifest) -> None:
    """Replace a kept folder's `probekd.json` and model card (after `probekd export` records its choice)."""
    write_text(Path(folder) / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
    write_text(Path(folder) / "README.md", model_card(manifest))


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def model_card(m: KeptManifest) -> str:
    """The kept student's README.md: what it was distilled from, how, how well it does, how to use it, its limits."""
    s = m.student
    auto = (
        {"cross": "AutoModelForMultipleChoice", "biencoder": "AutoModel"}[s.head]
        if s.kind == "encoder"
        else ("AutoModelForCausalLM")
    )
    ci = m.metrics.test_accuracy_ci
    acc = _acc(m.metrics.test_accuracy) + (f" (95% interval {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
    how = {
        "hard": "the gold labels alone",
        "teacher": "the teacher's own answer probabilities (logit-KD)",
        "smoothed": "the gold labels smoothed toward uniform (label smoothing, as soft as the probe's targets unless "
        "set otherwise)",
        "teacher_calibrated": "the teacher's answer probabilities, calibrated on dev (a temperature, plus "
        "option-position biases where they made it more accurate on dev)",
        "probe": f"the probabilities of a linear probe on the teacher's hidden states ({m.probe or 'chosen on dev'}; "
        "Probe-KD)",
    }.get(m.signal, f"the `{m.signal}` targets")
    weighting = "" if m.weighting == "none" else f", examples weighted by `{m.weighting}`"
    if m.selection != "random":
        weighting += f", its labelled questions chosen by `{m.selection}`"
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'multiple-choice' if s.kind == 'encoder' else 'text-generation'}",
        "tags: [probekd, knowledge-distillation, multiple-choice]",
        "---",
        "",
        f"# probekd student: {m.task or 'task'} ({m.cell or 'kept student'})",
        "",
        f"A small `{s.kind}` student (`{s.model}`) distilled by probekd from the teacher `{m.teacher or '?'}` "
        f"({m.teacher_formulation or '?'} formulation) on {how}, with the `{m.loss}` loss{weighting}.",
        "",
        "## How well it does",
        "",
        "| on the test questions of the run | accuracy |",
        "|---|---|",
        f"| this student | {acc} |",
        f"| the teacher's own answer | {_acc(m.metrics.teacher_test_accuracy)} |",
        f"| the probe on the teacher's states | {_acc(m.metrics.probe_test_accuracy)} |",
        "",
        f"Test questions: {m.metrics.n_test if m.metrics.n_test is not None else '?'}. Its epoch was chosen on dev "
        f"(dev accuracy {_acc(m.metrics.dev_accuracy)}), never on test. Labels used: "
        f"{m.n_labelled if m.n_labelled is not None else '?'} training + {m.n_dev if m.n_dev is not None else '?'} "
        f"dev (labelled fraction {m.fraction if m.fraction is not None else '?'}, seed {m.seed}).",
        "",
    ]
    if m.exported:
        lines += ["## Why this student", "", str(m.exported.get("reason", "")), ""]
    lines += [
        "## How to use it",
        "",
        "```bash",
        "probekd predict THIS_FOLDER --file questions.jsonl --out predictions.jsonl",
        "```",
        "",
        "```python",
        "import probekd",
        "student = probekd.load_student('THIS_FOLDER')",
        "student.predict([{'question': '...', 'options': ['...', '...', '...']}])",
        "```",
        "",
        f"The weights load with `transformers.{auto}.from_pretrained(folder)`; `probekd.json` says how questions "
        f"become its inputs ({_inputs(m)}).",
        "",
        *_biencoder_usage(m),
        "## Intended use and limits",
        "",
        f"Multiple-choice questions like those of `{m.task or 'its task'}`, with at most {m.num_options} options. "
        "It was trained on a few hundred to a few thousand questions: expect its accuracy only on questions "
        "like those, and check it on your own labelled sample before relying on it. It inherits the errors and "
        "biases of its teacher and of the task's data.",
        "",
    ]
    return "\n".join(lines)


def _biencoder_usage(m: KeptManifest) -> list[str]:
    """Model-card lines for a bi-encoder: scoring with transformers alone, and the sentence-transformers files."""
    if not (m.student.kind == "encoder" and m.student.head == "biencoder"):
        return []
    code = BIENCODER_SNIPPET.replace("MAX_LENGTH", str(m.student.max_length))
    return [
        "Without probekd, with `transformers` alone (the same probabilities):",
        "",
        "```python",
        *code.rstrip("\n").splitlines(),
        "```",
        "",
        "It is also a sentence-transformers model: `SentenceTransformer('THIS_FOLDER').encode(texts)` gives the same "
        "normalized embeddings (their cosine times the scale above is its score).",
        "",
    ]


def _inputs(m: KeptManifest) -> str:
    s = m.student
    if s.kind == "encoder" and s.head == "biencoder":
        return (
            "question and each option embedded apart (mean of the token states), the cosine of the two times the "
            f"learned scale `{LOGIT_SCALE}` stored with the weights, softmax over the options"
        )
    if s.kind == "encoder":
        return "question and each option as a text pair, one score per option, softmax over the options"
    if s.formulation == "option":
        return "each option's mean token log-likelihood after the question prompt, softmax over the options"
    return "the option letters' logits after the lettered prompt, softmax over the options"
