"""Unit tests that each isolate one mechanism of the model, on small random models."""

import collections
import copy
import math
import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformer_lens.utilities import lm_cross_entropy_loss as tl_lm_cross_entropy_loss

import gpt2_small
import solution
from solution import Attention, Embedding, LayerNorm, PositionalEmbedding, Transformer, TransformerConfig

TINY = TransformerConfig(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=101, n_ctx=16)


def tiny_model(attn_impl: str = "sdpa", seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(**{**vars(TINY), "attn_impl": attn_impl, "init_range": 0.3, **overrides})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm parameters, so every path matters
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.split(".")[-1].startswith("b_"):
                p.normal_(0.0, 0.1).add_(1.0 if name.endswith(".w") else 0.0)
    return model


def random_tokens(batch: int, pos: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


# --- Embedding -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["token", "position"])
def test_embedding_gradient_sums_repeated_ids_the_same_way_every_time(which):
    """Real text repeats tokens, and left-padded batches repeat positions. Their gradients must add
    up to the right rows, and in the same order on every run, or CPU training is not reproducible
    (indexing's backward was not)."""
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=128, n_heads=4, d_head=32, d_vocab=50304)
    ids = torch.randint(0, 300, (4, 128))  # each id about 1.7 times on average
    if which == "token":
        module = Embedding(cfg)
        weight, embed = module.W_E, lambda: module(ids)
    else:
        module = PositionalEmbedding(cfg)
        weight, embed = module.W_pos, lambda: module(ids, positions=ids)
    upstream = torch.randn(4, 128, 128)
    grads = []
    for _ in range(10):
        weight.grad = None
        (embed() * upstream).sum().backward()
        grads.append(weight.grad.clone())
    assert all(torch.equal(grad, grads[0]) for grad in grads[1:])
    expected = torch.zeros(weight.shape, dtype=torch.float64).index_add_(
        0, ids.flatten(), upstream.reshape(-1, 128).double()
    )
    torch.testing.assert_close(grads[0].double(), expected, rtol=1e-6, atol=1e-6)
    assert grads[0][300:].abs().sum() == 0 and grads[0][ids[0, 0]].abs().sum() > 0


# --- LayerNorm -----------------------------------------------------------------------------


def test_layernorm_epsilon_is_inside_the_sqrt():
    ln = LayerNorm(TransformerConfig(d_model=4, n_heads=1, d_head=4, layer_norm_eps=0.1))
    x = torch.tensor([[[0.1, -0.1, 0.1, -0.1]]])  # mean 0, variance 0.01, comparable to eps
    out = ln(x)
    inside = x / math.sqrt(0.01 + 0.1)
    outside = x / (math.sqrt(0.01) + 0.1)
    torch.testing.assert_close(out, inside)
    assert not torch.allclose(out, outside, rtol=1e-2, atol=0)
    torch.testing.assert_close(out, F.layer_norm(x, (4,), eps=0.1))
    # bfloat16 takes F.layer_norm unhooked and the readable formula hooked; both use the config's eps.
    x16 = x.bfloat16()
    expected = (x16.float() / math.sqrt(x16.float().pow(2).mean() + 0.1)).bfloat16()
    for path in (ln, _hooked_readable_path(copy.deepcopy(ln))):
        torch.testing.assert_close(path(x16), expected, rtol=2**-7, atol=0)


def test_layernorm_applies_w_and_b_after_normalizing():
    ln = LayerNorm(TransformerConfig(d_model=4, n_heads=1, d_head=4))
    with torch.no_grad():
        ln.w.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        ln.b.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0]))
    x = torch.randn(2, 3, 4)
    expected = F.layer_norm(x, (4,), weight=ln.w, bias=ln.b, eps=1e-5)
    torch.testing.assert_close(ln(x), expected)


def _hooked_readable_path(ln: LayerNorm) -> LayerNorm:
    ln.hook_scale.add_hook(lambda scale, hook: scale)  # any hook makes forward take the readable formula
    return ln


@pytest.mark.parametrize("path", ["fused", "readable"])
def test_layernorm_statistics_are_upcast_in_bfloat16(path):
    ln = LayerNorm(TransformerConfig(d_model=64, n_heads=1, d_head=64))
    if path == "readable":
        _hooked_readable_path(ln)
    # A large common offset with a small spread: bf16 statistics lose the spread entirely.
    x32 = 300.0 + torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
    x16 = x32.bfloat16()
    out = ln(x16)
    assert out.dtype == torch.bfloat16
    exact = F.layer_norm(x16.float(), (64,), eps=1e-5)
    naive = x16 - x16.mean(-1, keepdim=True)
    naive = naive / (naive.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    ours_err = (out.float() - exact).abs().max()
    naive_err = (naive.float() - exact).abs().max()
    assert ours_err <= 0.02, ours_err
    assert naive_err > 10 * ours_err, (naive_err, ours_err)


def test_layernorm_fused_bfloat16_path_equals_the_readable_formula(monkeypatch):
    cfg = TransformerConfig(d_model=64, n_heads=1, d_head=64)
    fused = LayerNorm(cfg).bfloat16()
    with torch.no_grad():
        fused.w.copy_(torch.linspace(0.5, 2.0, 64))
        fused.b.copy_(torch.linspace(-1.0, 1.0, 64))
    readable = _hooked_readable_path(copy.deepcopy(fused))
    x = (3.0 * torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)) + 7.0).bfloat16()
    fused_calls = []
    layer_norm = F.layer_norm
    monkeypatch.setattr(solution.F, "layer_norm", lambda *a, **k: fused_calls.append(1) or layer_norm(*a, **k))
    out_readable = readable(x)
    assert fused_calls == []  # a hook in use: the readable formula
    normalized_only, seen = copy.deepcopy(fused), []
    normalized_only.hook_normalized.add_hook(lambda normalized, hook: seen.append(normalized.dtype))
    normalized_only(x)
    assert fused_calls == [] and seen == [torch.float32]  # so does a hook on hook_normalized alone
    out_fused = fused(x)
    assert fused_calls == [1]
    fused.float()(x.float())
    assert fused_calls == [1]  # float32 always takes the readable formula
    # Both compute in float32 and round once to bf16: at most one bf16 step apart.
    torch.testing.assert_close(out_fused.float(), out_readable.float(), rtol=2 * 2**-8, atol=1e-2)
    assert out_fused.dtype == out_readable.dtype == torch.bfloat16


# --- Attention -----------------------------------------------------------------------------


@torch.no_grad()
def test_a_padding_query_attends_to_its_own_key_alone():
    """No row of the mask is fully blocked (a softmax over nothing is NaN in some kernels): a
    padding query sees its own key and nothing else, and no real query sees padding."""
    model, tokens = tiny_model("eager"), random_tokens(1, 5)
    _, cache = model.run_with_cache(tokens, attention_mask=torch.tensor([[0, 0, 1, 1, 1]]))
    for layer in range(TINY.n_layers):
        pattern = cache["pattern", layer][0]  # [n_heads query_pos key_pos]
        own = torch.eye(5)[:2].expand(TINY.n_heads, 2, 5)
        torch.testing.assert_close(pattern[:, :2], own, rtol=0, atol=0)
        assert bool((pattern[:, 2:, :2] == 0).all()) and bool((pattern[:, 2:, 2:].sum(-1) > 0.99).all())


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_causal_mask_future_token_cannot_change_past_logits(attn_impl):
    model = tiny_model(attn_impl)
    tokens = random_tokens(2, 10)
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % TINY.d_vocab
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :6], before[:, :6], rtol=0, atol=0)
    assert (after[:, 6:] - before[:, 6:]).abs().amax(dim=-1).min() > 1e-4  # and the rest does change


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_single_position_attention_returns_the_value(attn_impl):
    """With one position the pattern is [[1]], so the output is v W_O + b_O exactly."""
    torch.manual_seed(0)
    attn = Attention(TransformerConfig(**{**vars(TINY), "attn_impl": attn_impl, "init_range": 0.3}))
    with torch.no_grad():
        for b in (attn.b_Q, attn.b_K, attn.b_V, attn.b_O):
            b.normal_()
    x = torch.randn(3, 1, TINY.d_model)
    v = torch.einsum("bpd,hde->bphe", x, attn.W_V) + attn.b_V
    expected = torch.einsum("bphe,hed->bpd", v, attn.W_O) + attn.b_O
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected)
        if attn_impl == "eager":
            seen = {}
            attn.hook_pattern.add_hook(lambda t, hook: seen.setdefault("pattern", t))
            attn(x)
            attn.hook_pattern.remove_hooks()
            torch.testing.assert_close(seen["pattern"], torch.ones(3, TINY.n_heads, 1, 1))


def test_pattern_rows_sum_to_one_and_ignore_the_future():
    model = tiny_model("eager")
    _, cache = model.run_with_cache(random_tokens(2, 9))
    pattern = cache["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, TINY.n_heads, 9))
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)
    assert torch.equal(pattern[..., future], torch.zeros_like(pattern[..., future]))


