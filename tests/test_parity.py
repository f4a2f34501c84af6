"""Every component against the TransformerLens 4 bridge (and the whole model against HF).

Each component is fed its own reference input from the bridge's cache, so a failure points
at that component and not at something upstream.
"""

import copy
import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from gpt2_small import convert_hf_state_dict
from gpt2_small.bridge_names import bridge_name_hint
from solution import _optional_hook_setter, causal_mask

BLOCK_HOOKS = [
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
]
TOP_HOOKS = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized"]


def hook_names(n_layers: int) -> list[str]:
    return TOP_HOOKS + [f"blocks.{i}.{h}" for i in range(n_layers) for h in BLOCK_HOOKS]


@contextmanager
def capture(module: torch.nn.Module, *hook_attrs: str) -> Iterator[dict[str, torch.Tensor]]:
    """Record what the module's own HookPoints see during the `with` body."""
    seen: dict[str, torch.Tensor] = {}
    points = [getattr(module, attr) for attr in hook_attrs]
    for attr, point in zip(hook_attrs, points, strict=True):
        point.add_hook(lambda tensor, hook, attr=attr: seen.__setitem__(attr, tensor.detach()))
    try:
        yield seen
    finally:
        for point in points:
            point.remove_hooks()


def test_embedding(ref, parity):
    parity(ref.model.embed(ref.tokens), ref.cache["hook_embed"], "Embedding", ref.spec.name)


def test_positional_embedding(ref, parity):
    parity(ref.model.pos_embed(ref.tokens), ref.cache["hook_pos_embed"], "PositionalEmbedding", ref.spec.name)


@pytest.mark.parametrize("ln, resid_in", [("ln1", "hook_resid_pre"), ("ln2", "hook_resid_mid")])
def test_block_layernorms(ref, parity, ln, resid_in):
    for i, block in enumerate(ref.model.blocks):
        module, prefix = getattr(block, ln), f"blocks.{i}.{ln}"
        with capture(module, "hook_scale", "hook_normalized") as seen, torch.no_grad():
            out = module(ref.cache[f"blocks.{i}.{resid_in}"])
        parity(seen["hook_scale"], ref.cache[f"{prefix}.hook_scale"], f"LayerNorm {ln} scale", ref.spec.name)
        parity(
            seen["hook_normalized"], ref.cache[f"{prefix}.hook_normalized"], f"LayerNorm {ln} normalized", ref.spec.name
        )
        parity(out, ref.cache[f"{prefix}.hook_out"], f"LayerNorm {ln} out", ref.spec.name)


def test_final_layernorm(ref, parity):
    last = ref.spec.n_layer - 1
    module = ref.model.ln_final
    with capture(module, "hook_scale", "hook_normalized") as seen, torch.no_grad():
        out = module(ref.cache[f"blocks.{last}.hook_resid_post"])
    parity(seen["hook_scale"], ref.cache["ln_final.hook_scale"], "LayerNorm ln_final scale", ref.spec.name)
    parity(
        seen["hook_normalized"], ref.cache["ln_final.hook_normalized"], "LayerNorm ln_final normalized", ref.spec.name
    )
    parity(out, ref.cache["ln_final.hook_out"], "LayerNorm ln_final out", ref.spec.name)


def test_attention_sdpa_path(ref, parity):
    """With no hooks on scores or pattern the fused kernel runs; its output must match too."""
    for i, block in enumerate(ref.model.blocks):
        assert block.attn.cfg.attn_impl == "sdpa" and not block.attn.uses_eager_path()
        with capture(block.attn, "hook_z") as seen, torch.no_grad():
            out = block.attn(ref.cache[f"blocks.{i}.ln1.hook_out"])
        parity(seen["hook_z"], ref.cache[f"blocks.{i}.attn.hook_z"], "Attention z (sdpa)", ref.spec.name)
        parity(out, ref.cache[f"blocks.{i}.hook_attn_out"], "Attention attn_out (sdpa)", ref.spec.name)


