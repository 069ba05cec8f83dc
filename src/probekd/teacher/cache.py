"""The teacher cache: per split, a manifest plus sharded safetensors files, fingerprinted and resumable.

Layout of `RUN/teacher/<split>/`:
- `manifest.json`: format version, fingerprint and the fields it hashes, the example ids in order, shard size,
  layers, shapes, storage dtype. Written before any shard.
- `shard-00000.safetensors`, ...: shard i holds examples `ids[i*S:(i+1)*S]`: `hidden` ([n, L, H] for `letter`,
  [n, K, L, H] for `option`, in the storage dtype), `hidden_mean` (`option` only), `scores` [n, K] fp32 (the
  teacher's own answer scores, -inf where an option is missing), `mask` [n, K], `answers` [n] (-1: unlabelled).
  Each shard is written to a temporary name and renamed, so a shard file that exists is complete.

A rerun with the same fingerprint computes only the missing shards; a different fingerprint is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from probekd.atomic import atomic_path, write_json
from probekd.errors import ProbekdError

FORMAT_VERSION = 1
FP16_MAX = 65504.0


class CacheMismatchError(ProbekdError):
    """A cache exists at the target but was made from other inputs."""


def fingerprint(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines the cached values."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def differing_fields(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The sorted keys whose values differ between two fingerprint field sets (missing counts as different)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def shard_path(folder: Path, i: int, suffix: str = ".safetensors") -> Path:
    return folder / f"shard-{i:05d}{suffix}"


def open_cache(
    folder: Path, manifest: dict[str, Any], *, overwrite: bool = False, suffix: str = ".safetensors",
    what: str = "teacher cache",
) -> list[int]:  # fmt: skip
    """Create or reopen a sharded cache for `manifest` (`fingerprint`, `fields`, `n_shards`); return the indices of
    the shards still missing (`shard-<i><suffix>` files; each is written atomically, so one that exists is complete).

    An existing cache with another fingerprint raises CacheMismatchError naming the fields that differ, unless
    `overwrite`, which deletes it first.
    """
    mpath = folder / "manifest.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if old.get("fingerprint") != manifest["fingerprint"]:
            if not overwrite:
                diff = differing_fields(old.get("fields", {}), manifest["fields"])
                hint = ""
                if "compute_dtype" in diff:  # `auto` resolves per machine: bf16 on CUDA and bf16 CPUs, else fp32
                    was = str(old.get("fields", {}).get("compute_dtype", "?")).removeprefix("torch.")
                    hint = (
                        f"; it was computed in {was}, and compute_dtype auto chose otherwise on this machine: "
                        f"to resume it here, set extract.compute_dtype: {was} (--compute-dtype {was})"
                    )
                raise CacheMismatchError(
                    f"the {what} at {folder} was made with different inputs (differs in: {', '.join(diff)}){hint}; "
                    "use another --out, or pass --overwrite to replace it"
                )
            for f in folder.glob(f"shard-*{suffix}"):
                f.unlink()
    write_json(mpath, manifest)
    return [i for i in range(manifest["n_shards"]) if not shard_path(folder, i, suffix).exists()]


def write_shard(folder: Path, i: int, ids: list[str], tensors: dict[str, torch.Tensor], storage_dtype: str) -> None:
    """Write shard i atomically, casting hidden states to the storage dtype (refusing fp16 overflow)."""
    out = {}
    for name, t in tensors.items():
        if name.startswith("hidden"):
            if storage_dtype == "float16" and t.abs().max().item() > FP16_MAX:
                raise ProbekdError(
                    f"hidden states reach {t.abs().max().item():.0f}, beyond the float16 maximum {FP16_MAX:.0f}; "
                    "store the cache as bfloat16 or float32 (--storage-dtype)"
                )
            t = t.to(getattr(torch, storage_dtype))
        out[name] = t.contiguous()
    with atomic_path(shard_path(folder, i)) as tmp:
        save_file(out, str(tmp), metadata={"ids": json.dumps(ids)})


@dataclass
class TeacherCache:
    """A split cache: ids, scores, option mask and answers in memory (rows in manifest order); the hidden states stay
    on disk and are read on demand (`layer_states`), only the layers asked for, so memory follows what a caller reads,
    not the size of the cache."""

    manifest: dict[str, Any]
    ids: list[str]
    scores: np.ndarray  # [N, K]
    mask: np.ndarray  # [N, K] bool
    answers: np.ndarray  # [N]
    folder: Path | None = None  # the shards' folder; None: no hidden states (e.g. `layout.load_answers`)
    states: tuple[str, ...] = ()  # the hidden-state tensors the shards hold (`hidden`, `hidden_mean`)

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    def padded_mask(self, kmax: int) -> np.ndarray:
        """The option mask [N, kmax], padded with False to `kmax` options (splits may differ in K)."""
        m = np.zeros((len(self.ids), kmax), dtype=bool)
        m[:, : self.mask.shape[1]] = self.mask
        return m

    def teacher_predictions(self) -> np.ndarray:
        """The teacher's own answer per row: the argmax of its scores over the valid options."""
        return np.where(self.mask, self.scores, -np.inf).argmax(1)

    def teacher_accuracy(self) -> float:
        """Accuracy of the teacher's own answer on the labelled rows."""
        lab = self.answers >= 0
        if not lab.any():
            return float("nan")
        return float((self.teacher_predictions()[lab] == self.answers[lab]).mean())

    def layer_states(self, name: str, layer_idx: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """The `name` states (`hidden` or `hidden_mean`) at the cached layers `layer_idx` (indices into `layers`),
        layer first, as float32: [G, N, H] (`letter`) or [G, N, K, H] (`option`), written into `out` when given.

        Read shard by shard from the memory-mapped safetensors files, each run of consecutive layers as one slice,
        so the peak memory is the result plus one shard's slice of it, whatever the number of cached layers."""
        if self.folder is None or name not in self.states:
            where = f"at {self.folder}" if self.folder is not None else "here (only the answers were kept)"
            has = ", ".join(self.states) or "none"
            raise ProbekdError(f"the teacher cache {where} has no {name} states (it has: {has})")
        n_layers = len(self.manifest["layers"])
        if any(not 0 <= i < n_layers for i in layer_idx):
            raise ProbekdError(f"layer indices {list(layer_idx)} out of range: the cache holds {n_layers} layers")
        letter = self.manifest["formulation"] == "letter"
        options = () if letter else (self.mask.shape[1],)
        shape = (len(layer_idx), len(self.ids), *options, self.manifest["hidden_size"])
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape:
            raise ProbekdError(f"output array has shape {out.shape}, the states read have {shape}")
        runs: list[tuple[int, int, int]] = []  # (position in out, first cached layer, count)
        for pos, i in enumerate(layer_idx):
            if runs and runs[-1][1] + runs[-1][2] == i:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((pos, i, 1))
        size = self.manifest["shard_size"]
        for s in range(self.manifest["n_shards"]):
            rows = slice(s * size, min((s + 1) * size, len(self.ids)))
            with safe_open(str(shard_path(self.folder, s)), "pt") as f:
                part = f.get_slice(name)
                for pos, first, count in runs:
                    layers = slice(first, first + count)
                    t = part[:, layers] if letter else part[:, :, layers]
                    out[pos : pos + count, rows] = np.moveaxis(t.float().numpy(), 1 if letter else 2, 0)
        return out


def load_cache(folder: Path) -> TeacherCache:
    """Open a complete split cache: read its ids, scores, mask and answers, check every shard (present, with the ids
    the manifest gives it); hidden states are read later, by `TeacherCache.layer_states`."""
    mpath = folder / "manifest.json"
    if not mpath.exists():
        raise ProbekdError(f"no teacher cache at {folder} (manifest.json missing); run probekd extract first")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ProbekdError(
            f"teacher cache at {folder} has format {manifest.get('format_version')}, "
            f"this probekd reads {FORMAT_VERSION}; re-extract it"
        )
    missing = [i for i in range(manifest["n_shards"]) if not shard_path(folder, i).exists()]
    if missing:
        raise ProbekdError(
            f"teacher cache at {folder} is incomplete (shards {missing} missing); rerun probekd "
            "extract with the same arguments to finish it"
        )
    parts: dict[str, list[np.ndarray]] = {}
    states: set[str] = set()
    size = manifest["shard_size"]
    for i in range(manifest["n_shards"]):
        path = shard_path(folder, i)
        with safe_open(str(path), "pt") as f:
            ids = json.loads(f.metadata()["ids"])
            if ids != manifest["ids"][i * size : (i + 1) * size]:
                raise ProbekdError(f"shard {path} holds other example ids than its manifest says; re-extract")
            names = set(f.keys())
            states = names if i == 0 else states & names
            for name in sorted(names):
                if not name.startswith("hidden"):
                    t = f.get_tensor(name)
                    parts.setdefault(name, []).append(t.float().numpy() if t.is_floating_point() else t.numpy())
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return TeacherCache(
        manifest,
        list(manifest["ids"]),
        cat["scores"],
        cat["mask"].astype(bool),
        cat["answers"],
        folder=folder,
        states=tuple(sorted(n for n in states if n.startswith("hidden"))),
    )
