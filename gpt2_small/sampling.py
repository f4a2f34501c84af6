"""Sampling from a `Transformer`: greedy, temperature, top-k, top-p, penalties, streaming, beam search.

    tokens = generate(model, to_tokens("ROMEO:"), 50, temperature=0.8, top_k=40, seed=0)
    text = generate_text(model, get_tokenizer(), "ROMEO:", 50, temperature=0.8)
    for piece in stream_text(model, get_tokenizer(), "ROMEO:", 50): print(piece, end="")
    best = beam_search(model, to_tokens("ROMEO:"), num_beams=4, max_new_tokens=20)

Every loop runs the prompt through the model once (prefill), then one position per step
against a `KVCache` of the earlier positions' keys and values. `use_kv_cache=False` recomputes
the whole sequence at every step instead: slower, and the reference the cache is tested against.

Each sampling step turns the last position's logits into the next token, in this order:
  1. ids >= 50257 are masked: they are the padding of a padded vocabulary (the training presets
     use 50304), never real tokens;
  2. penalties, as in OpenAI's API: logit[j] -= freq_penalty * count[j] + presence_penalty * (count[j] > 0),
     where count[j] is how often token j occurs in the sequence so far (prompt and generated
     tokens, padding excluded);
  3. temperature 0 takes the argmax (greedy); otherwise the logits are divided by the temperature;
  4. top_k keeps the k largest logits (and any tied with the k-th);
  5. top_p keeps the smallest set of most likely tokens whose probability (after 3 and 4) sums
     to at least p;
  6. the token is drawn from the softmax of what is left.
Steps 3 to 5 are HF generate's temperature, top-k and top-p warpers, in its order and with its
arithmetic, so the distribution drawn from is HF's (tested on the whole vocabulary).

Prompts of different lengths go in one batch left-padded (`pad_prompts`), with an attention
mask: padding is never attended to, and each real token's position counts only the real tokens
before it, so every row gives exactly what it would alone (and what HF's generate gives).

Context: GPT-2's positions stop at n_ctx, so a prompt plus max_new_tokens longer than n_ctx is
refused up front with a ValueError. We do not slide the window: with learned absolute positions
every cached key would have to be recomputed, and the model never saw shifted contexts.

Hooks: with the KV cache, each forward call sees only its new positions (the prompt first, then
one token per step), so hooks fire on those alone and patterns span the cached keys. Hooks that
must see the whole sequence at every step need use_kv_cache=False. Either way only the last
position's logits are computed (logits_to_keep=1), so ln_final's hooks see that position alone.

CUDA graphs: on a CUDA device, by default, the decoding steps run against a static KVCache (all
shapes fixed, write position on the device) and the first step is captured as a CUDA graph that
every later step replays. A step of GPT-2 small is some 200 small kernels, and launching them
one by one from Python, not the arithmetic, is what bounds decoding at small batch sizes. The
prompt (prefill) runs normally. A graph replays what was captured once, so hooks would not run:
with any hook attached the steps run eagerly instead (cuda_graph=None), or a ValueError says so
(cuda_graph=True). The static and dynamic caches compute the same logits (tested).

compile=True runs each decoding step through torch.compile (fullgraph; the first step of the
first generation compiles, which takes seconds to a minute; later generations reuse it). It
fuses the bias adds, GELU, residual adds and LayerNorms of a step into fewer kernels; with a
CUDA graph the graph then replays the compiled kernels. It uses a static cache, refuses hooks
like cuda_graph=True, and gives the eager step's tokens (tested on CPU; on a CPU it does not
speed batch-1 decoding up, which is bound by the matrix-vector products there).

Kept between generations: a graphed or compiled generation leaves its static cache and decoding
step (with the captured graph) with the model, and the next one of the same batch size, prompt +
new tokens, dtype, mode, autocast and inference mode starts from them: no allocation, no warm-up
steps, no capture. The graph reads the parameters where they are, and the cache rebuilds what it
derives from them, so weights changed in place in between (a training step, an edit through
.data) are followed; parameters that moved (.to(), load_state_dict(assign=True)) make a new
state. One state per model: a new shape replaces it. It holds the cache's memory (2 * n_layers *
batch * positions * d_model values) until `release_decoding_state(model)` or until the model is
deleted. Two generations interleaved on one model (two open streams) each get their own.
"""

import codecs
import contextlib
import functools
import itertools
import math
import numbers
import operator
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import einops
import tiktoken
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gpt2_small.tokenizer import EOT_ID, EOT_TOKEN, GPT2_VOCAB
from solution import KVCache, Transformer, check_count, check_device, check_flag, check_model, refuse_keywords

_DROPPED = -1e9  # HF's beam search bookkeeping value for "never pick this"

