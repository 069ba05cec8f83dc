"""Where a causal LM keeps its decoder blocks and its final norm, whatever its family calls them.

Extraction reads the residual stream at every layer: layer 0 is the input of the first decoder block (the token
embeddings after whatever the family adds to them: GPT-2's position embeddings, Gemma's sqrt(hidden) scaling), layer
i the output of block i; the teacher's own answer needs the final norm. Families name these parts differently
(Llama, Qwen2/3, Gemma2/3, Mistral, Phi-3, OLMo: `layers` and `norm`; GPT-2: `h` and `ln_f`; GPT-NeoX: `layers` and
`final_layer_norm`), so the blocks are found by structure instead of by name: the `nn.ModuleList` child of the
decoder with `num_hidden_layers` entries; the final norm is the decoder's child of one of the known names
(`NORM_NAMES`). transformers records hidden states through private per-class tables; this module reads only the
public module tree.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from probekd.errors import ProbekdError

NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f")


@dataclass(frozen=True)
class DecoderParts:
    """A causal LM's decoder blocks (in order) and its final norm."""

    blocks: nn.ModuleList
    norm: nn.Module


def decoder_parts(model: nn.Module) -> DecoderParts:
    """The blocks and final norm of `model` (a `*ForCausalLM` or its base model), or a ProbekdError naming the
    model class and what was missing."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    lists = [(name, m) for name, m in decoder.named_children() if isinstance(m, nn.ModuleList)]
    blocks = [(name, m) for name, m in lists if n is None or len(m) == n]
    if len(blocks) != 1:
        found = ", ".join(f"{name} ({len(m)})" for name, m in lists) or "none"
        raise ProbekdError(
            f"cannot find the decoder blocks of {type(model).__name__}: expected one module list of "
            f"{n} blocks under {type(decoder).__name__}, found: {found}"
        )
    norms = [getattr(decoder, name) for name in NORM_NAMES if isinstance(getattr(decoder, name, None), nn.Module)]
    if not norms:
        raise ProbekdError(
            f"cannot find the final norm of {type(model).__name__}: {type(decoder).__name__} has none of "
            f"{', '.join(NORM_NAMES)}"
        )
    return DecoderParts(blocks=blocks[0][1], norm=norms[0])
