"""Optional dependencies (the `probekd[...]` extras): import one only where it is needed, or say how to install it.

| extra | package | needed for |
|---|---|---|
| `zoo` | `gguf` | converting GGUF weights (the packaged models, a `.gguf` file) into a safetensors folder |
| `hf` | `datasets` | reading a task from a Hugging Face `datasets` source (format `hf`) |
| `plots` | `matplotlib` | the PNG plots in reports (reports are still written without it) |
| `trackers` | `tensorboard` | logging training to TensorBoard |
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from probekd.errors import MissingExtraError


def available(module: str) -> bool:
    """Whether `module` (a top-level package name) is installed, checked without importing it."""
    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import and return `module`; if it cannot be imported, raise MissingExtraError naming `extra` and `purpose`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{purpose} needs the optional package {module!r}, which is not installed ({e}); "
            f"install it with: pip install 'probekd[{extra}]'"
        ) from e
