"""probekd: task-specific knowledge distillation from LLMs via intermediate-layer probes.

The Python API (`probekd.api`): `load_task`, `load_config`, `tune`, `run`, `results`, `export`, `load_student`,
`load_problems`, `rollouts`. They are imported on first use, so `import probekd` is cheap and changes no global
state (no torch, no plotting backend).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from probekd.errors import ProbekdError

__version__ = "0.1.0"

__all__ = [
    "ProbekdError", "__version__", "export", "load_config", "load_problems", "load_student", "load_task", "results",
    "rollouts", "run", "tune",
]  # fmt: skip

if TYPE_CHECKING:
    from probekd.api import export, load_config, load_problems, load_student, load_task, results, rollouts, run, tune


def __getattr__(name: str) -> Any:
    if name in __all__[2:]:
        from probekd import api

        return getattr(api, name)
    raise AttributeError(f"module 'probekd' has no attribute {name!r}")
