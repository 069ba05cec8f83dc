"""Students: models that give K-way option logits (masked options -inf), and how examples become their inputs.

- `encoder`: question + each option through an encoder with a scoring head (`AutoModelForMultipleChoice`,
  MiniLM-L6 by default); missing options are run as empty texts and masked.
- `encoder`, `head: biencoder`: the question and each option through the encoder (`AutoModel`) apart, each
  mean-pooled over its tokens; an option's logit is s * cos(question, option) with a learned scale s. A sentence
  embedding model (all-MiniLM-L6-v2) answers this way before any training, where the cross head starts at chance.
- `causal`, `formulation: letter`: a causal LM reads the lettered prompt (the same template as the teacher's
  `letter` formulation) and its logits of the option-letter tokens at the last prompt position are the K logits.
  The letters must be single tokens of the student's tokenizer (checked, see
  `probekd.teacher.extract.letter_token_ids`).
- `causal`, `formulation: option`: question prefix + each option text (as the teacher's `option` formulation); an
  option's logit is the mean log-probability of its tokens (length-normalized log-likelihood). The prefix runs
  once per question and its key/value cache is shared by the K continuations, in training too (gradients flow
  through the cache): on ARC the prefix is most of the tokens, so this is ~K times less compute and activation
  memory than K full sequences. The output layer is applied only at the positions that predict option tokens.

Full fine-tuning by default; LoRA through `peft` as an option (the scoring head stays fully trainable).

The model is a plain `AutoModel` (bi-encoder, with its scale as one more parameter) / `AutoModelForMultipleChoice` /
`AutoModelForCausalLM`; the scoring lives in a function of the
model and a batch (`Student.scorer`), so the trained weights save and load the standard way. The causal scorers call
the decoder and output layer directly: they run in one process (data-parallel training of causal students would
need their scoring inside the wrapped model's forward).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from probekd.data.examples import MCQExample
from probekd.data.prompts import get_template
from probekd.errors import ProbekdError

StudentKind = Literal["encoder", "causal"]


class StudentConfig(BaseModel):
    """Which student, and how its inputs are made."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("minilm-l6", description="Packaged model name, local folder or HF id.")
    kind: StudentKind = Field("encoder", description="`encoder` (multiple-choice head) or `causal` (letter logits).")
    head: Literal["cross", "biencoder"] = Field(
        "biencoder",
        description="`encoder` students: `biencoder` (the default: question and each option embedded apart, "
        "mean-pooled, scored by their cosine times a learned scale: the sentence-embedding model's own judgement "
        "before any training) or `cross` (question and option read together, a new linear scoring head: "
        "`AutoModelForMultipleChoice`, at chance before training; the default before 2026-12).",
    )
    max_length: int = Field(128, ge=8, description="Tokens per (question, option) pair or prompt; longer is cut.")
    formulation: Literal["letter", "option"] = Field(
        "letter",
        description="`causal` students: `letter` (letter logits after the lettered prompt) or `option` (each "
        "option's length-normalized log-likelihood after the question).",
    )
    lora: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator.")
    prompt: str = Field("auto", description="`causal` students: prompt preset (auto, base, instruct).")


def recorded_student(fields: dict[str, Any]) -> dict[str, Any]:
    """A student configuration as a run folder or kept student recorded it, read as it was meant when written:
    recorded configurations hold every field, so one without `head` predates the bi-encoder head, when every
    encoder student was a cross-encoder (the default then)."""
    return fields if "head" in fields else {**fields, "head": "cross"}


