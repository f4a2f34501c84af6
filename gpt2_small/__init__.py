"""gpt2_small: a readable, exact, hookable GPT-2.

The model itself lives in the top-level module `solution`; this package re-exports it and
adds the tokenizer, weight loading, sampling, interpretability tools (gpt2_small.interp, and
TransformerLens's weight processing in gpt2_small.processing) and
(in gpt2_small.training and gpt2_small.data) training. gpt2_small.bridge_names says what to hook
here when given one of the TransformerLens bridge's own hook names.
"""

from gpt2_small import interp
from gpt2_small.assets import AssetChecksumError, asset_path
from gpt2_small.interp import (
    ActivationCache,
    activation_patching,
    direct_logit_attribution,
    induction_score,
    logit_lens,
)
from gpt2_small.processing import process_weights
from gpt2_small.sampling import (
    BeamSearchOutput,
    SamplingSettings,
    beam_search,
    generate,
    generate_text,
    pad_prompts,
    release_decoding_state,
    stream,
    stream_text,
)
from gpt2_small.tokenizer import (
    EOT_ID,
    get_tokenizer,
    to_single_token,
    to_str_tokens,
    to_string,
    to_strings,
    to_tokens,
)
from gpt2_small.weights import WeightLoadError, config_from_hf, convert_hf_state_dict, export_hf, load_model
from solution import (
    IGNORE_INDEX,
    MLP,
    Attention,
    Embedding,
    KVCache,
    LayerNorm,
    PositionalEmbedding,
    Transformer,
    TransformerBlock,
    TransformerConfig,
    Unembedding,
    attention_bias,
    blocked_keys,
    causal_mask,
    lm_cross_entropy_loss,
)

__all__ = [
    "EOT_ID",
    "IGNORE_INDEX",
    "MLP",
    "ActivationCache",
    "AssetChecksumError",
    "Attention",
    "BeamSearchOutput",
    "Embedding",
    "KVCache",
    "LayerNorm",
    "PositionalEmbedding",
    "SamplingSettings",
    "Transformer",
    "TransformerBlock",
    "TransformerConfig",
    "Unembedding",
    "WeightLoadError",
    "activation_patching",
    "asset_path",
    "attention_bias",
    "beam_search",
    "blocked_keys",
    "causal_mask",
    "config_from_hf",
    "convert_hf_state_dict",
    "direct_logit_attribution",
    "export_hf",
    "generate",
    "generate_text",
    "get_tokenizer",
    "induction_score",
    "interp",
    "lm_cross_entropy_loss",
    "load_model",
    "logit_lens",
    "pad_prompts",
    "process_weights",
    "release_decoding_state",
    "stream",
    "stream_text",
    "to_single_token",
    "to_str_tokens",
    "to_string",
    "to_strings",
    "to_tokens",
]