def test_attention_eager_path(ref, parity):
    pos = ref.spec.pos
    masked = causal_mask(pos, pos, torch.device("cpu"))
    for i, block in enumerate(ref.model.blocks):
        prefix = f"blocks.{i}.attn"
        with capture(block.attn, "hook_attn_scores", "hook_pattern", "hook_z") as seen, torch.no_grad():
            assert block.attn.uses_eager_path()
            out = block.attn(ref.cache[f"blocks.{i}.ln1.hook_out"])
        ref_scores = ref.cache[f"{prefix}.hook_attn_scores"]
        # Masked scores hold finfo.min, whose norm overflows: compare the visible ones, and
        # require the masked ones to be identical.
        parity(seen["hook_attn_scores"][..., ~masked], ref_scores[..., ~masked], "Attention attn_scores", ref.spec.name)
        assert torch.equal(seen["hook_attn_scores"][..., masked], ref_scores[..., masked])
        parity(seen["hook_pattern"], ref.cache[f"{prefix}.hook_pattern"], "Attention pattern", ref.spec.name)
        parity(seen["hook_z"], ref.cache[f"{prefix}.hook_z"], "Attention z", ref.spec.name)
        parity(out, ref.cache[f"blocks.{i}.hook_attn_out"], "Attention attn_out", ref.spec.name)


def test_attention_patterns_are_not_trivial(ref):
    """Guard on the fixture: near-uniform patterns would make the pattern comparison weak."""
    pattern = ref.cache["blocks.0.attn.hook_pattern"]
    assert pattern[..., -1, :].max() > 3.0 / ref.spec.pos


def test_mlp(ref, parity):
    for i, block in enumerate(ref.model.blocks):
        prefix = f"blocks.{i}.mlp"
        with capture(block.mlp, "hook_pre", "hook_post") as seen, torch.no_grad():
            out = block.mlp(ref.cache[f"blocks.{i}.ln2.hook_out"])
        parity(seen["hook_pre"], ref.cache[f"{prefix}.hook_pre"], "MLP pre", ref.spec.name)
        parity(seen["hook_post"], ref.cache[f"{prefix}.hook_post"], "MLP post", ref.spec.name)
        parity(out, ref.cache[f"blocks.{i}.hook_mlp_out"], "MLP mlp_out", ref.spec.name)


def test_transformer_block(ref, parity):
    for i, block in enumerate(ref.model.blocks):
        with torch.no_grad():
            out = block(ref.cache[f"blocks.{i}.hook_resid_pre"])
        parity(out, ref.cache[f"blocks.{i}.hook_resid_post"], "TransformerBlock resid_post", ref.spec.name)


def test_unembedding(ref, parity):
    with torch.no_grad():
        logits = ref.model.unembed(ref.cache["ln_final.hook_out"])
    parity(logits, ref.logits, "Unembedding logits", ref.spec.name)


def test_full_model_matches_hf(ref, parity):
    with torch.no_grad():
        logits = ref.model(ref.tokens)
    parity(logits, ref.hf_logits, "Transformer logits vs HF", ref.spec.name, truth=ref.logits64)


def test_full_model_matches_bridge(ref, parity):
    with torch.no_grad():
        logits = ref.model(ref.tokens)
    parity(logits, ref.logits, "Transformer logits vs bridge", ref.spec.name, truth=ref.logits64)


def test_config_answers_transformer_lens_questions_as_the_bridge_does(ref):
    """Code written for TransformerLens reads model.cfg.d_vocab_out, act_fn, normalization_type and
    positional_embedding_type (AttributeError before); the values are the bridge's for GPT-2. Not
    fields: a saved config holds the fields alone."""
    names = ["d_vocab_out", "act_fn", "normalization_type", "positional_embedding_type"]
    for name in ["d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", *names]:
        assert getattr(ref.model.cfg, name) == getattr(ref.bridge.cfg, name), name
    assert not set(names) & {f.name for f in dataclasses.fields(ref.model.cfg)}


def test_hook_names_are_exactly_transformer_lens_names(ref):
    ours = set(ref.model.hook_dict)
    expected = set(hook_names(ref.spec.n_layer))
    assert ours == expected, f"missing {sorted(expected - ours)}, extra {sorted(ours - expected)}"
    assert expected <= set(ref.cache.keys())


