"""Extraction of a task's splits into teacher caches: shard by shard, resumable, with a progress bar."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from probekd.atomic import write_json
from probekd.data.examples import MCQExample, answers_array, option_mask
from probekd.data.prompts import PromptTemplate, get_template
from probekd.errors import ProbekdError
from probekd.models.zoo import model_info, sha256_files
from probekd.teacher import cache as tcache
from probekd.teacher.extract import (
    Teacher,
    extract_letter_batch,
    extract_option_batch,
    length_batches,
    letter_token_ids,
    load_teacher,
    option_tokens,
    resolve_layers,
    shared_prefix,
)

log = logging.getLogger(__name__)


class ExtractConfig(BaseModel):
    """How the teacher is read."""

    model_config = ConfigDict(extra="forbid")

    formulation: Literal["letter", "option"] = Field(
        "letter",
        description="`letter`: one prompt listing the options, state at the last prompt token; `option`: "
        "one sequence per option, state at the option's last token (see DESIGN.md).",
    )
    layers: str | list[int] = Field("all", description="`all` (0 = embeddings .. L), or a list of layer indices.")
    prompt: str | PromptTemplate = Field("auto", description="A preset (auto, base, instruct) or a template.")
    storage_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of cached hidden states; float16 refuses values beyond its range."
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the forward pass: auto = bfloat16 on CUDA and on CPUs with native bfloat16 matmul "
        "(AMX or AVX-512 BF16), float32 on other CPUs.",
    )
    device: str = Field("auto", description="`auto` (CUDA if present, else CPU), `cpu`, `cuda`, `cuda:1`, ...")
    device_map: Literal["auto"] | None = Field(
        None,
        description="`auto`: a teacher larger than one device, its layers spread over the GPUs (and CPU) by "
        "accelerate's big-model loading, within `max_memory`; `device` is then ignored. null: one device.",
    )
    max_memory: dict[str, str] | None = Field(
        None,
        description="With device_map auto: the memory each device may hold, e.g. {0: 70GiB, 1: 70GiB, cpu: 200GiB}.",
    )
    batch_size: int = Field(
        16, ge=1, description="Prompts per forward pass (`letter`); questions, each with its K options (`option`)."
    )
    shard_size: int = Field(256, ge=1, description="Examples per cache shard (the unit of resume).")


def _weights_sha(folder: Path) -> str:
    info = model_info(folder)
    if info.get("sha256"):
        return str(info["sha256"])
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return sha256_files(files)


def _tokenizer_sha(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "chat_template")))
    return sha256_files(files)


def _manifest(
    examples: list[MCQExample],
    cfg: ExtractConfig,
    template: PromptTemplate,
    layers: list[int],
    teacher: Teacher,
    model_folder: Path,
) -> dict[str, Any]:
    ids = [e.id for e in examples]
    fields = {
        "format_version": tcache.FORMAT_VERSION,
        "model_sha256": _weights_sha(model_folder),
        "tokenizer_sha256": _tokenizer_sha(model_folder),
        "prompt": template.model_dump(),
        "formulation": cfg.formulation,
        "layers": layers,
        "storage_dtype": cfg.storage_dtype,
        "compute_dtype": str(next(teacher.model.parameters()).dtype),
        "batch_size": cfg.batch_size,
        "shard_size": cfg.shard_size,
        "ids_sha256": tcache.fingerprint({"ids": ids}),
    }
    return {
        "format_version": tcache.FORMAT_VERSION,
        "fingerprint": tcache.fingerprint(fields),
        "fields": fields,
        "model": str(model_folder),
        "ids": ids,
        "n_shards": (len(ids) + cfg.shard_size - 1) // cfg.shard_size,
        "shard_size": cfg.shard_size,
        "layers": layers,
        "formulation": cfg.formulation,
        "kmax": max(e.k for e in examples),
        "hidden_size": teacher.hidden_size,
    }


def _letter_shard(
    teacher: Teacher,
    exs: list[MCQExample],
    template: PromptTemplate,
    layers: list[int],
    kmax: int,
    bs: int,
    bar: tqdm,
) -> dict[str, torch.Tensor]:
    letter_ids = letter_token_ids(teacher.tokenizer, template, kmax)
    prompts = [template.letter_prompt(e, teacher.tokenizer) for e in exs]
    tokens = teacher.tokenizer(prompts)["input_ids"]  # tokenized once, here
    prefix = shared_prefix(teacher, tokens)  # the chat header and instructions: computed once per shard
    hidden = torch.empty(len(exs), len(layers), teacher.hidden_size)
    scores = torch.full((len(exs), kmax), float("-inf"))
    for idx in length_batches([len(t) for t in tokens], bs):  # batched by length: little padding
        h, logits = extract_letter_batch(teacher, [tokens[i] for i in idx], layers, letter_ids, prefix)
        assert logits is not None
        hidden[idx] = h
        scores[idx] = logits
        bar.update(len(idx))
    return {"hidden": hidden, "scores": scores}


def _option_shard(
    teacher: Teacher,
    exs: list[MCQExample],
    template: PromptTemplate,
    layers: list[int],
    kmax: int,
    bs: int,
    bar: tqdm,
) -> dict[str, torch.Tensor]:
    shape = (len(exs), kmax, len(layers), teacher.hidden_size)
    hidden, hidden_mean = torch.zeros(shape), torch.zeros(shape)
    scores = torch.full((len(exs), kmax), float("-inf"))
    tokens = [option_tokens(teacher.tokenizer, *template.option_texts(e, teacher.tokenizer)) for e in exs]
    shared = shared_prefix(teacher, [pre for pre, _ in tokens])  # the chat header and instructions, once per shard
    for idx in length_batches([len(pre) + max(map(len, conts)) for pre, conts in tokens], bs):
        outs = extract_option_batch(teacher, [tokens[i][0] for i in idx], [tokens[i][1] for i in idx], layers, shared)
        for i, (last, mean, s) in zip(idx, outs, strict=True):
            k = exs[i].k
            hidden[i, :k], hidden_mean[i, :k], scores[i, :k] = last, mean, s
        bar.update(len(idx))
    return {"hidden": hidden, "hidden_mean": hidden_mean, "scores": scores}


def extract_split(
    teacher: Teacher,
    model_folder: Path,
    examples: list[MCQExample],
    out: Path,
    cfg: ExtractConfig,
    *,
    overwrite: bool = False,
    desc: str = "extract",
) -> dict[str, Any]:
    """Fill (or finish) the cache of one split at `out`; return its summary (teacher accuracy, timings, size).

    Under a launcher (`torchrun --nproc_per_node N -m probekd extract ...`, `probekd.ranks`) each rank computes
    every N-th missing shard; rank 0 alone writes what is written once, and all wait for each other before the
    cache is read whole. The cache is the one a single process writes."""
    from probekd.ranks import ranks

    r = ranks()
    template = get_template(cfg.prompt, teacher.tokenizer)
    layers = resolve_layers(cfg.layers, teacher.num_layers)
    manifest = _manifest(examples, cfg, template, layers, teacher, model_folder)
    if r.main:  # the manifest written (and, with overwrite, stale shards removed) once, before any rank starts
        missing = tcache.open_cache(out, manifest, overwrite=overwrite)
    r.barrier()
    if not r.main:  # the same list as rank 0's: read before any rank writes a shard (the second barrier)
        missing = [i for i in range(manifest["n_shards"]) if not tcache.shard_path(out, i).exists()]
    r.barrier()
    kmax, size = manifest["kmax"], cfg.shard_size
    mine = r.mine(missing)
    todo = sum(len(examples[i * size : (i + 1) * size]) for i in mine)
    t0, done = time.perf_counter(), 0
    with tqdm(total=todo, desc=desc, unit="ex", disable=None) as bar:
        for i in mine:
            exs = examples[i * size : (i + 1) * size]
            if cfg.formulation == "letter":
                tensors = _letter_shard(teacher, exs, template, layers, kmax, cfg.batch_size, bar)
            else:
                tensors = _option_shard(teacher, exs, template, layers, kmax, cfg.batch_size, bar)
            mask = torch.from_numpy(option_mask(exs, kmax))
            tensors["scores"] = tensors["scores"].masked_fill(~mask, float("-inf"))
            tensors |= {"mask": mask.to(torch.uint8), "answers": torch.from_numpy(answers_array(exs))}
            tcache.write_shard(out, i, [e.id for e in exs], tensors, cfg.storage_dtype)
            done += len(exs)
            if bar.disable:  # no terminal (a background job's log): one line per shard instead of the bar
                spent = time.perf_counter() - t0
                eta = (todo - done) * spent / done / 60
                log.info(
                    "%s: shard %d, %d/%d examples, %.2f ex/s, %.0f min left", desc, i, done, todo, done / spent, eta
                )
    r.barrier()  # every rank's shards are there
    seconds = time.perf_counter() - t0
    computed = sum(len(examples[i * size : (i + 1) * size]) for i in missing)
    loaded = tcache.load_cache(out)
    summary = {
        "n": len(examples),
        "computed": computed,
        "processes": r.world,
        "seconds": round(seconds, 2),
        "examples_per_s": round(computed / seconds, 2) if computed and seconds > 0 else None,
        "teacher_accuracy": loaded.teacher_accuracy(),
        "cache_bytes": sum(p.stat().st_size for p in out.glob("shard-*.safetensors")),
        "layers": layers,
        "formulation": cfg.formulation,
    }
    if r.main:
        write_json(out / "summary.json", summary)
    return summary


def extract_task(
    task: str,
    teacher: str,
    out: Path,
    splits: list[str],
    cfg: ExtractConfig,
    limit: int | dict[str, int] | None,
    overwrite: bool,
) -> dict[str, Any]:
    """Extract `splits` of `task` (the first `limit` examples of each, or `limit[split]`, when given) into
    `out/teacher/<split>/`
    and write `out/teacher/summary.json`; returns each split's summary. Finished caches are kept (resume)."""
    from probekd.data import load_task
    from probekd.models import prepare

    loaded = load_task(task)
    unknown = [s for s in splits if s not in loaded.splits]
    if unknown:
        raise ProbekdError(f"task {task!r} has no split(s) {unknown}; it has {list(loaded.splits)}")
    folder = prepare(teacher)
    log.info("loading teacher %s from %s", teacher, folder)
    model = load_teacher(str(folder), cfg.device, cfg.compute_dtype, device_map=cfg.device_map,
                         max_memory=cfg.max_memory)  # fmt: skip
    summaries = {}
    for split in splits:
        n = limit.get(split) if isinstance(limit, dict) else limit
        examples = loaded.splits[split][:n] if n else loaded.splits[split]
        summaries[split] = extract_split(
            model, folder, examples, out / "teacher" / split, cfg, overwrite=overwrite, desc=f"{split}"
        )
    from probekd.ranks import ranks

    if ranks().main:
        write_json(out / "teacher" / "summary.json", {"task": task, "teacher": teacher, "splits": summaries})
    return summaries