def test_causal_mask_with_cached_keys_offsets_the_triangle():
    """Three new queries over five keys: query i sits at absolute position 2 + i."""
    mask = solution.causal_mask(3, 5, torch.device("cpu"))
    expected = torch.tensor(
        [[False, False, False, True, True], [False, False, False, False, True], [False, False, False, False, False]]
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_bias_added_to_scores_equals_masked_fill_exactly(dtype):
    """The additive mask's most negative finite value absorbs any realistic score, so adding it
    is bit for bit the masked_fill it replaces; where it is 0 the scores pass unchanged."""
    scores = (torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(0)) * 1e4).to(dtype)
    blocked = torch.rand(2, 1, 4, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    bias = solution.attention_bias(blocked, dtype)
    assert bias.dtype == dtype and torch.equal(bias == 0, ~blocked)
    assert torch.equal(scores + bias, scores.masked_fill(blocked, torch.finfo(dtype).min))


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_the_attention_mask_is_built_once_per_forward_not_once_per_layer(attn_impl):
    """With padding, the model turns the boolean mask into the scores' additive term once, and
    every layer adds that: the mask work must not grow with depth. (Handed a boolean mask, SDPA
    converts it in every layer, and inverting one for it costs a kernel per layer too.)"""
    tokens, mask = gpt2_small.pad_prompts([[5, 6, 7, 8], [9, 10]], pad_id=0)
    mask_ops = {"aten::where", "aten::bitwise_not", "aten::logical_not", "aten::masked_fill", "aten::masked_fill_"}
    counts = []
    for n_layers in (1, 3):
        model = tiny_model(attn_impl, n_layers=n_layers)
        with torch.no_grad(), torch.profiler.profile() as prof:
            model(tokens, attention_mask=mask)
        names = [event.name for event in prof.events()]
        sdpa_calls = names.count("aten::_scaled_dot_product_flash_attention_for_cpu")
        assert sdpa_calls == (n_layers if attn_impl == "sdpa" else 0)
        counts.append(sum(name in mask_ops for name in names))
    assert counts[0] == counts[1] > 0


def test_attention_bias_follows_autocast_s_dtype():
    """Under bf16 autocast the scores are bf16, so the masked ones hold bf16's most negative
    finite value (a float32 bias would round to -inf there), and sdpa and eager still agree."""
    tokens, mask = gpt2_small.pad_prompts([[5, 6, 7, 8], [9, 10]], pad_id=0)
    eager, sdpa = tiny_model("eager"), tiny_model("sdpa")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, cache = eager.run_with_cache(tokens, attention_mask=mask)
        scores = cache["blocks.0.attn.hook_attn_scores"]
        assert scores.dtype == torch.bfloat16
        assert scores[1, 0, 3, 0] == torch.finfo(torch.bfloat16).min  # row 1's first key is padding
        torch.testing.assert_close(sdpa(tokens, attention_mask=mask)[1, 2:], logits[1, 2:], rtol=2e-2, atol=2e-2)


def test_sdpa_path_equals_eager_path():
    tokens = random_tokens(3, 16)
    eager, sdpa = tiny_model("eager"), tiny_model("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(sdpa(tokens), eager(tokens))
    assert not sdpa.blocks[0].attn.uses_eager_path() and eager.blocks[0].attn.uses_eager_path()


def test_a_float64_models_attention_pattern_is_a_float64_softmax():
    """The eager path's softmax rounded a float64 model's pattern to float32 (~1e-8), where the
    SDPA path keeps float64: the two paths then disagreed beyond float64 rounding."""
    tokens = random_tokens(3, 16)
    eager, sdpa = tiny_model("eager").double(), tiny_model("sdpa").double()
    with torch.no_grad():
        logits, cache = eager.run_with_cache(tokens)
        torch.testing.assert_close(sdpa(tokens), logits, rtol=1e-12, atol=1e-12)
    for layer in range(TINY.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.dtype == torch.float64
        expected = cache[f"blocks.{layer}.attn.hook_attn_scores"].softmax(dim=-1)
        torch.testing.assert_close(pattern, expected, rtol=1e-15, atol=1e-15)


def test_hooks_on_the_pattern_switch_sdpa_to_the_eager_path():
    model = tiny_model("sdpa")
    attn = model.blocks[0].attn
    assert not attn.uses_eager_path()
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: None)]):
        assert attn.uses_eager_path()
    assert not attn.uses_eager_path()
    _, cache = model.run_with_cache(random_tokens(1, 5), names_filter="blocks.0.attn.hook_pattern")
    assert cache["blocks.0.attn.hook_pattern"].shape == (1, TINY.n_heads, 5, 5)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_weight_products_add_their_bias_inside_the_matrix_multiply(attn_impl):
    """Attention's and the MLP's four weight products (QKV, W_O, W_in, W_out) are each one addmm,
    as in HF's Conv1D: not a matrix multiply followed by `+ b`, a second kernel and a second pass
    over the output. In a one-token decoding step every kernel is tiny and their number is what
    the time goes on."""
    block = tiny_model(attn_impl).blocks[0]
    x = torch.randn(2, 5, TINY.d_model)
    with torch.no_grad(), torch.profiler.profile() as prof:
        block.attn(x)
        block.mlp(x)
    ops = collections.Counter(event.name for event in prof.events())
    assert ops["aten::addmm"] == 4
    assert ops["aten::mm"] == 0
    assert ops["aten::add"] == (1 if attn_impl == "eager" else 0)  # eager: the causal mask, added to the scores


# --- Unembedding ---------------------------------------------------------------------------


def test_unembedding_gradient_comes_out_in_W_U_s_vocab_major_layout():
    """W_U is stored [d_vocab d_model]-major so that its GEMMs have the aligned leading dimension
    d_model rather than GPT-2's odd 50257. Its gradient must come out of backward in that same
    layout: written [d_model d_vocab]-major, the weight-gradient GEMM would have the odd leading
    dimension, and accumulating it into .grad would copy it once more (einsum's backward did that)."""
    model = tiny_model()
    W_U, tokens = model.unembed.W_U, random_tokens(3, 16)
    assert W_U.stride() == (1, TINY.d_model)
    raw = []
    W_U.register_hook(lambda grad: raw.append(grad))  # sees the gradient before accumulation
    model(tokens).logsumexp(dim=-1).sum().backward()
    assert raw[0].stride() == W_U.stride() == W_U.grad.stride()
    # The value, against F.linear on an lm_head-style [d_vocab d_model] copy of W_U.
    x = model.ln_final(model(tokens, stop_at_layer=TINY.n_layers)).detach()
    lm_head = W_U.detach().T.clone().requires_grad_()
    F.linear(x, lm_head, model.unembed.b_U.detach()).logsumexp(dim=-1).sum().backward()
    torch.testing.assert_close(raw[0], lm_head.grad.T, rtol=1e-6, atol=1e-7)


# --- the whole model -----------------------------------------------------------------------


# Run in a fresh interpreter: einops' per-type backend cache is process-wide, and this session's
# earlier tests have long filled it.
_COMPILE_TWICE = """
import torch
from solution import Transformer, TransformerConfig, lm_cross_entropy_loss

graphs = []

def count_graphs(graph_module, example_inputs):
    graphs.append(graph_module)
    return graph_module.forward

cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32, d_vocab=50, n_ctx=16)
model = Transformer(cfg)
step = torch.compile(lambda tokens: lm_cross_entropy_loss(model(tokens), tokens), backend=count_graphs)
tokens = torch.randint(0, 50, (2, 8))
step(tokens).backward()
first = len(graphs)
for _ in range(2):
    step(tokens).backward()
print(first, len(graphs))
"""


