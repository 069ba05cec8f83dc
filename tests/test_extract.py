"""Teacher extraction on a tiny random Llama: batched gather == unbatched reference, KV reuse == full sequences,
resume after a kill == uninterrupted run, and a changed prompt is refused by fingerprint."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from probekd.data.examples import MCQExample
from probekd.data.prompts import PRESETS, PromptTemplate
from probekd.errors import ConfigError, ProbekdError
from probekd.teacher import cache as tcache
from probekd.teacher import extract as extract_module
from probekd.teacher.extract import (
    extract_letter_batch,
    extract_option_batch,
    length_batches,
    letter_token_ids,
    load_teacher,
    naive_letter_extract,
    option_tokens,
    resolve_layers,
    shared_prefix,
)
from probekd.teacher.pipeline import ExtractConfig, extract_split

WORDS = ["water", "plants", "sun", "energy", "heat", "light", "dog", "fish", "frog", "ant"]


def examples(n: int) -> list[MCQExample]:
    out = []
    for i in range(n):
        k = 3 + i % 3
        q = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + i % 5)) + "?"
        out.append(MCQExample(f"e{i}", q, tuple(WORDS[(i * 3 + j) % len(WORDS)] for j in range(k)), i % k))
    return out


@pytest.fixture(scope="module")
def teacher(tiny_llama_dir: Path):
    return load_teacher(str(tiny_llama_dir), "cpu")


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_letter_gather_equals_unbatched(teacher, side: str) -> None:
    teacher.tokenizer.padding_side = side
    tpl = PRESETS["base"]
    exs = examples(6)
    prompts = [tpl.letter_prompt(e) for e in exs]
    assert len({len(teacher.tokenizer(p)["input_ids"]) for p in prompts}) > 1  # padding really happens
    ids = letter_token_ids(teacher.tokenizer, tpl, 5)
    layers = resolve_layers("all", teacher.num_layers)
    hidden, logits = extract_letter_batch(teacher, prompts, layers, ids)
    for i, p in enumerate(prompts):
        ref_h, ref_logits = naive_letter_extract(teacher, p, ids)
        # reference hidden_states[L] comes after the final norm; ours is the block output, so compare 0..L-1
        torch.testing.assert_close(hidden[i, :-1], ref_h[:-1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits[i], ref_logits, atol=1e-5, rtol=1e-4)
    # without logits the forward pass stops early and gives the same states
    part, none = extract_letter_batch(teacher, prompts, [0, 1], None)
    assert none is None
    torch.testing.assert_close(part, hidden[:, :2])
    # token ids made beforehand (the pipeline tokenizes once) give the same result as texts
    tokens = teacher.tokenizer(prompts)["input_ids"]
    h2, l2 = extract_letter_batch(teacher, tokens, layers, ids)
    torch.testing.assert_close(h2, hidden, atol=0, rtol=0)
    torch.testing.assert_close(l2, logits, atol=0, rtol=0)
    # the shared prefix (the instructions) from its cache, only the rest run: the same states and logits
    prefix = shared_prefix(teacher, tokens, min_len=1)
    assert prefix is not None and len(prefix.ids) > 5
    h3, l3 = extract_letter_batch(teacher, tokens, layers, ids, prefix)
    torch.testing.assert_close(h3, hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(l3, logits, atol=1e-5, rtol=1e-4)
    h4, _ = extract_letter_batch(teacher, tokens, [0, 1], None, prefix)  # stopped early, cache discarded
    torch.testing.assert_close(h4, hidden[:, :2], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="start with it"):
        extract_letter_batch(teacher, [t[1:] for t in tokens], layers, ids, prefix)
    teacher.tokenizer.padding_side = "right"


def test_option_batch_equals_full_sequences(teacher, monkeypatch: pytest.MonkeyPatch) -> None:
    """Questions of different prefix lengths and option counts, options of different token lengths, batched, with
    and without the shared prefix from its cache: every option's states, mean and log-likelihood equal running
    prefix + option alone through the model."""
    tok = teacher.tokenizer
    tpl = PRESETS["base"]
    exs = [
        MCQExample(e.id, e.question, tuple(" ".join([o] * (1 + j % 3)) for j, o in enumerate(e.options)), e.answer)
        for e in examples(5)
    ]
    tokens = [option_tokens(tok, *tpl.option_texts(e)) for e in exs]
    assert len({len(pre) for pre, _ in tokens}) > 1 and len({len(cs) for _, cs in tokens}) > 1
    assert len({len(c) for _, cs in tokens for c in cs}) > 1  # prefixes, option counts, options: all padded
    layers = [0, 1, 2]
    shared = shared_prefix(teacher, [pre for pre, _ in tokens], min_len=1)
    assert shared is not None
    plain = extract_option_batch(teacher, [p for p, _ in tokens], [c for _, c in tokens], layers)
    cached = extract_option_batch(teacher, [p for p, _ in tokens], [c for _, c in tokens], layers, shared)
    for (pre, conts), got, got_shared in zip(tokens, plain, cached, strict=True):
        for last, mean, scores in (got, got_shared):
            assert last.shape == mean.shape == (len(conts), 3, teacher.hidden_size) and scores.shape == (len(conts),)
            for j, cid in enumerate(conts):
                with torch.inference_mode():
                    out = teacher.model(input_ids=torch.tensor([pre + cid]), output_hidden_states=True)
                hs = out.hidden_states
                # hs[2], the tiny model's last entry, comes after the final norm; ours is the block output
                torch.testing.assert_close(last[j, :2], torch.stack([hs[0][0, -1], hs[1][0, -1]]), atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(mean[j, 1], hs[1][0, len(pre) :].mean(0), atol=1e-5, rtol=1e-4)
                logp = torch.log_softmax(out.logits[0].float(), -1)
                ll = sum(logp[len(pre) - 1 + t, cid[t]].item() for t in range(len(cid))) / len(cid)
                assert scores[j].item() == pytest.approx(ll, abs=1e-4)
    # the output layer in chunks of 3 rows gives the same log-likelihoods as in one product
    monkeypatch.setattr(extract_module, "_LOGIT_ROWS", 3)
    chunked = extract_option_batch(teacher, [p for p, _ in tokens], [c for _, c in tokens], layers)
    for (_, _, a), (_, _, b) in zip(plain, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="start with it"):
        extract_option_batch(teacher, [tokens[0][0][1:]], [tokens[0][1]], layers, shared)
    with pytest.raises(ConfigError, match="no tokens"):
        option_tokens(tok, "Question: why?", [" yes", ""])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 300), max_size=60),
    st.integers(1, 20),
    st.sampled_from([0.0, 0.05, 0.1, 0.5]),
)
def test_length_batches_partition_and_bounds(lengths: list[int], max_size: int, max_padding: float) -> None:
    batches = length_batches(lengths, max_size, max_padding)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every index exactly once
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)  # shortest first, so neighbours have similar lengths
    for b in batches:
        real = [lengths[i] for i in b]
        assert 1 <= len(b) <= max_size
        assert len(b) == 1 or len(b) * max(real) <= (1 + max_padding) * sum(real) + 1e-9


def test_length_batches_examples() -> None:
    assert length_batches([5, 5, 5, 5, 5], 2) == [[0, 1], [2, 3], [4]]
    assert length_batches([10, 30, 10, 11], 8) == [[0, 2, 3], [1]]  # 3 x 30 pads 51 real tokens to 90: split
    assert length_batches([10, 30, 10, 11], 8, max_padding=1.0) == [[0, 2, 3, 1]]
    with pytest.raises(ValueError, match="max_size"):
        length_batches([1], 0)


def test_layer_and_letter_errors(teacher) -> None:
    assert resolve_layers("all", 2) == [0, 1, 2]
    assert resolve_layers("0,-1", 2) == [0, 2]
    with pytest.raises(ConfigError, match=r"layers \[5\] out of range: the teacher has layers 0..2"):
        resolve_layers([5], 2)
    bad = PromptTemplate(letters="ABCDEFGHIJ", letter_prefix=" option ")
    with pytest.raises(ConfigError, match="letter scoring needs one token per option"):
        letter_token_ids(teacher.tokenizer, bad, 2)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("shard-*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.name}/{k}"] = v
    return out


@pytest.mark.parametrize("formulation", ["letter", "option"])
def test_extract_split_cache_and_accuracy(
    teacher, tiny_llama_dir: Path, tmp_path: Path, formulation: str, caplog: pytest.LogCaptureFixture
) -> None:
    exs = examples(7)
    cfg = ExtractConfig(formulation=formulation, shard_size=3, batch_size=2, prompt="base")
    with caplog.at_level(logging.INFO, logger="probekd.teacher.pipeline"):
        summary = extract_split(teacher, tiny_llama_dir, exs, tmp_path, cfg, desc="train")
    # no terminal here, so no bar: a progress line per shard (3 + 3 + 1 examples)
    progress = [r.getMessage() for r in caplog.records if "ex/s" in r.getMessage()]
    assert [m.split(" examples")[0] for m in progress] == [
        "train: shard 0, 3/7",
        "train: shard 1, 6/7",
        "train: shard 2, 7/7",
    ]
    assert progress[-1].endswith(", 0 min left")
    c = tcache.load_cache(tmp_path)
    assert c.ids == [e.id for e in exs]
    assert c.mask.sum(1).tolist() == [e.k for e in exs]
    assert (c.scores[~c.mask] == float("-inf")).all()
    states = c.layer_states("hidden", range(3))  # layer first
    assert states.shape == ((3, 7, teacher.hidden_size) if formulation == "letter" else (3, 7, 5, 32))
    assert c.states == (("hidden",) if formulation == "letter" else ("hidden", "hidden_mean"))
    pred = [max(range(e.k), key=lambda j, i=i: c.scores[i, j]) for i, e in enumerate(exs)]
    acc = sum(p == e.answer for p, e in zip(pred, exs, strict=True)) / len(exs)
    assert summary["teacher_accuracy"] == pytest.approx(acc)
    # a second call computes nothing and changes nothing
    before = _tensors(tmp_path)
    assert extract_split(teacher, tiny_llama_dir, exs, tmp_path, cfg)["computed"] == 0
    after = _tensors(tmp_path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("formulation", ["letter", "option"])
def test_lazy_layer_reads_equal_the_stored_tensors(
    teacher, tiny_llama_dir: Path, tmp_path: Path, formulation: str
) -> None:
    """`layer_states` (memory-mapped slices, shard by shard) returns exactly what safetensors' own full read of
    every shard gives, for any layer selection, in the storage dtype's values, whatever the order asked."""
    cfg = ExtractConfig(formulation=formulation, shard_size=3, batch_size=2, prompt="base", storage_dtype="bfloat16")
    extract_split(teacher, tiny_llama_dir, examples(7), tmp_path, cfg)
    c = tcache.load_cache(tmp_path)
    layer_axis = 1 if formulation == "letter" else 2
    for name in c.states:
        eager = torch.cat([load_file(str(f))[name] for f in sorted(tmp_path.glob("shard-*.safetensors"))])
        assert eager.dtype == torch.bfloat16
        for idx in ([0, 1, 2], [2], [2, 0, 1], [0, 2]):
            want = eager.float().numpy().take(idx, axis=layer_axis)
            got = c.layer_states(name, idx)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, np.moveaxis(want, layer_axis, 0))
    with pytest.raises(ProbekdError, match=r"out of range: the cache holds 3 layers"):
        c.layer_states("hidden", [3])
    with pytest.raises(ProbekdError, match=r"has no hidden_extra states"):
        c.layer_states("hidden_extra", [0])


