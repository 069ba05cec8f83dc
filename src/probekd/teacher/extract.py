"""Run a frozen causal LM over multiple-choice prompts and read, for every requested layer, its hidden state.

Two formulations (see DESIGN.md):
- `letter`: one prompt per question listing all options; the state at the last prompt token; the teacher's answer
  is the logits of the option-letter tokens at that position (computed in fp32 from the final-norm state).
- `option`: one sequence per (question, option); the question prefixes of a batch run once and each one's
  key/value cache is reused for its K continuations; the state at each option's last token (and the mean over its
  tokens); the teacher's answer is each option's length-normalized log-likelihood.

Layer 0 is the embedding output, layer i the output of decoder block i (the residual stream, before the final
norm for every layer, so the curve is comparable across depth). Hidden states are read with forward hooks that keep
only the gathered rows, and the forward pass stops after the deepest layer needed when no logits are needed.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from probekd.data.prompts import PromptTemplate
from probekd.errors import ConfigError
from probekd.teacher.layers import DecoderParts, decoder_parts

log = logging.getLogger(__name__)


_LOGIT_ROWS = 256  # option-token rows per output-layer product (256 x 151k fp32 = 155 MB)


class _StopForward(Exception):
    """Raised by a hook after the deepest layer needed, to skip the rest of the network."""


@dataclass
class Teacher:
    """A loaded causal LM with the parts extraction needs."""

    model: nn.Module
    tokenizer: Any
    device: torch.device

    @property
    def decoder(self) -> nn.Module:
        return self.model.get_decoder()

    @functools.cached_property
    def parts(self) -> DecoderParts:
        """Its decoder blocks and final norm, found by structure once (`probekd.teacher.layers`)."""
        return decoder_parts(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.parts.blocks)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)


def native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX-BF16 or AVX-512 BF16 in its flags): there a
    bfloat16 forward pass is several times faster than float32 (6.7x the naive float32 loop, docs/PERFORMANCE.md);
    elsewhere bfloat16 is emulated and slower. False where the flags cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "amx_bf16" in flags or "avx512_bf16" in flags


def auto_compute_dtype(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> torch.dtype:
    """`compute_dtype: auto`: bfloat16 on CUDA and on CPUs with native bfloat16 matmul, float32 on other CPUs.
    The answer logits are computed in float32 either way (from the final-norm state)."""
    if device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu(cpuinfo)):
        return torch.bfloat16
    return torch.float32


def load_teacher(
    folder: str,
    device: str = "auto",
    compute_dtype: str = "auto",
    *,
    device_map: str | None = None,
    max_memory: dict[str, str] | None = None,
) -> Teacher:
    """Load a causal LM and its tokenizer from a local folder, frozen, in eval mode: on `device`, or with
    `device_map="auto"` spread over the available devices by accelerate (within `max_memory` per device), for a
    teacher larger than one; inputs then go to the device of its embeddings, and hidden states are gathered there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":  # under a launcher, each rank on its own GPU
        from probekd.ranks import ranks

        device = f"cuda:{ranks().local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    dtype = auto_compute_dtype(dev) if compute_dtype == "auto" else getattr(torch, compute_dtype)
    tok = AutoTokenizer.from_pretrained(folder)
    if device_map is not None:
        if compute_dtype == "auto" and torch.cuda.is_available():
            dtype = torch.bfloat16
        memory = {int(k) if str(k).isdigit() else k: v for k, v in (max_memory or {}).items()} or None
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map, max_memory=memory)
        dev = model.get_input_embeddings().weight.device
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(dev)
    model.eval().requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return Teacher(model, tok, dev)


