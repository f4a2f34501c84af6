"""GPT-2, written out so that it can be read in one sitting and checked to the last decimal.

This file defines, in data-flow order:

    TransformerConfig    hyperparameters, GPT-2 small by default
    HookPoint            TransformerLens's hook point, refusing a hook's return of another shape
    Embedding            tokens -> W_E rows                       (HF: transformer.wte)
    PositionalEmbedding  positions -> W_pos rows                  (HF: transformer.wpe)
    KVCache              keys and values of earlier positions, for incremental decoding
    LayerNorm            centre, scale by 1/std, then w * x + b   (HF: ln_1, ln_2, ln_f)
    Attention            causal multi-head self-attention         (HF: attn.c_attn, attn.c_proj)
    MLP                  W_in, gelu_new, W_out                    (HF: mlp.c_fc, mlp.c_proj)
    TransformerBlock     pre-LayerNorm residual block
    Unembedding          residual stream -> logits                (HF: lm_head)
    lm_cross_entropy_loss  next-token loss, TransformerLens's (forward's return_type="loss")
    Transformer          the whole model, a TransformerLens HookedRootModule

Parameter names, shapes and hook names are TransformerLens's (W_Q is
[n_heads d_model d_head], the pattern is at blocks.{i}.attn.hook_pattern, ...), so
`model.run_with_cache(tokens)` returns the activations a TransformerLens user expects, and
`model.W_Q` (every layer's, stacked), `model.OV` and the like are TransformerLens's too.
The logits equal Hugging Face's GPT2LMHeadModel and every hooked activation equals the
TransformerLens 4 TransformerBridge on the same weights; tests/ checks both.

Loading pretrained weights, the tokenizer, sampling and training live in the package
`gpt2_small`, which re-exports everything defined here.
"""

import dataclasses
import difflib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens import FactoredMatrix, HookedRootModule, hook_points

_ATTN_IMPLS = ("sdpa", "eager")
_RETURN_TYPES = ("logits", "loss", "both", None)  # Transformer.forward's, as TransformerLens's

# einops caches its backend per tensor type, on first sight. A type first seen inside a
# torch.compile trace grows that cache under the trace, and the compiled function compiles a
# second time on its next call (its guard: len(einops._backends._type2backend)), 13 s for a
# GPT-2 training step on a CPU. The model's einops calls see Tensors and Parameters: meet both now.
for _tensor in (torch.empty(0), nn.Parameter(torch.empty(0))):
    einops.rearrange(_tensor, "a -> a")
del _tensor


@dataclass
class TransformerConfig:
    """Shape of a GPT-2 model. Field names follow TransformerLens's HookedTransformerConfig."""

    d_model: int = 768  # width of the residual stream
    n_layers: int = 12  # number of TransformerBlocks
    n_heads: int = 12  # attention heads per block
    d_head: int = 64  # width of one head's queries, keys and values; n_heads * d_head == d_model
    d_mlp: int = 3072  # hidden width of the MLP, 4 * d_model in every GPT-2 size
    d_vocab: int = 50257  # vocabulary: 256 bytes + 50,000 BPE merges + <|endoftext|>
    n_ctx: int = 1024  # longest sequence the model accepts (rows of W_pos)
    layer_norm_eps: float = 1e-5  # added to the variance inside the square root
    init_range: float = 0.02  # std of the normal initialisation of weight matrices
    # "sdpa": the fused F.scaled_dot_product_attention kernel; "eager": the einsum path that
    # materialises scores and pattern. Hooks on attn_scores or pattern always run eager.
    # A str checked in __post_init__ rather than a Literal, so a typo gets our ValueError
    # listing the choices even when beartype checks the dataclass's __init__.
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"TransformerConfig.{name} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be positive, got {value}")
        if self.n_heads * self.d_head != self.d_model:
            raise ValueError(
                f"TransformerConfig.d_model={self.d_model} must equal n_heads * d_head = "
                f"{self.n_heads} * {self.d_head} = {self.n_heads * self.d_head}; {self._head_split_hint()}"
            )
        for name in ("layer_norm_eps", "init_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"TransformerConfig.{name} must be a float, got {value!r}")
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"TransformerConfig.{name} must be a positive number, got {value}")
        if self.attn_impl not in _ATTN_IMPLS:
            raise ValueError(f"TransformerConfig.attn_impl must be one of {_ATTN_IMPLS}, got {self.attn_impl!r}")

    # TransformerLens's names for what every GPT-2 fixes, read by code written for its models
    # (model.cfg.d_vocab_out, model.cfg.act_fn == "gelu_new", ...); not fields, so never saved.
    @property
    def d_vocab_out(self) -> int:
        """Width of the logits: d_vocab (GPT-2 unembeds into its own vocabulary)."""
        return self.d_vocab

    @property
    def act_fn(self) -> str:
        """The MLP's activation: GPT-2's tanh approximation of GELU."""
        return "gelu_new"

    @property
    def normalization_type(self) -> str:
        """LayerNorm with learned w and b ("LN", as TransformerLens names it)."""
        return "LN"

    @property
    def positional_embedding_type(self) -> str:
        """Learned absolute positions, W_pos ("standard", as TransformerLens names it)."""
        return "standard"

    def __getattr__(self, name: str):
        # Reached only for a missing attribute. TransformerLens's config holds the model's device
        # and dtype, and its users write model.cfg.device; here the parameters hold them.
        if name in ("device", "dtype"):
            raise AttributeError(f"TransformerConfig has no {name}: the model's parameters hold it; use model.{name}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _head_split_hint(self) -> str:
        """How to make n_heads * d_head == d_model: a d_head when n_heads divides d_model, else the
        head counts nearest n_heads that do (a d_head of d_model // n_heads would leave a remainder)."""
        if self.d_model % self.n_heads == 0:
            return f"set d_head={self.d_model // self.n_heads} or change n_heads"
        # No divisor of d_model exceeds it: a search up to a mistyped n_heads=10**12 would never end.
        below = max(h for h in range(1, min(self.n_heads, self.d_model + 1)) if self.d_model % h == 0)
        above = next((h for h in range(self.n_heads + 1, self.d_model + 1) if self.d_model % h == 0), None)
        choices = " or ".join(f"n_heads={h} with d_head={self.d_model // h}" for h in (below, above) if h)
        return f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}; use {choices}"


def checked_config(cfg: object, owner: str, alternative: str = "") -> TransformerConfig:
    """cfg itself, once it is a TransformerConfig: a dict or a model would otherwise fail later
    with "'dict' object has no attribute 'd_vocab'", naming neither the module nor the fix.
    `alternative`, as " (or use X)", names another way to build `owner`."""
    if not isinstance(cfg, TransformerConfig):
        hint = "; build one with TransformerConfig(**cfg)" if isinstance(cfg, dict) else ""
        raise TypeError(f"{owner} cfg must be a TransformerConfig{alternative}, got {type(cfg).__name__}{hint}")
    return cfg


def at_least_float32(x: Tensor) -> Tensor:
    """x in float32 if it is held in fewer bits (bfloat16, float16); float32 and float64 as they are."""
    return x.float() if x.element_size() < 4 else x


def _normal(*shape: int, std: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape).normal_(mean=0.0, std=std))


