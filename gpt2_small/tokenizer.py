"""GPT-2's byte-level BPE tokenizer, built offline from the ranks file bundled in the package.

The ranks are byte-identical to tiktoken's r50k_base ("gpt2") encoding, so this gives exactly
the ids of Hugging Face's GPT2Tokenizer: "Hello world" -> [15496, 995]. The literal text
"<|endoftext|>" encodes to the special token 50256, as in Hugging Face's tokenizer.
"""

import functools
import numbers
import operator
from collections.abc import Sequence

import numpy as np
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public
import torch
from jaxtyping import Int
from torch import Tensor

from gpt2_small.assets import asset_path, expected_sha256
from solution import check_device, check_flag

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
GPT2_VOCAB = EOT_ID + 1  # real GPT-2 tokens; ids at or above are padding of a padded vocabulary
TOKENIZER_ASSET = "gpt2.tiktoken"
# What the decoders take: ids in a tensor, a numpy array (a token cache's) or a list (numpy's ints
# too), or one id. Annotated in full, so that jaxtyping's run-time checks admit them all.
TokenIds = Tensor | np.ndarray | Sequence[numbers.Integral] | numbers.Integral


def _bundled_ranks() -> dict[bytes, int]:
    """The BPE ranks of the bundled file, as tiktoken.load.load_tiktoken_bpe reads them, checked.

    tiktoken keeps a copy of each ranks file it reads in a cache keyed by the file's path alone
    ($TIKTOKEN_CACHE_DIR, else data-gym-cache in the temporary directory, which any user of the
    machine can write to) and, unless given the file's hash, returns that copy unchecked: the
    sha256 that asset_path checks would vouch for a file that was not what was read. Given the
    hash, tiktoken replaces a copy that differs with the file itself.
    """
    path = str(asset_path(TOKENIZER_ASSET))
    return tiktoken.load.load_tiktoken_bpe(path, expected_hash=expected_sha256(TOKENIZER_ASSET))


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, read from the bundled ranks file; never touches the network."""
    ranks = _bundled_ranks()
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=tiktoken_ext.openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
    )


def hf_tokenizer():
    """Hugging Face's GPT-2 tokenizer (a PreTrainedTokenizerFast), converted from the bundled ranks
    offline: the same ids as get_tokenizer(), for saving beside a checkpoint in Hugging Face's
    format (export_hf does), where transformers and TransformerLens look for it."""
    from transformers import PreTrainedTokenizerFast  # deferred: transformers is slow to import
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class BundledRanksConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:  # its own reads tiktoken's cache unchecked
            return _bundled_ranks()

    converted = BundledRanksConverter(
        vocab_file=str(asset_path(TOKENIZER_ASSET)),
        pattern=tiktoken_ext.openai_public.r50k_pat_str,
        extra_special_tokens={EOT_TOKEN: EOT_ID},
    ).converted()
    return PreTrainedTokenizerFast(
        tokenizer_object=converted, bos_token=EOT_TOKEN, eos_token=EOT_TOKEN, unk_token=EOT_TOKEN
    )


def to_tokens(
    text: str,
    *,
    prepend_bos: bool = False,
    device: str | torch.device | None = None,
) -> Int[Tensor, "1 pos"]:
    """Encode `text` to a [1, pos] long tensor. `prepend_bos` puts <|endoftext|> first, as GPT-2 was never given a BOS token of its own."""
    if not isinstance(text, str):
        hint = ""
        if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
            # TransformerLens's to_tokens pads a list of texts into a batch; here that takes the mask
            hint = (
                "; for a batch of texts, pad_prompts([get_tokenizer().encode(t) for t in texts]) gives the "
                "left-padded tokens and their attention_mask"
            )
        raise TypeError(f"text must be a str, got {type(text).__name__}{hint}")
    if device is not None:
        device = check_device(device)  # "cuda" without a GPU: torch's AssertionError names no argument
    check_flag("prepend_bos", prepend_bos)  # "no" would be truthy
    ids = get_tokenizer().encode(text, allowed_special={EOT_TOKEN})
    if prepend_bos:
        ids = [EOT_ID, *ids]
    if not ids:
        raise ValueError("text encodes to no tokens; pass non-empty text or prepend_bos=True")
    return torch.tensor([ids], dtype=torch.long, device=device)


def to_single_token(text: str) -> int:
    """The id of `text` if it is exactly one token, as TransformerLens's to_single_token:
    to_single_token(" Mary") == 5335. Text of several tokens is a ValueError naming them, where
    to_tokens(text)[0, 0] would silently take the first."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = get_tokenizer().encode(text, allowed_special={EOT_TOKEN})
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens, {ids} ({to_str_tokens(ids)}), not one")
    return ids[0]