def _pad_options(logits: torch.Tensor, option_mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, Kb] of a batch run with Kb <= K option columns (see `Student.collate`) as [B, K], -inf where
    an option is missing."""
    k = option_mask.shape[1]
    if logits.shape[1] < k:
        logits = torch.cat([logits, logits.new_full((logits.shape[0], k - logits.shape[1]), float("-inf"))], 1)
    return logits.masked_fill(~option_mask, float("-inf"))


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a DDP and/or peft wrapper, or the model itself."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_output(model: nn.Module, **inputs: Any) -> Any:
    """The causal LM's decoder output (`last_hidden_state`, the cache) for `inputs`. Under DDP the pass goes through
    the wrapped model's own forward, as DDP needs to synchronize the step's gradients, with the language-model head
    applied to one position only (`logits_to_keep=1`, unused), and a forward hook on the decoder takes its output;
    otherwise the decoder runs alone (no logits at all)."""
    decoder = base_model(model).get_decoder()
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return decoder(**inputs)
    taken: list[Any] = []
    handle = decoder.register_forward_hook(lambda _module, _args, out: taken.append(out))
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return taken[0]


# A scorer turns a batch of `Student.collate` into K-way option logits [B, K] (masked options -inf) with the student's
# model, which it receives as an argument: the model itself stays a plain `PreTrainedModel` (or a peft model around
# one while LoRA trains), so `Trainer`, `save_pretrained` and `AutoModel*.from_pretrained` handle it as usual.


def encoder_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, option_mask: torch.Tensor, **kw: Any
) -> torch.Tensor:
    """An `AutoModelForMultipleChoice`'s logits, masked to each example's options."""
    extra = {k: v for k, v in kw.items() if k == "token_type_ids"}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.float()
    return _pad_options(logits, option_mask)


LOGIT_SCALE = "probekd_logit_scale"  # the bi-encoder's learned log-scale, a parameter of the encoder model itself
_INITIAL_SCALE = 20.0  # the usual scale of cosine logits for sentence embeddings (sentence-transformers' default)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the attended positions (a row without any: zeros)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def biencoder_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    option_mask: torch.Tensor,
    option_ids: torch.Tensor,
    option_attention: torch.Tensor,
    **_: Any,
) -> torch.Tensor:
    """s * cos(mean-pooled question, mean-pooled option) per option; s = exp of the model's `LOGIT_SCALE`."""
    q, o = biencoder_embeddings(model, input_ids, attention_mask, option_ids, option_attention)
    return biencoder_scores(model, q, o, option_mask)