def test_cache_matches_bridge_cache(ref, parity):
    """A whole run: every hook's value vs the bridge's (rel <= 1e-5), and as close to float64 as the bridge's."""
    with torch.no_grad():
        logits, cache = ref.model.run_with_cache(ref.tokens)
    parity(logits, ref.logits, "run_with_cache logits", ref.spec.name, truth=ref.logits64)
    masked = causal_mask(ref.spec.pos, ref.spec.pos, torch.device("cpu"))
    for name in hook_names(ref.spec.n_layer):
        ours, theirs, truth = cache[name], ref.cache[name], ref.cache64[name]
        assert ours.shape == theirs.shape, f"{name}: {tuple(ours.shape)} != {tuple(theirs.shape)}"
        if name.endswith("hook_attn_scores"):
            assert torch.equal(ours[..., masked], theirs[..., masked]), name
            ours, theirs, truth = ours[..., ~masked], theirs[..., ~masked], truth[..., ~masked]
        component = "cache " + name.split(".", 2)[-1] if name.startswith("blocks.") else "cache " + name
        parity(ours, theirs, component, ref.spec.name, truth=truth)


def test_a_float64_run_matches_the_float64_bridge_to_float64_rounding(ref):
    """Converted to float64, every hook and the logits are the float64 bridge's to 1e-12: no step
    rounds through float32 (the eager softmax once did, ~1e-8 on the pattern)."""
    model = copy.deepcopy(ref.model).double()
    with torch.no_grad():
        logits, cache = model.run_with_cache(ref.tokens)
    assert logits.dtype == torch.float64
    assert rel_error(logits, ref.logits64) <= 1e-12
    masked = causal_mask(ref.spec.pos, ref.spec.pos, torch.device("cpu"))
    for name in hook_names(ref.spec.n_layer):
        ours, truth = cache[name], ref.cache64[name]
        assert ours.dtype == torch.float64, name
        if name.endswith("hook_attn_scores"):
            ours, truth = ours[..., ~masked], truth[..., ~masked]
        assert rel_error(ours, truth) <= 1e-12, (name, rel_error(ours, truth))


def test_weights_match_bridge_weights(ref):
    """Our parameters are TL's parameters: same names and shapes, same values."""
    for i, (ours, theirs) in enumerate(zip(ref.model.blocks, ref.bridge.blocks, strict=True)):
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            torch.testing.assert_close(
                getattr(ours.attn, name), getattr(theirs.attn, name), rtol=0, atol=0, msg=f"blocks.{i}.attn.{name}"
            )
    W_E = ref.model.embed.W_E
    torch.testing.assert_close(ref.model.unembed.W_U, W_E.T, rtol=0, atol=0)


STACKED = ["W_E", "W_pos", "W_E_pos", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
           "W_in", "b_in", "W_out", "b_out"]  # fmt: skip


def test_weight_shortcuts_equal_the_bridges(ref):
    """model.W_Q (every layer's, stacked), model.QK, ...: TransformerLens's names, shapes and values."""
    for name in STACKED:
        torch.testing.assert_close(getattr(ref.model, name), getattr(ref.bridge, name), rtol=0, atol=0, msg=name)
    assert ref.model.W_E is ref.model.embed.W_E and ref.model.W_U is ref.model.unembed.W_U  # the parameters
    for name in ("QK", "OV"):
        ours, theirs = getattr(ref.model, name), getattr(ref.bridge, name)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours.A, theirs.A, rtol=0, atol=0, msg=f"{name}.A")
        torch.testing.assert_close(ours.B, theirs.B, rtol=0, atol=0, msg=f"{name}.B")


# --- return_type: the loss, as TransformerLens's forward gives it ------------------------------


def test_loss_and_per_token_loss_equal_the_bridges(ref):
    with torch.no_grad():
        logits, loss = ref.model(ref.tokens, return_type="both")
        per_token = ref.model(ref.tokens, return_type="loss", loss_per_token=True)
        expected = ref.bridge(ref.tokens, return_type="loss")
        expected_per_token = ref.bridge(ref.tokens, return_type="loss", loss_per_token=True)
    assert loss.shape == () and per_token.shape == (ref.spec.batch, ref.spec.pos - 1)
    torch.testing.assert_close(per_token, expected_per_token, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, ref.logits)
    assert ref.model(ref.tokens, return_type=None) is None
    # model.loss_fn, where TransformerLens keeps the function, on the bridge's logits
    mask = torch.ones_like(ref.tokens)
    mask[0, :4] = 0
    for attention_mask in (None, mask):
        for per_token in (False, True):
            ours = ref.model.loss_fn(ref.logits, ref.tokens, attention_mask, per_token=per_token)
            theirs = ref.bridge.loss_fn(ref.logits, ref.tokens, attention_mask, per_token=per_token)
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_loss_gradients_cached_with_incl_bwd_equal_the_bridges(ref):
    """run_with_cache(return_type="loss", incl_bwd=True): the "_grad" entries of every hook. The
    bridge's hook_resid_mid gradient lacks the residual connection (it is ln2's input there, a
    branch of the stream), so for it ours is checked to be the bridge's plus resid_post's: what
    autograd gives for the stream itself."""
    loss, cache = ref.model.run_with_cache(ref.tokens, return_type="loss", incl_bwd=True)
    expected_loss, expected = ref.bridge.run_with_cache(ref.tokens, return_type="loss", incl_bwd=True)
    ref.model.zero_grad(set_to_none=True)
    ref.bridge.zero_grad(set_to_none=True)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    grads = [name for name in cache if name.endswith("_grad")]
    assert len(grads) == len(ref.model.hook_dict)
    for name in grads:
        theirs = expected[name]
        if name.endswith("hook_resid_mid_grad"):
            theirs = theirs + expected[name.replace("resid_mid", "resid_post")]
        assert rel_error(cache[name], theirs) <= 1e-5, name