def test_a_compiled_loss_compiles_on_its_first_call_only():
    run = subprocess.run([sys.executable, "-c", _COMPILE_TWICE], capture_output=True, text=True, timeout=300,
                         cwd=Path(solution.__file__).parent)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    first, total = (int(n) for n in run.stdout.split())
    assert first >= 1
    assert total == first, f"compiled {total - first} more graph(s) after the first call: {run.stderr[-2000:]}"


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_batch_items_do_not_interact(attn_impl):
    model = tiny_model(attn_impl)
    tokens = random_tokens(4, 12)
    with torch.no_grad():
        together = model(tokens)
        alone = torch.cat([model(tokens[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)


def test_full_context_is_accepted():
    model = tiny_model()
    logits = model(random_tokens(1, TINY.n_ctx))
    assert logits.shape == (1, TINY.n_ctx, TINY.d_vocab)


def test_run_with_hooks_intervenes():
    """Zero-ablating every head of layer 0 through hook_z equals zeroing that layer's W_O."""
    model = tiny_model()
    tokens = random_tokens(2, 8)

    def ablate(z, hook):
        return torch.zeros_like(z)

    with torch.no_grad():
        hooked = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", ablate)])
        clean = model(tokens)
        model.blocks[0].attn.W_O.zero_()
        edited = model(tokens)
    torch.testing.assert_close(hooked, edited)
    assert not torch.allclose(hooked, clean)
    assert not model.blocks[0].attn.hook_z.has_hooks()


@pytest.mark.parametrize(
    "name, cut",
    [
        ("blocks.0.hook_resid_pre", lambda x: x[:, :3]),  # fewer positions: had given logits of 3
        ("blocks.1.attn.hook_pattern", lambda x: x[:1]),  # a batch-1 patch: had been broadcast
        ("blocks.0.attn.hook_z", lambda x: x[..., 0, :]),  # one head's: had failed deep in attention
        ("ln_final.hook_scale", lambda x: x[..., 0]),  # [batch pos] for [batch pos 1]: broadcast
        ("blocks.0.attn.hook_result", lambda x: x.sum(-2)),  # an optional hook, added by its setter
    ],
)
def test_a_forward_hook_returning_another_shape_is_refused(name, cut):
    model, tokens = tiny_model(), random_tokens(2, 8)
    model.set_use_attn_result(True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=name)
        shape = cache[name].shape
        expected = re.escape(
            f"a forward hook on {name} returned a tensor of shape {tuple(cut(torch.empty(shape)).shape)} "
            f"in place of the activation, whose shape is {tuple(shape)}; return one of that shape"
        )
        with pytest.raises(ValueError, match=f"^{expected}"):
            model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: cut(x))])
        # What a hook may return: a new tensor of the activation's shape, or the activation itself.
        doubled = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x * 2)])
        in_place = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x.mul_(2))])
        clean = model(tokens)
    torch.testing.assert_close(in_place, doubled, rtol=0, atol=0)
    assert not torch.allclose(doubled, clean)
    assert not model.hook_dict[name].has_hooks()


def test_a_forward_hook_returning_no_tensor_is_refused():
    """Before: AttributeError "'int' object has no attribute 'element_size'" from inside ln1."""
    model, tokens = tiny_model(), random_tokens(2, 8)
    with pytest.raises(
        TypeError, match=r"^a forward hook on blocks\.0\.hook_resid_pre returned int; a hook returns None"
    ):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: 3)])
    assert not model.hook_dict["blocks.0.hook_resid_pre"].has_hooks()


HOOK_NAME_ROUTES = {
    "run_with_cache": lambda m, names, t: m.run_with_cache(t, names_filter=names),
    "add_caching_hooks": lambda m, names, t: m.add_caching_hooks(names_filter=names),
    "run_with_hooks": lambda m, names, t: m.run_with_hooks(t, fwd_hooks=[(n, lambda x, hook: x) for n in names]),
    "bwd_hooks": lambda m, names, t: m.run_with_hooks(
        t, bwd_hooks=[(n, lambda g, hook: None) for n in names], reset_hooks_end=False
    ),
    "add_hook": lambda m, names, t: [m.add_hook(n, lambda x, hook: x) for n in names],
}


@pytest.mark.parametrize("route", HOOK_NAME_ROUTES)
def test_a_misspelt_hook_name_is_refused_before_anything_runs(route):
    """HookedRootModule took a misspelt name in names_filter as "cache nothing" and in a hook list
    as a bare KeyError. Each route that takes hook names now names it and the nearest real one, and
    leaves no hook behind from the valid names listed before it."""
    model, tokens = tiny_model(), random_tokens(1, 4)
    good, bad = "blocks.0.hook_resid_post", "blocks.0.attn.hook_patern"
    expected = f"{bad!r} is not the name of a hook point of this model; did you mean 'blocks.0.attn.hook_pattern'"
    calls = []
    model.blocks[0].hook_resid_post.add_hook(lambda x, hook: calls.append(1))  # counts forward passes
    with pytest.raises(ValueError, match=re.escape(expected)):
        HOOK_NAME_ROUTES[route](model, [good, bad], tokens)
    assert calls == [] or route == "add_hook", "the model ran before the name was checked"
    assert len(model.blocks[0].hook_resid_post.fwd_hooks) == 1 + (route == "add_hook")
    assert not model.blocks[0].hook_resid_post.bwd_hooks
    model.reset_hooks()

    # The same routes with real names (and a filter function) still work.
    HOOK_NAME_ROUTES[route](model, [good, "blocks.0.attn.hook_pattern"], tokens)
    model.reset_hooks()
    _, cache = model.run_with_cache(tokens, names_filter=good)
    assert list(cache) == [good]
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_patern"))
    assert list(cache) == []
    with pytest.raises(ValueError, match=r"'hook_zzz' is not the name .*; see model.hook_dict for them"):
        model.run_with_cache(tokens, names_filter="hook_zzz")


def test_a_misspelt_hook_name_near_several_gets_the_three_nearest():
    model, tokens = tiny_model(), random_tokens(1, 4)
    near = "'blocks.0.hook_resid_pre' or 'blocks.0.hook_resid_mid' or 'blocks.0.hook_resid_post'"
    with pytest.raises(ValueError, match=re.escape(f"did you mean {near}?")):
        model.run_with_cache(tokens, names_filter="blocks.0.hook_resid")


@pytest.mark.parametrize("route", ["run_with_hooks", "bwd_hooks", "add_hook"])
def test_a_hook_named_by_a_filter_function_runs_on_every_hook_point_it_picks(route):
    """As in TransformerLens, a hook's name may be a function of the hook name: it is no name to
    check, and the hook runs at each hook point for which it returns True."""
    model, tokens = tiny_model(), random_tokens(1, 4)
    seen = []

    def record(x, hook):
        seen.append(hook.name)

    def picks(name):
        return name.endswith("hook_resid_post")

    if route == "add_hook":
        model.add_hook(picks, record)
        model(tokens)
    elif route == "run_with_hooks":
        model.run_with_hooks(tokens, fwd_hooks=[(picks, record)])
    else:
        model.run_with_hooks(tokens, return_type="loss", bwd_hooks=[(picks, record)], reset_hooks_end=False).backward()
    model.reset_hooks()
    expected = [f"blocks.{layer}.hook_resid_post" for layer in range(TINY.n_layers)]
    assert sorted(seen) == expected  # each picked hook point once, no other


@pytest.mark.parametrize("route", HOOK_NAME_ROUTES)
def test_a_bridge_native_hook_name_is_refused_with_ours(route):
    """The TransformerLens bridge's own names ("blocks.1.hook_out", "unembed.hook_out") are no hook
    points here; each route says which hook is the same activation, or that none is, before running."""
    model, tokens = tiny_model(), random_tokens(1, 4)
    calls = []
    model.blocks[1].hook_resid_post.add_hook(lambda x, hook: calls.append(1))
    cases = {
        "blocks.1.hook_out": "'blocks.1.hook_out' is the TransformerLens bridge's name for 'blocks.1.hook_resid_post'; "
        "this model has TransformerLens's names only",
        "unembed.hook_out": "'unembed.hook_out' is the TransformerLens bridge's name for the logits, which forward "
        "returns; they have no hook point here",
    }
    for native, expected in cases.items():
        with pytest.raises(ValueError, match=re.escape(expected)):
            HOOK_NAME_ROUTES[route](model, [native], tokens)
    assert calls == []
    assert len(model.blocks[1].hook_resid_post.fwd_hooks) == 1  # only the counter
    model.reset_hooks()


def test_a_bridge_native_name_in_a_cache_lookup_names_ours():
    model, tokens = tiny_model(), random_tokens(1, 4)
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(KeyError, match=re.escape("bridge's name for 'blocks.0.attn.hook_z'")):
        cache["blocks.0.attn.o.hook_in"]
    with pytest.raises(KeyError, match=re.escape("ln2's output, w * normalized + b, which has no hook point here: "
                                                 "hook blocks.1.ln2.hook_normalized")):  # fmt: skip
        cache["blocks.1.mlp.hook_in"]
    with pytest.raises(KeyError, match="is not in this cache"):  # a block this model lacks: no hint to give
        cache["blocks.2.hook_out"]


@pytest.mark.parametrize("name", [5, "blocks.x.hook_out", "layers.0.hook_out", "blocks.2.hook_out"])
def test_a_name_shaped_like_a_bridge_name_gets_no_bridge_hint(name):
    """Only "blocks.{i}." with a block this model has is read as a bridge block name: not a name
    that is no str, nor blocks.x., nor another prefix, which would name blocks.0.hook_resid_post."""
    model, tokens = tiny_model(), random_tokens(1, 4)
    expected = f"names_filter: {name!r} is not the name of a hook point of this model; "
    with pytest.raises(ValueError, match=re.escape(expected)):
        model.run_with_cache(tokens, names_filter=["hook_embed", name])
    if isinstance(name, str):
        _, cache = model.run_with_cache(tokens)
        with pytest.raises(KeyError, match=re.escape(f"{name!r} is not in this cache")):
            cache[name]