def _zeros(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


def affine(
    x: Float[Tensor, "batch pos d_in"], W: Float[Tensor, "d_in d_out"], b: Float[Tensor, " d_out"]
) -> Float[Tensor, "batch pos d_out"]:
    """x @ W + b, with the bias added by the matrix multiply itself.

    F.linear computes x @ weight.T + bias as one addmm (as HF's Conv1D does), so it is handed
    W.T, a view. A separate `+ b` is a second kernel and a second pass over the output: in a
    one-token decoding step, where every kernel is tiny, launches are what the time goes on.
    Under autocast, b is cast with x and W, and the output is in the autocast dtype, as nn.Linear's.
    """
    return F.linear(x, W.T, b)


class HookPoint(hook_points.HookPoint):
    """TransformerLens's HookPoint, which also refuses a forward hook's return that cannot stand
    in for the activation: anything but None or a tensor of the activation's shape.

    TransformerLens passes on whatever a hook returns. A tensor cut to fewer positions then gave
    logits of fewer positions, and a batch-1 patch was broadcast over the batch, with no error; a
    number failed deep in the next module. Dtype and device are left to the hook: under autocast a
    float32 patch of a bf16 activation is what the next matmul casts anyway. A backward hook's
    return is checked too (shape and dtype, as autograd needs), where torch's own refusal named the
    hook only as 'hook'.
    """

    def __call__(self, x: Tensor) -> Tensor:
        out = super().__call__(x)
        if out is not x:  # a hook returned a new value; with none, or only caching hooks, x itself
            _check_hook_output(self.name, "forward", x, out)
        return out

    def add_hook(self, hook: Callable, dir: str = "fwd", *args, **kwargs) -> object:
        if dir == "bwd":
            hook = _CheckedBackwardHook(hook)
        return super().add_hook(hook, dir, *args, **kwargs)


class _CheckedBackwardHook:
    """A backward hook whose return is checked against the gradient it was given."""

    def __init__(self, hook: Callable):
        self.hook = hook

    def __call__(self, grad: Tensor, hook: HookPoint) -> Tensor | None:
        out = self.hook(grad, hook=hook)
        if out is not None and out is not grad:
            _check_hook_output(hook.name, "backward", grad, out)
        return out

    def __repr__(self) -> str:
        # What TransformerLens names the hook by; a partial's own repr prints its (large) arguments.
        return f"partial({self.hook.func!r},...)" if isinstance(self.hook, partial) else repr(self.hook)


def _check_hook_output(name: str | None, direction: str, x: Tensor, out: object) -> None:
    value = "activation" if direction == "forward" else "gradient"
    if not isinstance(out, Tensor):
        raise TypeError(
            f"a {direction} hook on {name} returned {type(out).__name__}; a hook returns None (to keep the "
            f"{value}) or a tensor of the {value}'s shape {tuple(x.shape)} to replace it"
        )
    if out.shape != x.shape:
        raise ValueError(
            f"a {direction} hook on {name} returned a tensor of shape {tuple(out.shape)} in place of the {value}, "
            f"whose shape is {tuple(x.shape)}; return one of that shape"
            + (" (expand_as(activation) to repeat a patch)" if direction == "forward" else "")
        )
    if direction == "backward" and out.dtype != x.dtype:
        raise TypeError(
            f"a backward hook on {name} returned a {out.dtype} tensor in place of the gradient, which is "
            f"{x.dtype}; autograd takes a gradient of its own dtype"
        )


def _residual_init_std(cfg: TransformerConfig) -> float:
    # GPT-2 shrinks the two projections that write into the residual stream (W_O, W_out) by
    # 1/sqrt(2 * n_layers), so the stream's variance does not grow with depth.
    return cfg.init_range / math.sqrt(2 * cfg.n_layers)


class Embedding(nn.Module):
    """Token embedding: row `token` of W_E."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg = checked_config(cfg, "Embedding")
        self.W_E = _normal(cfg.d_vocab, cfg.d_model, std=cfg.init_range)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        # The same rows as W_E[tokens]. Indexing's backward, though, adds repeated tokens' gradients
        # in an order that varies from run to run on CPUs, so training would not be reproducible;
        # F.embedding's backward adds them in a fixed order.
        return F.embedding(tokens, self.W_E)


class PositionalEmbedding(nn.Module):
    """Learned absolute position embedding: row `pos` of W_pos.

    By default token i sits at position i in every batch item. Incremental decoding and left
    padding pass explicit `positions` instead (see Transformer.forward).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg = checked_config(cfg, "PositionalEmbedding")
        self.W_pos = _normal(cfg.n_ctx, cfg.d_model, std=cfg.init_range)

    def forward(
        self, tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, "batch pos"] | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        batch, pos = tokens.shape
        if positions is None:
            return einops.repeat(self.W_pos[:pos], "pos d_model -> batch pos d_model", batch=batch)
        return F.embedding(positions, self.W_pos)  # not W_pos[positions]: see Embedding.forward


class KVCache:
    """Keys and values of every position seen so far, so each new token costs one position's work.

    Pre-allocated for `max_pos` positions of a `batch` of sequences: `k[layer]` and `v[layer]`
    are [batch max_pos n_heads d_head]. `model(tokens, kv_cache=cache)` writes the new positions'
    keys and values into slots [length, length + pos) and advances `length`. `key_mask` records
    which slots hold real tokens; left padding (attention_mask 0) does not, and no query ever
    attends to it.

    Two layouts of the same computation:
      dynamic (default): attention runs over the filled slots [0, length + pos) only;
      static=True: attention runs over all max_pos slots, the unfilled ones masked, and the write
        position is a device tensor (`cursor`). Every decoding step then has the same shapes and
        no host synchronisation, so a CUDA graph can capture one step and replay it (see
        gpt2_small.sampling). Hooks on a static cache see key_pos = max_pos.

    The weights are taken to be fixed while a cache is in use (one generation): it also keeps
    each layer's stacked W_Q/W_K/W_V, because re-stacking them for every token would cost more
    than the one-token matrix multiply itself. `reset()` empties a cache for the next generation
    without reallocating it, and has those kept weights rebuilt, in place, at their next use; so
    does another model's use of the cache (its keys and values carried over to a model of the
    same shape). Its dtype and device must be the model's (KVCache.for_model makes it so).
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        batch: int,
        max_pos: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
    ):
        checked_config(cfg, "KVCache", alternative=" (or use KVCache.for_model)")
        check_flag("static", static)  # "no" would be truthy
        if any(isinstance(n, bool) or not isinstance(n, int) for n in (batch, max_pos)):
            raise TypeError(f"KVCache batch and max_pos must be ints, got batch={batch!r}, max_pos={max_pos!r}")
        if not 1 <= max_pos <= cfg.n_ctx:
            raise ValueError(f"KVCache max_pos={max_pos} must be in [1, n_ctx={cfg.n_ctx}]")
        if batch < 1:
            raise ValueError(f"KVCache batch={batch} must be >= 1")
        shape = (batch, max_pos, cfg.n_heads, cfg.d_head)  # batch pos n_heads d_head
        # A tensor per layer, not one [n_layers ...] tensor: torch.compile turns an in-place write
        # into a view of a larger input into a copy of all of it, at every decoding step.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.key_mask = torch.zeros(batch, max_pos, dtype=torch.bool, device=device)
        self.static = static
        self.padded = False  # whether any cached position is padding (dynamic: then masks are needed)
        self._length = 0  # filled slots, counted on the host (dynamic)
        self.cursor = torch.zeros((), dtype=torch.long, device=device)  # filled slots, on the device (static)
        self.slots: Int[Tensor, " pos"] | None = None  # static: the slots the forward call in progress writes
        self._weights: dict[int, tuple[Tensor, ...]] = {}
        self._stale: set[int] = set()  # layers whose kept weights predate the last reset()
        self._owners: dict[int, nn.Module] = {}  # the module whose weights each layer keeps

    @classmethod
    def for_model(cls, model: "Transformer", batch: int, max_pos: int, *, static: bool = False) -> "KVCache":
        return cls(model.cfg, batch, max_pos, device=model.device, dtype=model.dtype, static=static)

    @property
    def batch(self) -> int:
        return self.key_mask.shape[0]

    @property
    def max_pos(self) -> int:
        return self.key_mask.shape[1]

    @property
    def length(self) -> int:
        """Filled slots. A static cache counts them on the device only (`cursor`), so that nothing
        in a decoding step depends on a host integer; reading this then waits for the device."""
        return int(self.cursor) if self.static else self._length

    def advance(self, pos: int) -> None:
        """Count `pos` newly written slots as filled."""
        if self.static:
            self.cursor += pos
        else:
            self._length += pos

    def extend(
        self,
        layer: int,
        k: Float[Tensor, "batch pos n_heads d_head"],
        v: Float[Tensor, "batch pos n_heads d_head"],
    ) -> tuple[Float[Tensor, "batch key_pos n_heads d_head"], Float[Tensor, "batch key_pos n_heads d_head"]]:
        """Store layer `layer`'s keys and values for the new positions; return those of all key slots."""
        if self.static:
            # Cast as the dynamic layout's slice assignment casts: under autocast k and v come in
            # bf16, and index_copy_ refuses a dtype other than the cache's.
            self.k[layer].index_copy_(1, self.slots, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(1, self.slots, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[1]
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def weights(self, layer: int, owner: nn.Module, build: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """build() for this layer, computed once per cache (and never kept while autograd records),
        and again when another `owner` (another model's layer) uses the cache."""
        if torch.is_grad_enabled():
            return build()
        # Another model's attention on this cache (its keys and values carried over, as an
        # experiment may) had been handed the first model's kept weights, silently.
        if layer not in self._weights:
            self._weights[layer] = build()
            self._owners[layer] = owner
        elif layer in self._stale or self._owners[layer] is not owner:
            # In place: a CUDA graph captured on this cache reads these very buffers.
            for kept, fresh in zip(self._weights[layer], build(), strict=True):
                kept.copy_(fresh)
            self._stale.discard(layer)
            self._owners[layer] = owner
        return self._weights[layer]

    def reset(self) -> None:
        """Forget every cached position, keeping the buffers (a captured CUDA graph reads them by
        address), for a new generation of the same shape. The model's weights may have changed
        since (a training step, an edit through .data), so each kept weight is rebuilt at its next
        use."""
        self.cursor.zero_()
        self.key_mask.zero_()
        self._length = 0
        self.padded = False
        self.slots = None
        self._stale = set(self._weights)

    def reorder(self, index: Int[Tensor, " new_batch"]) -> None:
        """Keep batch items `index` (in that order, repeats allowed), as beam search needs.

        In place, so that a captured CUDA graph keeps reading the same buffers.
        """
        if index.shape[0] != self.batch:
            raise ValueError(f"reorder index has {index.shape[0]} entries; the cache holds {self.batch} sequences")
        for cached in (*self.k, *self.v, self.key_mask):
            cached.copy_(cached[index])


class LayerNorm(nn.Module):
    """LayerNorm over d_model: (x - mean) / sqrt(var + eps) * w + b.

    hook_scale sees sqrt(var + eps) and hook_normalized sees (x - mean) / scale, before w
    and b, as in TransformerLens. In float16/bfloat16 the statistics are computed in float32,
    because the variance of a wide residual stream overflows or loses its low bits otherwise.

    In float16/bfloat16 with neither hook in use, the fused F.layer_norm kernel computes the same
    function (also with float32 statistics) in one launch instead of about ten, which is what
    bounds one-token decoding steps; the two agree to bf16 rounding (tested). In float32 the
    readable formula always runs, so that it stays bit-identical to TransformerLens's.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg = checked_config(cfg, "LayerNorm")
        self.eps = cfg.layer_norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = _zeros(cfg.d_model)
        # Both [batch pos n_heads ...] on a block's per-head copies of the residual (see
        # Transformer.set_use_split_qkv_input).
        self.hook_scale = HookPoint()  # [batch pos 1]
        self.hook_normalized = HookPoint()  # [batch pos d_model]

    def forward(self, x: Float[Tensor, "batch pos *n_heads d_model"]) -> Float[Tensor, "batch pos *n_heads d_model"]:
        low_precision = x.element_size() < 4
        if low_precision and not (self.hook_scale.has_hooks() or self.hook_normalized.has_hooks()):
            return F.layer_norm(x, (self.cfg.d_model,), self.w.to(x.dtype), self.b.to(x.dtype), self.eps)
        in_dtype = x.dtype
        if low_precision:
            x = x.float()
        x = x - x.mean(dim=-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(dim=-1, keepdim=True) + self.eps).sqrt())
        normalized = self.hook_normalized(x / scale)
        return (normalized * self.w + self.b).to(in_dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention.

    Each head h reads q = x W_Q[h] + b_Q[h] (likewise k, v), attends with
    softmax(q k^T / sqrt(d_head)) over key positions at or before the query, and writes
    z W_O[h] back; the heads' writes are summed and b_O added.

    Two implementations compute the same thing: "eager" materialises attn_scores and pattern
    through einsums (and their hooks), "sdpa" calls the fused F.scaled_dot_product_attention.
    Whenever hook_attn_scores or hook_pattern has a hook (run_with_cache adds them), the
    eager path runs, so cached or patched patterns are always real.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg = checked_config(cfg, "Attention")
        std, out_std = cfg.init_range, _residual_init_std(cfg)
        # Shape [n_heads d_model d_head] as in TransformerLens, stored d_model-major (a permuted
        # view): stacking the three into the fused projection's weight is then a plain copy, not
        # a transposition, in every training step (compiled GPT-2 on an H100: 2 x 50 us per layer).
        self.W_Q, self.W_K, self.W_V = (
            nn.Parameter(torch.empty(cfg.d_model, cfg.n_heads, cfg.d_head).normal_(mean=0.0, std=std).permute(1, 0, 2))
            for _ in range(3)
        )
        self.W_O = _normal(cfg.n_heads, cfg.d_head, cfg.d_model, std=out_std)
        self.b_Q = _zeros(cfg.n_heads, cfg.d_head)
        self.b_K = _zeros(cfg.n_heads, cfg.d_head)
        self.b_V = _zeros(cfg.n_heads, cfg.d_head)
        self.b_O = _zeros(cfg.d_model)
        self.hook_q = HookPoint()  # [batch pos n_heads d_head]
        self.hook_k = HookPoint()  # [batch pos n_heads d_head]
        self.hook_v = HookPoint()  # [batch pos n_heads d_head]
        self.hook_attn_scores = HookPoint()  # [batch n_heads query_pos key_pos]
        self.hook_pattern = HookPoint()  # [batch n_heads query_pos key_pos]
        self.hook_z = HookPoint()  # [batch pos n_heads d_head]
        # Each head's write z[h] W_O[h], before the sum over heads: a HookPoint only while
        # Transformer.set_use_attn_result(True) is on, as it costs n_heads x the output's memory.
        self.hook_result: HookPoint | None = None  # [batch pos n_heads d_model]

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos n_heads d_model"],
        attn_bias: Float[Tensor, "batch 1 pos key_pos"] | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        *,
        key_input: Float[Tensor, "batch pos n_heads d_model"] | None = None,
        value_input: Float[Tensor, "batch pos n_heads d_model"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """`attn_bias` is added to the attention scores: 0 where a query may attend and the most
        negative finite value where it may not (see `attention_bias`); None means plain causal
        attention, the queries being the last positions of the keys.

        With a `kv_cache`, x holds only the new positions: their keys and values are appended
        to layer `layer` of the cache, and attention runs over all cached positions.

        x is what the queries read, and the keys and values too unless key_input and value_input
        are given. It may hold one copy per head ([batch pos n_heads d_model]: each head reads its
        own), which TransformerBlock passes while Transformer.set_use_attn_in or
        set_use_split_qkv_input is on; key_input and value_input are per head.
        """
        if x.ndim == 3 and key_input is None and value_input is None:
            q, k, v = self._project_shared(x, kv_cache, layer)
        elif x.ndim == 3:
            raise ValueError(
                f"with key_input or value_input, x must also hold one copy per head, [batch pos n_heads d_model]; "
                f"got shape {tuple(x.shape)}"
            )
        else:
            q, k, v = self._project_per_head(
                x, x if key_input is None else key_input, x if value_input is None else value_input
            )
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if kv_cache is not None:
            k, v = kv_cache.extend(layer, k, v)
        if self.uses_eager_path():
            z = self._attend_eager(q, k, v, attn_bias)
        else:
            z = self._attend_sdpa(q, k, v, attn_bias)
        z = self.hook_z(z)
        if self.hook_result is not None:
            result = self.hook_result(
                einops.einsum(
                    z, self.W_O, "batch pos n_heads d_head, n_heads d_head d_model -> batch pos n_heads d_model"
                )
            )
            return einops.reduce(result, "batch pos n_heads d_model -> batch pos d_model", "sum") + self.b_O
        # Summing the heads' writes is one matrix multiply over (n_heads d_head).
        z_flat = einops.rearrange(z, "batch pos n_heads d_head -> batch pos (n_heads d_head)")
        W_O = einops.rearrange(self.W_O, "n_heads d_head d_model -> (n_heads d_head) d_model")
        return affine(z_flat, W_O, self.b_O)

    def _project_shared(
        self, x: Float[Tensor, "batch pos d_model"], kv_cache: KVCache | None, layer: int
    ) -> tuple[Float[Tensor, "batch pos n_heads d_head"], ...]:
        # One matrix multiply for all three projections instead of three (fewer, larger GEMMs).
        # Weight products are `affine` (x @ W + b), einops naming the head axes around them:
        # einops.einsum spends ~35 us of host-side planning per call, which at 49 calls came to
        # 6% of a one-token decoding step of GPT-2 small on a CPU.
        W_QKV, b_QKV = self.stacked_qkv() if kv_cache is None else kv_cache.weights(layer, self, self.stacked_qkv)
        qkv = einops.rearrange(
            affine(x, W_QKV, b_QKV),
            "batch pos (qkv n_heads d_head) -> batch pos qkv n_heads d_head",
            qkv=3,
            n_heads=self.cfg.n_heads,
        )
        return qkv.unbind(dim=2)

    def _project_per_head(
        self,
        query_input: Float[Tensor, "batch pos n_heads d_model"],
        key_input: Float[Tensor, "batch pos n_heads d_model"],
        value_input: Float[Tensor, "batch pos n_heads d_model"],
    ) -> tuple[Float[Tensor, "batch pos n_heads d_head"], ...]:
        pattern = "batch pos n_heads d_model, n_heads d_model d_head -> batch pos n_heads d_head"
        return tuple(
            einops.einsum(inputs, W, pattern) + b
            for inputs, W, b in ((query_input, self.W_Q, self.b_Q), (key_input, self.W_K, self.b_K),
                                 (value_input, self.W_V, self.b_V))
        )  # fmt: skip

    def stacked_qkv(self) -> tuple[Float[Tensor, "d_model 3*d_model"], Float[Tensor, " 3*d_model"]]:
        """W_Q, W_K, W_V side by side as one [d_model (qkv n_heads d_head)] matrix (and b_Q, b_K,
        b_V as one vector), for the fused projection in forward.

        W_Q/W_K/W_V are stored d_model-major, so stacking them is a plain copy, and the result is
        contiguous: the matrix multiply reads it in place.
        """
        W_QKV = torch.stack(
            [
                einops.rearrange(W, "n_heads d_model d_head -> d_model n_heads d_head")
                for W in (self.W_Q, self.W_K, self.W_V)
            ],
            dim=1,
        )
        b_QKV = torch.stack([self.b_Q, self.b_K, self.b_V])
        return (
            einops.rearrange(W_QKV, "d_model qkv n_heads d_head -> d_model (qkv n_heads d_head)"),
            einops.rearrange(b_QKV, "qkv n_heads d_head -> (qkv n_heads d_head)"),
        )

    def uses_eager_path(self) -> bool:
        """True when attention runs through the einsum path (config, or hooks that need it)."""
        return self.cfg.attn_impl == "eager" or self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks()

    def _attend_eager(
        self,
        q: Float[Tensor, "batch query_pos n_heads d_head"],
        k: Float[Tensor, "batch key_pos n_heads d_head"],
        v: Float[Tensor, "batch key_pos n_heads d_head"],
        attn_bias: Float[Tensor, "batch 1 query_pos key_pos"] | None = None,
    ) -> Float[Tensor, "batch query_pos n_heads d_head"]:
        scores = einops.einsum(
            q, k, "batch query_pos n_heads d_head, batch key_pos n_heads d_head -> batch n_heads query_pos key_pos"
        ) / math.sqrt(self.cfg.d_head)
        if attn_bias is None:
            attn_bias = attention_bias(causal_mask(q.shape[1], k.shape[1], q.device), scores.dtype)
        scores = scores + attn_bias
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(at_least_float32(scores).softmax(dim=-1).to(v.dtype))
        return einops.einsum(
            pattern,
            v,
            "batch n_heads query_pos key_pos, batch key_pos n_heads d_head -> batch query_pos n_heads d_head",
        )

    def _attend_sdpa(
        self,
        q: Float[Tensor, "batch query_pos n_heads d_head"],
        k: Float[Tensor, "batch key_pos n_heads d_head"],
        v: Float[Tensor, "batch key_pos n_heads d_head"],
        attn_bias: Float[Tensor, "batch 1 query_pos key_pos"] | None = None,
    ) -> Float[Tensor, "batch query_pos n_heads d_head"]:
        query_pos, key_pos = q.shape[1], k.shape[1]
        # Without a mask, two cases need no mask tensor: the plain causal triangle (which has a
        # dedicated flash kernel), and one new query after cached keys (it sees them all).
        triangle = attn_bias is None and query_pos == key_pos
        unmasked = attn_bias is None and query_pos == 1
        if attn_bias is None and not (triangle or unmasked):
            attn_bias = attention_bias(causal_mask(query_pos, key_pos, q.device), q.dtype)
        z = F.scaled_dot_product_attention(
            einops.rearrange(q, "batch query_pos n_heads d_head -> batch n_heads query_pos d_head"),
            einops.rearrange(k, "batch key_pos n_heads d_head -> batch n_heads key_pos d_head"),
            einops.rearrange(v, "batch key_pos n_heads d_head -> batch n_heads key_pos d_head"),
            # Float, already in q's dtype (the cast is a no-op); SDPA would convert a boolean
            # mask to this form in every layer.
            attn_mask=None if triangle or unmasked else attn_bias.to(q.dtype),
            is_causal=triangle,
        )
        return einops.rearrange(z, "batch n_heads query_pos d_head -> batch query_pos n_heads d_head")


def causal_mask(query_pos: int, key_pos: int, device: torch.device) -> Tensor:
    """Boolean [query_pos key_pos] mask, True where the key lies after the query.

    Queries are the last query_pos of the key_pos positions, so query i sits at absolute
    position key_pos - query_pos + i; with query_pos == key_pos this is the usual triangle.
    """
    ones = torch.ones(query_pos, key_pos, dtype=torch.bool, device=device)
    return ones.triu(diagonal=key_pos - query_pos + 1)


def blocked_keys(
    query_slots: Int[Tensor, " query_pos"], key_mask: Bool[Tensor, "batch key_pos"]
) -> Bool[Tensor, "batch 1 query_pos key_pos"]:
    """True where a query may not attend: keys after it, and padding keys (key_mask False).

    Query i sits at key position query_slots[i] (its own key). A padding query still sees its
    own key, so that no row is fully masked (a softmax over nothing is NaN in some kernels);
    padding positions' outputs are never used. Built once per forward call, shared by all layers.
    """
    key_slots = torch.arange(key_mask.shape[1], device=key_mask.device)
    after = einops.rearrange(key_slots, "key_pos -> 1 key_pos") > einops.rearrange(
        query_slots, "query_pos -> query_pos 1"
    )
    own = einops.rearrange(key_slots, "key_pos -> 1 key_pos") == einops.rearrange(
        query_slots, "query_pos -> query_pos 1"
    )
    padding = einops.rearrange(~key_mask, "batch key_pos -> batch 1 key_pos") & ~own
    return einops.rearrange(after | padding, "batch query_pos key_pos -> batch 1 query_pos key_pos")


def attention_bias(
    blocked: Bool[Tensor, "*leading query_pos key_pos"], dtype: torch.dtype
) -> Float[Tensor, "*leading query_pos key_pos"]:
    """The mask as a term added to the attention scores: 0 where a query may attend, and where
    it may not (`blocked`), the most negative finite value of `dtype`.

    Added to a score s, min + s rounds back to min (any realistic s is far below half the
    spacing of floats there, ~1e31), so the sum equals masked_fill(blocked, min) exactly. It
    is not -inf, so that a fully masked row would softmax to uniform instead of NaN, and the
    cached scores equal TransformerLens's bridge.
    The model builds it once per forward call and every layer adds it: given a boolean mask,
    SDPA would build this itself in each layer (two kernels there, per decoding step).
    """
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, torch.finfo(dtype).min)


class MLP(nn.Module):
    """Position-wise MLP: gelu_new(x W_in + b_in) W_out + b_out.

    gelu_new is GPT-2's tanh approximation of GELU, which F.gelu(approximate="tanh") computes.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg = checked_config(cfg, "MLP")
        self.W_in = _normal(cfg.d_model, cfg.d_mlp, std=cfg.init_range)
        self.b_in = _zeros(cfg.d_mlp)
        self.W_out = _normal(cfg.d_mlp, cfg.d_model, std=_residual_init_std(cfg))
        self.b_out = _zeros(cfg.d_model)
        self.hook_pre = HookPoint()  # [batch pos d_mlp]
        self.hook_post = HookPoint()  # [batch pos d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(affine(x, self.W_in, self.b_in))  # [batch pos d_model] @ [d_model d_mlp]
        post = self.hook_post(F.gelu(pre, approximate="tanh"))
        return affine(post, self.W_out, self.b_out)  # [batch pos d_mlp] @ [d_mlp d_model]


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(resid_mid))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg = checked_config(cfg, "TransformerBlock")
        self.ln1 = LayerNorm(cfg)
        self.attn = Attention(cfg)
        self.ln2 = LayerNorm(cfg)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()  # [batch pos d_model]
        self.hook_attn_out = HookPoint()  # [batch pos d_model]
        self.hook_resid_mid = HookPoint()  # [batch pos d_model]
        self.hook_mlp_out = HookPoint()  # [batch pos d_model]
        self.hook_resid_post = HookPoint()  # [batch pos d_model]
        # TransformerLens's optional hooks on copies of the stream, each a HookPoint only while
        # the Transformer's setter turns it on (see Transformer.set_use_attn_in and the others).
        # A copy is what the branch reads, so patching it leaves the stream itself alone.
        self.hook_attn_in: HookPoint | None = None  # [batch pos n_heads d_model]
        self.hook_q_input: HookPoint | None = None  # [batch pos n_heads d_model]
        self.hook_k_input: HookPoint | None = None  # [batch pos n_heads d_model]
        self.hook_v_input: HookPoint | None = None  # [batch pos n_heads d_model]
        self.hook_mlp_in: HookPoint | None = None  # [batch pos d_model]

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        attn_bias: Float[Tensor, "batch 1 pos key_pos"] | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        if self.hook_q_input is not None:
            # ln1 runs on each copy (its hooks fire three times, as in TransformerLens's
            # HookedTransformer), so a patched copy is normalised as the model would.
            query_input, key_input, value_input = (
                self.ln1(hook(self._per_head_copy(resid_pre)))
                for hook in (self.hook_q_input, self.hook_k_input, self.hook_v_input)
            )
            attn = self.attn(query_input, attn_bias, kv_cache, layer, key_input=key_input, value_input=value_input)
        elif self.hook_attn_in is not None:
            attn = self.attn(self.ln1(self.hook_attn_in(self._per_head_copy(resid_pre))), attn_bias, kv_cache, layer)
        else:
            attn = self.attn(self.ln1(resid_pre), attn_bias, kv_cache, layer)
        attn_out = self.hook_attn_out(attn)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = resid_mid if self.hook_mlp_in is None else self.hook_mlp_in(resid_mid.clone())
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in)))
        return self.hook_resid_post(resid_mid + mlp_out)

    def _per_head_copy(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos n_heads d_model"]:
        # Contiguous: its own memory, so a hook editing one copy in place edits no other.
        return einops.repeat(
            resid, "batch pos d_model -> batch pos n_heads d_model", n_heads=self.cfg.n_heads
        ).contiguous()


class Unembedding(nn.Module):
    """Residual stream to logits: x W_U + b_U.

    W_U is a parameter of its own, as in TransformerLens, not a view of W_E: pretrained GPT-2
    ties the two (W_U = W_E^T, and from_pretrained copies it so), but keeping them apart lets
    interpretability work edit or study either alone. b_U is zero in pretrained GPT-2.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg = checked_config(cfg, "Unembedding")
        # Shape [d_model d_vocab], stored vocab-major (a transposed view, like HF's lm_head): with
        # d_vocab = 50257 the row-major layout has an odd leading dimension, and GPU GEMMs on it
        # fall back to unaligned kernels (compiled training on an H100: 232k -> 245k tok/s).
        self.W_U = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model).normal_(mean=0.0, std=cfg.init_range).T)
        self.b_U = _zeros(cfg.d_vocab)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        # [batch pos d_model] @ [d_model d_vocab]. As a matmul (not einsum's batched product),
        # backward writes W_U's gradient in W_U's own vocab-major layout: aligned, and no copy
        # when it is accumulated (tested). Not `affine`: under bf16 autocast the product is bf16
        # and b_U float32, so the logits come out in float32, which the softmax over 50257 of
        # them keeps (and the trainer's fused loss matches); addmm would round them to bf16.
        return x @ self.W_U + self.b_U


IGNORE_INDEX = -100  # a label that asks for no loss, as in Hugging Face and the TransformerLens bridge


def lm_cross_entropy_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None,
    per_token: bool = False,
) -> Float[Tensor, ""] | Float[Tensor, "batch pos-1"]:
    """Next-token cross-entropy, as TransformerLens's: position i's logits predict token i + 1.

    `tokens` may be labels: a token of IGNORE_INDEX (-100) is no target, and its pair counts 0
    and is left out of the mean, as in Hugging Face. With attention_mask, so is a pair where
    either token is padding. per_token gives each pair's loss, [batch pos-1]. The softmax is
    taken in float32 at least: a float64 model's loss stays float64, as TransformerLens's does.
    """
    check_flag("per_token", per_token)  # "no" would be truthy
    log_probs = at_least_float32(logits).log_softmax(dim=-1)
    targets = tokens[:, 1:]
    # IGNORE_INDEX is clamped to a real id for the gather; its loss is zeroed below.
    next_tokens = einops.rearrange(targets.clamp(min=0), "batch pos -> batch pos 1")
    losses = -log_probs[:, :-1].gather(-1, next_tokens)[..., 0]
    real = targets != IGNORE_INDEX
    if attention_mask is not None:
        real &= attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    losses = losses.masked_fill(~real, 0.0)
    if per_token:
        return losses
    n_pairs = real.sum()
    if _host_reads_possible(n_pairs) and int(n_pairs) == 0:
        # Name only what was given: a message about padding confused a caller who passed no mask.
        padding, ignored = attention_mask is not None, bool((targets == IGNORE_INDEX).any())
        if not (padding or ignored):
            raise ValueError(f"tokens of {tokens.shape[1]} position(s) hold no pair of consecutive tokens to score")
        cause = {
            (True, False): "the attention_mask's padding leaves",
            (False, True): "the -100 (IGNORE_INDEX) labels leave",
            (True, True): "the attention_mask's padding and the -100 (IGNORE_INDEX) labels leave",
        }[padding, ignored]
        raise ValueError(f"{cause} no pair of consecutive real tokens, so there is no loss to average")
    return losses.sum() / n_pairs


CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "gpt2_small_config.json"


def _holds_training_run(path: Path) -> bool:
    """Whether `path` is a training run's output directory: gpt2_small.training's layout,
    out_dir/checkpoints/step-NNNNNNN."""
    return (path / "checkpoints").is_dir()


def _training_run_hint(path: Path) -> str:
    """What to say when a loader is pointed at a training run's output directory, or its checkpoints/
    folder, instead of one checkpoint."""
    if path.name == "checkpoints" and any(path.glob("step-*")):
        return (
            f"; {path} is a training run's checkpoints folder: gpt2_small.load_model({str(path.parent)!r}) loads "
            f"its newest checkpoint, or name one of the step-* directories in it"
        )
    if not _holds_training_run(path):
        return ""
    return f"; {path} holds a training run: gpt2_small.load_model({str(path)!r}) loads its newest checkpoint"


# What Transformer.forward returns: logits (kept_pos = pos unless logits_to_keep), the residual
# stream (stop_at_layer), the loss or each pair's loss, logits and loss together, or nothing.
ForwardOutput = (
    Float[Tensor, "batch kept_pos d_vocab"]
    | Float[Tensor, "batch pos d_model"]
    | Float[Tensor, ""]
    | Float[Tensor, "batch pos-1"]
    | tuple[Float[Tensor, "batch pos d_vocab"], Float[Tensor, ""] | Float[Tensor, "batch pos-1"]]
    | None
)


class Transformer(HookedRootModule):
    """GPT-2: tokens [batch pos] -> logits [batch pos d_vocab].

    Tokens are checked before forward runs (see `check_tokens`): dtype torch.long or int32, shape
    [batch pos] with 1 <= pos <= n_ctx, ids in [0, d_vocab). A 1-D tensor is refused rather
    than guessed to be one sequence; pass `tokens[None]`.
    """

    def __init__(self, cfg: TransformerConfig | None = None):
        super().__init__()
        if cfg is None:
            cfg = TransformerConfig()
        self.cfg = cfg = checked_config(cfg, "Transformer")
        self.embed = Embedding(cfg)
        self.hook_embed = HookPoint()  # [batch pos d_model]
        self.pos_embed = PositionalEmbedding(cfg)
        self.hook_pos_embed = HookPoint()  # [batch pos d_model]
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = LayerNorm(cfg)
        self.unembed = Unembedding(cfg)
        # A pre-hook, so that bad tokens get our ValueError before jaxtyping's shape check.
        self.register_forward_pre_hook(_check_tokens_pre_hook, with_kwargs=True)
        self.setup()

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
        *,
        attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None,
        kv_cache: KVCache | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        logits_to_keep: int | None = None,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        labels: Int[Tensor, "batch pos"] | None = None,
    ) -> ForwardOutput:
        """Logits for `tokens` (kept_pos = pos unless logits_to_keep is given).

        attention_mask: 1/True for real tokens and 0/False for (left) padding, as in Hugging Face.
            Padding is never attended to, and a real token's position counts only the real tokens
            before it, so a left-padded prompt gives the same logits as the unpadded one.
        kv_cache: a KVCache holding the earlier positions of these sequences; `tokens` are then
            only the new positions, and the cache is extended with them.
        start_at_layer: as in TransformerLens, `tokens` is then the residual stream [batch pos
            d_model] entering block start_at_layer (say, a patched cache["resid_pre", k]), and
            forward runs blocks [start_at_layer, n_layers) (or to stop_at_layer), ln_final and the
            unembedding. Negative values count from the end; n_layers runs no block. The
            embeddings and earlier blocks, and their hooks, do not run. attention_mask still keeps
            padding from being attended to.
        stop_at_layer: as in TransformerLens, run the embeddings and blocks [0, stop_at_layer)
            only (negative values count from the end) and return the residual stream there,
            before ln_final: 0 gives the embeddings, n_layers the last block's resid_post.
        logits_to_keep: as in Hugging Face, return the logits of the last logits_to_keep positions
            only. Generation needs the last one alone, and ln_final and the unembedding then run
            on it alone, not on every prompt position (the [batch pos d_vocab] logits of a long
            prompt are large). ln_final's hooks see just those positions.
        return_type: as in TransformerLens. "logits"; "loss", the mean next-token cross-entropy
            of `tokens` (lm_cross_entropy_loss, padding left out), or each pair's loss with
            loss_per_token=True; "both", (logits, loss); None, nothing (the hooks still run, the
            unembedding does not).
        labels: as in the TransformerLens bridge and Hugging Face, the tokens the loss scores in
            place of `tokens` (position i's logits predict labels[:, i + 1]); -100 (IGNORE_INDEX)
            marks a position with no target, say a prompt's. With start_at_layer, whose input is
            a residual stream, the loss needs them.
        """
        for name, layer in (("start_at_layer", start_at_layer), ("stop_at_layer", stop_at_layer)):
            if layer is not None:
                self._check_layer_bound(name, layer, kv_cache)
        batch, pos = tokens.shape[:2]
        if logits_to_keep is not None:
            self._check_logits_to_keep(logits_to_keep, pos, stop_at_layer)
        wants_loss = self._check_return_type(
            return_type, loss_per_token, pos, start_at_layer, stop_at_layer, logits_to_keep, kv_cache, labels
        )
        if kv_cache is not None and kv_cache.static:
            positions, blocked = self._static_slots(attention_mask, kv_cache, batch, pos)
        else:
            positions, blocked = self._dynamic_slots(attention_mask, kv_cache, batch, pos, tokens.device)
        if start_at_layer is None:
            residual = self.hook_embed(self.embed(tokens)) + self.hook_pos_embed(self.pos_embed(tokens, positions))
        else:
            residual = tokens  # the positions were added at the embedding, which ran before
        attn_bias = None if blocked is None else attention_bias(blocked, self._scores_dtype(residual))
        # A slice of the layer indices, so negative and out-of-order bounds act as TransformerLens's.
        for layer in range(self.cfg.n_layers)[start_at_layer:stop_at_layer]:
            residual = self.blocks[layer](residual, attn_bias, kv_cache, layer)
        if stop_at_layer is not None:
            return residual
        if kv_cache is not None:
            kv_cache.advance(pos)
        if logits_to_keep is not None:
            residual = residual[:, pos - logits_to_keep :]  # LayerNorm and unembedding act per position
        residual = self.ln_final(residual)
        if return_type is None:
            return None
        logits = self.unembed(residual)
        if not wants_loss:
            return logits
        targets = tokens if labels is None else labels.to(logits.device)
        loss = lm_cross_entropy_loss(logits, targets, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    @staticmethod
    def _scores_dtype(residual: Tensor) -> torch.dtype:
        # Attention scores come out of matrix products: in autocast's dtype under autocast.
        device_type = residual.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return residual.dtype

    def _check_layer_bound(self, name: str, layer: object, kv_cache: KVCache | None) -> None:
        """Check start_at_layer or stop_at_layer (`name`)."""
        n_layers = self.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{name} must be an int or None, got {layer!r}")
        if not -n_layers <= layer <= n_layers:
            raise ValueError(f"{name}={layer} is outside [-{n_layers}, {n_layers}] (n_layers={n_layers})")
        if kv_cache is not None:
            skipped = "earlier" if name == "start_at_layer" else "later"
            raise ValueError(f"{name} cannot be used with a kv_cache: the {skipped} layers' caches would not be filled")

    @staticmethod
    def _check_logits_to_keep(logits_to_keep: object, pos: int, stop_at_layer: int | None) -> None:
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
            raise TypeError(f"logits_to_keep must be an int or None, got {logits_to_keep!r}")
        if not 1 <= logits_to_keep <= pos:
            raise ValueError(f"logits_to_keep={logits_to_keep} must be in [1, {pos}], the number of positions given")
        if stop_at_layer is not None:
            raise ValueError("logits_to_keep cannot be used with stop_at_layer, which returns the residual stream")

    @staticmethod
    def _check_return_type(
        return_type: object,
        loss_per_token: object,
        pos: int,
        start_at_layer: int | None,
        stop_at_layer: int | None,
        logits_to_keep: int | None,
        kv_cache: KVCache | None,
        labels: Tensor | None,
    ) -> bool:
        """Refuse a return_type, or a combination, that forward cannot honour; True if it wants the loss."""
        if return_type not in _RETURN_TYPES:
            raise ValueError(f"return_type must be one of {_RETURN_TYPES}, got {return_type!r}")
        check_flag("loss_per_token", loss_per_token)
        if stop_at_layer is not None and return_type != "logits":
            raise ValueError(
                f"return_type={return_type!r} cannot be used with stop_at_layer, which returns the residual"
            )
        wants_loss = return_type in ("loss", "both")
        if loss_per_token and not wants_loss:
            raise ValueError(f"loss_per_token=True needs return_type 'loss' or 'both', got {return_type!r}")
        if labels is not None and not wants_loss:
            raise ValueError(f"labels are only scored with return_type 'loss' or 'both', got {return_type!r}")
        if not wants_loss:
            return False
        if start_at_layer is not None and labels is None:
            raise ValueError(
                f"return_type={return_type!r} with start_at_layer needs labels=tokens: the input is a residual "
                "stream, not the tokens to predict"
            )
        if logits_to_keep is not None or kv_cache is not None:
            raise ValueError(
                "return_type='loss' or 'both' needs every position's logits and the tokens after them: "
                "pass neither logits_to_keep nor kv_cache"
            )
        if pos < 2:
            raise ValueError("the loss needs at least 2 positions (a token and the one after it); got 1")
        return True

    @staticmethod
    def _dynamic_slots(
        attention_mask: Tensor | None, kv_cache: KVCache | None, batch: int, pos: int, device: torch.device
    ) -> tuple[Int[Tensor, "batch pos"] | None, Bool[Tensor, "batch 1 pos key_pos"] | None]:
        """Positions of the new tokens and the attention mask; None for either when the default holds.

        Without padding anywhere the positions are start, start + 1, ... and attention is plainly
        causal, so neither tensor is built (the common case, and the one flash attention wants).
        """
        start = 0 if kv_cache is None else kv_cache.length
        # One host sync per call with a mask: generation passes it only with the prompt.
        padded = attention_mask is not None and not bool(attention_mask.all())
        if kv_cache is None:
            key_mask = attention_mask.bool() if padded else None
        else:
            kv_cache.key_mask[:, start : start + pos] = True if attention_mask is None else attention_mask.bool()
            kv_cache.padded |= padded
            key_mask = kv_cache.key_mask[:, : start + pos] if kv_cache.padded else None
        if key_mask is not None:
            positions = (key_mask.long().cumsum(dim=-1) - 1).clamp(min=0)[:, start:]
            return positions, blocked_keys(torch.arange(start, start + pos, device=device), key_mask)
        if start > 0:
            return einops.repeat(torch.arange(start, start + pos, device=device), "pos -> batch pos", batch=batch), None
        return None, None

    @staticmethod
    def _static_slots(
        attention_mask: Tensor | None, kv_cache: KVCache, batch: int, pos: int
    ) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch 1 pos key_pos"]]:
        """As _dynamic_slots for a static cache, from device tensors only (no host sync, fixed shapes)."""
        slots = kv_cache.cursor + torch.arange(pos, device=kv_cache.cursor.device)
        real = torch.ones(batch, pos, dtype=torch.bool, device=slots.device)
        kv_cache.key_mask.index_copy_(1, slots, real if attention_mask is None else attention_mask.bool())
        kv_cache.slots = slots
        # A real token's position counts the real tokens before it; slots not yet filled are
        # False in key_mask, so the cumulative sum over all max_pos slots is right where it is read.
        positions = (kv_cache.key_mask.long().cumsum(dim=-1) - 1).clamp(min=0).index_select(1, slots)
        return positions, blocked_keys(slots, kv_cache.key_mask)

    def check_tokens(self, tokens: object, attention_mask: object = None) -> None:
        """Raise ValueError/TypeError naming what is wrong with `tokens`, or return None.

        attention_mask, when given, only sharpens the message for an id outside the vocabulary
        that sits in the padding (pad_prompts pads with <|endoftext|>, 50256, by default)."""
        if not isinstance(tokens, Tensor):
            hint = ""
            if isinstance(tokens, str):  # TransformerLens's forward takes text; this one takes ids only
                hint = "; for text pass gpt2_small.to_tokens(text)"
            elif isinstance(tokens, (list, tuple)):
                hint = "; wrap a nested list of ids as torch.tensor(ids)"
            raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}{hint}")
        if tokens.dtype not in (torch.long, torch.int32):  # the index types F.embedding takes
            integer = not (tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex())
            hint = "; convert with tokens.long()" if integer else ""
            if tokens.is_floating_point() and tokens.ndim == 3:
                hint = "; to run from a residual stream [batch, pos, d_model], pass start_at_layer"
            raise ValueError(f"tokens must have dtype torch.long or torch.int32, got {tokens.dtype}{hint}")
        if tokens.ndim != 2:
            hint = "; for one sequence pass tokens[None]" if tokens.ndim == 1 else ""
            raise ValueError(f"tokens must have shape [batch, pos] (ndim 2), got shape {tuple(tokens.shape)}{hint}")
        batch, pos = tokens.shape
        if pos < 1 or pos > self.cfg.n_ctx:
            raise ValueError(f"sequence length {pos} must be in [1, n_ctx={self.cfg.n_ctx}]")
        if batch < 1:
            raise ValueError("tokens has batch size 0; pass at least one sequence")
        if not _host_reads_possible(tokens):
            return
        low, high = torch.aminmax(tokens)
        low, high = int(low), int(high)
        if low < 0 or high >= self.cfg.d_vocab:
            bad = low if low < 0 else high
            outside = (tokens < 0) | (tokens >= self.cfg.d_vocab)
            masked = isinstance(attention_mask, Tensor) and attention_mask.shape == tokens.shape
            if masked and not bool((outside & attention_mask.bool()).any()):
                # Padding is embedded like any token (and then never attended to), so its id must exist.
                raise ValueError(
                    f"token id {bad} is outside [0, d_vocab={self.cfg.d_vocab}); it is the padding's (attention_mask 0), "
                    f"which is embedded all the same: pad with an id the model has, pad_prompts(..., pad_id=0)"
                )
            raise ValueError(f"token id {bad} is outside [0, d_vocab={self.cfg.d_vocab})")

    def check_residual(self, residual: object) -> None:
        """As check_tokens, for the residual stream that forward takes in their place with start_at_layer."""
        if not isinstance(residual, Tensor) or not residual.is_floating_point():
            got = f"dtype {residual.dtype}" if isinstance(residual, Tensor) else type(residual).__name__
            raise TypeError(
                "with start_at_layer, forward takes the residual stream entering that block (a float tensor "
                f"[batch, pos, d_model], e.g. cache['resid_pre', layer]) in place of tokens, got {got}"
            )
        d_model, n_ctx = self.cfg.d_model, self.cfg.n_ctx
        shape = tuple(residual.shape)
        if residual.ndim != 3 or shape[0] < 1 or not 1 <= shape[1] <= n_ctx or shape[2] != d_model:
            raise ValueError(
                f"the residual stream must have shape [batch, pos, d_model={d_model}] with batch >= 1 and "
                f"1 <= pos <= n_ctx={n_ctx}, got shape {shape}"
            )
        if residual.dtype != self.dtype:
            raise ValueError(
                f"the residual stream has dtype {residual.dtype} but the model's is {self.dtype}; "
                f"convert it with .to({self.dtype})"
            )

    def check_labels(self, tokens: Tensor, labels: object) -> None:
        """Raise ValueError/TypeError naming what is wrong with forward's labels (None passes).

        `tokens` may be the residual stream [batch pos d_model] that start_at_layer takes."""
        if labels is None:
            return
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor of token ids, got {type(labels).__name__}")
        if labels.dtype not in (torch.long, torch.int32):
            raise ValueError(f"labels must have dtype torch.long or torch.int32, got {labels.dtype}")
        batch, pos = tokens.shape[:2]
        if labels.shape != (batch, pos):
            raise ValueError(f"labels has shape {tuple(labels.shape)}; it must match tokens, {(batch, pos)}")
        if not _host_reads_possible(labels):
            return
        outside = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.cfg.d_vocab))
        if bool(outside.any()):
            bad = int(labels[outside][0])
            raise ValueError(
                f"label {bad} is outside [0, d_vocab={self.cfg.d_vocab}) and is not {IGNORE_INDEX} (no target)"
            )

    def check_mask_and_cache(self, tokens: Tensor, attention_mask: object, kv_cache: object) -> None:
        """Raise ValueError/TypeError naming what is wrong with forward's attention_mask or kv_cache.

        `tokens` may be the residual stream [batch pos d_model] that start_at_layer takes."""
        batch, pos = tokens.shape[:2]
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor):
                raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
            if attention_mask.shape != (batch, pos):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; it must match tokens, {(batch, pos)}"
                )
            if attention_mask.is_floating_point() or attention_mask.is_complex():
                raise ValueError(
                    f"attention_mask must be bool or integer (1 = token, 0 = padding), got {attention_mask.dtype}"
                )
            if attention_mask.dtype != torch.bool and _host_reads_possible(attention_mask):
                low, high = (int(v) for v in torch.aminmax(attention_mask))
                if low < 0 or high > 1:
                    raise ValueError(
                        f"attention_mask values must be 0 (padding) or 1 (token), found {low if low < 0 else high}"
                    )
        if kv_cache is None:
            return
        if not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a KVCache, got {type(kv_cache).__name__}")
        if kv_cache.batch != batch:
            raise ValueError(f"kv_cache holds {kv_cache.batch} sequences, but tokens has batch size {batch}")
        if _host_reads_possible(tokens) and kv_cache.length + pos > kv_cache.max_pos:
            raise ValueError(
                f"{kv_cache.length} cached + {pos} new positions exceed the kv_cache's max_pos={kv_cache.max_pos}"
            )
        layers_and_heads = (len(kv_cache.k), tuple(kv_cache.k[0].shape[-2:]))
        if layers_and_heads != (self.cfg.n_layers, (self.cfg.n_heads, self.cfg.d_head)):
            raise ValueError(
                "kv_cache was made for a model of another shape; make it with KVCache.for_model(model, ...)"
            )
        held = (kv_cache.k[0].dtype, kv_cache.k[0].device)
        if held != (self.dtype, self.device):
            # Else attention's own error ("Expected query, key, and value to have the same dtype"),
            # or a device mismatch, from inside the first block.
            raise ValueError(
                f"kv_cache holds {held[0]} keys and values on {held[1]}, the model's parameters are {self.dtype} on "
                f"{self.device}; make it with KVCache.for_model(model, ...)"
            )

    # lm_cross_entropy_loss itself, where TransformerLens keeps it: model.loss_fn(logits, tokens).
    loss_fn = staticmethod(lm_cross_entropy_loss)

    def __getattr__(self, name: str):
        # nn.Module's, which finds parameters and submodules, is reached only once ordinary lookup
        # has failed; a TransformerLens user's model.to_tokens(...) then learns where it lives here.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in PACKAGE_FUNCTIONS:
                raise AttributeError(
                    f"Transformer has no {name}: the tokenizer and sampling are functions of the package "
                    f"gpt2_small, not methods of the model; use {PACKAGE_FUNCTIONS[name]}"
                ) from None
            raise

    def run_with_cache(
        self, *model_args, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs
    ) -> tuple[Tensor, "ActivationCache | dict[str, Tensor]"]:  # noqa: F821
        """HookedRootModule.run_with_cache (names_filter, device, ... as there), with the cache as a
        gpt2_small.interp.ActivationCache: a dict of hook name -> activation with TransformerLens's
        accumulated_resid, decompose_resid, stack_head_results and apply_ln_to_stack; a plain dict
        with return_cache_object=False, as in TransformerLens."""
        from gpt2_small.interp import ActivationCache

        tokens = model_args[0] if model_args else kwargs.get("tokens")
        check_flags(  # "no" would be truthy
            return_cache_object=return_cache_object,
            remove_batch_dim=remove_batch_dim,
            incl_bwd=kwargs.get("incl_bwd", False),
        )
        if kwargs.get("incl_bwd") and (kwargs.get("return_type", "logits") != "loss" or kwargs.get("loss_per_token")):
            # HookedRootModule calls backward() on the output, which only a scalar allows.
            raise ValueError(
                "incl_bwd=True calls backward() on forward's output, which must then be a scalar: pass "
                "return_type='loss' (as in TransformerLens), or for another function, cache = "
                "model.add_caching_hooks(incl_bwd=True), call backward() on it yourself, and model.reset_hooks()"
            )
        if remove_batch_dim and isinstance(tokens, Tensor) and tokens.ndim in (2, 3) and tokens.shape[0] != 1:
            # HookedRootModule would assert this only after the forward pass
            raise ValueError(
                f"remove_batch_dim=True needs one sequence (batch size 1), got batch size {tokens.shape[0]}"
            )
        out, cache = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if not return_cache_object:
            return out, cache
        return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)

    # HookedRootModule takes hook points by name in four places. A misspelt name there raised a bare
    # KeyError (a hook) or, worse, cached nothing at all (a names_filter). These overrides name the
    # bad entry and the nearest real hook names before anything runs; callables pass through.
    def _check_hook_names(self, names: object, arg: str) -> None:
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list):
            return
        for name in names:
            if isinstance(name, str) and name in self.hook_dict:
                continue
            from gpt2_small.bridge_names import bridge_name_hint  # only on this error path: no import cycle

            native = bridge_name_hint(name, self.cfg.n_layers)
            if native is not None:
                raise ValueError(f"{arg}: {native}")
            setter = _optional_hook_setter(name, self.cfg.n_layers)
            if setter is not None:
                raise ValueError(
                    f"{arg}: {name!r} is one of TransformerLens's optional hooks; it exists after model.{setter}(True)"
                )
            hint = (
                did_you_mean(name, self.hook_dict) if isinstance(name, str) else None
            ) or "see model.hook_dict for them"
            raise ValueError(f"{arg}: {name!r} is not the name of a hook point of this model; {hint}")

    def add_hook(self, name: str | Callable[[str], bool], hook: Callable, *args, **kwargs) -> None:
        self._check_hook_names(name, "add_hook")
        super().add_hook(name, hook, *args, **kwargs)

    def hooks(self, fwd_hooks: Iterable = (), bwd_hooks: Iterable = (), *args, **kwargs) -> AbstractContextManager:
        fwd_hooks, bwd_hooks = list(fwd_hooks), list(bwd_hooks)  # a generator is read once, here
        for arg, pairs in (("fwd_hooks", fwd_hooks), ("bwd_hooks", bwd_hooks)):
            self._check_hook_names([name for name, _ in pairs if not callable(name)], arg)
        return super().hooks(fwd_hooks, bwd_hooks, *args, **kwargs)

    def get_caching_hooks(self, names_filter: object = None, *args, **kwargs) -> tuple:
        self._check_hook_names(names_filter, "names_filter")
        return super().get_caching_hooks(names_filter, *args, **kwargs)

    def add_caching_hooks(self, names_filter: object = None, *args, **kwargs) -> dict:
        self._check_hook_names(names_filter, "names_filter")
        return super().add_caching_hooks(names_filter, *args, **kwargs)

    # --- TransformerLens's optional hooks ---------------------------------------------------
    # As in TransformerLens, four setters add hook points that cost memory or speed, so are off by
    # default. Off, their hook points do not exist here (not in hook_dict, so no cache has them and
    # a hook named for one is refused), rather than existing and never firing.

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """blocks.{l}.attn.hook_result: each head's write to the stream, z[h] W_O[h], [batch pos
        n_heads d_model]; attention's output is then their sum plus b_O (n_heads x the memory)."""
        self._set_optional_hooks("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """blocks.{l}.hook_q_input, hook_k_input, hook_v_input: one copy of resid_pre per head for
        each of the queries, keys and values, [batch pos n_heads d_model], before ln1, so that one
        head's query (or key, or value) input can be patched alone, as in path patching. ln1 then
        runs on each copy: its hooks fire three times a forward pass, with an n_heads axis, and a
        cache keeps the value copy's. Exclusive with set_use_attn_in."""
        self._set_optional_hooks("use_split_qkv_input", use_split_qkv_input, excludes="use_attn_in")

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """blocks.{l}.hook_attn_in: one copy of resid_pre per head, [batch pos n_heads d_model],
        before ln1, read by that head's queries, keys and values alike. ln1 then runs on the copies
        and its hooks have an n_heads axis. Exclusive with set_use_split_qkv_input."""
        self._set_optional_hooks("use_attn_in", use_attn_in, excludes="use_split_qkv_input")

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """blocks.{l}.hook_mlp_in: a copy of resid_mid, [batch pos d_model], before ln2, that the
        MLP alone reads (patching it leaves resid_mid, and so resid_post's skip term, alone)."""
        self._set_optional_hooks("use_hook_mlp_in", use_hook_mlp_in)

    def _set_optional_hooks(self, flag: str, value: object, excludes: str | None = None) -> None:
        """Add (value True) or drop the hook points that set_{flag} governs (OPTIONAL_HOOKS) in every
        block; dropped, with their hooks, permanent ones too. `excludes`: a flag that must be off."""
        on = check_flag(flag, value)
        if on and excludes is not None and getattr(self.blocks[0], _optional_hooks_of(excludes)[0]) is not None:
            raise ValueError(
                f"{flag} and {excludes} are mutually exclusive (as in TransformerLens); "
                f"call model.set_{excludes}(False) first"
            )
        for block in self.blocks:
            for name in _optional_hooks_of(flag):
                owner, _, attr = name.rpartition(".")
                module = block.get_submodule(owner) if owner else block
                hook_point = getattr(module, attr)
                if on and hook_point is None:
                    setattr(module, attr, HookPoint())
                elif not on and hook_point is not None:
                    hook_point.remove_hooks("both", including_permanent=True)
                    setattr(module, attr, None)
        self.setup()

    def num_params(self, include_unembed: bool = True) -> int:
        """Number of parameters.

        With the defaults this is 163,087,441: W_U (38,597,376) and b_U (50,257) are parameters
        of their own here. Pretrained GPT-2 ties W_U to W_E and has no b_U, which is where the
        usual "124M" (124,439,808) comes from: `num_params(include_unembed=False)`.
        """
        skip = set() if check_flag("include_unembed", include_unembed) else {id(p) for p in self.unembed.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    @property
    def device(self) -> torch.device:
        return self.embed.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.W_E.dtype

    # --- TransformerLens's weight shortcuts ----------------------------------------------
    # model.W_E is the parameter itself; model.W_Q and the other per-layer names stack every
    # layer's parameter along a leading n_layers axis, a copy as in TransformerLens (gradients
    # flow through it; to edit the model, edit model.blocks[i].attn.W_Q).

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        return self.pos_embed.W_pos

    @property
    def W_E_pos(self) -> Float[Tensor, "d_vocab_plus_n_ctx d_model"]:
        """W_E and W_pos as one table, rows of tokens then of positions."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.unembed.b_U

    def _stacked(self, name: str) -> Tensor:
        return torch.stack([block.get_parameter(name) for block in self.blocks])

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stacked("attn.W_Q")

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stacked("attn.W_K")

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stacked("attn.W_V")

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stacked("attn.W_O")

    @property
    def b_Q(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stacked("attn.b_Q")

    @property
    def b_K(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stacked("attn.b_K")

    @property
    def b_V(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stacked("attn.b_V")

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stacked("attn.b_O")

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stacked("mlp.W_in")

    @property
    def b_in(self) -> Float[Tensor, "n_layers d_mlp"]:
        return self._stacked("mlp.b_in")

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return self._stacked("mlp.W_out")

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stacked("mlp.b_out")

    @property
    def QK(self) -> FactoredMatrix:
        """Each head's W_Q W_K^T, [n_layers n_heads d_model d_model], kept factored (rank d_head):
        the bilinear form scoring a query residual against a key residual, before 1/sqrt(d_head)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """Each head's W_V W_O, [n_layers n_heads d_model d_model], kept factored (rank d_head):
        what the head writes to the residual stream for each residual direction it attends to."""
        return FactoredMatrix(self.W_V, self.W_O)

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """What the biases have added to the residual stream before block `layer` (n_layers: before
        ln_final), as TransformerLens's: every earlier b_O and, with include_mlp_biases, b_out;
        mlp_input adds block `layer`'s own b_O (the stream its MLP reads)."""
        n_layers = self.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_layers:
            raise ValueError(f"layer must be an int in [0, n_layers={n_layers}], got {layer!r}")
        check_flags(mlp_input=mlp_input, include_mlp_biases=include_mlp_biases)  # "no" would be truthy
        if mlp_input and layer == n_layers:
            raise ValueError(f"mlp_input=True needs the block's own b_O, and there is no block {layer}")
        bias = torch.zeros_like(self.blocks[0].attn.b_O)
        for block in self.blocks[: layer + int(mlp_input)]:
            bias = bias + block.attn.b_O
        if include_mlp_biases:
            for block in self.blocks[:layer]:
                bias = bias + block.mlp.b_out
        return bias

    def tokens_to_residual_directions(self, tokens: str | int | Tensor) -> Float[Tensor, "*token_shape d_model"]:
        """W_U's columns of `tokens`, as TransformerLens's: [d_model] for one token (an id, a str of
        one token, a one-element tensor), else the tokens' shape + [d_model]. Through ln_final they
        are the directions whose dot product with the final stream gives the logits; fold ln_final in
        first (gpt2_small.process_weights) to read them off the stream itself."""
        from gpt2_small.interp import residual_directions

        return residual_directions(self, tokens)

    @property
    def all_head_labels(self) -> list[str]:
        """Labels "L{layer}H{head}" of every head, in the order of a flattened (n_layers n_heads) axis."""
        return [f"L{layer}H{head}" for layer in range(self.cfg.n_layers) for head in range(self.cfg.n_heads)]

    def all_composition_scores(self, mode: str) -> Float[Tensor, "n_layers n_heads n_layers n_heads"]:
        """How strongly each head's output feeds each later head's queries ("Q"), keys ("K") or
        values ("V"), as TransformerLens's (Elhage et al. 2021, "A Mathematical Framework for
        Transformer Circuits"): ||OV_1 M_2||_F / (||OV_1||_F ||M_2||_F), where OV_1 is the earlier
        head's and M_2 the later head's QK, QK^T or OV. [l1, h1, l2, h2] is 0 unless l1 < l2.
        Independent random heads score about 1/sqrt(d_model) (0.036 for GPT-2 small). A head whose
        matrix is zero (say, ablated) scores NaN, 0/0, as in TransformerLens; plot_composition_scores
        draws those cells grey. The LayerNorm between the heads is not in the product: fold its
        weights in first with gpt2_small.process_weights, as TransformerLens advises.
        """
        if mode not in ("Q", "K", "V"):
            raise ValueError(f"mode must be 'Q', 'K' or 'V', got {mode!r}")
        with torch.no_grad():
            dtype = torch.promote_types(self.dtype, torch.float32)
            W_Q, W_K, W_V, W_O = (w.to(dtype) for w in (self.W_Q, self.W_K, self.W_V, self.W_O))
            # The later head's matrix as A @ B: A [d_model d_head], B [d_head d_model].
            A, B = {"Q": (W_Q, W_K.mT), "K": (W_K, W_Q.mT), "V": (W_V, W_O)}[mode]
            # ||Q_1 X Q_2^T||_F = ||X||_F when Q_1 and Q_2 have orthonormal columns, so with W_V = Q_V R_V
            # and B^T = Q_B R_B every norm is that of a d_head-sided matrix: OV_1 M_2 = Q_V (left @ right) Q_B^T,
            # OV_1 = Q_V left and M_2 = right Q_B^T. No [d_model d_model] product is ever formed.
            left = torch.linalg.qr(W_V, mode="r").R @ W_O  # [n_layers n_heads d_head d_model]
            right = A @ torch.linalg.qr(B.mT, mode="r").R.mT  # [n_layers n_heads d_model d_head]
            left_norm, right_norm = left.norm(dim=(-2, -1)), right.norm(dim=(-2, -1))
            n_layers, n_heads = self.cfg.n_layers, self.cfg.n_heads
            scores = torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=dtype, device=left.device)
            # One earlier layer at a time, so the products are [n_heads later_layers n_heads d_head d_head].
            for layer in range(n_layers - 1):
                product = einops.einsum(
                    left[layer],
                    right[layer + 1 :],
                    "head d_head d_model, later_layer later_head d_model d_head_2 "
                    "-> head later_layer later_head d_head d_head_2",
                )
                norms = left_norm[layer, :, None, None] * right_norm[layer + 1 :]
                scores[layer, :, layer + 1 :] = product.norm(dim=(-2, -1)) / norms
        return scores

    # --- weights -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **other_options: object,
    ) -> "Transformer":
        """GPT-2 weights in Hugging Face's format, from a local directory or a hub id, as they are.

        See gpt2_small.weights.load_hf_gpt2 for the accepted layouts and errors. TransformerLens's
        processing options (fold_ln, ...) are refused, naming gpt2_small.process_weights.
        """
        from gpt2_small.weights import OTHER_LOADING_OPTIONS, load_hf_gpt2

        refuse_keywords("Transformer.from_pretrained", other_options, OTHER_LOADING_OPTIONS)
        return load_hf_gpt2(name_or_path, device=device, dtype=dtype, model_class=cls)

    def save(self, path: str | os.PathLike) -> Path:
        """Write this model to the directory `path` (created if needed) as safetensors + JSON config.

        Both files are written to a temporary name and renamed into place, so a crash never
        leaves a half-written checkpoint behind. `Transformer.load(path)` restores it bit for bit.
        Parameters that share memory (tied by assignment, as in a weight-sharing experiment) are
        written once each and load as separate parameters, equal but no longer tied.
        """
        from safetensors.torch import save_file

        # "~/runs/x" expanded: a "~" directory in the working directory is never meant
        path = directory_to_write(path, "path", "Transformer.save")
        if (path / "config.json").exists():
            raise ValueError(
                f"{path} holds a Hugging Face checkpoint (config.json), whose model.safetensors save would overwrite "
                f"with its own; save to a directory of its own"
            )
        if _holds_training_run(path):
            raise ValueError(
                f"{path} holds a training run (checkpoints/); save to a directory of its own: load_model would read "
                f"this checkpoint instead of the run's newest"
            )
        path.mkdir(parents=True, exist_ok=True)
        tensors = _dense_unshared(self.state_dict())
        _atomic_write(path / CHECKPOINT_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        config_text = json.dumps({"format": "gpt2_small", "config": dataclasses.asdict(self.cfg)}, indent=2)
        _atomic_write(path / CHECKPOINT_CONFIG, lambda tmp: Path(tmp).write_text(config_text))
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> "Transformer":
        """Load a checkpoint written by `save`. Parameters keep their saved dtype unless `dtype` is given."""
        _check_placement(device, dtype)
        path = user_path(path, "path")
        config_file, weights_file = path / CHECKPOINT_CONFIG, path / CHECKPOINT_WEIGHTS
        for f in (config_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} not found: Transformer.load expects a directory written by Transformer.save "
                    f"(for Hugging Face checkpoints use Transformer.from_pretrained){_training_run_hint(path)}"
                )
        meta = _read_json(config_file)
        if meta.get("format") != "gpt2_small":
            raise ValueError(f"{config_file} is not a gpt2_small checkpoint config (format={meta.get('format')!r})")
        config = meta.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} has no 'config' object; the file is damaged: save it again")
        fields = {f.name for f in dataclasses.fields(TransformerConfig)}
        if unknown := sorted(set(config) - fields):
            # Fields missing from the file keep their defaults, so that older checkpoints load.
            raise ValueError(
                f"{config_file} sets {unknown}, which TransformerConfig does not have (a newer gpt2_small or a "
                f"hand edit?); its fields are {sorted(fields)}"
            )
        model = cls(TransformerConfig(**config))
        state = _read_safetensors(weights_file)
        if not state:
            raise ValueError(
                f"{weights_file} holds no tensors; Transformer.load expects one written by Transformer.save"
            )
        model.to(next(iter(state.values())).dtype)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # torch's message names the missing, unexpected and mis-shaped tensors
            from gpt2_small.weights import WeightLoadError  # only on this error path: no import cycle

            raise WeightLoadError(
                f"{weights_file} does not hold the tensors {config_file.name} describes; it is damaged or was not "
                f"written by Transformer.save. {e}"
            ) from None
        return model.to(device=device, dtype=dtype)


