"""Model resolution: names -> local Hugging Face folders (HF ids, local folders, packaged offline models)."""

from probekd.models.zoo import PACKAGED, cache_root, install, list_models, prepare

__all__ = ["PACKAGED", "cache_root", "install", "list_models", "prepare"]