# TransformerLens's and Hugging Face's generate options, and what to write here instead.
OTHER_SAMPLING_OPTIONS = {
    "do_sample": "sampling is the default; temperature=0 is greedy (do_sample=False elsewhere)",
    "use_past_kv_cache": "pass use_kv_cache= (TransformerLens's name for it)",
    "max_length": "pass max_new_tokens=, which counts the new tokens only, not the prompt's",
    "num_beams": "beam search is a function of its own: beam_search(model, tokens, num_beams, max_new_tokens)",
    "repetition_penalty": "Hugging Face's divides the logits of repeated tokens; here freq_penalty= and "
    "presence_penalty= subtract from them (see the module docstring)",
}


# --- settings and one step ---------------------------------------------------------------------


def _is_number(value: object) -> bool:
    """An int or a float, and not a bool, which Python counts as an int but no setting means as one."""
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _check_top_k(top_k: object, d_vocab: int | None) -> None:
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1 or (d_vocab is not None and top_k > d_vocab):
        allowed = "an int >= 1" if d_vocab is None else f"an int in [1, d_vocab={d_vocab}]"
        raise ValueError(f"top_k must be {allowed} or None, got {top_k!r}")


@dataclass(frozen=True)
class SamplingSettings:
    """How one next token is chosen; see the module docstring for the order of operations."""

    temperature: float | int = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | int | None = None  # keep the smallest set of most likely tokens with mass >= top_p
    freq_penalty: float | int = 0.0  # subtracted once per earlier occurrence of a token
    presence_penalty: float | int = 0.0  # subtracted once if a token occurred at all

    def __post_init__(self) -> None:
        # Checked here, not only by generate: process_logits and sample_next_token are public, and
        # there a temperature of -1 inverted the distribution and a top_p of 2 sampled unfiltered.
        t = self.temperature
        if not _is_number(t) or not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        _check_top_k(self.top_k, d_vocab=None)
        p = self.top_p
        if p is not None and (not _is_number(p) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {p!r}")
        for name in ("freq_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

    def check(self, d_vocab: int) -> None:
        """Raise ValueError if top_k exceeds the vocabulary; every other range is checked at construction."""
        _check_top_k(self.top_k, d_vocab)

    @property
    def uses_counts(self) -> bool:
        return self.freq_penalty != 0 or self.presence_penalty != 0


def mask_padding_ids(logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, "batch d_vocab"]:
    """-inf at ids >= 50257, which a padded vocabulary has but no text contains."""
    if logits.shape[-1] <= GPT2_VOCAB:
        return logits
    return logits.index_fill(-1, torch.arange(GPT2_VOCAB, logits.shape[-1], device=logits.device), float("-inf"))


def process_logits(
    logits: Float[Tensor, "batch d_vocab"],
    settings: SamplingSettings,
    counts: Float[Tensor, "batch d_vocab"] | None = None,
) -> Float[Tensor, "batch d_vocab"]:
    """Steps 1-5 of the module docstring, in float32: softmax of the result is what step 6 samples.

    With temperature 0 the result is the penalised logits, whose argmax is the greedy token.
    """
    logits = mask_padding_ids(logits.float())
    if settings.uses_counts:
        if counts is None:
            raise ValueError("freq_penalty and presence_penalty need the token counts")
        logits = logits - settings.freq_penalty * counts - settings.presence_penalty * (counts > 0).float()
    if settings.temperature == 0:
        return logits
    logits = logits / settings.temperature
    if settings.top_k is not None and settings.top_k < logits.shape[-1]:
        # Ties with the k-th largest are kept, as by HF (a bf16 model's logits tie often).
        kth = logits.topk(settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p is not None and settings.top_p < 1:
        # Summed from the least likely end, as by HF: a token is dropped when it and every less
        # likely token together hold at most 1 - top_p. (Summed in float32 from the most likely
        # end, the tail's thousands of tiny probabilities lose their mass to rounding, and a token
        # or two of a nucleus of p = 0.99 would be dropped.)
        ascending, order = logits.sort(dim=-1)
        dropped_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - settings.top_p
        dropped_sorted[..., -1] = False  # the most likely token always stays
        dropped = dropped_sorted.scatter(-1, order, dropped_sorted)
        logits = logits.masked_fill(dropped, float("-inf"))
    return logits


def sample_next_token(
    logits: Float[Tensor, "batch d_vocab"],
    settings: SamplingSettings,
    counts: Float[Tensor, "batch d_vocab"] | None = None,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """One token per row: the argmax (temperature 0) or a draw from softmax(process_logits(...))."""
    processed = process_logits(logits, settings, counts)
    if settings.temperature == 0:
        return processed.argmax(dim=-1)
    probs = processed.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- prompts -----------------------------------------------------------------------------------


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int = EOT_ID, device: torch.device | str | None = None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-pad token lists to one batch; returns (tokens, attention_mask) with 0 at padding."""
    if device is not None:
        device = check_device(device)
    # As for the ids below: 1.5 or True would silently pad with the token 1, and -1 is no token.
    if isinstance(pad_id, bool) or not isinstance(pad_id, numbers.Integral) or pad_id < 0:  # numpy's ints too
        raise ValueError(f"pad_id must be a token id, an int >= 0, got {pad_id!r}")
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one")
    # One str is itself a sequence, of one-character strs: name it whole, not its first character.
    if text := prompts if isinstance(prompts, str) else next((p for p in prompts if isinstance(p, str)), None):
        raise TypeError(
            f"pad_prompts takes lists of token ids, got the str {text!r}; encode text first "
            f"(get_tokenizer().encode), or give strings to generate_text"
        )
    if (empty := next((i for i, p in enumerate(prompts) if len(p) == 0), None)) is not None:
        raise ValueError(f"prompt {empty} of {len(prompts)} is empty; every prompt needs at least one token")
    pos = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), pos), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), pos), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids = torch.as_tensor(list(prompt))
        # Copied into a long tensor, 1.5 or True would silently become the token 1.
        if ids.ndim != 1 or ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(
                f"prompt {row} must be a flat sequence of token ids (ints), got {ids.dtype} values of shape "
                f"{tuple(ids.shape)}: {list(prompt)[:8]!r}"
            )
        tokens[row, pos - len(prompt) :] = ids
        mask[row, pos - len(prompt) :] = 1
    return tokens.to(device), mask.to(device)


def _check_eos(eos: object) -> None:
    # An id >= d_vocab is allowed: it is the default's case on a model of a small vocabulary, and
    # only means that no row stops early. A negative id is never a token.
    if isinstance(eos, bool) or not isinstance(eos, int) or eos < 0:
        raise ValueError(f"eos_token_id must be a token id, an int >= 0, got {eos!r}")


def check_seed(seed: object) -> None:
    """A seed torch's generators take: None or an int in [-2**63, 2**64) (a negative one is
    taken modulo 2**64). Outside it, torch says only "Overflow when unpacking long long"."""
    # numpy's ints have __index__ and are taken; a bool would pass for seed 0 or 1 without a word,
    # and a tensor (which has __index__ too) would be read from the device at each generation.
    if seed is not None and (isinstance(seed, (bool, Tensor)) or not hasattr(type(seed), "__index__")):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if seed is not None and not -(2**63) <= operator.index(seed) < 2**64:
        raise ValueError(f"seed {seed} is outside the range torch's generators take, [-2**63, 2**64)")


def _check_request(model: Transformer, tokens: object, attention_mask: Tensor | None, max_new_tokens: object) -> None:
    check_model(model)
    check_count("max_new_tokens", max_new_tokens, 0)
    if isinstance(tokens, Tensor) and tokens.ndim == 2 and tokens.shape[1] == 0:
        raise ValueError(
            "the prompt is empty (0 tokens); start from <|endoftext|> (id 50256) for an unconditional sample"
        )
    model.check_tokens(tokens, attention_mask)
    model.check_mask_and_cache(tokens, attention_mask, None)
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask must have 1 at the last position of every row: pad prompts on the left")
    total = tokens.shape[1] + max_new_tokens
    if total > model.cfg.n_ctx:
        raise ValueError(
            f"prompt of {tokens.shape[1]} tokens + max_new_tokens={max_new_tokens} = {total} exceeds "
            f"n_ctx={model.cfg.n_ctx}; shorten the prompt or ask for fewer tokens"
        )


# --- the decoding loop -------------------------------------------------------------------------


def _hooked(model: Transformer) -> bool:
    return any(hook_point.has_hooks() for hook_point in model.hook_dict.values())


def _use_compile(model: Transformer, compile: bool, use_kv_cache: bool) -> bool:
    """Check the compile argument: it needs the cache and no hooks."""
    check_flag("use_kv_cache", use_kv_cache)  # a str such as "no" would be truthy
    check_flag("compile", compile)
    if compile and not use_kv_cache:
        raise ValueError("compile=True needs use_kv_cache=True: it compiles one cached decoding step")
    if compile and _hooked(model):
        raise ValueError(
            "compile=True with hooks attached: the compiled step would not follow hooks added or removed "
            "later; remove them (model.reset_hooks()) or pass compile=False"
        )
    return compile


def _use_cuda_graph(model: Transformer, cuda_graph: bool | None, use_kv_cache: bool) -> bool:
    """Resolve the cuda_graph argument: None picks graphs where they work, True insists on them."""
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True, False or None, got {cuda_graph!r}")
    hooked = _hooked(model)
    if cuda_graph is None:
        return model.device.type == "cuda" and use_kv_cache and not hooked
    if cuda_graph:
        if model.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, got device {model.device}")
        if not use_kv_cache:
            raise ValueError("cuda_graph=True needs use_kv_cache=True: the graph replays one cached decoding step")
        if hooked:
            raise ValueError(
                "cuda_graph=True with hooks attached: a CUDA graph replays the kernels captured once, so the "
                "hooks would not run on later steps; remove them (model.reset_hooks()) or pass cuda_graph=False"
            )
    return bool(cuda_graph)


def _decode_step(model: Transformer, tokens: Int[Tensor, "batch 1"], cache: KVCache) -> Float[Tensor, "batch d_vocab"]:
    return model(tokens, kv_cache=cache, logits_to_keep=1)[:, -1]


@functools.cache
def _compiled_decode_step() -> Callable[[Transformer, Tensor, KVCache], Tensor]:
    # One compiled function for every generation: dynamo guards on the shapes of the model and
    # cache it is handed, not on their identity, so a new KVCache of the same shape reuses the
    # compiled code (and a new shape compiles once more, then with dynamic sizes).
    return torch.compile(_decode_step, fullgraph=True)


class _FastStep:
    """One decoding step (one token per row against a static KVCache), compiled with torch.compile,
    captured as a CUDA graph, or both (the graph then replays the compiled kernels).

    Each call copies the new tokens into one input buffer: the graph reads it, and the compiled
    code, which guards on strides, always sees the same layout. With a graph the returned logits
    live in the graph's output buffer until the next call. The model is passed to each call, not
    kept: a _FastStep outlives its generation (see _KeptState), and must not keep a model alive.
    """

    def __init__(self, model: Transformer, cache: KVCache, cuda_graph: bool, compiled: bool):
        self.cache = cache
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=model.device)
        self.run = _compiled_decode_step() if compiled else _decode_step
        self.graph: torch.cuda.CUDAGraph | None = None
        if cuda_graph:
            self._capture(model)

    def _capture(self, model: Transformer) -> None:
        cache = self.cache
        cursor = cache.cursor.clone()
        # Warm-up runs (compilation, cuBLAS handles, workspaces) and the capture itself each write
        # one step at the current slot; rewinding makes the first real step overwrite that slot.
        side = torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run(model, self.tokens, cache)
                cache.cursor.copy_(cursor)
        torch.cuda.current_stream(model.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.run(model, self.tokens, cache)
        cache.cursor.copy_(cursor)

    def __call__(self, model: Transformer, new_tokens: Int[Tensor, "batch 1"]) -> Float[Tensor, "batch d_vocab"]:
        self.tokens.copy_(new_tokens)
        if self.graph is None:
            return self.run(model, self.tokens, self.cache)
        self.graph.replay()  # also advances the cache's device cursor
        return self.logits


# --- what a generation leaves for the next one -------------------------------------------------


@dataclass(eq=False)
class _KeptState:
    """A static KVCache and its fast decoding step, kept with a model after a generation.

    The next generation with the same key (batch size, prompt + new tokens, mode, inference mode,
    autocast, and the address of every parameter and buffer, which a CUDA graph reads) resets the
    cache and reuses both: no allocation, no warm-up runs, no capture. Weights changed in place
    (training, edits) are fine: the graph reads the parameters themselves, and the cache rebuilds
    what it derives from them at the next prefill (KVCache.reset).
    """

    key: tuple
    cache: KVCache
    cuda_graph: bool
    compiled: bool
    step: _FastStep | None = None  # made (compiled, captured) at the first decoding step
    busy: bool = False  # a generation is using it (another one, interleaved, gets its own)


# One entry per model, dropped with the model. A WeakKeyDictionary rather than an attribute,
# so that copy.deepcopy(model) never meets a CUDA graph.
_KEPT: "weakref.WeakKeyDictionary[Transformer, _KeptState]" = weakref.WeakKeyDictionary()


def _acquire_state(model: Transformer, batch: int, max_pos: int, cuda_graph: bool, compiled: bool) -> _KeptState:
    """The model's kept state if it fits and is free; otherwise a new one, kept in its place."""
    device_type = model.device.type
    tensors = itertools.chain(model.parameters(), model.buffers())
    # Inference mode is in the key because tensors made under it refuse in-place updates outside.
    key = (
        batch, max_pos, cuda_graph, compiled, model.dtype, model.device, torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type),
        tuple(t.data_ptr() for t in tensors),
    )  # fmt: skip
    kept = _KEPT.get(model)
    if kept is not None and not kept.busy and kept.key == key:
        kept.cache.reset()
    else:
        share = kept is None or not kept.busy
        if share:
            _KEPT.pop(model, None)  # before allocating: never hold two states' memory at once
        kept = _KeptState(key, KVCache.for_model(model, batch, max_pos, static=True), cuda_graph, compiled)
        if share:
            _KEPT[model] = kept
    kept.busy = True
    return kept


def release_decoding_state(model: Transformer) -> bool:
    """Free the static KVCache and CUDA graph that the model's last fast generation left for the
    next one (see the module docstring); True if there was one. Deleting the model frees them too.
    """
    check_model(model)  # else "cannot create weak reference to 'str' object"
    return _KEPT.pop(model, None) is not None


class _Decoder:
    """Feeds a model a prompt and then one token per row per step; returns the last logits.

    `kept`: a static cache and fast step (from _acquire_state) to decode with instead of a cache
    of its own; the caller releases it.
    """

    def __init__(
        self,
        model: Transformer,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Tensor | None,
        use_kv_cache: bool,
        max_pos: int,
        kept: _KeptState | None = None,
    ):
        self.model = model
        self.tokens, self.mask = tokens, attention_mask
        self.kept = kept
        self.cache = None
        if kept is not None:
            self.cache = kept.cache
        elif use_kv_cache:
            self.cache = KVCache.for_model(model, tokens.shape[0], max_pos)

    def prefill(self) -> Float[Tensor, "batch d_vocab"]:
        return self.model(self.tokens, attention_mask=self.mask, kv_cache=self.cache, logits_to_keep=1)[:, -1]

    def step(self, new_tokens: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
        new = einops.rearrange(new_tokens, "batch -> batch 1")
        if self.kept is not None:
            if self.kept.step is None:
                self.kept.step = _FastStep(self.model, self.kept.cache, self.kept.cuda_graph, self.kept.compiled)
            return self.kept.step(self.model, new)
        if self.cache is not None:
            return _decode_step(self.model, new, self.cache)
        self.tokens = torch.cat([self.tokens, new], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(new, dtype=self.mask.dtype)], dim=1)
        return self.model(self.tokens, attention_mask=self.mask, logits_to_keep=1)[:, -1]

    def reorder(self, index: Int[Tensor, " batch"]) -> None:
        if self.cache is not None:
            self.cache.reorder(index)  # the tokens themselves are only needed without a cache
            return
        self.tokens = self.tokens[index]
        self.mask = None if self.mask is None else self.mask[index]


@contextlib.contextmanager
def _decoding(
    model: Transformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None,
    use_kv_cache: bool,
    max_pos: int,
    cuda_graph: bool,
    compiled: bool,
) -> Iterator[_Decoder]:
    """A _Decoder for one generation; a fast one (graphed or compiled) decodes with the model's
    kept state, handed back for the next generation at the end."""
    kept = _acquire_state(model, tokens.shape[0], max_pos, cuda_graph, compiled) if cuda_graph or compiled else None
    try:
        yield _Decoder(model, tokens, attention_mask, use_kv_cache, max_pos, kept)
    finally:
        if kept is not None:
            kept.busy = False


def stream(
    model: Transformer,
    tokens: Int[Tensor, "batch pos"],
    max_new_tokens: int,
    *,
    temperature: float | int = 1.0,
    top_k: int | None = None,
    top_p: float | int | None = None,
    freq_penalty: float | int = 0.0,
    presence_penalty: float | int = 0.0,
    stop_at_eos: bool = True,
    eos_token_id: int = EOT_ID,
    seed: int | None = None,
    use_kv_cache: bool = True,
    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
    **other_options: object,
) -> Iterator[Int[Tensor, " batch"]]:
    """Yield each step's new tokens, one per row, as they are chosen. See `generate` for the arguments.

    With stop_at_eos, a row that produced eos_token_id yields it from then on, and the stream
    ends once every row has.
    """
    refuse_keywords("stream", other_options, OTHER_SAMPLING_OPTIONS)
    _check_request(model, tokens, attention_mask, max_new_tokens)
    _check_top_k(top_k, model.cfg.d_vocab)  # before the settings' own check, which cannot name d_vocab
    settings = SamplingSettings(temperature, top_k, top_p, freq_penalty, presence_penalty)
    _check_eos(eos_token_id)
    check_seed(seed)
    check_flag("stop_at_eos", stop_at_eos)
    graphed = _use_cuda_graph(model, cuda_graph, use_kv_cache)
    compiled = _use_compile(model, compile, use_kv_cache)
    if max_new_tokens == 0:
        return
    batch, pos = tokens.shape
    device = model.device
    tokens = tokens.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(operator.index(seed))
    counts = None
    if settings.uses_counts:
        counts = torch.zeros(batch, model.cfg.d_vocab, device=device)
        real = torch.ones_like(tokens) if attention_mask is None else attention_mask.long()
        counts.scatter_add_(1, tokens, real.float())
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # no_grad around each model call, not as a decorator: a decorator on a generator function
    # only covers its body if it sees the generator itself, which another wrapper (jaxtyping's
    # runtime checks, say) hides; and a `with` spanning a yield would leak into the caller's code.
    # (_decoding does span the yields: it only hands the kept state back, when the stream ends,
    # is closed, or is garbage-collected.)
    with _decoding(model, tokens, attention_mask, use_kv_cache, pos + max_new_tokens, graphed, compiled) as decoder:
        with torch.no_grad():
            logits = decoder.prefill()
        for step in range(max_new_tokens):
            next_tokens = sample_next_token(logits, settings, counts, generator)
            if stop_at_eos:
                next_tokens = next_tokens.masked_fill(finished, eos_token_id)
                finished |= next_tokens == eos_token_id
            yield next_tokens
            if step + 1 == max_new_tokens or (stop_at_eos and bool(finished.all())):
                return
            if counts is not None:
                counts.scatter_add_(1, next_tokens[:, None], (~finished).float()[:, None])
            with torch.no_grad():
                logits = decoder.step(next_tokens)


def generate(
    model: Transformer,
    tokens: Int[Tensor, "batch pos"],
    max_new_tokens: int,
    *,
    temperature: float | int = 1.0,
    top_k: int | None = None,
    top_p: float | int | None = None,
    freq_penalty: float | int = 0.0,
    presence_penalty: float | int = 0.0,
    stop_at_eos: bool = True,
    eos_token_id: int = EOT_ID,
    seed: int | None = None,
    use_kv_cache: bool = True,
    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
    **other_options: object,
) -> Int[Tensor, "batch total_pos"]:
    """The prompt followed by up to max_new_tokens sampled tokens per row.

    temperature 0 is greedy. With stop_at_eos, rows that finished are padded with eos_token_id
    and generation ends early once all have, as in Hugging Face (an eos_token_id >= d_vocab, the
    default on a model of a small vocabulary, never ends a row). `seed` makes the draw
    reproducible (a generator of its own; the global RNG is left alone); None uses the global
    RNG. attention_mask marks left padding (see pad_prompts). cuda_graph and compile: see the
    module docstring (cuda_graph None: on for a CUDA model without hooks; compile: off).
    TransformerLens's and Hugging Face's options (do_sample, max_length, ...) are refused, naming
    what to write here.
    """
    refuse_keywords("generate", other_options, OTHER_SAMPLING_OPTIONS)
    # stream checks every argument at its first step, so tokens is known to be a Tensor by the time it is moved
    new_tokens = [
        einops.rearrange(next_tokens, "batch -> batch 1")
        for next_tokens in stream(
            model, tokens, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            freq_penalty=freq_penalty, presence_penalty=presence_penalty, stop_at_eos=stop_at_eos,
            eos_token_id=eos_token_id, seed=seed, use_kv_cache=use_kv_cache, attention_mask=attention_mask,
            cuda_graph=cuda_graph, compile=compile,
        )
    ]  # fmt: skip
    return torch.cat([tokens.to(model.device), *new_tokens], dim=1)


def _check_tokenizer(tokenizer: object, caller: str) -> None:
    if not isinstance(tokenizer, tiktoken.Encoding):  # stream_text needs its decode_single_token_bytes
        # A str is the prompt, given where the tokenizer goes: its own check would blame the next argument.
        order = f" ({caller} takes the model, the tokenizer, then the prompt)" if isinstance(tokenizer, str) else ""
        raise TypeError(
            f"tokenizer must be the tiktoken encoding gpt2_small.get_tokenizer() returns, got "
            f"{type(tokenizer).__name__}{order}"
        )


def _encode(tokenizer, prompt: str, index: int | None = None) -> list[int]:
    """The prompt's ids; `index` is its place in a list of prompts, which the errors name."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt{'' if index is None else f' {index}'} must be a str, got {type(prompt).__name__}")
    ids = tokenizer.encode(prompt, allowed_special={EOT_TOKEN})
    if not ids:
        which = "the prompt" if index is None else f"prompt {index} of the list"
        raise ValueError(f"{which} is empty; use '<|endoftext|>' for an unconditional sample")
    return ids


def generate_text(
    model: Transformer, tokenizer, prompt: str | Sequence[str], max_new_tokens: int = 50, **kwargs
) -> str | list[str]:
    """Prompt text plus its continuation (a list of prompts gives a list, batched with left padding).

    The continuation ends before the first generated <|endoftext|> when stop_at_eos is on (the
    default). kwargs are generate's.
    """
    check_model(model)
    _check_tokenizer(tokenizer, "generate_text")
    single = isinstance(prompt, str)
    # bytes are a Sequence too, of ints: "prompt 0 must be a str, got int" named no bytes.
    if not single and (not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray))):
        raise TypeError(f"prompt must be a str or a sequence of str, got {type(prompt).__name__}")
    prompts = [prompt] if single else list(prompt)
    ids = [_encode(tokenizer, p, None if single else i) for i, p in enumerate(prompts)]
    tokens, mask = pad_prompts(ids, device=model.device)
    out = generate(model, tokens, max_new_tokens, attention_mask=mask, **kwargs)
    eos = kwargs.get("eos_token_id", EOT_ID)
    texts = []
    for text, row in zip(prompts, out[:, tokens.shape[1] :].tolist(), strict=True):
        if kwargs.get("stop_at_eos", True) and eos in row:
            row = row[: row.index(eos)]
        texts.append(text + tokenizer.decode([t for t in row if t < GPT2_VOCAB]))
    return texts[0] if single else texts


def stream_text(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 50, **kwargs) -> Iterator[str]:
    """Yield the continuation of one prompt piece by piece, as soon as each piece is valid text.

    A token can end in the middle of a multi-byte character; such bytes are held back until the
    character is complete. Stops before <|endoftext|> when stop_at_eos is on. kwargs are generate's.
    """
    check_model(model)
    _check_tokenizer(tokenizer, "stream_text")
    tokens = torch.tensor([_encode(tokenizer, prompt)], device=model.device)
    eos = kwargs.get("eos_token_id", EOT_ID)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for next_tokens in stream(model, tokens, max_new_tokens, **kwargs):
        token = int(next_tokens[0])
        if token == eos and kwargs.get("stop_at_eos", True):
            break
        piece = decoder.decode(tokenizer.decode_single_token_bytes(token) if token < GPT2_VOCAB else b"")
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


# --- beam search -------------------------------------------------------------------------------


@dataclass
class BeamSearchOutput:
    tokens: Int[Tensor, "batch total_pos"]  # best hypothesis per row, prompt included, eos-padded
    scores: Float[Tensor, " batch"]  # log_probs / generated_length ** length_penalty (HF's sequences_scores)
    log_probs: Float[Tensor, " batch"]  # sum of the generated tokens' log-probabilities
    lengths: Int[Tensor, " batch"]  # generated tokens, eos included


def banned_ngram_tokens(sequence: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already in `sequence` (n-1 last tokens as the prefix)."""
    if n <= 0 or len(sequence) + 1 < n:
        return []
    prefix = tuple(sequence[len(sequence) - n + 1 :])
    return [sequence[i + n - 1] for i in range(len(sequence) - n + 1) if tuple(sequence[i : i + n - 1]) == prefix]


def _gather(values: Tensor, index: Int[Tensor, "batch k"]) -> Tensor:
    """values[b, index[b, j], ...] for every b, j."""
    expanded = index.reshape(*index.shape, *([1] * (values.ndim - 2))).expand(*index.shape, *values.shape[2:])
    return values.gather(1, expanded)


@torch.no_grad()
def beam_search(
    model: Transformer,
    tokens: Int[Tensor, "batch pos"],
    num_beams: int,
    max_new_tokens: int,
    *,
    length_penalty: float | int = 1.0,
    no_repeat_ngram_size: int = 0,
    eos_token_id: int = EOT_ID,
    use_kv_cache: bool = True,
    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
) -> BeamSearchOutput:
    """Beam search, step for step the algorithm of Hugging Face's generate(num_beams=k, do_sample=False).

    Each step extends every beam by every token, keeps the 2k best candidates by summed
    log-probability, moves those of the best k that end in eos (or reach max_new_tokens) to the
    finished hypotheses, scored sum / length ** length_penalty, and continues with the k best
    that did not finish. A row stops once no running beam can beat its k finished ones (HF's
    early_stopping=False heuristic). no_repeat_ngram_size > 0 forbids repeating any n-gram.

    attention_mask marks left padding (see pad_prompts): each row then gives what it gives alone,
    as HF's beam search does with the same mask. The n-grams that no_repeat_ngram_size forbids
    are those of the real tokens; HF also counts the padding's, which can differ only when a
    pad id is generated right after the n-1 tokens that followed it in the padding.
    """
    check_count("num_beams", num_beams, 1)
    # generate returns the prompt for 0 new tokens; a beam is scored by its generated length
    check_count("max_new_tokens", max_new_tokens, 1)
    check_count("no_repeat_ngram_size", no_repeat_ngram_size, 0)
    if not _is_number(length_penalty) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    _check_request(model, tokens, attention_mask, max_new_tokens)
    _check_eos(eos_token_id)
    graphed = _use_cuda_graph(model, cuda_graph, use_kv_cache)
    compiled = _use_compile(model, compile, use_kv_cache)
    device = model.device
    tokens = tokens.to(device)
    batch, prompt_len = tokens.shape
    max_len, keep = prompt_len + max_new_tokens, 2 * num_beams

    running = torch.full((batch, num_beams, max_len), eos_token_id, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = einops.repeat(tokens, "batch pos -> batch beam pos", beam=num_beams)
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = _DROPPED  # all beams start equal: expand only the first
    finished = running.clone()
    finished_scores = torch.full((batch, num_beams), _DROPPED, device=device)
    finished_sums = torch.zeros(batch, num_beams, device=device)
    finished_lengths = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
    is_finished: Bool[Tensor, "batch beam"] = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(batch, dtype=torch.bool, device=device)
    in_top_beams = torch.arange(keep, device=device) < num_beams

    flat = "batch beam pos -> (batch beam) pos"
    prompts = einops.rearrange(running[:, :, :prompt_len], flat)
    prompt_mask, padding = None, [[]] * batch
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        prompt_mask = einops.repeat(attention_mask, "batch pos -> (batch beam) pos", beam=num_beams)
        padding = [(row == 0).nonzero().flatten().tolist() for row in attention_mask.cpu()]
    with _decoding(model, prompts, prompt_mask, use_kv_cache, max_len, graphed, compiled) as decoder:
        logits = decoder.prefill()
        for cur_len in range(prompt_len, max_len):
            log_probs = mask_padding_ids(logits.float()).log_softmax(dim=-1)
            if no_repeat_ngram_size:
                for row, seq in enumerate(einops.rearrange(running[:, :, :cur_len], flat).tolist()):
                    for pos in reversed(padding[row // num_beams]):
                        del seq[pos]
                    log_probs[row, banned_ngram_tokens(seq, no_repeat_ngram_size)] = float("-inf")
            d_vocab = log_probs.shape[-1]
            totals = einops.rearrange(log_probs, "(batch beam) d_vocab -> batch beam d_vocab", beam=num_beams)
            totals = einops.rearrange(totals + running_scores[..., None], "batch beam d_vocab -> batch (beam d_vocab)")
            top_scores, top_index = totals.topk(keep, dim=-1)
            source_beam, token = top_index // d_vocab, top_index % d_vocab
            candidates = _gather(running, source_beam)
            candidates[:, :, cur_len] = token
            stops = (token == eos_token_id) | (cur_len + 1 == max_len)

            # The k best candidates that did not stop run on.
            live_scores = top_scores + stops.float() * _DROPPED
            best_live = live_scores.topk(num_beams, dim=-1).indices
            running = _gather(candidates, best_live)
            running_scores = _gather(live_scores, best_live)
            beam_origin = _gather(source_beam, best_live)

            # Those of the k best that stopped join the finished hypotheses, if they beat the worst.
            length = cur_len + 1 - prompt_len
            newly_finished = stops & in_top_beams & can_improve[:, None]
            penalised = top_scores / length**length_penalty + (~newly_finished).float() * _DROPPED
            merged = torch.cat([finished_scores, penalised], dim=1).topk(num_beams, dim=-1).indices
            finished = _gather(torch.cat([finished, candidates], dim=1), merged)
            finished_sums = _gather(torch.cat([finished_sums, top_scores], dim=1), merged)
            finished_lengths = _gather(torch.cat([finished_lengths, torch.full_like(token, length)], dim=1), merged)
            finished_scores = _gather(torch.cat([finished_scores, penalised], dim=1), merged)
            is_finished = _gather(torch.cat([is_finished, newly_finished], dim=1), merged)

            # HF's early_stopping=False heuristic: the best running beam, at its current length, must
            # still beat the worst finished hypothesis (of a full set of k) for the row to go on.
            best_possible = running_scores[:, 0] / length**length_penalty
            worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, _DROPPED)
            can_improve &= (best_possible[:, None] > worst_finished).any(dim=1)
            if not bool(can_improve.any()) or bool(stops.all()):
                break
            index = einops.rearrange(
                beam_origin + torch.arange(batch, device=device)[:, None] * num_beams, "b k -> (b k)"
            )
            decoder.reorder(index)
            logits = decoder.step(einops.rearrange(running[:, :, cur_len], "batch beam -> (batch beam)"))

    out_len = prompt_len + int(finished_lengths[:, 0].max())
    return BeamSearchOutput(
        tokens=finished[:, 0, :out_len],
        scores=finished_scores[:, 0],
        log_probs=finished_sums[:, 0],
        lengths=finished_lengths[:, 0],
    )


__all__ = [
    "BeamSearchOutput",
    "SamplingSettings",
    "banned_ngram_tokens",
    "beam_search",
    "check_seed",
    "generate",
    "generate_text",
    "mask_padding_ids",
    "pad_prompts",
    "process_logits",
    "release_decoding_state",
    "sample_next_token",
    "stream",
    "stream_text",
]