def test_parameter_gradients_of_the_loss_equal_hfs(ref):
    """What training steps on: every parameter's gradient of the mean next-token loss, against HF's
    (labels=tokens) on the same weights, mapped by convert_hf_state_dict, which moves and reshapes
    each tensor and so maps gradients as it maps weights. HF ties lm_head to wte, so its wte
    gradient is our W_E's plus W_U's transposed. b_U, which HF lacks, is checked to be the summed
    gradient of the logits: softmax minus the one-hot target, over the pairs, over their count."""
    model, hf = ref.model, ref.hf
    model.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    try:
        logits, loss = model(ref.tokens, return_type="both")
        loss.backward()
        hf(ref.tokens, labels=ref.tokens).loss.backward()
        hf_grads = {name: p.grad for name, p in hf.named_parameters() if name != "lm_head.weight"}
        expected = convert_hf_state_dict(hf_grads, model.cfg)
        errors = {}
        for name, p in model.named_parameters():
            if name.endswith("attn.b_K"):
                # Zero in exact arithmetic: a bias on every key shifts each query's scores by one
                # constant, which the softmax takes away. Both are rounding (about 1e-8 of W_K's).
                errors[name] = float(p.grad.norm() / model.get_parameter(name.replace("b_K", "W_K")).grad.norm())
            elif name not in ("embed.W_E", "unembed.W_U", "unembed.b_U"):
                errors[name] = rel_error(p.grad, expected[name])
        errors["W_E + W_U.T"] = rel_error(
            model.embed.W_E.grad + model.unembed.W_U.grad.T, hf.transformer.wte.weight.grad
        )
        one_hot = torch.nn.functional.one_hot(ref.tokens[:, 1:], model.cfg.d_vocab)
        d_logits = (logits[:, :-1].detach().softmax(dim=-1) - one_hot) / one_hot[..., 0].numel()
        errors["b_U"] = rel_error(model.unembed.b_U.grad, d_logits.sum(dim=(0, 1)))
        assert len(errors) == len(list(model.parameters())) - 1  # W_E and W_U together
        assert max(errors.values()) <= 1e-5, max(errors.items(), key=lambda item: item[1])
    finally:
        model.zero_grad(set_to_none=True)
        hf.zero_grad(set_to_none=True)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).double().norm() / expected.double().norm())


# --- start_at_layer: the rest of the model, from a residual stream ------------------------------


