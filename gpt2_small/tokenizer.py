"""GPT-2's byte-level BPE tokenizer, built offline from the ranks file bundled in the package.

The ranks are byte-identical to tiktoken's r50k_base ("gpt2") encoding, so this gives exactly
the ids of Hugging Face's GPT2Tokenizer: "Hello world" -> [15496, 995]. The literal text
"<|endoftext|>" encodes to the special token 50256, as in Hugging Face's tokenizer.
"""

import functools
from collections.abc import Sequence

import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public
import torch
from jaxtyping import Int
from torch import Tensor

from gpt2_small.assets import asset_path

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
TOKENIZER_ASSET = "gpt2.tiktoken"


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, read from the bundled ranks file; never touches the network."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(asset_path(TOKENIZER_ASSET)))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=tiktoken_ext.openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
    )


def to_tokens(
    text: str,
    *,
    prepend_bos: bool = False,
    device: str | torch.device | None = None,
) -> Int[Tensor, "1 pos"]:
    """Encode `text` to a [1, pos] long tensor. `prepend_bos` puts <|endoftext|> first, as GPT-2 was never given a BOS token of its own."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = get_tokenizer().encode(text, allowed_special={EOT_TOKEN})
    if prepend_bos:
        ids = [EOT_ID, *ids]
    if not ids:
        raise ValueError("text encodes to no tokens; pass non-empty text or prepend_bos=True")
    return torch.tensor([ids], dtype=torch.long, device=device)


def to_string(tokens: Tensor | Sequence[int]) -> str:
    """Decode one sequence: a list of ids, a [pos] tensor or a [1, pos] tensor."""
    if isinstance(tokens, Tensor):
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise ValueError(
                f"to_string decodes one sequence, shape [pos] or [1, pos]; got {tuple(tokens.shape)}. "
                f"For a batch use to_strings"
            )
        tokens = tokens.tolist()
    return get_tokenizer().decode(list(tokens))


def to_strings(tokens: Int[Tensor, "batch pos"]) -> list[str]:
    """Decode each row of a [batch, pos] tensor."""
    if tokens.ndim != 2:
        raise ValueError(f"to_strings expects shape [batch, pos], got {tuple(tokens.shape)}")
    return get_tokenizer().decode_batch(tokens.tolist())


def to_str_tokens(tokens: Tensor | Sequence[int] | str) -> list[str]:
    """One string per token, for labelling plots: "Hello world" -> ["Hello", " world"]."""
    if isinstance(tokens, str):
        tokens = to_tokens(tokens)[0]
    if isinstance(tokens, Tensor):
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        tokens = tokens.tolist()
    enc = get_tokenizer()
    return [enc.decode_single_token_bytes(t).decode("utf-8", errors="replace") for t in tokens]