def test_hooks_takes_a_generator_of_hooks():
    """TransformerLens's hooks() reads fwd_hooks once; the name check must not use the generator up."""
    model, tokens = tiny_model(), random_tokens(1, 4)
    seen = []
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    with model.hooks(fwd_hooks=((name, lambda x, hook: seen.append(hook.name)) for name in names)):
        model(tokens)
    assert seen == names


def test_backward_hooks_receive_the_gradient_of_their_activation():
    """bwd_hooks (attribution patching's tool) see d(metric)/d(activation), as autograd computes it;
    one on hook_pattern alone is enough to make the pattern real (the eager path)."""
    model, tokens = tiny_model(), random_tokens(2, 8)
    names = ["blocks.1.hook_resid_mid", "blocks.0.attn.hook_pattern"]
    grads = {}
    logits = model.run_with_hooks(
        tokens,
        bwd_hooks=[(name, lambda grad, hook: grads.__setitem__(hook.name, grad.detach())) for name in names],
        reset_hooks_end=False,  # backward runs after the call
    )
    logits[:, -1, 3].sum().backward()
    model.reset_hooks()

    activations = {}

    def keep(x, hook):
        x.retain_grad()
        activations[hook.name] = x

    model.zero_grad()
    model.run_with_hooks(tokens, fwd_hooks=[(name, keep) for name in names])[:, -1, 3].sum().backward()
    for name in names:
        assert grads[name].shape == activations[name].shape and grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], activations[name].grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "returned, error, message",
    [
        (
            lambda g: g[:1],
            ValueError,
            "returned a tensor of shape (1, 8, 32) in place of the gradient, whose shape is ",
        ),
        (lambda g: g.double(), TypeError, "returned a torch.float64 tensor in place of the gradient, which is torch"),
        (lambda g: 0.0, TypeError, "returned float; a hook returns None (to keep the gradient) or a tensor of the "),
    ],
)
def test_a_backward_hook_returning_what_autograd_cannot_take_is_named(returned, error, message):
    """Before: torch's "hook 'hook' has changed the size of value" (or type), naming no hook point."""
    model, tokens = tiny_model(), random_tokens(2, 8)
    name = "blocks.1.hook_resid_mid"
    loss = model.run_with_hooks(
        tokens, return_type="loss", bwd_hooks=[(name, lambda g, hook: returned(g))], reset_hooks_end=False
    )
    with pytest.raises(error, match="^" + re.escape(f"a backward hook on {name} {message}")):
        loss.backward()
    model.reset_hooks()


def test_a_backward_hook_may_replace_the_gradient_with_one_of_its_shape():
    """The check lets through what autograd takes: zeroing the gradient at resid_mid of the last
    block leaves only the paths that skip it (none reach W_E: every path runs through it)."""
    model, tokens = tiny_model(), random_tokens(2, 8)
    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_mid"
    model.run_with_hooks(
        tokens, return_type="loss", bwd_hooks=[(name, lambda g, hook: torch.zeros_like(g))], reset_hooks_end=False
    ).backward()
    model.reset_hooks()
    assert model.embed.W_E.grad.abs().sum() == 0
    assert model.unembed.W_U.grad.abs().sum() > 0  # after the hook point: untouched
    assert repr(model.hook_dict[name]) == f"HookPoint(name={name!r})"


# --- TransformerLens's optional hooks -------------------------------------------------------

OPTIONAL_SETTERS = {
    "set_use_attn_result": ["attn.hook_result"],
    "set_use_split_qkv_input": ["hook_q_input", "hook_k_input", "hook_v_input"],
    "set_use_attn_in": ["hook_attn_in"],
    "set_use_hook_mlp_in": ["hook_mlp_in"],
}


@pytest.mark.parametrize("setter", list(OPTIONAL_SETTERS))
def test_optional_hooks_exist_only_while_on_and_leave_the_function_alone(setter, without_shape_checks):
    """Off (the default), an optional hook is no hook point: naming one is refused with the setter
    to call, rather than accepted and never fired. On, it is one and fires; off again, it is gone
    with its hooks, permanent ones too. None of this changes the logits."""
    model, tokens = tiny_model(), random_tokens(2, 6)
    logits = model(tokens)
    name = f"blocks.1.{OPTIONAL_SETTERS[setter][0]}"
    assert name not in model.hook_dict
    with pytest.raises(
        ValueError,
        match=re.escape(f"{name!r} is one of TransformerLens's optional hooks; it exists after model.{setter}(True)"),
    ):
        model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: None)])
    beyond = f"blocks.{TINY.n_layers}.{OPTIONAL_SETTERS[setter][0]}"  # a block this model lacks: no setter helps
    with pytest.raises(ValueError, match=re.escape(f"{beyond!r} is not the name of a hook point of this model")):
        model.run_with_hooks(tokens, fwd_hooks=[(beyond, lambda x, hook: None)])
    getattr(model, setter)(True)
    seen = []
    model.add_hook(name, lambda x, hook: seen.append(x.shape), is_permanent=True)
    getattr(model, setter)(True)  # idempotent: the hook point, and the hook on it, stay
    torch.testing.assert_close(model(tokens), logits)  # float32 rounding apart (result: a sum over heads)
    heads = () if setter == "set_use_hook_mlp_in" else (TINY.n_heads,)
    assert seen == [torch.Size((2, 6, *heads, TINY.d_model))]
    getattr(model, setter)(False)
    assert name not in model.hook_dict and not any(n.endswith(tuple(OPTIONAL_SETTERS[setter])) for n in model.hook_dict)
    torch.testing.assert_close(model(tokens), logits, rtol=0, atol=0)
    assert len(seen) == 1  # the permanent hook went with its hook point
    with pytest.raises(TypeError, match=r"must be True or False, got 1"):
        getattr(model, setter)(1)


def test_split_qkv_input_and_attn_in_exclude_each_other():
    model = tiny_model()
    model.set_use_attn_in(True)
    with pytest.raises(ValueError, match=r"mutually exclusive .* call model.set_use_attn_in\(False\) first"):
        model.set_use_split_qkv_input(True)
    model.set_use_attn_in(False)
    model.set_use_split_qkv_input(True)
    with pytest.raises(ValueError, match=r"mutually exclusive .* call model.set_use_split_qkv_input\(False\) first"):
        model.set_use_attn_in(True)
    assert "blocks.0.hook_q_input" in model.hook_dict and "blocks.0.hook_attn_in" not in model.hook_dict
    model.set_use_attn_in(False)  # turning the other one off is no conflict, and changes nothing
    assert "blocks.0.hook_q_input" in model.hook_dict and "blocks.0.hook_attn_in" not in model.hook_dict


def test_a_split_key_input_reaches_that_heads_keys_alone():
    """Patching head 2's copy in hook_k_input changes head 2's keys and nothing else of that layer's
    q, k, v; editing the query copy in place (a hook returning None) leaves the key copy alone."""
    model, tokens = tiny_model("eager"), random_tokens(2, 6)
    model.set_use_split_qkv_input(True)
    _, clean = model.run_with_cache(tokens)

    def add(x, hook):
        x = x.clone()
        x[:, :, 2] += torch.randn(x[:, :, 2].shape, generator=torch.Generator().manual_seed(0))
        return x

    with model.hooks(fwd_hooks=[("blocks.1.hook_k_input", add)]):
        _, patched = model.run_with_cache(tokens)
    changed = (patched["k", 1] != clean["k", 1]).any(dim=(0, 1, 3))
    assert changed.tolist() == [False, False, True, False]
    assert torch.equal(patched["q", 1], clean["q", 1]) and torch.equal(patched["v", 1], clean["v", 1])
    assert torch.equal(patched["resid_pre", 1], clean["resid_pre", 1])
    with model.hooks(fwd_hooks=[("blocks.0.hook_q_input", lambda x, hook: x.zero_())]):
        _, zeroed = model.run_with_cache(tokens)
    assert not torch.equal(zeroed["q", 0], clean["q", 0])
    assert torch.equal(zeroed["k", 0], clean["k", 0]) and torch.equal(zeroed["v", 0], clean["v", 0])
    # ln1 ran on each copy: per head, three times, the cache keeping the value copy's.
    assert clean["scale", 0, "ln1"].shape == (2, 6, TINY.n_heads, 1)
    calls = []
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.ln1.hook_scale", lambda x, hook: calls.append(1))])
    assert len(calls) == 3