@pytest.mark.parametrize("start", [0, 1, -1])
def test_start_at_layer_equals_the_bridges(ref, parity, start):
    """A residual stream that no token run gives (noise at the stream's scale) enters block
    `start`; the logits and every hook that runs equal the bridge's, and only the hooks of blocks
    start.. and ln_final run: not the embeddings' nor the earlier blocks'."""
    layer = start % ref.spec.n_layer
    scale = ref.cache[f"blocks.{layer}.hook_resid_pre"].std()
    generator = torch.Generator().manual_seed(ref.spec.seed)
    residual = scale * torch.randn(ref.spec.batch, ref.spec.pos, ref.spec.n_embd, generator=generator)
    with torch.no_grad():
        logits, cache = ref.model.run_with_cache(residual, start_at_layer=start)
        expected_logits, expected = ref.bridge.run_with_cache(residual, start_at_layer=start)
        truth = ref.bridge64(residual.double(), start_at_layer=start)
    ran = [name for name in hook_names(ref.spec.n_layer) if name.startswith("ln_final")]
    ran += [f"blocks.{i}.{h}" for i in range(layer, ref.spec.n_layer) for h in BLOCK_HOOKS]
    assert sorted(cache.keys()) == sorted(ran)
    assert set(ran) <= set(expected.keys()) and f"blocks.{layer}.hook_resid_pre" in cache
    if layer > 0:
        assert f"blocks.{layer - 1}.hook_resid_post" not in expected.keys()  # the bridge's skip too
    torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], residual, rtol=0, atol=0)
    parity(logits, expected_logits, "start_at_layer logits", ref.spec.name, truth=truth)
    for name in ran:
        ours, theirs = cache[name], expected[name]
        if name.endswith("hook_attn_scores"):  # -inf above the diagonal in both
            masked = causal_mask(ref.spec.pos, ref.spec.pos, torch.device("cpu"))
            assert torch.equal(ours[..., masked], theirs[..., masked]), name
            ours, theirs = ours[..., ~masked], theirs[..., ~masked]
        assert rel_error(ours, theirs) <= 1e-5, name


def test_start_at_layer_with_left_padding_equals_the_bridges(ref):
    """The mask still keeps padding out of attention when the run starts at a block."""
    mask = torch.ones(ref.spec.batch, ref.spec.pos, dtype=torch.long)
    mask[0, :5] = 0
    generator = torch.Generator().manual_seed(ref.spec.seed)
    residual = torch.randn(ref.spec.batch, ref.spec.pos, ref.spec.n_embd, generator=generator)
    with torch.no_grad():
        logits = ref.model(residual, start_at_layer=1, attention_mask=mask)
        expected = ref.bridge(residual, start_at_layer=1, attention_mask=mask)
        unmasked = ref.model(residual, start_at_layer=1)
    real = mask.bool()
    assert rel_error(logits[real], expected[real]) <= 1e-5
    assert rel_error(logits[1], unmasked[1]) <= 1e-5  # the unpadded row is its own
    assert rel_error(logits[0, 5:], unmasked[0, 5:]) > 1e-3  # and the padded one is not the unmasked run's


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_loss_from_start_at_layer_with_labels_equals_the_bridges(ref, padded):
    """The bridge's labels: the residual stream entering block 1 and labels with -100 (no target)
    on the first positions of one row give the bridge's loss, per pair and averaged, with and
    without left padding."""
    mask = torch.ones(ref.spec.batch, ref.spec.pos, dtype=torch.long)
    if padded:
        mask[0, :3] = 0
    labels = ref.tokens.clone()
    labels[1, :6] = -100
    residual = ref.cache["blocks.1.hook_resid_pre"]
    options = {"start_at_layer": 1, "labels": labels, "attention_mask": mask, "return_type": "loss"}
    with torch.no_grad():
        for per_token in (False, True):
            loss = ref.model(residual, loss_per_token=per_token, **options)
            expected = ref.bridge(residual, loss_per_token=per_token, **options)
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5, msg=f"per_token={per_token}")
        per_pair = ref.model(residual, loss_per_token=True, **options)
    assert torch.equal(per_pair[1, :5], torch.zeros(5)) and bool((per_pair[1, 5:] > 0).all())


# --- TransformerLens's optional hooks (model.set_use_attn_result and the others) -----------------

OPTIONAL = {  # setter -> the hook points it adds to each block
    "set_use_attn_result": ["attn.hook_result"],
    "set_use_split_qkv_input": ["hook_q_input", "hook_k_input", "hook_v_input"],
    "set_use_attn_in": ["hook_attn_in"],
    "set_use_hook_mlp_in": ["hook_mlp_in"],
}


@contextmanager
def optional_hooks(ref, setter: str) -> Iterator[None]:
    """Turn one optional hook family on in both our model and the bridge (session-wide fixtures)."""
    getattr(ref.model, setter)(True)
    getattr(ref.bridge, setter)(True)
    try:
        yield
    finally:
        getattr(ref.model, setter)(False)
        getattr(ref.bridge, setter)(False)