def test_changed_prompt_is_refused(teacher, tiny_llama_dir: Path, tmp_path: Path) -> None:
    exs = examples(4)
    extract_split(teacher, tiny_llama_dir, exs, tmp_path, ExtractConfig(prompt="base", shard_size=2))
    other = PRESETS["base"].model_copy(update={"instruction": "Pick one."})
    with pytest.raises(tcache.CacheMismatchError, match=r"made with different inputs \(differs in: prompt\)"):
        extract_split(teacher, tiny_llama_dir, exs, tmp_path, ExtractConfig(prompt=other, shard_size=2))
    s = extract_split(teacher, tiny_llama_dir, exs, tmp_path, ExtractConfig(prompt=other, shard_size=2), overwrite=True)
    assert s["computed"] == 4
    assert json.loads((tmp_path / "manifest.json").read_text())["fields"]["prompt"]["instruction"] == "Pick one."


def test_a_cache_made_in_another_compute_dtype_names_the_setting_to_resume_it(
    teacher, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """`compute_dtype: auto` resolves per machine (bf16 on CUDA and bf16 CPUs): a cache begun in float32 and resumed
    where the teacher computes in bfloat16 is refused with the setting that resumes it."""
    exs = examples(4)
    extract_split(teacher, tiny_llama_dir, exs, tmp_path, ExtractConfig(prompt="base", shard_size=2))
    bf16 = load_teacher(str(tiny_llama_dir), "cpu", "bfloat16")
    with pytest.raises(tcache.CacheMismatchError, match=r"differs in: compute_dtype\); it was computed in float32, "
                       r".*set extract.compute_dtype: float32 \(--compute-dtype float32\)"):  # fmt: skip
        extract_split(bf16, tiny_llama_dir, exs, tmp_path, ExtractConfig(prompt="base", shard_size=2))


def test_fp16_overflow_is_refused(tmp_path: Path) -> None:
    big = {"hidden": torch.tensor([[7e4, 1.0]]), "scores": torch.zeros(1, 2)}
    with pytest.raises(ProbekdError, match="beyond the float16 maximum"):
        tcache.write_shard(tmp_path, 0, ["a"], big, "float16")
    assert not list(tmp_path.iterdir())
    tcache.write_shard(tmp_path, 0, ["a"], big, "bfloat16")
    assert load_file(str(tcache.shard_path(tmp_path, 0)))["hidden"].dtype == torch.bfloat16


def test_incomplete_cache_is_not_loaded(teacher, tiny_llama_dir: Path, tmp_path: Path) -> None:
    extract_split(teacher, tiny_llama_dir, examples(5), tmp_path, ExtractConfig(prompt="base", shard_size=2))
    tcache.shard_path(tmp_path, 1).unlink()
    with pytest.raises(ProbekdError, match=r"is incomplete \(shards \[1\] missing\); rerun probekd extract"):
        tcache.load_cache(tmp_path)


KILL_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_extract import examples
from probekd.teacher import cache as tcache, pipeline
from probekd.teacher.extract import load_teacher
orig = tcache.write_shard
def slow(*a, **k):
    orig(*a, **k)
    time.sleep(0.6)
tcache.write_shard = slow
t = load_teacher({model!r}, "cpu")
cfg = pipeline.ExtractConfig(formulation={form!r}, shard_size=2, batch_size=2, prompt="base")
pipeline.extract_split(t, Path({model!r}), examples(9), Path({out!r}), cfg)
"""


@pytest.mark.parametrize("formulation", ["letter", "option"])
def test_resume_after_kill_equals_uninterrupted(
    teacher,
    tiny_llama_dir: Path,
    tmp_path: Path,
    formulation: str,
) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = KILL_SCRIPT.format(
        tests=str(Path(__file__).parent), model=str(tiny_llama_dir), out=str(killed), form=formulation
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not tcache.shard_path(killed, 1).exists():
        assert proc.poll() is None, "the extraction process ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in killed.glob("shard-*.safetensors"))
    assert 2 <= len(done) < 5  # killed part-way: some shards written, the rest missing
    cfg = ExtractConfig(formulation=formulation, shard_size=2, batch_size=2, prompt="base")
    resumed = extract_split(teacher, tiny_llama_dir, examples(9), killed, cfg)
    assert resumed["computed"] == 9 - 2 * len(done)
    extract_split(teacher, tiny_llama_dir, examples(9), clean, cfg)
    a, b = _tensors(killed), _tensors(clean)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert not [p for p in killed.iterdir() if "partial" in p.name]


# --- every decoder family a user would pick as a teacher (tiny random configs) ----------------------------------

_COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
)
FAMILIES = {  # config class, model class, extra config fields
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"num_key_value_heads": 2, "head_dim": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 2}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {"num_key_value_heads": 2}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"num_key_value_heads": 2}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),  # its own field names
}


def _family_teacher(family: str, tok):
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    fields = dict(n_embd=32, n_layer=2, n_head=4, n_positions=256) if extra is None else {**_COMMON, **extra}
    config = getattr(transformers, config_name)(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **fields)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    return extract_module.Teacher(model, tok, torch.device("cpu"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_decoder_family_extracts_what_output_hidden_states_gives(family: str, tiny_tokenizer) -> None:
    """Layer discovery by structure (`probekd.teacher.layers`): for each family, the letter and option paths give
    the states transformers' `output_hidden_states` gives (layer 0: the first block's input, with GPT-2's position
    embeddings and Gemma's scaling) and the teacher's own letter logits and option log-likelihoods."""
    teacher = _family_teacher(family, tiny_tokenizer)
    assert teacher.num_layers == 2
    tpl = PRESETS["base"]
    exs = examples(3)
    prompts = [tpl.letter_prompt(e) for e in exs]
    ids = letter_token_ids(tiny_tokenizer, tpl, 5)
    hidden, logits = extract_letter_batch(teacher, prompts, [0, 1, 2], ids)
    for i, p in enumerate(prompts):
        ref_h, ref_logits = naive_letter_extract(teacher, p, ids)
        torch.testing.assert_close(hidden[i, :-1], ref_h[:-1], atol=1e-5, rtol=1e-4)  # ref's last is after the norm
        torch.testing.assert_close(logits[i], ref_logits, atol=1e-5, rtol=1e-4)
    tokens = [option_tokens(tiny_tokenizer, *tpl.option_texts(e)) for e in exs]
    got = extract_option_batch(teacher, [p for p, _ in tokens], [c for _, c in tokens], [0, 1])
    for (pre, conts), (last, _, scores) in zip(tokens, got, strict=True):
        for j, cid in enumerate(conts):
            with torch.inference_mode():
                out = teacher.model(input_ids=torch.tensor([pre + cid]), output_hidden_states=True)
            ref = torch.stack([out.hidden_states[0][0, -1], out.hidden_states[1][0, -1]])
            torch.testing.assert_close(last[j], ref, atol=1e-5, rtol=1e-4)
            logp = torch.log_softmax(out.logits[0].float(), -1)
            ll = sum(logp[len(pre) - 1 + t, cid[t]].item() for t in range(len(cid))) / len(cid)
            assert scores[j].item() == pytest.approx(ll, abs=1e-4)


def test_a_model_without_recognizable_blocks_is_refused_by_name() -> None:
    from torch import nn

    from probekd.teacher.layers import decoder_parts

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks_a, self.blocks_b = nn.ModuleList([nn.Linear(2, 2)]), nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ProbekdError, match=r"cannot find the decoder blocks of Odd: .*blocks_a \(1\), blocks_b \(1\)"):
        decoder_parts(Odd())

    class NoNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ProbekdError, match="cannot find the final norm of NoNorm"):
        decoder_parts(NoNorm())


def test_two_ranks_under_torchrun_write_the_cache_one_process_writes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m probekd extract ...` (gloo on CPU): each rank computes every other shard, and
    the cache is byte for byte the one a single process writes (one thread each, so that the sums run in the same
    order); the split's summary is written once and counts every shard."""
    args = ["extract", "--task", "arc_easy", "--teacher", str(tiny_llama_dir), "--splits", "dev", "--limit", "10",
            "--formulation", "option", "--prompt", "base", "--storage-dtype", "float32",
            "--shard-size", "3"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "probekd", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "probekd", *args, "--out",
                          str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr
    a, b = tmp_path / "one" / "teacher" / "dev", tmp_path / "two" / "teacher" / "dev"
    shards = sorted(p.name for p in a.glob("shard-*"))
    assert len(shards) == 4 and shards == sorted(p.name for p in b.glob("shard-*"))
    for name in [*shards, "manifest.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    summary = json.loads((b / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["computed"] == 10
    # each shard computed once: one progress line per shard over both ranks (rank 0: 0 and 2, rank 1: 1 and 3)
    assert one.stderr.count("dev: shard") == two.stderr.count("dev: shard") == 4
    assert "dev: shard 3, 4/4 examples" in two.stderr and "dev: shard 2, 6/6 examples" in two.stderr
    assert two.stdout.count("teacher acc") == 1  # the table printed by rank 0 only


def test_a_teacher_loaded_with_device_map_auto_extracts_the_same(teacher, tiny_llama_dir: Path) -> None:
    """`extract.device_map: auto` (accelerate's big-model loading; here every layer lands on the CPU) gives the same
    states and answers as the teacher moved to one device, and a `max_memory` budget is accepted."""
    spread = load_teacher(str(tiny_llama_dir), "cpu", device_map="auto", max_memory={"cpu": "2GiB"})
    assert spread.device.type == "cpu"
    tpl = PRESETS["base"]
    exs = examples(4)
    ids = letter_token_ids(teacher.tokenizer, tpl, 5)
    prompts = [tpl.letter_prompt(e) for e in exs]
    for a, b in zip(extract_letter_batch(teacher, prompts, [0, 1, 2], ids),
                    extract_letter_batch(spread, prompts, [0, 1, 2], ids), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)
    tokens = [option_tokens(teacher.tokenizer, *tpl.option_texts(e)) for e in exs]
    one = extract_option_batch(teacher, [p for p, _ in tokens], [c for _, c in tokens], [0, 2])
    two = extract_option_batch(spread, [p for p, _ in tokens], [c for _, c in tokens], [0, 2])
    for x, y in zip(one, two, strict=True):
        for a, b in zip(x, y, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_probekd_run_under_torchrun_shares_the_extraction_and_the_students(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """`torchrun --nproc_per_node 2 -m probekd run CONFIG`: both ranks extract, rank 0 alone fits the probes and
    makes the targets while the other waits, then both train each student together (DDP) and rank 0 reports;
    a rerun finds everything done."""
    import yaml

    cfg = {"name": "tiny", "task": "arc_easy", "teacher": str(tiny_llama_dir),
           "limit": {"train": 24, "dev": 12, "test": 12},
           "extract": {"formulation": "option", "prompt": "base", "storage_dtype": "float32", "shard_size": 5},
           "probe": {"l2_grid": [0.1], "max_iter": 20, "layers": [1, 2], "n_folds": 3},
           "student": {"model": str(tiny_bert_dir), "max_length": 48}, "train": {"epochs": 1, "batch_size": 8},
           "grid": {"fractions": [1.0], "seeds": [0], "signals": ["hard", "probe"]}}  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = str(Path(sys.executable).with_name("torchrun"))
    torchrun = [launcher, "--standalone", "--nproc_per_node", "2", "-m", "probekd"]
    out = tmp_path / "run"
    proc = subprocess.run([*torchrun, "run", str(path), "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "students").iterdir()) == ["hard-f1-s0", "probe-f1-s0"]
    assert (out / "report" / "report.md").is_file()
    assert json.loads((out / "teacher" / "train" / "summary.json").read_text())["processes"] == 2
    assert json.loads((out / "students" / "probe-f1-s0" / "metrics.json").read_text())["processes"] == 2
    before = (out / "students" / "probe-f1-s0" / "metrics.json").read_text()
    again = subprocess.run([*torchrun, "run", str(path), "--out", str(out)], capture_output=True, text=True,
                           env=env, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "students" / "probe-f1-s0" / "metrics.json").read_text() == before


def test_auto_compute_dtype_is_bf16_on_cuda_and_on_cpus_with_native_bf16(tmp_path: Path) -> None:
    """`compute_dtype: auto` reads the CPU's flags: AMX-BF16 or AVX-512 BF16 give bfloat16, AVX2 alone float32 (this
    project's 2-core AVX2 machine), an unreadable file float32; CUDA is bfloat16 whatever the CPU."""
    from probekd.teacher.extract import auto_compute_dtype, native_bf16_cpu

    def cpuinfo(flags: str) -> str:
        f = tmp_path / f"cpuinfo-{len(flags)}"
        f.write_text(f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        return str(f)

    avx2 = cpuinfo("fpu sse sse2 avx avx2 fma")
    sapphire = cpuinfo("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
    cooper = cpuinfo("fpu avx2 avx512f avx512_bf16")
    assert not native_bf16_cpu(avx2) and native_bf16_cpu(sapphire) and native_bf16_cpu(cooper)
    assert not native_bf16_cpu(str(tmp_path / "missing"))
    assert auto_compute_dtype(torch.device("cpu"), avx2) == torch.float32
    assert auto_compute_dtype(torch.device("cpu"), sapphire) == torch.bfloat16
    assert auto_compute_dtype(torch.device("cuda"), avx2) == torch.bfloat16