def test_an_edit_of_resid_mid_is_the_stream_the_mlp_output_is_added_to():
    """hook_resid_mid sits on the residual stream itself, as in TransformerLens's HookedTransformer
    (TransformerLens issue #309; hook_mlp_in is the copy only the MLP reads): an edit there reaches
    ln2 and resid_post both. On the 4.3 bridge it reaches ln2 alone."""
    model, tokens = tiny_model(), random_tokens(2, 6)
    _, clean = model.run_with_cache(tokens)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_mid", lambda x, hook: 2.0 * x)]):
        _, patched = model.run_with_cache(tokens)
    torch.testing.assert_close(patched["resid_mid", 0], 2.0 * clean["resid_mid", 0], rtol=0, atol=0)
    assert not torch.equal(patched["mlp_out", 0], clean["mlp_out", 0])  # ln2 read the edit
    torch.testing.assert_close(
        patched["resid_post", 0], patched["resid_mid", 0] + patched["mlp_out", 0], rtol=0, atol=0
    )


def test_mlp_in_is_a_copy_only_the_mlp_reads():
    model, tokens = tiny_model(), random_tokens(2, 6)
    model.set_use_hook_mlp_in(True)
    _, clean = model.run_with_cache(tokens)
    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_in", lambda x, hook: x.mul_(2.0))]):  # in place
        _, patched = model.run_with_cache(tokens)
    assert torch.equal(patched["resid_mid", 0], clean["resid_mid", 0])
    torch.testing.assert_close(patched["mlp_in", 0], 2.0 * clean["mlp_in", 0], rtol=0, atol=0)
    assert not torch.equal(patched["mlp_out", 0], clean["mlp_out", 0])
    torch.testing.assert_close(
        patched["resid_post", 0], patched["resid_mid", 0] + patched["mlp_out", 0], rtol=0, atol=0
    )


def test_attn_result_holds_each_heads_write():
    """hook_result is z[h] W_O[h] per head; their sum plus b_O is attn_out, and zeroing one head's
    result removes exactly that head's write from the stream."""
    model, tokens = tiny_model(), random_tokens(2, 6)
    model.set_use_attn_result(True)
    _, cache = model.run_with_cache(tokens)
    attn = model.blocks[1].attn
    for head in range(TINY.n_heads):
        torch.testing.assert_close(cache["result", 1][:, :, head], cache["z", 1][:, :, head] @ attn.W_O[head])
    torch.testing.assert_close(cache["result", 1].sum(dim=2) + attn.b_O, cache["attn_out", 1], rtol=0, atol=0)

    def ablate(x, hook):
        x = x.clone()
        x[:, :, 3] = 0.0
        return x

    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_result", ablate)]):
        _, ablated = model.run_with_cache(tokens)
    torch.testing.assert_close(
        ablated["attn_out", 1], cache["attn_out", 1] - cache["result", 1][:, :, 3], rtol=1e-5, atol=1e-5
    )


def test_optional_hooks_keep_cached_decoding_equal_to_the_full_run():
    """Per-head inputs take another projection than the fused one the kv_cache keeps; decoding
    one position at a time with them on still gives the full run's logits."""
    model, tokens = tiny_model(), random_tokens(2, 8)
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    full = model(tokens)
    cache = gpt2_small.KVCache.for_model(model, batch=2, max_pos=8)
    steps = [model(tokens[:, :5], kv_cache=cache)] + [model(tokens[:, i : i + 1], kv_cache=cache) for i in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_attention_refuses_a_shared_query_input_with_per_head_key_input():
    model = tiny_model()
    x = torch.randn(1, 3, TINY.d_model)
    per_head = x[:, :, None].expand(-1, -1, TINY.n_heads, -1)
    with pytest.raises(
        ValueError, match=r"x must also hold one copy per head, \[batch pos n_heads d_model\]; got shape \(1, 3, 32\)"
    ):
        model.blocks[0].attn(x, key_input=per_head, value_input=per_head)
    torch.testing.assert_close(
        model.blocks[0].attn(per_head, key_input=per_head, value_input=per_head), model.blocks[0].attn(x)
    )


def test_stop_at_layer_returns_the_residual_stream_there():
    # The eager attention path, which run_with_cache also takes: the two runs are then bit-identical.
    model, tokens = tiny_model("eager"), random_tokens(2, 6)
    _, cache = model.run_with_cache(tokens)
    embeddings = cache["hook_embed"] + cache["hook_pos_embed"]
    torch.testing.assert_close(model(tokens, stop_at_layer=0), embeddings, rtol=0, atol=0)
    torch.testing.assert_close(model(tokens, stop_at_layer=1), cache["blocks.1.hook_resid_pre"], rtol=0, atol=0)
    torch.testing.assert_close(model(tokens, stop_at_layer=-1), cache["blocks.1.hook_resid_pre"], rtol=0, atol=0)
    last = model(tokens, stop_at_layer=TINY.n_layers)
    torch.testing.assert_close(last, cache["blocks.1.hook_resid_post"], rtol=0, atol=0)
    torch.testing.assert_close(model.unembed(model.ln_final(last)), model(tokens), rtol=0, atol=0)
    # Only the layers that ran call their hooks.
    seen = []
    hooks = [(f"blocks.{i}.hook_resid_pre", lambda x, hook: seen.append(hook.name)) for i in range(2)]
    model.run_with_hooks(tokens, stop_at_layer=1, fwd_hooks=hooks)
    assert seen == ["blocks.0.hook_resid_pre"]


@pytest.mark.parametrize("name, skipped", [("stop_at_layer", "later"), ("start_at_layer", "earlier")])
def test_layer_bounds_reject_what_they_cannot_do(name, skipped):
    model, tokens = tiny_model(), random_tokens(1, 3)
    given = tokens if name == "stop_at_layer" else model(tokens, stop_at_layer=1)
    with pytest.raises(ValueError, match=rf"{name}=3 is outside \[-2, 2\] \(n_layers=2\)"):
        model(given, **{name: 3})
    with pytest.raises(TypeError, match=f"{name} must be an int or None, got True"):
        model(given, **{name: True})
    cache = gpt2_small.KVCache.for_model(model, batch=1, max_pos=8)
    with pytest.raises(ValueError, match=f"{name} cannot be used with a kv_cache: the {skipped} layers'"):
        model(given, kv_cache=cache, **{name: 1})
    assert cache.length == 0


def test_start_at_layer_runs_the_rest_of_the_model_from_a_residual_stream():
    # Eager attention, as run_with_cache takes: the runs are then bit-identical (as for stop_at_layer).
    model, tokens = tiny_model("eager"), random_tokens(2, 6)
    logits, cache = model.run_with_cache(tokens)
    for start in (0, 1, -1, -2):
        resid = cache["resid_pre", start % TINY.n_layers]
        torch.testing.assert_close(model(resid, start_at_layer=start), logits, rtol=0, atol=0, msg=str(start))
    last = cache["resid_post", 1]
    torch.testing.assert_close(model(last, start_at_layer=TINY.n_layers), logits, rtol=0, atol=0)
    # With stop_at_layer, blocks [start, stop) only; none when stop <= start, as in TransformerLens.
    middle = model(cache["resid_pre", 0], start_at_layer=0, stop_at_layer=1)
    torch.testing.assert_close(middle, cache["resid_pre", 1], rtol=0, atol=0)
    torch.testing.assert_close(model(last, start_at_layer=1, stop_at_layer=1), last, rtol=0, atol=0)
    # The stream given is the one used: patch one position, and only it and later ones change.
    patched = cache["resid_pre", 1].clone()
    patched[:, 3] += 1.0
    changed = (model(patched, start_at_layer=1) != logits).any(dim=-1)
    assert changed[:, 3:].all() and not changed[:, :3].any()
    # Only the hooks of the blocks that ran, then ln_final's and the unembedding's.
    seen = []
    every = [(name, lambda x, hook: seen.append(hook.name)) for name in model.hook_dict]
    model.run_with_hooks(cache["resid_pre", 1], start_at_layer=1, fwd_hooks=every)
    assert seen[0] == "blocks.1.hook_resid_pre" and seen[-1] == "ln_final.hook_normalized"
    assert not any(name.startswith(("hook_embed", "hook_pos_embed", "blocks.0.")) for name in seen)


def test_start_at_layer_rejects_what_it_cannot_do(without_shape_checks):
    model, tokens = tiny_model(), random_tokens(2, 3)
    resid = model(tokens, stop_at_layer=1)
    with pytest.raises(TypeError, match=r"takes the residual stream entering that block .* got dtype torch.int64$"):
        model(tokens, start_at_layer=1)
    with pytest.raises(ValueError, match=r"to run from a residual stream \[batch, pos, d_model\], pass start_at_layer"):
        model(resid)
    with pytest.raises(ValueError, match=r"shape \[batch, pos, d_model=32\] .* got shape \(2, 3, 31\)"):
        model(resid[..., :31], start_at_layer=1)
    with pytest.raises(ValueError, match=r"1 <= pos <= n_ctx=16, got shape \(2, 17, 32\)"):
        model(torch.zeros(2, 17, 32), start_at_layer=1)
    with pytest.raises(ValueError, match=r"with batch >= 1 and 1 <= pos <= n_ctx=16, got shape \(0, 3, 32\)"):
        model(resid[:0], start_at_layer=1)
    with pytest.raises(ValueError, match=r"has dtype torch.float64 but the model's is torch.float32; convert it"):
        model(resid.double(), start_at_layer=1)
    with pytest.raises(ValueError, match=r"return_type='loss' with start_at_layer needs labels=tokens: the input is"):
        model(resid, start_at_layer=1, return_type="loss")
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\); it must match tokens, \(2, 3\)"):
        model(resid, start_at_layer=1, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="remove_batch_dim=True needs one sequence .* got batch size 2"):
        model.run_with_cache(resid, start_at_layer=1, remove_batch_dim=True)


