"""Shared fixtures: offline mode, a private cache, and tiny real HF models and tokenizers built from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROBEKD_CACHE", str(tmp_path_factory.getbasetemp() / "probekd-cache"))


def build_tokenizer(chat: bool = True):
    """A real byte-level BPE tokenizer trained on a small text, so letters, spaces and digits all tokenize."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Question: Which is a mammal? A. dog B. fish C. frog D. ant Answer: A",
        "The following is a multiple choice question. Answer with the letter of the correct option.",
        " A B C D E 0 1 2 3 4 5 6 7 8 9 water plants sun energy heat light",
        *[f"Answer: {c}" for c in "ABCDE"],
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with hidden size 32 and a real tokenizer, saved as a plain HF folder."""
    return _tiny_llama(tmp_path_factory, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_tied_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with the output layer tied to the embeddings, as in SmolLM2, Gemma and Qwen."""
    return _tiny_llama(tmp_path_factory, tie_word_embeddings=True)


def _tiny_llama(tmp_path_factory: pytest.TempPathFactory, *, tie_word_embeddings: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _tiny_teacher_run(llama: Path, run: Path, formulation: str, sizes: dict[str, int]) -> Path:
    """Teacher caches of the first `sizes[split]` ARC-Easy questions per split under `run`/teacher (tiny Llama)."""
    from probekd.data import load_task
    from probekd.teacher.extract import load_teacher
    from probekd.teacher.pipeline import ExtractConfig, extract_split

    teacher = load_teacher(str(llama), "cpu")
    task = load_task("arc_easy")
    cfg = ExtractConfig(formulation=formulation, prompt="base", shard_size=16)  # type: ignore[arg-type]
    for split, n in sizes.items():
        extract_split(teacher, llama, task.splits[split][:n], run / "teacher" / split, cfg)
    return run


@pytest.fixture(scope="session")
def tiny_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with letter-formulation teacher caches of 45/20/20 ARC-Easy questions (tiny Llama)."""
    sizes = {"train": 45, "dev": 20, "test": 20}
    return _tiny_teacher_run(tiny_llama_dir, tmp_path_factory.mktemp("run"), "letter", sizes)


@pytest.fixture(scope="session")
def tiny_option_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with option-formulation teacher caches (last-token and mean states) of 40/20/20 ARC-Easy
    questions (tiny Llama)."""
    sizes = {"train": 40, "dev": 20, "test": 20}
    return _tiny_teacher_run(tiny_llama_dir, tmp_path_factory.mktemp("option-run"), "option", sizes)


def build_bert_tokenizer():
    """A real WordPiece tokenizer with BERT's [CLS] a [SEP] b [SEP] pair template and token type ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    corpus = ["which is a mammal? dog fish frog ant water plants sun energy heat light what why how"] * 20
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 32, no dropout) with a real WordPiece tokenizer, saved as a plain HF folder."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tok = build_bert_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        pad_token_id=tok.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
