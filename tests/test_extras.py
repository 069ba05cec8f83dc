"""Optional packages (the `probekd[...]` extras): without one, the code that needs it says which extra to install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from probekd.data.formats import Columns, read_hf
from probekd.errors import MissingExtraError, ProbekdError
from probekd.extras import available, require
from probekd.models import zoo
from probekd.report import plots


def _hide(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make `module` look uninstalled: a None entry in sys.modules fails its import and its find_spec."""
    monkeypatch.setitem(sys.modules, module, None)


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require("json", "none", "parsing").dumps(1) == "1"
    _hide(monkeypatch, "gguf")
    assert not available("gguf")
    with pytest.raises(MissingExtraError, match=r"pip install 'probekd\[zoo\]'") as e:
        require("gguf", "zoo", "converting x.gguf")
    assert isinstance(e.value, ProbekdError) and "converting x.gguf" in str(e.value)


def test_plots_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide(monkeypatch, "matplotlib")
    assert not plots.plots_available()
    with pytest.raises(MissingExtraError, match=r"probekd\[plots\]"):
        plots.plot_layers(tmp_path / "l.png", [0, 1], {"p": [0.2, 0.3]}, teacher=None, chance=None, chosen=None,
                          title="t")  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_hf_reader_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "datasets")
    with pytest.raises(MissingExtraError, match=r"probekd\[hf\]"):
        read_hf("json", split="train", columns=Columns())


def test_gguf_conversion_without_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide(monkeypatch, "gguf")
    with pytest.raises(MissingExtraError, match=r"probekd\[zoo\]"):
        zoo.convert_gguf(tmp_path / "m.gguf", tmp_path / "out", {})
    assert not (tmp_path / "out").exists()