@torch.no_grad()
def test_start_at_layer_scores_the_labels_as_the_whole_run_scores_its_tokens():
    """As the TransformerLens bridge: a residual stream and labels=tokens give the loss the tokens'
    own run gives (bit for bit, both on the fast attention path), per pair and averaged; a patched
    stream changes it."""
    model, tokens = tiny_model(), random_tokens(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    for attention_mask in (None, mask):
        resid = model(tokens, attention_mask=attention_mask, stop_at_layer=1)
        for per_token in (False, True):
            options = {"return_type": "loss", "loss_per_token": per_token, "attention_mask": attention_mask}
            expected = model(tokens, **options)
            actual = model(resid, start_at_layer=1, labels=tokens, **options)
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        logits, loss = model(resid, start_at_layer=1, labels=tokens, return_type="both", attention_mask=attention_mask)
        torch.testing.assert_close(logits, model(tokens, attention_mask=attention_mask), rtol=0, atol=0)
        # Noise, not a constant: a shift along every channel is what each LayerNorm removes.
        noise = torch.randn(resid.shape, generator=torch.Generator().manual_seed(0))
        patched = model(
            resid + noise, start_at_layer=1, labels=tokens, return_type="loss", attention_mask=attention_mask
        )
        assert abs(float(patched - loss)) > 1e-3


@torch.no_grad()
def test_labels_are_scored_in_place_of_the_tokens_and_minus_100_is_no_target():
    model, tokens = tiny_model(), random_tokens(2, 6)
    logits, plain = model(tokens, return_type="both")
    per_pair = model(tokens, return_type="loss", loss_per_token=True)
    # Other labels: the loss of the same logits against them, not against the tokens.
    other = (tokens + 1) % TINY.d_vocab
    expected = solution.lm_cross_entropy_loss(logits, other)
    torch.testing.assert_close(model(tokens, return_type="loss", labels=other), expected, rtol=0, atol=0)
    assert abs(float(expected - plain)) > 1e-3
    # -100 (IGNORE_INDEX) at positions 1 and 2 drops pairs 0 and 1 (they predict those positions):
    # each counts 0, the others keep their loss, and the mean is over the three left.
    labels = tokens.clone()
    labels[0, 1:3] = gpt2_small.IGNORE_INDEX
    ignored = model(tokens, return_type="loss", labels=labels, loss_per_token=True)
    assert torch.equal(ignored[0, :2], torch.zeros(2))
    torch.testing.assert_close(ignored[0, 2:], per_pair[0, 2:], rtol=0, atol=0)
    torch.testing.assert_close(ignored[1], per_pair[1], rtol=0, atol=0)
    mean = model(tokens, return_type="loss", labels=labels)
    kept = torch.cat([per_pair[0, 2:], per_pair[1]])
    torch.testing.assert_close(mean, kept.mean(), rtol=1e-6, atol=1e-6)
    assert abs(float(mean - plain)) > 1e-4
    # -100 at position 0 is never a target, so it changes nothing; int32 labels act as long ones.
    first = tokens.clone()
    first[:, 0] = gpt2_small.IGNORE_INDEX
    torch.testing.assert_close(model(tokens, return_type="loss", labels=first.int()), plain, rtol=0, atol=0)


def test_labels_reject_what_they_cannot_do():
    model, tokens = tiny_model(), random_tokens(2, 3)
    with pytest.raises(ValueError, match="labels are only scored with return_type 'loss' or 'both', got 'logits'"):
        model(tokens, labels=tokens)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor of token ids, got list"):
        model(tokens, return_type="loss", labels=tokens.tolist())
    with pytest.raises(ValueError, match="labels must have dtype torch.long or torch.int32, got torch.float32"):
        model(tokens, return_type="loss", labels=tokens.float())
    with pytest.raises(ValueError, match=r"labels has shape \(2, 2\); it must match tokens, \(2, 3\)"):
        model(tokens, return_type="loss", labels=tokens[:, :2])
    for bad in (-1, TINY.d_vocab):
        labels = tokens.clone()
        labels[1, 2] = bad
        with pytest.raises(ValueError, match=rf"label {bad} is outside \[0, d_vocab=101\) and is not -100"):
            model(tokens, return_type="loss", labels=labels)
    # The refusal names what left nothing to score, and only that (before: the attention_mask's
    # padding, which this call does not have).
    with pytest.raises(ValueError, match=r"^the -100 \(IGNORE_INDEX\) labels leave no pair of consecutive real tokens"):
        model(tokens, return_type="loss", labels=torch.full_like(tokens, -100))
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    labels = tokens.clone()
    labels[1] = -100
    with pytest.raises(
        ValueError, match=r"^the attention_mask's padding and the -100 \(IGNORE_INDEX\) labels leave no pair of"
    ):
        model(tokens, return_type="loss", labels=torch.tensor([[0, 0, -100], [0, -100, -100]]), attention_mask=mask)
    assert model(tokens, return_type="loss", labels=labels, attention_mask=mask).isfinite()  # row 0's 1 pair remains
    with pytest.raises(ValueError, match=r"^tokens of 1 position\(s\) hold no pair of consecutive tokens to score$"):
        gpt2_small.lm_cross_entropy_loss(model(tokens[:, :1]), tokens[:, :1])


@pytest.mark.parametrize("keep", [1, 3, 6])  # 6: every position, the edge that is allowed
def test_logits_to_keep_gives_the_last_positions_logits_and_runs_ln_final_on_them_alone(keep):
    model, tokens = tiny_model(), random_tokens(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding: positions still line up
    seen = []
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: seen.append(x.shape[1]))]):
        kept = model(tokens, attention_mask=mask, logits_to_keep=keep)
    full = model(tokens, attention_mask=mask)
    assert kept.shape == (2, keep, TINY.d_vocab) and seen == [keep]
    # Per-position arithmetic on fewer rows: equal up to the GEMM's blocking, not necessarily bitwise.
    torch.testing.assert_close(kept, full[:, -keep:], rtol=1e-6, atol=1e-6)


def test_logits_to_keep_rejects_what_it_cannot_do():
    model, tokens = tiny_model(), random_tokens(1, 3)
    with pytest.raises(ValueError, match=r"logits_to_keep=4 must be in \[1, 3\], the number of positions given"):
        model(tokens, logits_to_keep=4)
    with pytest.raises(ValueError, match=r"logits_to_keep=0 must be in \[1, 3\]"):
        model(tokens, logits_to_keep=0)
    with pytest.raises(TypeError, match="logits_to_keep must be an int or None, got True"):
        model(tokens, logits_to_keep=True)
    with pytest.raises(ValueError, match="logits_to_keep cannot be used with stop_at_layer"):
        model(tokens, logits_to_keep=1, stop_at_layer=1)


def test_loss_function_equals_transformer_lens_with_and_without_padding():
    logits = torch.randn(4, 8, 50, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    # Left padding, none, nearly all, and right padding (a real token followed by padding: no pair).
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8, [0, 0, 0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]])
    for attention_mask in (None, mask, mask.bool()):
        for per_token in (False, True):
            expected = tl_lm_cross_entropy_loss(logits, tokens, attention_mask, per_token=per_token)
            actual = solution.lm_cross_entropy_loss(logits, tokens, attention_mask, per_token=per_token)
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    # By hand: row 2 has one real pair (positions 6 -> 7); padded pairs count 0 and not in the mean.
    per_pair = -logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    masked = solution.lm_cross_entropy_loss(logits, tokens, mask, per_token=True)
    assert torch.equal(masked[2, :6], torch.zeros(6)) and masked[2, 6] == per_pair[2, 6]
    assert torch.equal(masked[3, 4:], torch.zeros(3)) and torch.equal(masked[3, :4], per_pair[3, :4])
    real_pairs = 5 + 7 + 1 + 4
    torch.testing.assert_close(solution.lm_cross_entropy_loss(logits, tokens, mask), masked.sum() / real_pairs)