def _decodable(tokens: TokenIds, caller: str, ndim: int = 1) -> list:
    """tokens as (nested) lists of ids that have text, or a ValueError/TypeError naming the one that has not.

    Before this check tiktoken raised KeyError for an id of a padded vocabulary's extra rows
    (50257 and up, which an untrained model's argmax can pick) and OverflowError for a negative one.
    """
    if isinstance(tokens, str):  # else each character would be named as a bad id
        raise TypeError(f"{caller} decodes token ids, got the str {tokens!r}; encode text with to_tokens")
    if ndim == 1 and isinstance(tokens, numbers.Integral):  # one id, as TransformerLens takes it
        tokens = [tokens]  # a bool too: _ids refuses it by name
    if isinstance(tokens, Tensor):
        if ndim == 1 and tokens.ndim == 0:  # one id: cache-style scalars, argmax()
            tokens = tokens[None]
        if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
            raise TypeError(f"{caller} decodes integer token ids, got a tensor of dtype {tokens.dtype}")
        if ndim == 1 and tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != ndim:
            shape = "[pos] or [1, pos]" if ndim == 1 else "[batch, pos]"
            hint = ". For a batch use to_strings" if ndim == 1 and tokens.ndim == 2 else ""
            raise ValueError(f"{caller} expects shape {shape}, got {tuple(tokens.shape)}{hint}")
        tokens = tokens.tolist()
    return [_ids(row, caller) for row in tokens] if ndim == 2 else _ids(tokens, caller)


def _ids(tokens: np.ndarray | Sequence, caller: str) -> list[int]:
    ids = []
    for token in tokens:
        try:
            if isinstance(token, bool):
                raise TypeError
            token = operator.index(token)  # ints, numpy's included
        except TypeError:
            raise TypeError(f"{caller} decodes integer token ids, got {token!r}") from None
        if not 0 <= token < GPT2_VOCAB:
            padding = " (ids from 50257 up are a padded vocabulary's unused rows)" if token >= GPT2_VOCAB else ""
            raise ValueError(
                f"{caller}: token id {token} is outside GPT-2's vocabulary [0, {GPT2_VOCAB}), so it has no text"
                f"{padding}"
            )
        ids.append(token)
    return ids


def to_string(tokens: TokenIds) -> str:
    """Decode one sequence: a list of ids, a [pos] tensor or a [1, pos] tensor; or one id (an int
    or a 0-d tensor, as TransformerLens's to_string takes it)."""
    return get_tokenizer().decode(_decodable(tokens, "to_string"))


def to_strings(tokens: Int[Tensor, "batch pos"]) -> list[str]:
    """Decode each row of a [batch, pos] tensor."""
    return get_tokenizer().decode_batch(_decodable(tokens, "to_strings", ndim=2))


def to_str_tokens(tokens: TokenIds | str, *, prepend_bos: bool = False) -> list[str]:
    """One string per token, for labelling plots: "Hello world" -> ["Hello", " world"]; one id (an
    int or a 0-d tensor) gives a list of one.

    Text is encoded as to_tokens encodes it, `prepend_bos` included, so the labels line up with
    the tokens of the run they label; empty text has no tokens and gets no labels. Token ids are
    decoded as they are, and prepend_bos=True with them is refused rather than ignored.
    """
    check_flag("prepend_bos", prepend_bos)
    enc = get_tokenizer()
    if isinstance(tokens, str):
        # Not through to_tokens, which refuses empty text: it has no [1, 0] tensor to give.
        tokens = ([EOT_ID] if prepend_bos else []) + enc.encode(tokens, allowed_special={EOT_TOKEN})
    elif prepend_bos:
        raise ValueError("prepend_bos=True applies to text; to_str_tokens decodes token ids as they are")
    return [
        enc.decode_single_token_bytes(t).decode("utf-8", errors="replace") for t in _decodable(tokens, "to_str_tokens")
    ]