def _read_json(path: Path) -> dict:
    """A checkpoint's JSON config, or a ValueError naming the damaged file (json's own error names none)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged: save or download it again") from e
    if not isinstance(data, dict):  # every config and index is an object; its readers look keys up
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}, not an object; the file is damaged: save or download it again"
        )
    return data


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """A checkpoint's tensors, or a ValueError naming the file, which safetensors' SafetensorError
    (not a ValueError, so callers that catch those would see a traceback) leaves out."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a complete safetensors file ({e}); it is damaged or cut short: save or download it again"
        ) from e


# TransformerLens's optional hook points, by their name in a block, and the setter that adds them.
OPTIONAL_HOOKS = {
    "attn.hook_result": "set_use_attn_result",
    "hook_attn_in": "set_use_attn_in",
    "hook_q_input": "set_use_split_qkv_input",
    "hook_k_input": "set_use_split_qkv_input",
    "hook_v_input": "set_use_split_qkv_input",
    "hook_mlp_in": "set_use_hook_mlp_in",
}


# TransformerLens's model methods that are package functions here, with the call to use instead.
PACKAGE_FUNCTIONS = {
    "to_tokens": "gpt2_small.to_tokens(text) (prepend_bos=True for TransformerLens's leading <|endoftext|>)",
    "to_str_tokens": "gpt2_small.to_str_tokens(tokens_or_text)",
    "to_string": "gpt2_small.to_string(tokens), or gpt2_small.to_strings for a batch",
    "to_single_token": "gpt2_small.to_single_token(text)",
    "tokenizer": "gpt2_small.get_tokenizer() (tiktoken's encoding; gpt2_small.tokenizer.hf_tokenizer() for HF's)",
    "generate": "gpt2_small.generate(model, tokens, max_new_tokens), or generate_text(model, get_tokenizer(), prompt)",
}