def test_the_loss_of_bfloat16_logits_is_taken_in_float32():
    """The log-softmax over 50257 logits rounded to bf16 would be off by ~2**-9 of ~10 nats per
    token; taken in float32, the loss of bf16 logits is the loss of the same values in float32."""
    logits = (4 * torch.randn(2, 16, 50257, generator=torch.Generator().manual_seed(0))).bfloat16()
    tokens = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = solution.lm_cross_entropy_loss(logits, tokens)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, solution.lm_cross_entropy_loss(logits.float(), tokens), rtol=1e-6, atol=0)


def test_the_loss_of_float64_logits_stays_float64_as_transformerlens_s():
    """Upcasting is for fewer bits than float32: a float64 model's loss was rounded to float32, 1e-8
    relative, where TransformerLens's keeps every digit."""
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(2, 16, 50257, generator=generator, dtype=torch.float64)
    tokens = torch.randint(0, 50257, (2, 16), generator=generator)
    for per_token in (False, True):
        loss = solution.lm_cross_entropy_loss(logits, tokens, per_token=per_token)
        assert loss.dtype == torch.float64
        expected = tl_lm_cross_entropy_loss(logits, tokens, per_token=per_token)
        torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    model = tiny_model().double()
    with torch.no_grad():
        logits, loss = model(tokens % TINY.d_vocab, return_type="both")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, tl_lm_cross_entropy_loss(logits, tokens % TINY.d_vocab), rtol=1e-14, atol=0)


def test_a_left_padded_loss_is_each_sequences_own():
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    tokens, mask = gpt2_small.pad_prompts(prompts, pad_id=0)
    with torch.no_grad():
        per_token = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
        alone = model(torch.tensor([prompts[1]]), return_type="loss", loss_per_token=True)
        loss = model(tokens, attention_mask=mask, return_type="loss")
        unmasked = model(tokens, return_type="loss")
    torch.testing.assert_close(per_token[1, 3:], alone[0])  # the real pairs of the padded row
    assert not per_token[1, :3].any()  # pairs with padding count 0
    torch.testing.assert_close(loss, per_token.sum() / (5 + 2))
    assert not torch.isclose(loss, unmasked)  # the mask matters: padding would otherwise be predicted


def test_model_flags_are_checked_not_taken_for_truthy(without_shape_checks):
    """Before: remove_batch_dim="no" dropped the batch axis, per_token="no" gave per-token losses,
    static="no" made a static cache, include_unembed="no" counted the unembedding, and
    accumulated_bias(mlp_input="no") failed in int("no")."""
    model, tokens = tiny_model(), random_tokens(1, 3)
    logits = model(tokens)
    calls = {
        "static": lambda value: gpt2_small.KVCache.for_model(model, batch=1, max_pos=3, static=value),
        "per_token": lambda value: gpt2_small.lm_cross_entropy_loss(logits, tokens, per_token=value),
        "return_cache_object": lambda value: model.run_with_cache(tokens, return_cache_object=value),
        "remove_batch_dim": lambda value: model.run_with_cache(tokens, remove_batch_dim=value),
        "incl_bwd": lambda value: model.run_with_cache(tokens, return_type="loss", incl_bwd=value),
        "include_unembed": lambda value: model.num_params(include_unembed=value),
        "mlp_input": lambda value: model.accumulated_bias(1, mlp_input=value),
        "include_mlp_biases": lambda value: model.accumulated_bias(1, include_mlp_biases=value),
    }
    for flag, call in calls.items():
        call(False)  # the bool itself is taken
        with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got 'no'$"):
            call("no")
    assert model.run_with_cache(tokens, remove_batch_dim=False)[1]["hook_embed"].shape == (1, 3, TINY.d_model)


def test_return_type_rejects_what_it_cannot_do(without_shape_checks):
    model, tokens = tiny_model(), random_tokens(1, 3)
    with pytest.raises(ValueError, match=r"return_type must be one of \('logits', 'loss', 'both', None\), got 'logit'"):
        model(tokens, return_type="logit")
    with pytest.raises(ValueError, match="loss_per_token=True needs return_type 'loss' or 'both', got 'logits'"):
        model(tokens, loss_per_token=True)
    with pytest.raises(TypeError, match="loss_per_token must be True or False, got 1"):
        model(tokens, return_type="loss", loss_per_token=1)
    with pytest.raises(ValueError, match="return_type='loss' cannot be used with stop_at_layer"):
        model(tokens, return_type="loss", stop_at_layer=1)
    with pytest.raises(ValueError, match="pass neither logits_to_keep nor kv_cache"):
        model(tokens, return_type="both", logits_to_keep=1)
    with pytest.raises(ValueError, match="pass neither logits_to_keep nor kv_cache"):
        model(tokens, return_type="loss", kv_cache=gpt2_small.KVCache.for_model(model, batch=1, max_pos=3))
    with pytest.raises(ValueError, match="the loss needs at least 2 positions"):
        model(tokens[:, :1], return_type="loss")
    with pytest.raises(ValueError, match="^the attention_mask's padding leaves no pair of consecutive real tokens"):
        model(tokens, return_type="loss", attention_mask=torch.tensor([[0, 0, 1]]))
    with pytest.raises(ValueError, match="which must then be a scalar: pass return_type='loss'"):
        model.run_with_cache(tokens, return_type="loss", loss_per_token=True, incl_bwd=True)
    assert not any(hook.bwd_hooks or hook.fwd_hooks for hook in model.hook_dict.values())


def test_parameter_names_and_shapes():
    cfg = TransformerConfig(d_model=24, n_layers=2, n_heads=3, d_head=8, d_mlp=40, d_vocab=50, n_ctx=7)
    with torch.device("meta"):
        model = Transformer(cfg)
    per_block = {
        "ln1.w": (24,), "ln1.b": (24,),
        "attn.W_Q": (3, 24, 8), "attn.W_K": (3, 24, 8), "attn.W_V": (3, 24, 8), "attn.W_O": (3, 8, 24),
        "attn.b_Q": (3, 8), "attn.b_K": (3, 8), "attn.b_V": (3, 8), "attn.b_O": (24,),
        "ln2.w": (24,), "ln2.b": (24,),
        "mlp.W_in": (24, 40), "mlp.b_in": (40,), "mlp.W_out": (40, 24), "mlp.b_out": (24,),
    }  # fmt: skip
    expected = {"embed.W_E": (50, 24), "pos_embed.W_pos": (7, 24)}
    for i in range(2):
        expected |= {f"blocks.{i}.{k}": v for k, v in per_block.items()}
    expected |= {"ln_final.w": (24,), "ln_final.b": (24,), "unembed.W_U": (24, 50), "unembed.b_U": (50,)}
    actual = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert actual == expected
    assert list(model.state_dict()) == list(expected)  # no buffers ride along in checkpoints


def test_parameter_counts_for_gpt2_small():
    with torch.device("meta"):
        model = Transformer()
    assert model.num_params() == 163_087_441
    assert model.num_params(include_unembed=False) == 124_439_808  # HF's tied GPT-2 count


def test_initialisation_follows_gpt2():
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=256, n_layers=8, n_heads=4, d_head=64, d_mlp=1024, d_vocab=1000, n_ctx=128)
    model = Transformer(cfg)
    residual_std = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        last = name.split(".")[-1]
        if last in ("W_O", "W_out"):
            assert abs(p.std().item() - residual_std) < 0.05 * residual_std, name
        elif last.startswith("W_"):
            assert abs(p.std().item() - 0.02) < 0.05 * 0.02, name
            assert abs(p.mean().item()) < 0.002, name
        elif last == "w":
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert torch.equal(p, torch.zeros_like(p)), name


