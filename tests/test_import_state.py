"""Importing probekd changes no global state: not the caller's matplotlib backend, and `import probekd` alone
pulls in none of the heavy libraries. Each check runs in a fresh interpreter, so the modules this test session
already imported do not hide an import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _run(code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON object last, which is returned."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_imports_and_plots_keep_the_callers_backend(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the optional `plots` extra
    code = """
import json, sys
from pathlib import Path
import matplotlib
matplotlib.use("pdf")
import probekd, probekd.config, probekd.cli, probekd.report.report, probekd.probes.pipeline
after_import = matplotlib.get_backend()
from probekd.report.plots import plot_layers
png = Path(sys.argv[1]) / "layers.png"
plot_layers(png, [0, 1, 2], {"probe": [0.3, 0.5, 0.4]}, teacher=0.35, chance=0.25, chosen=1, title="t")
print(json.dumps({"after_import": after_import, "after_plot": matplotlib.get_backend(), "png": png.is_file(),
                  "pyplot": "matplotlib.pyplot" in sys.modules}))
"""
    got = _run(code, str(tmp_path))
    assert got == {"after_import": "pdf", "after_plot": "pdf", "png": True, "pyplot": False}
    assert (tmp_path / "layers.png").read_bytes().startswith(b"\x89PNG")


def test_import_probekd_is_light() -> None:
    code = """
import json, sys
import probekd
light = sorted(m for m in ("torch", "transformers", "matplotlib") if m in sys.modules)
import probekd.report.plots
print(json.dumps({"import probekd": light, "plots imports matplotlib": "matplotlib" in sys.modules}))
"""
    assert _run(code) == {"import probekd": [], "plots imports matplotlib": False}