def did_you_mean(name: str, names: Iterable[str]) -> str | None:
    """ "did you mean 'a' or 'b'?" for up to 3 of `names` close to a misspelt `name`, or None."""
    close = difflib.get_close_matches(name, list(names), n=3)
    return f"did you mean {' or '.join(map(repr, close))}?" if close else None


def _optional_hook_setter(name: object, n_layers: int) -> str | None:
    """The setter that adds hook point `name`, if it is an optional hook of one of the n_layers blocks."""
    parts = name.split(".", 2) if isinstance(name, str) else []
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) < n_layers:
        return OPTIONAL_HOOKS.get(parts[2])
    return None


def _optional_hooks_of(flag: str) -> list[str]:
    """The hook points, by their name in a block, that set_{flag} governs."""
    return [name for name, setter in OPTIONAL_HOOKS.items() if setter == f"set_{flag}"]


def user_path(value: object, name: str) -> Path:
    """`value` as a Path, "~" expanded, or a TypeError naming `name` (os.fspath's own names no argument).

    An empty str is refused: Path("") is the working directory, so an unset variable passed as a
    path read a checkpoint there, or wrote one, without a word."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike path, got {type(value).__name__}")
    if os.fspath(value) == "":
        raise ValueError(f"{name} is an empty path; name one ('.' for the working directory)")
    return Path(value).expanduser()


def spelled_as_path(name: str) -> bool:
    """Whether `name` can only be a local path, never a Hugging Face Hub id ("name" or "owner/name"):
    it starts with '.', '/' or '~', is absolute, ends with a separator or has more than one '/'."""
    return (
        name.startswith((".", "/", "~")) or os.path.isabs(name) or name.endswith(("/", os.sep)) or name.count("/") > 1
    )


def file_in_the_way(path: Path) -> str | None:
    """Why no directory can be made at `path` ("is a file", "lies under X, which is a file"), or None.

    Asked before writing: mkdir would end in errno 17 or 20 ("Not a directory: 'notes.txt/model'"),
    not saying which part is the file."""
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is None or blocker.is_dir():
        return None
    return "is a file" if blocker == path else f"lies under {blocker}, which is a file"


def directory_to_write(value: object, name: str, writer: str) -> Path:
    """user_path(value, name), refused if it or a folder above it is a file: `writer` writes a directory there."""
    path = user_path(value, name)
    if (why := file_in_the_way(path)) is not None:
        raise ValueError(f"{path} {why}; {writer} writes a directory")
    return path


def check_flag(name: str, value: object) -> bool:
    """`value`, or a TypeError naming `name` if it is not a bool (1 and None are not taken for one)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_flags(**flags: object) -> None:
    """check_flag of each keyword: a TypeError naming the first that is not a bool."""
    for name, value in flags.items():
        check_flag(name, value)