def test_modules_follow_the_input_dtype():
    model = tiny_model().to(torch.bfloat16)
    logits = model(random_tokens(1, 5))
    assert logits.dtype == torch.bfloat16
    reference = tiny_model()(random_tokens(1, 5))
    rel = (logits.float() - reference).norm() / reference.norm()
    assert rel < 4 * torch.finfo(torch.bfloat16).eps, rel


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_bfloat16_autocast_keeps_the_residual_stream_and_logits_in_float32(attn_impl):
    """Under autocast the weight products run in bf16 with their bias (as nn.Linear), so what
    attention and the MLP compute is bf16; the residual stream they add into, the LayerNorms
    and the logits (b_U added in float32) stay float32, as the loss needs."""
    model = tiny_model(attn_impl)
    pattern_hooks = ("hook_attn_scores", "hook_pattern")  # hooking these would switch sdpa to eager
    keep = (lambda name: True) if attn_impl == "eager" else (lambda name: not name.endswith(pattern_hooks))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, cache = model.run_with_cache(random_tokens(2, 6), names_filter=keep)
    assert logits.dtype == torch.float32
    low = {"attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z"}
    low |= {"hook_attn_out", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out"}
    assert len(cache) == 4 + TINY.n_layers * (17 if attn_impl == "eager" else 15)
    for name, activation in cache.items():
        expected = torch.bfloat16 if name.split(".", 2)[-1] in low else torch.float32
        assert activation.dtype == expected, name


def test_package_reexports_the_same_objects():
    for name in ("TransformerConfig", "Embedding", "PositionalEmbedding", "LayerNorm", "Attention", "MLP",
                 "TransformerBlock", "Unembedding", "Transformer"):  # fmt: skip
        assert getattr(gpt2_small, name) is getattr(solution, name), name


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, error, message",
    [
        (torch.zeros(1, 4), ValueError, r"dtype torch.long or torch.int32, got torch.float32$"),
        (torch.zeros(1, 4, dtype=torch.bool), ValueError, r"dtype torch.long or torch.int32, got torch.bool$"),
        # the dtype the trainer's token cache holds: F.embedding would refuse it with a RuntimeError
        (torch.zeros(1, 4, dtype=torch.uint16), ValueError, r"got torch.uint16; convert with tokens.long\(\)"),
        (torch.zeros(1, 4, dtype=torch.int16), ValueError, r"got torch.int16; convert with tokens.long\(\)"),
        (torch.zeros(4, dtype=torch.long), ValueError, r"shape \[batch, pos\].*tokens\[None\]"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, r"ndim 2\), got shape \(1, 2, 3\)"),
        (
            torch.zeros(1, TINY.n_ctx + 1, dtype=torch.long),
            ValueError,
            r"sequence length 17 must be in \[1, n_ctx=16\]",
        ),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, r"sequence length 0 must be in \[1, n_ctx=16\]"),
        (torch.zeros(0, 3, dtype=torch.long), ValueError, "batch size 0"),
        (torch.tensor([[1, -1]]), ValueError, r"token id -1 is outside \[0, d_vocab=101\)"),
        (torch.tensor([[1, 101]]), ValueError, r"token id 101 is outside \[0, d_vocab=101\)"),
        ([[1, 2]], TypeError, "torch.Tensor"),
    ],
    ids=[
        "float",
        "bool",
        "uint16",
        "int16",
        "1-D",
        "3-D",
        "too-long",
        "empty",
        "no-batch",
        "negative-id",
        "id-too-large",
        "list",
    ],
)
def test_bad_tokens_raise_a_named_error(tokens, error, message):
    model = tiny_model()
    with pytest.raises(error, match=message):
        model(tokens)
    with pytest.raises(error, match=message):
        model(tokens=tokens)


def test_text_or_a_list_in_place_of_tokens_gets_a_hint(without_shape_checks):
    """Without jaxtyping, as in a user's code, our own check is the one that answers."""
    model = tiny_model()
    with pytest.raises(TypeError, match=r"got str; for text pass gpt2_small.to_tokens\(text\)$"):
        model("Hello world")
    with pytest.raises(TypeError, match=r"got list; wrap a nested list of ids as torch.tensor\(ids\)$"):
        model([[1, 2]])
    with pytest.raises(TypeError, match="of token ids, got int$"):
        model(3)


@pytest.mark.parametrize("name", sorted(solution.PACKAGE_FUNCTIONS))
def test_transformerlens_model_methods_that_are_package_functions_here_name_them(name):
    model = tiny_model()
    with pytest.raises(AttributeError, match=rf"^Transformer has no {name}: .* use gpt2_small\.") as error:
        getattr(model, name)
    assert not hasattr(model, name)
    for function in re.findall(r"gpt2_small\.([\w.]+)\(", str(error.value)):  # each function it names exists
        assert callable(operator.attrgetter(function)(gpt2_small)), function


def test_other_missing_attributes_keep_torchs_error_and_submodules_are_found():
    model = tiny_model()
    with pytest.raises(AttributeError, match=r"^'Transformer' object has no attribute 'to_tokenz'$"):
        _ = model.to_tokenz
    assert model.embed is model._modules["embed"] and model.unembed.W_U is model._modules["unembed"].W_U


def test_int32_tokens_are_accepted():
    model = tiny_model()
    torch.testing.assert_close(model(random_tokens(1, 4).int()), model(random_tokens(1, 4)))


# --- config --------------------------------------------------------------------------------


def test_config_defaults_are_gpt2_small():
    cfg = TransformerConfig()
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_mlp) == (768, 12, 12, 64, 3072)
    assert (cfg.d_vocab, cfg.n_ctx, cfg.layer_norm_eps, cfg.init_range) == (50257, 1024, 1e-5, 0.02)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"d_model": 100}, ValueError, r"d_model=100 must equal n_heads \* d_head = 12 \* 64 = 768"),
        ({"d_model": 96}, ValueError, "= 768; set d_head=8 or change n_heads$"),
        # Before: "set d_head=7", and 4 * 7 = 28 is no fix; only a head count dividing d_model is.
        (
            {"d_model": 30, "n_heads": 4},
            ValueError,
            "d_model=30 is not a multiple of n_heads=4; use n_heads=3 with d_head=10 or n_heads=5 with d_head=6$",
        ),
        ({"d_model": 7, "n_heads": 12}, ValueError, "not a multiple of n_heads=12; use n_heads=7 with d_head=1$"),
        # Before: the hint searched every count below n_heads for a divisor of d_model, 10**12 of them.
        ({"n_heads": 10**12}, ValueError, f"not a multiple of n_heads={10**12}; use n_heads=768 with d_head=1$"),
        ({"n_layers": 0}, ValueError, "n_layers must be positive, got 0"),
        ({"d_vocab": -5}, ValueError, "d_vocab must be positive, got -5"),
        # A wrong type is refused by beartype (in tests) or __post_init__; both name field and value.
        ({"n_heads": 12.0}, TypeError, r"n_heads[\s\S]*12\.0"),
        ({"n_ctx": True}, TypeError, "n_ctx must be an int, got True"),
        ({"layer_norm_eps": 0.0}, ValueError, "layer_norm_eps must be a positive number, got 0.0"),
        ({"init_range": float("nan")}, ValueError, "init_range must be a positive number"),
        ({"layer_norm_eps": float("inf")}, ValueError, "layer_norm_eps must be a positive number, got inf"),
        ({"attn_impl": "flash"}, ValueError, r"attn_impl must be one of \('sdpa', 'eager'\), got 'flash'"),
    ],
)
def test_config_rejects_inconsistent_values(overrides, error, message):
    with pytest.raises(error, match=message):
        TransformerConfig(**overrides)


def test_config_refuses_a_bool_for_a_float_field(without_shape_checks):
    # Without beartype, as in a user's code: True is an int, and 1 is a number, so True needs its own check.
    with pytest.raises(TypeError, match="TransformerConfig.layer_norm_eps must be a float, got True"):
        TransformerConfig(layer_norm_eps=True)
    assert TransformerConfig(init_range=1).init_range == 1


@pytest.mark.parametrize("name", ["device", "dtype"])
def test_the_config_points_transformerlens_s_cfg_device_and_dtype_at_the_model(name):
    model = tiny_model()
    with pytest.raises(AttributeError, match=rf"^TransformerConfig has no {name}: .*; use model\.{name}$"):
        getattr(model.cfg, name)
    assert getattr(model, name) == (torch.device("cpu") if name == "device" else torch.float32)
    assert not hasattr(model.cfg, name)
    with pytest.raises(AttributeError, match=r"^'TransformerConfig' object has no attribute 'd_modle'$"):
        _ = model.cfg.d_modle
    assert copy.deepcopy(model.cfg) == model.cfg  # copy's lookups of __deepcopy__ and the like still fail plainly


def test_transformer_rejects_a_non_config():
    with pytest.raises(TypeError, match="TransformerConfig"):
        Transformer({"d_model": 768})


@pytest.mark.parametrize(
    "module",
    [
        "Embedding",
        "PositionalEmbedding",
        "LayerNorm",
        "Attention",
        "MLP",
        "TransformerBlock",
        "Unembedding",
        "Transformer",
    ],
)
def test_every_module_names_a_non_config_without_beartype(module, without_shape_checks):
    # Users build single layers as in ARENA; a dict used to fail with "'dict' object has no attribute 'd_vocab'".
    cls = getattr(solution, module)
    with pytest.raises(
        TypeError,
        match=rf"^{module} cfg must be a TransformerConfig, got dict; build one with TransformerConfig\(\*\*cfg\)$",
    ):
        cls({"d_model": 768})
    with pytest.raises(TypeError, match=rf"^{module} cfg must be a TransformerConfig, got Transformer$"):
        cls(tiny_model())
    assert isinstance(cls(TINY), torch.nn.Module)


def test_runtime_shape_checking_is_on():
    """pyproject's addopts turn on jaxtyping + beartype for solution and gpt2_small."""
    import jaxtyping

    ln = tiny_model().blocks[0].ln1
    with pytest.raises(jaxtyping.TypeCheckError):
        ln(torch.randn(3, TINY.d_model))  # missing the pos axis
    with pytest.raises(jaxtyping.TypeCheckError):
        tiny_model().embed(torch.zeros(1, 3))  # float where Int token ids are declared
