"""probekd: task-specific knowledge distillation from LLMs via intermediate-layer probes."""

from probekd.errors import ProbekdError

__version__ = "0.1.0"
__all__ = ["ProbekdError", "__version__"]