def refuse_keywords(caller: str, given: dict[str, object], instead: dict[str, str]) -> None:
    """A TypeError for the first keyword argument in `given`, which `caller` does not take: Python's
    own message, or, for a name another library takes (TransformerLens's, Hugging Face's), what to
    write here, instead[name]."""
    if not given:
        return
    name = next(iter(given))
    if name in instead:
        raise TypeError(f"{caller} takes no {name}: {instead[name]}")
    raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")


def check_model(model: object) -> "Transformer":
    """`model`, or a TypeError naming what was given in its place: a str (a hub id), Hugging Face's
    GPT2LMHeadModel or TransformerLens's bridge had failed deep inside, on an attribute it lacks."""
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a gpt2_small.Transformer, got {type(model).__name__}")
    return model


def check_count(name: str, value: object, minimum: int) -> int:
    """`value`, or a ValueError naming `name` if it is not an int >= minimum (True is no count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ValueError naming it if it is not one this machine has."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    name = str(device)
    try:
        resolved = torch.device(device)
    except RuntimeError:  # torch's message lists every backend it was built to know of
        raise ValueError(f"device {name!r} is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested, but CUDA is not available here")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ValueError(
            f"device {name!r} requested, but this machine has {n} CUDA device(s): use cuda:0 to cuda:{n - 1}"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested, but MPS is not available here")
    return resolved


def _check_placement(device: object, dtype: object) -> None:
    """Refuse a bad device or dtype before any weights are read (or downloaded)."""
    if device is not None:
        check_device(device)
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype such as torch.bfloat16, got {dtype!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point (torch.float32, bfloat16 or float16), got {dtype}")


def _host_reads_possible(tokens: Tensor) -> bool:
    """Whether checks may read device values back to the host. Not while torch.compile traces
    (the read would split the graph, and a host count would be baked in and guarded on) or while
    a CUDA graph is captured (whose decoding steps feed it tokens that the sampler chose)."""
    return not (torch.compiler.is_compiling() or (tokens.is_cuda and torch.cuda.is_current_stream_capturing()))


def _check_tokens_pre_hook(model: Transformer, args: tuple, kwargs: dict) -> None:
    tokens = args[0] if args else kwargs.get("tokens")
    if kwargs.get("start_at_layer") is None:
        model.check_tokens(tokens, kwargs.get("attention_mask"))
    else:
        model.check_residual(tokens)
    model.check_mask_and_cache(tokens, kwargs.get("attention_mask"), kwargs.get("kv_cache"))
    model.check_labels(tokens, kwargs.get("labels"))


def _dense_unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """`tensors` made dense, as safetensors writes them, and none sharing memory with another,
    which safetensors refuses: a tensor whose memory an earlier one uses is copied; the rest are
    copied only if they are not dense already."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