def biencoder_embeddings(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    option_ids: torch.Tensor,
    option_attention: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bi-encoder's mean-pooled question embeddings [B, H] and option embeddings [B, Kb, H] (float32)."""
    b, kb, c = option_ids.shape
    q = _mean_pool(model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, attention_mask)
    om = option_attention.reshape(b * kb, c)
    o = _mean_pool(model(input_ids=option_ids.reshape(b * kb, c), attention_mask=om).last_hidden_state, om)
    return q.float(), o.float().reshape(b, kb, -1)


def biencoder_scores(model: nn.Module, q: torch.Tensor, o: torch.Tensor, option_mask: torch.Tensor) -> torch.Tensor:
    """s * cos(q, o_k) [B, K] from the embeddings of `biencoder_embeddings` (or mixtures of them)."""
    cos = torch.nn.functional.cosine_similarity(q[:, None], o, dim=-1)
    # under DDP the scale is the wrapped model's (its gradient is still all-reduced: DDP hooks every parameter)
    scale = getattr(base_model(model), LOGIT_SCALE).float().exp()
    return _pad_options(scale * cos, option_mask)


def attach_training_head(model: nn.Module, name: str, in_width: int, out_width: int) -> nn.Linear:
    """A linear map that an extra training term needs (hidden-state matching's projection, LELP's subclass head),
    set as the submodule `name` of the student model so the trainer optimizes and checkpoints it with the model; an
    existing one is kept (a resumed run). `detach_training_head` removes it before the student is saved."""
    if not hasattr(model, name):
        setattr(model, name, nn.Linear(in_width, out_width))
    return getattr(model, name)


def detach_training_head(model: nn.Module, name: str) -> None:
    """Remove the training-only submodule `name`: the deployed student is the plain encoder."""
    if hasattr(model, name):
        delattr(model, name)


def add_logit_scale(model: nn.Module, log_scale: float = math.log(_INITIAL_SCALE)) -> nn.Module:
    """Give an encoder model the bi-encoder's learned log-scale as a parameter of its own, so that it is trained,
    checkpointed and saved with the weights (`save_pretrained` writes it; `AutoModel` ignores it on loading, which
    changes no answer: the argmax of the cosines does not depend on the scale)."""
    model.register_parameter(LOGIT_SCALE, nn.Parameter(torch.tensor(float(log_scale))))
    return model


@dataclass(frozen=True)
class LetterScorer:
    """A causal LM's logits of the option-letter tokens at the last prompt token (right padding, gathered per row);
    only the K letter rows of the output layer are applied."""

    letter_ids: tuple[int, ...]

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        option_mask: torch.Tensor,
        **_: Any,
    ) -> torch.Tensor:
        base = base_model(model)
        hidden = decoder_output(model, input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(1) - 1
        final = hidden[torch.arange(len(last), device=last.device), last]
        head = base.get_output_embeddings()
        ids = torch.tensor(self.letter_ids, device=final.device)
        logits = final @ head.weight[ids].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[ids]
        return logits.float().masked_fill(~option_mask, float("-inf"))


def option_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    option_mask: torch.Tensor,
    option_ids: torch.Tensor,
    option_attention: torch.Tensor,
    **_: Any,
) -> torch.Tensor:
    """A causal LM's score of each option: the mean log-probability of its tokens after the question prefix.

    Inputs (see `Student.collate`): the prefixes `input_ids`/`attention_mask` [B, P] (right padding) and the
    continuations `option_ids`/`option_attention` [B, Kb, C]. The prefixes run once, their cache is repeated Kb
    times, and the continuations run on it with position ids that go on from each real prefix length."""
    from transformers import DynamicCache

    b, kb, c = option_ids.shape
    base = base_model(model)
    cache = DynamicCache()
    pre = decoder_output(
        model, input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True
    )
    plen = attention_mask.sum(1)
    pre_last = pre.last_hidden_state[torch.arange(b, device=plen.device), plen - 1]  # predicts token 0
    cache.batch_repeat_interleave(kb)
    ids = option_ids.reshape(b * kb, c)
    om = option_attention.reshape(b * kb, c)
    hidden = decoder_output(
        model,
        input_ids=ids,
        attention_mask=torch.cat([attention_mask.repeat_interleave(kb, 0), om], 1),
        position_ids=plen.repeat_interleave(kb)[:, None] + torch.arange(c, device=plen.device),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    # the state predicting option token j: the prefix's last for j = 0, the continuation's j - 1 after
    states = torch.cat([pre_last.repeat_interleave(kb, 0)[:, None], hidden[:, :-1]], 1)  # [B*Kb, C, H]
    rows, pos = om.bool().nonzero(as_tuple=True)
    logits = base.get_output_embeddings()(states[rows, pos]).float()  # [M, V]
    logp = logits.gather(1, ids[rows, pos][:, None])[:, 0] - logits.logsumexp(1)
    total = logp.new_zeros(b * kb).index_add(0, rows, logp)
    count = om.sum(1).clamp_min(1)
    return _pad_options((total / count).reshape(b, kb), option_mask)


Scorer = Callable[..., torch.Tensor]


@dataclass
class Student:
    """A student: its model (a `PreTrainedModel`, or a peft model around one while LoRA trains), its tokenizer, the
    scorer that turns a batch into option logits, and how examples become its inputs (K option columns at most)."""

    model: nn.Module
    tokenizer: Any
    cfg: StudentConfig
    k: int
    scorer: Scorer
    template: Any = None

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Option logits [B, K] of a collated batch (masked options -inf)."""
        return self.scorer(self.model, **batch)

    def merge_lora(self, adapter_dir: Path | None = None) -> None:
        """Fold trained LoRA adapters into the weights, so that `model` is a plain `PreTrainedModel` (what a user
        loads with `AutoModel*`); the adapter alone is saved to `adapter_dir` first when given. No-op without LoRA."""
        if not hasattr(self.model, "merge_and_unload"):
            return
        if adapter_dir is not None:
            self.model.save_pretrained(str(adapter_dir))
        self.model = self.model.merge_and_unload()

    def encode(self, ex: MCQExample) -> dict[str, list[Any]]:
        """Unpadded token ids of one example (padded to K options with empty texts for the encoder)."""
        tok = self.tokenizer
        if self.cfg.kind == "encoder" and self.cfg.head == "biencoder":
            q = tok(ex.question, truncation=True, max_length=self.cfg.max_length)["input_ids"]
            opts = [tok(o, truncation=True, max_length=self.cfg.max_length)["input_ids"] for o in ex.options]
            return {"input_ids": q, "attention_mask": [1] * len(q), "option_ids": opts + [[]] * (self.k - ex.k)}
        if self.cfg.kind == "encoder":
            options = list(ex.options) + [""] * (self.k - ex.k)
            enc = tok([ex.question] * self.k, options, truncation="only_first", max_length=self.cfg.max_length)
            return {key: enc[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in enc}
        if self.cfg.formulation == "option":
            return self._encode_options(ex)
        ids = tok(self.template.letter_prompt(ex, tok))["input_ids"]
        if len(ids) > self.cfg.max_length:  # keep the end: the answer cue and the last options
            ids = ids[-self.cfg.max_length :]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def _encode_options(self, ex: MCQExample) -> dict[str, list[Any]]:
        """The prefix's token ids and K continuations (missing options: none); each continuation keeps at most
        `max_length - 1` tokens, and the prefix loses its start so that it and the longest continuation fit
        `max_length`."""
        tok = self.tokenizer
        prefix, conts = self.template.option_texts(ex, tok)
        c = [tok(t, add_special_tokens=False)["input_ids"][: self.cfg.max_length - 1] for t in conts]
        c += [[] for _ in range(self.k - ex.k)]
        p = tok(prefix)["input_ids"][-(self.cfg.max_length - max(map(len, c))) :]
        return {"input_ids": p, "attention_mask": [1] * len(p), "option_ids": c}

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of encoded rows (right padding) into tensors; other keys are stacked as they are."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        token_keys = [k for k in ("input_ids", "attention_mask", "token_type_ids", "option_ids") if k in rows[0]]
        out: dict[str, torch.Tensor] = {}
        # only as many option columns as the batch's longest question has (ARC: K = 5 for a few questions and 4
        # for most; the empty fifth option would cost a quarter of the compute); the student pads back
        kb = max(int(torch.as_tensor(r["option_mask"]).sum()) for r in rows) if "option_mask" in rows[0] else self.k
        for key in token_keys:
            fill = pad_id if key in ("input_ids", "option_ids") else 0
            if isinstance(rows[0][key][0], list):  # one sequence per option: [B, Kb, T]
                t = max(1, max(len(seq) for r in rows for seq in r[key][:kb]))
                out[key] = torch.tensor([[seq + [fill] * (t - len(seq)) for seq in r[key][:kb]] for r in rows])
                if key == "option_ids":
                    lens = torch.tensor([[len(seq) for seq in r[key][:kb]] for r in rows])
                    out["option_attention"] = (torch.arange(t) < lens[..., None]).long()
            else:
                t = max(len(r[key]) for r in rows)
                out[key] = torch.tensor([r[key] + [fill] * (t - len(r[key])) for r in rows])
        for key in rows[0]:
            if key not in token_keys:
                out[key] = torch.stack([torch.as_tensor(r[key]) for r in rows])
        return out


def assemble(model: nn.Module, tok: Any, cfg: StudentConfig, k: int, template: Any = None) -> Student:
    """The `Student` of a loaded model and tokenizer: the scorer and prompt template `cfg` asks for (`template`, a
    `PromptTemplate`, overrides the preset: a kept student brings the one it was trained with)."""
    from probekd.teacher.extract import letter_token_ids

    if cfg.kind == "encoder":
        return Student(model, tok, cfg, k, biencoder_logits if cfg.head == "biencoder" else encoder_logits)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    template = get_template(template or cfg.prompt, tok)
    if cfg.formulation == "option":
        return Student(model, tok, cfg, k, option_logits, template)
    try:
        ids = letter_token_ids(tok, template, k)
    except ProbekdError as e:
        raise ProbekdError(f"student {cfg.model}: {e}") from e
    return Student(model, tok, cfg, k, LetterScorer(tuple(ids)), template)


def load_hf_model(folder: Path | str, cfg: StudentConfig) -> nn.Module:
    """The student's model from a local folder, in float32: `AutoModelForMultipleChoice` (cross encoder),
    `AutoModel` with its learned scale (bi-encoder: the folder's saved scale, or the initial one for a base model)
    or `AutoModelForCausalLM`; without the "newly initialized" notice (a fresh scoring head is expected)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMultipleChoice
    from transformers import logging as hf_logging

    if cfg.kind == "causal":
        auto = AutoModelForCausalLM
    else:
        auto = AutoModel if cfg.head == "biencoder" else AutoModelForMultipleChoice
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = auto.from_pretrained(str(folder), dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    if cfg.kind == "encoder" and cfg.head == "biencoder":
        saved = _saved_tensor(Path(folder), LOGIT_SCALE)
        add_logit_scale(model, *([float(saved)] if saved is not None else []))
    return model


def _saved_tensor(folder: Path, name: str) -> torch.Tensor | None:
    """The tensor `name` of a folder's safetensors weights (one file or an index of shards), None if absent."""
    from safetensors import safe_open

    files = [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        shard = json.loads(index.read_text()).get("weight_map", {}).get(name)
        files = [folder / shard] if shard else []
    for f in files:
        if f.is_file():
            with safe_open(str(f), framework="pt") as st:
                if name in st.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                    return st.get_tensor(name)
    return None


def build_student(cfg: StudentConfig, k: int, seed: int = 0) -> Student:
    """A fresh student named by `cfg` for K options (LoRA adapters added if asked); the scoring head's
    initialization follows `seed`."""
    from transformers import AutoTokenizer

    from probekd.models import prepare

    folder = prepare(cfg.model)
    tok = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(seed)
    model = load_hf_model(folder, cfg)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                target_modules="all-linear",
                modules_to_save=["classifier"] if cfg.kind == "encoder" and cfg.head == "cross" else None,
                lora_dropout=0.0,
            ),
        )
        scale = getattr(model.get_base_model(), LOGIT_SCALE, None)
        if scale is not None:  # the bi-encoder's scale is trained with the adapters (and merged with them)
            scale.requires_grad_(True)
    return assemble(model, tok, cfg, k)