@pytest.mark.parametrize("setter", list(OPTIONAL))
def test_optional_hooks_cache_equals_the_bridges(ref, parity, setter):
    """With each setter on, the model's hook points are the usual ones plus exactly the setter's,
    and every cached activation, the new ones included, equals the bridge's. With per-head inputs,
    ln1 runs on each head's copy (an n_heads axis), which unpatched is the bridge's ln1 per head."""
    names = hook_names(ref.spec.n_layer)
    added = [f"blocks.{i}.{h}" for i in range(ref.spec.n_layer) for h in OPTIONAL[setter]]
    with optional_hooks(ref, setter), torch.no_grad():
        logits, cache = ref.model.run_with_cache(ref.tokens)
        expected_logits, expected = ref.bridge.run_with_cache(ref.tokens)
        assert set(ref.model.hook_dict) == set(names) | set(added)
    assert set(ref.model.hook_dict) == set(names)  # and off again
    parity(logits, expected_logits, f"{setter} logits", ref.spec.name, truth=ref.logits64)
    masked = causal_mask(ref.spec.pos, ref.spec.pos, torch.device("cpu"))
    per_head = setter in ("set_use_split_qkv_input", "set_use_attn_in")
    for name in names + added:
        ours, theirs = cache[name], expected[name]
        if per_head and ".ln1." in name:
            theirs = theirs[:, :, None].expand(-1, -1, ref.spec.n_head, -1)
        assert ours.shape == theirs.shape, f"{name}: {tuple(ours.shape)} != {tuple(theirs.shape)}"
        if name.endswith("hook_attn_scores"):
            assert torch.equal(ours[..., masked], theirs[..., masked]), name
            ours, theirs = ours[..., ~masked], theirs[..., ~masked]
        assert rel_error(ours, theirs) <= 1e-5, name


@pytest.mark.parametrize(
    "setter, hook, where",
    [
        ("set_use_split_qkv_input", "blocks.1.hook_q_input", (slice(None), slice(None), 2)),  # one head's queries
        ("set_use_split_qkv_input", "blocks.1.hook_k_input", (slice(None), 3, 1)),  # one key of one head
        ("set_use_split_qkv_input", "blocks.0.hook_v_input", (slice(None), slice(None), 0)),
        ("set_use_attn_in", "blocks.2.hook_attn_in", (slice(None), slice(None), 3)),
        ("set_use_attn_result", "blocks.0.attn.hook_result", (slice(None), slice(None), 1)),
        ("set_use_hook_mlp_in", "blocks.1.hook_mlp_in", (slice(None), 4)),
    ],
)
def test_patching_an_optional_hook_equals_the_bridges(ref, setter, hook, where):
    """Noise added to part of an optional hook's activation moves the logits, and the patched run
    equals the bridge's patched run: the copies feed what TransformerLens feeds them."""
    generator = torch.Generator().manual_seed(ref.spec.seed)

    def patch(activation, hook):
        patched = activation.clone()
        noise = torch.randn(patched[where].shape, generator=generator)
        patched[where] += noise * activation.std()
        return patched

    with optional_hooks(ref, setter), torch.no_grad():
        state = generator.get_state()
        logits = ref.model.run_with_hooks(ref.tokens, fwd_hooks=[(hook, patch)])
        generator.set_state(state)
        expected = ref.bridge.run_with_hooks(ref.tokens, fwd_hooks=[(hook, patch)])
    assert rel_error(logits, expected) <= 1e-5
    assert rel_error(logits, ref.logits) > 1e-3  # the patch reached the logits (measured: 0.014 to 0.47)


# --- The bridge's native hook names ("blocks.0.hook_out", "unembed.hook_out", ...) -------------------


def test_every_bridge_hook_name_is_ours_or_refused_with_a_hint(ref):
    """The bridge names its hook points twice over (TransformerLens's names and its own). Every name
    it has is a hook point here, one of TransformerLens's optional ones, or a native name that the
    hint explains, so a user porting bridge code gets that hint, not just the nearest spellings."""
    n_layers = ref.spec.n_layer
    names = set(ref.bridge.hook_dict) | set(ref.cache.keys())
    theirs_only = sorted(name for name in names - set(ref.model.hook_dict) if not _optional_hook_setter(name, n_layers))
    unexplained = [name for name in theirs_only if bridge_name_hint(name, n_layers) is None]
    assert not unexplained, f"bridge hook names with no hint: {unexplained}"
    assert len(theirs_only) == 29 * n_layers + 9  # the check above ran over every native name
    for ours in ref.model.hook_dict:  # and no real name of ours is taken for a native one
        assert bridge_name_hint(ours, n_layers) is None, ours


