"""The README's Python API example, run as written on tiny random models (only the model names are swapped)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    """The first python block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    code = api_example()
    names = 'teacher, student = "smollm2-135m-instruct", "minilm-l6"'
    assert names in code  # the one line this test changes
    code = code.replace(names, f'teacher, student = "{tiny_llama_dir}", "{tiny_bert_dir}"')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[:2]] == ["hard-f1-s0", "probe-f1-s0"]
    assert all(line.split()[2] == "True" for line in printed[:2])  # both students kept
    label, probs = printed[2].split(" ", 1)
    assert label in ("A", "B", "C") and len(eval(probs)) == 3
    assert (tmp_path / "runs" / "notebook-probe-f1-s0" / "probekd.json").is_file()
