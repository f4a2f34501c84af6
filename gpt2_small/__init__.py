"""gpt2_small: a readable, exact, hookable GPT-2.

The model itself lives in the top-level module `solution`; this package re-exports it and
adds the tokenizer and weight loading.
"""

from gpt2_small.assets import AssetChecksumError, asset_path
from gpt2_small.tokenizer import EOT_ID, get_tokenizer, to_str_tokens, to_string, to_strings, to_tokens
from gpt2_small.weights import WeightLoadError, config_from_hf, convert_hf_state_dict
from solution import (
    MLP,
    Attention,
    Embedding,
    LayerNorm,
    PositionalEmbedding,
    Transformer,
    TransformerBlock,
    TransformerConfig,
    Unembedding,
    causal_mask,
)

__all__ = [
    "MLP",
    "AssetChecksumError",
    "Attention",
    "EOT_ID",
    "Embedding",
    "LayerNorm",
    "PositionalEmbedding",
    "Transformer",
    "TransformerBlock",
    "TransformerConfig",
    "Unembedding",
    "WeightLoadError",
    "asset_path",
    "causal_mask",
    "config_from_hf",
    "convert_hf_state_dict",
    "get_tokenizer",
    "to_str_tokens",
    "to_string",
    "to_strings",
    "to_tokens",
]