def _described_value(ref, cache, name: str) -> torch.Tensor:
    """What the hint for a bridge-only name says it holds, computed from our run."""
    hint = bridge_name_hint(name, ref.spec.n_layer)
    if "the token ids" in hint:
        return ref.tokens
    if "the position ids" in hint:
        return torch.arange(ref.spec.pos)[None]
    if same_values := re.search(r"holds (\S+)'s values", hint):
        return cache[same_values[1]]
    if "the logits" in hint:
        return ref.logits
    ln_name = re.search(r"hook (\S+)\.hook_normalized", hint)[1]
    ln = ref.model.get_submodule(ln_name)
    return cache[f"{ln_name}.hook_normalized"] * ln.w.detach() + ln.b.detach()


def test_bridge_names_hint_at_the_same_activation(ref):
    """Each native name's hint names our hook of the same activation (a wrong entry, say attn.o.hook_in
    -> hook_v, fails here), or describes what it holds: LayerNorm outputs are w * normalized + b of
    the named LayerNorm, the logits are the logits. Checked on the bridge's own cached values."""
    n_layers = ref.spec.n_layer
    with torch.no_grad():
        _, cache = ref.model.run_with_cache(ref.tokens)
    same, described = 0, 0
    for name in ref.cache.keys():
        hint = bridge_name_hint(name, n_layers)
        if hint is None:
            continue
        target = re.search(r"bridge's name for '([^']+)'", hint)
        expected = cache[target[1]] if target else _described_value(ref, cache, name)
        assert rel_error(expected.to(ref.cache[name].dtype), ref.cache[name]) <= 1e-5, (name, hint)
        same, described = same + bool(target), described + (not target)
    assert (same, described) == (14 * n_layers + 3, 9 * n_layers + 6)  # every native name a full run caches


@pytest.mark.parametrize("setter", ["set_use_split_qkv_input", "set_use_attn_in"])
def test_bridge_names_of_optional_hooks_hint_at_ours_and_their_setter(ref, setter):
    """blocks.{i}.attn.hook_q_input and the like: the bridge's second spelling of an optional hook.
    The hint names ours and its setter; with it on, both hold the same activation."""
    names = {
        "set_use_split_qkv_input": ["hook_q_input", "hook_k_input", "hook_v_input"],
        "set_use_attn_in": ["hook_attn_in"],
    }
    natives = [f"blocks.{i}.attn.{hook}" for i in range(ref.spec.n_layer) for hook in names[setter]]
    for native in natives:
        ours = native.replace(".attn.", ".")
        assert f"for {ours!r} (an optional hook: it exists after model.{setter}(True))" in bridge_name_hint(
            native, ref.spec.n_layer
        )
    with optional_hooks(ref, setter), torch.no_grad():
        _, cache = ref.model.run_with_cache(ref.tokens)
        _, expected = ref.bridge.run_with_cache(ref.tokens)
    for native in natives:
        assert rel_error(cache[native.replace(".attn.", ".")], expected[native]) <= 1e-5, native


def test_patching_the_bridges_ln1_input_is_patching_our_attn_in(ref):
    """The hint for blocks.{i}.ln1.hook_in says to patch hook_attn_in: the same noise added to the
    bridge's ln1 input and to every head's copy of ours gives the same logits (and moves them)."""
    layer = ref.spec.n_layer - 1
    noise = torch.randn(ref.tokens.shape + (ref.spec.n_embd,), generator=torch.Generator().manual_seed(5))
    assert f"hook blocks.{layer}.hook_attn_in" in bridge_name_hint(f"blocks.{layer}.ln1.hook_in", ref.spec.n_layer)

    def theirs(x, hook):
        return x + noise

    def ours(x, hook):  # [batch pos n_heads d_model]: one copy per head
        return x + noise[:, :, None]

    with torch.no_grad():  # the bridge's setter stays off: on, its attention reads its own copies instead
        expected = ref.bridge.run_with_hooks(ref.tokens, fwd_hooks=[(f"blocks.{layer}.ln1.hook_in", theirs)])
        ref.model.set_use_attn_in(True)
        try:
            logits = ref.model.run_with_hooks(ref.tokens, fwd_hooks=[(f"blocks.{layer}.hook_attn_in", ours)])
        finally:
            ref.model.set_use_attn_in(False)
    assert rel_error(logits, expected) <= 1e-5
    assert rel_error(logits, ref.logits) > 1e-3
