"""Model resolution on tiny models saved to temporary folders; packaged-model errors; atomic conversion leftovers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from probekd.atomic import atomic_path, copy_atomic, remove_stale_partials, write_json
from probekd.errors import ModelError
from probekd.models import zoo


def test_local_folder_resolves_and_loads(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = zoo.prepare(str(tiny_llama_dir))
    assert path == tiny_llama_dir.resolve()
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 2


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="has no config.json"):
        zoo.prepare(str(tmp_path))


def test_missing_paths_and_offline_hub_ids(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="GGUF file not found"):
        zoo.prepare(str(tmp_path / "m.gguf"))
    with pytest.raises(ModelError, match="neither a model folder nor a .gguf file"):
        zoo.prepare("./no/such/folder")
    with pytest.raises(ModelError, match=r"not found in the local Hugging Face cache \(HF_HUB_OFFLINE=1\)"):
        zoo.prepare("someone/not-a-cached-model")


def _fake(tmp_path: Path, data: bytes, sha: str, parts: int = 1) -> zoo.PackagedModel:
    files = []
    for i in range(parts):
        f = tmp_path / f"part{i}.gguf"
        f.write_bytes(data)
        files.append(f)
    real = zoo.PACKAGED["smollm2-135m-instruct"]
    return dataclasses.replace(real, name="fake", sources=lambda: files, sha256=sha)


def test_checksum_mismatch_names_files_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for parts in (1, 3):
        fake = _fake(tmp_path, b"not a gguf", "0" * 64, parts)
        monkeypatch.setitem(zoo.PACKAGED, "fake", fake)
        with pytest.raises(ModelError, match=r"checksum mismatch for packaged model 'fake' .* expected sha256 0{64}"):
            zoo.prepare("fake")
        assert not fake.target().exists()
        assert not list(fake.target().parent.glob(".fake-*.partial-*"))  # the joined scratch file is gone too


def test_packaged_model_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = zoo.PACKAGED["smollm2-135m-instruct"]

    def missing() -> list[Path]:
        return [zoo._module_dir("no_such_module_probekd")]

    monkeypatch.setitem(zoo.PACKAGED, "fake", dataclasses.replace(real, name="fake", sources=missing))
    with pytest.raises(ModelError, match=r"'fake' is not installed .*run: probekd models install fake"):
        zoo.prepare("fake")
    row = next(r for r in zoo.list_models() if r["name"] == "fake")
    assert row["installed"] is False and row["prepared"] is False


def test_prepared_folder_is_reused_without_touching_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake(tmp_path, b"x", "f" * 64)
    monkeypatch.setitem(zoo.PACKAGED, "fake", fake)
    write_json(fake.target() / zoo.MARKER, {"name": "fake"})
    assert zoo.prepare("fake") == fake.target()
    with pytest.raises(ModelError, match="checksum mismatch"):
        zoo.prepare("fake", verify=True)


def test_sha256_of_concatenation(tmp_path: Path) -> None:
    import hashlib

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"hello ")
    b.write_bytes(b"world")
    assert zoo.sha256_files([a, b]) == hashlib.sha256(b"hello world").hexdigest()


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "done").write_text("1")
    assert (target / "done").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_copy_atomic_replaces_a_half_copy_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    src = tmp_path / "cell"
    (src / "checkpoints").mkdir(parents=True)
    (src / "metrics.json").write_text("{}")
    (src / "checkpoints" / "big.bin").write_bytes(b"x")
    dst = tmp_path / "run" / "cell"
    dst.mkdir(parents=True)
    (dst / "stale.npy").write_bytes(b"half")  # an unfinished cell
    copy_atomic(src, dst, ignore=("checkpoints",))
    assert sorted(p.name for p in dst.iterdir()) == ["metrics.json"]
    copy_atomic(src / "metrics.json", tmp_path / "run" / "m.json")
    assert (tmp_path / "run" / "m.json").read_text() == "{}"
    with pytest.raises(FileNotFoundError):
        copy_atomic(tmp_path / "missing", tmp_path / "run" / "other")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["cell", "m.json"]


def test_stale_partials_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".m.partial-abc" / "m").mkdir(parents=True)
    (tmp_path / ".other.partial-x").mkdir()
    remove_stale_partials(tmp_path, "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-x"]


def test_list_models_covers_packaged() -> None:
    names = [r["name"] for r in zoo.list_models()]
    assert names == ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct", "minilm-l6"]
    assert json.dumps(zoo.list_models())


def test_install_rejects_unknown_names() -> None:
    with pytest.raises(ModelError, match=r"unknown packaged model\(s\) \['gpt5'\]"):
        zoo.install(["gpt5"])