def resolve_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """`all` -> 0..L; a list or comma string of indices (negative counts from the end) -> sorted unique indices."""
    if spec == "all":
        return list(range(num_layers + 1))
    items = [int(x) for x in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = sorted({i + num_layers + 1 if i < 0 else i for i in items})
    bad = [i for i in out if not 0 <= i <= num_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range: the teacher has layers 0..{num_layers} (0 = embeddings)")
    return out


def letter_token_ids(tokenizer: Any, template: PromptTemplate, k: int) -> list[int]:
    """The token id of each answer string (' A', ' B', ...); each must be exactly one known token, all distinct."""
    ids = []
    for s in template.answer_strings(k):
        toks = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ConfigError(
                f"answer string {s!r} is {len(toks)} tokens {toks} for this tokenizer; letter scoring needs one "
                "token per option (change prompt.letter_prefix or prompt.letters)"
            )
        if tokenizer.unk_token_id is not None and toks[0] == tokenizer.unk_token_id:
            raise ConfigError(f"answer string {s!r} is the unknown token for this tokenizer; it cannot score letters")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"answer strings {template.answer_strings(k)} share tokens {ids} for this tokenizer")
    return ids


class _LayerTap:
    """Forward hooks that gather, per layer, the hidden rows at given positions (or their mean over a span)."""

    def __init__(self, teacher: Teacher, layers: list[int], need_norm: bool) -> None:
        self.layers = layers
        self.device = teacher.device
        self.deepest = max(layers)
        self.need_norm = need_norm
        self.gather: torch.Tensor | None = None  # [B] positions
        self.span: torch.Tensor | None = None  # [B, T] float weights for a mean, or None
        self.out: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.norm_out: torch.Tensor | None = None
        parts = teacher.parts
        # layer 0: the first block's input (the embeddings plus what the family adds: positions, scaling)
        self.handles = [parts.blocks[0].register_forward_pre_hook(self._input_hook, with_kwargs=True)]
        self.handles += [
            block.register_forward_hook(self._hook(i + 1))
            for i, block in enumerate(parts.blocks)
            if i + 1 <= self.deepest
        ]
        if need_norm:
            self.handles.append(parts.norm.register_forward_hook(self._norm_hook))

    def _rows(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # a teacher spread over devices (device_map) has layers elsewhere: rows are gathered on the inputs' device
        h = h.to(self.device)
        idx = torch.arange(h.shape[0], device=h.device)
        last = h[idx, self.gather].float()
        mean = None
        if self.span is not None:
            mean = (h.float() * self.span[..., None]).sum(1) / self.span.sum(1, keepdim=True).clamp_min(1)
        return last, mean

    def _hook(self, layer: int):
        def hook(_m: nn.Module, _inp: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            if layer in self.layers:
                self.out[layer] = self._rows(h)
            if layer == self.deepest and not self.need_norm:
                raise _StopForward

        return hook

    def _input_hook(self, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._hook(0)(m, args, args[0] if args else kwargs["hidden_states"])

    def _norm_hook(self, _m: nn.Module, _inp: Any, output: Any) -> None:
        self.norm_out = output.to(self.device)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        last = torch.stack([self.out[i][0] for i in self.layers], dim=1)
        means = [self.out[i][1] for i in self.layers]
        mean = torch.stack(means, dim=1) if means[0] is not None else None  # type: ignore[arg-type]
        return last, mean


def _output_rows(teacher: Teacher, token_ids: list[int] | None = None) -> torch.Tensor:
    w = teacher.model.get_output_embeddings().weight
    return (w if token_ids is None else w[token_ids]).to(teacher.device).float()


def _softcap(teacher: Teacher, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(teacher.model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@dataclass
class SharedPrefix:
    """The token prefix every prompt of a batch starts with (chat header, instructions), run once; its key/value
    cache is copied into each batch instead of recomputing it. With the SmolLM2 chat template it is 44 of ~100
    tokens of an ARC prompt."""

    ids: list[int]
    cache: Any  # transformers DynamicCache of the prefix, batch 1

    def rests(self, seqs: list[list[int]] | list[str]) -> list[list[int]]:
        """What follows the prefix in each token-id sequence; a ValueError unless every one starts with the prefix
        and goes on after it."""
        p = len(self.ids)
        if any(isinstance(t, str) or list(t[:p]) != self.ids or len(t) == p for t in seqs):
            raise ValueError("with a shared prefix, every sequence must be token ids that start with it and go on")
        return [list(t[p:]) for t in seqs]  # type: ignore[misc]

    def cache_for(self, n: int) -> Any:
        """A copy of the prefix's cache, repeated for a batch of `n` (the original stays batch 1 for the next)."""
        import copy

        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(n)
        return cache

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        """An attention mask [N, T] of what follows the prefix, with the prefix's columns (all real) in front."""
        ones = torch.ones(mask.shape[0], len(self.ids), dtype=mask.dtype, device=mask.device)
        return torch.cat([ones, mask], dim=1)


@torch.inference_mode()
def shared_prefix(teacher: Teacher, tokens: list[list[int]], min_len: int = 8) -> SharedPrefix | None:
    """The longest common prefix of `tokens` (leaving each prompt at least one token), run through the decoder;
    None if shorter than `min_len` tokens (not worth it)."""
    from transformers import DynamicCache

    if not tokens:
        return None
    n = min(len(t) for t in tokens) - 1  # leave every prompt at least one token to run
    first = tokens[0]
    for t in tokens[1:]:
        n = next((i for i in range(n) if t[i] != first[i]), n)
    common = list(first[:n])
    if len(common) < min_len:
        return None
    cache = DynamicCache()
    teacher.decoder(input_ids=torch.tensor([common], device=teacher.device), past_key_values=cache, use_cache=True)
    return SharedPrefix(common, cache)


def length_batches(lengths: list[int], max_size: int, max_padding: float = 0.1) -> list[list[int]]:
    """Indices into `lengths` grouped into batches of similar length, shortest first.

    A batch holds at most `max_size` sequences and ends early when padding to its longest member would add more
    than `max_padding` (a fraction of its real tokens): on a few hundred prompts fixed chunks of 16 waste a few
    percent, on a few dozen up to a third, while small batches cost this CPU little (a 576 x 1536 matmul on 55 rows
    runs at 70% of the speed it reaches on 880)."""
    if max_size < 1 or max_padding < 0:
        raise ValueError(f"need max_size >= 1 and max_padding >= 0, got {max_size}, {max_padding}")
    batches: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]  # the longest so far: sorted ascending
        if cur and (len(cur) >= max_size or (len(cur) + 1) * n > (1 + max_padding) * (real + n)):
            batches.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        batches.append(cur)
    return batches


def _right_padded(seqs: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T] ids right-padded with `pad`, and the [N, T] mask of real tokens."""
    t = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (t - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs], device=device)
    return ids, mask


@torch.inference_mode()
def extract_letter_batch(
    teacher: Teacher,
    prompts: list[str] | list[list[int]],
    layers: list[int],
    letter_ids: list[int] | None,
    prefix: SharedPrefix | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states [B, len(layers), H] at each prompt's last token, and fp32 letter logits [B, K].

    `prompts` are texts, or token ids already made by the tokenizer (so a caller that tokenized to sort by length
    does not tokenize twice). With `prefix` (token ids only), the prompts' shared prefix comes from its cache and
    only the rest runs. With `letter_ids=None` no logits are computed and the forward pass stops after the
    deepest requested layer.
    """
    tok = teacher.tokenizer
    dev = teacher.device
    kwargs: dict[str, Any] = {}
    if prefix is not None:
        rest = prefix.rests(prompts)
        ids, mask = _right_padded(rest, tok.pad_token_id, dev)
        last = mask.sum(1) - 1
        kwargs = {
            "attention_mask": prefix.mask(mask),
            "position_ids": (len(prefix.ids) + torch.arange(ids.shape[1], device=dev)).expand(*ids.shape),
            "past_key_values": prefix.cache_for(len(rest)),
            "use_cache": True,
        }
    else:
        if isinstance(prompts[0], str):
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
        else:
            enc = tok.pad({"input_ids": prompts}, return_tensors="pt")
        mask = enc["attention_mask"].to(dev)
        ids = enc["input_ids"].to(dev)
        if tok.padding_side == "right":
            last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
        else:  # left padding: the last real token is the last column
            last = torch.full((ids.shape[0],), ids.shape[1] - 1, device=dev)
        kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0), "use_cache": False}
    tap = _LayerTap(teacher, layers, need_norm=letter_ids is not None)
    tap.gather = last
    try:
        teacher.decoder(input_ids=ids, **kwargs)
    except _StopForward:
        pass
    finally:
        tap.remove()
    hidden, _ = tap.stacked()
    if letter_ids is None:
        return hidden.cpu(), None
    assert tap.norm_out is not None
    final = tap.norm_out[torch.arange(ids.shape[0], device=ids.device), last].float()
    logits = _softcap(teacher, final @ _output_rows(teacher, letter_ids).T)
    return hidden.cpu(), logits.cpu()


def option_tokens(tokenizer: Any, prefix: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of an `option`-formulation question: the prefix (with the tokenizer's special tokens) and each
    continuation (without them), tokenized separately so that every option starts on a token boundary."""
    pre = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    if any(len(c) == 0 for c in conts):
        raise ConfigError(f"an option tokenizes to no tokens: {continuations}")
    return pre, conts


@torch.inference_mode()
def extract_option_batch(
    teacher: Teacher,
    prefixes: list[list[int]],
    continuations: list[list[list[int]]],
    layers: list[int],
    shared: SharedPrefix | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each question of a batch (token ids from `option_tokens`): the hidden states at each option's last token
    [K, len(layers), H], their mean over the option's tokens [K, len(layers), H], and each option's
    length-normalized log-likelihood [K] (fp32).

    Two forward passes: the questions' prefixes together (right-padded; with `shared`, only what follows the shared
    prefix, whose key/value cache is copied in), then every (question, option) continuation at once on its
    question's cache. Padding is masked and positions are explicit, so each row sees exactly its own prefix and
    option, as if run alone. The output layer runs only at the rows that predict an option token.
    """
    from transformers import DynamicCache

    dev = teacher.device
    pad = teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else 0
    rests = shared.rests(prefixes) if shared is not None else prefixes
    if any(len(c) == 0 for cs in continuations for c in cs) or any(len(cs) == 0 for cs in continuations):
        raise ValueError("every question needs options, and every option at least one token")
    b = len(rests)
    p0 = len(shared.ids) if shared is not None else 0
    rest_ids, rest_mask = _right_padded(rests, pad, dev)
    rest_len = rest_mask.sum(1)
    cache = shared.cache_for(b) if shared is not None else DynamicCache()

    def with_shared(mask: torch.Tensor) -> torch.Tensor:
        return shared.mask(mask) if shared is not None else mask

    r = rest_ids.shape[1]
    out = teacher.decoder(
        input_ids=rest_ids,
        attention_mask=with_shared(rest_mask),
        position_ids=(p0 + torch.arange(r, device=dev)).expand(b, r),
        past_key_values=cache,
        use_cache=True,
    )
    pre_last = out.last_hidden_state[torch.arange(b, device=dev), rest_len - 1].float()  # after the final norm

    k = [len(cs) for cs in continuations]
    q = torch.repeat_interleave(torch.arange(b, device=dev), torch.tensor(k, device=dev))  # each row's question
    cont_ids, cont_mask = _right_padded([c for cs in continuations for c in cs], pad, dev)
    lengths = cont_mask.sum(1)
    t = cont_ids.shape[1]
    cache.batch_select_indices(q)
    tap = _LayerTap(teacher, layers, need_norm=True)
    tap.gather = lengths - 1
    tap.span = cont_mask.float()
    try:
        teacher.decoder(
            input_ids=cont_ids,
            attention_mask=with_shared(torch.cat([rest_mask[q], cont_mask], dim=1)),
            position_ids=(p0 + rest_len[q])[:, None] + torch.arange(t, device=dev),
            past_key_values=cache,
            use_cache=True,
        )
    finally:
        tap.remove()
    last, mean = tap.stacked()
    assert tap.norm_out is not None and mean is not None
    # the state predicting token j of an option: the prefix's last state for j=0, the option's state j-1 after
    states = torch.cat([pre_last[q][:, None], tap.norm_out[:, : t - 1].float()], dim=1)  # [N, T, H]
    real = cont_mask.bool()
    rows, targets, w = states[real], cont_ids[real], _output_rows(teacher)
    tok_logp = torch.zeros(cont_ids.shape, device=dev)
    tok_logp[real] = torch.cat(  # in chunks: rows x vocabulary logits would be GBs for long options and vocabularies
        [
            torch.log_softmax(_softcap(teacher, rows[i : i + _LOGIT_ROWS] @ w.T), dim=-1).gather(
                -1, targets[i : i + _LOGIT_ROWS, None]
            )[:, 0]
            for i in range(0, len(rows), _LOGIT_ROWS)
        ]
    )
    scores = tok_logp.sum(1) / lengths
    return list(zip(last.cpu().split(k), mean.cpu().split(k), scores.cpu().split(k), strict=True))


def naive_letter_extract(teacher: Teacher, prompt: str, letter_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop a user would write: batch 1, `output_hidden_states=True`, full logits. The benchmarks' baseline and
    the tests' reference (hidden_states[i] is layer i, except the last entry, which is after the final norm)."""
    with torch.inference_mode():
        enc = teacher.tokenizer(prompt, return_tensors="pt").to(teacher.device)
        out = teacher.model(**enc, output_hidden_states=True)
        hidden = torch.stack([h[0, -1].float() for h in out.hidden_states], dim=0)
        return hidden.cpu(), out.logits[0, -1, letter_ids].float().cpu()


__all__ = [
    "Teacher",
    "extract_letter_batch",
    "extract_option_batch",
    "length_batches",
    "letter_token_ids",
    "load_teacher",
    "naive_letter_extract",
    "option_tokens",
    "resolve_layers",
    "shared_prefix",
]
