"""The interpretability toolkit: cache helpers, logit lens, direct logit attribution, activation
patching, induction scores and plots, on small random models and one hand-built induction circuit."""

import copy
import logging
import math
import re
from pathlib import Path

import matplotlib.colors
import numpy as np
import pytest
import torch
from conftest import SPECS
from PIL import Image
from transformer_lens import patching as tl_patching
from transformer_lens.utilities import get_act_name
from transformer_lens.utilities import test_prompt as tl_test_prompt

import gpt2_small
from gpt2_small import Transformer, TransformerConfig, interp, process_weights, to_single_token, to_string, to_tokens
from gpt2_small.interp import (
    ActivationCache,
    activation_patching,
    direct_logit_attribution,
    induction_score,
    logit_lens,
    patched_logits,
    test_prompt,  # imported here, it is also checked not to be collected as a test
)

SMALL = TransformerConfig(d_model=32, n_layers=3, n_heads=4, d_head=8, d_mlp=64, d_vocab=101, n_ctx=24, init_range=0.3)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(SMALL).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm gains off 1, so that every term is exercised
        for name, p in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "b_U", ".b")):
                p.normal_(std=0.1)
            elif name.endswith(".w"):
                p.add_(torch.randn_like(p), alpha=0.2)
    return model


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 101, (3, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def run(model, tokens) -> tuple[torch.Tensor, ActivationCache]:
    with torch.no_grad():
        return model.run_with_cache(tokens)


ENTRY_POINTS = {
    "ActivationCache": lambda m, tokens, cache: ActivationCache(dict(cache), m),
    "logit_lens": lambda m, tokens, cache: logit_lens(m, tokens),
    "direct_logit_attribution": lambda m, tokens, cache: direct_logit_attribution(m, cache, 1, 2),
    "patched_logits": lambda m, tokens, cache: patched_logits(m, tokens, cache, ("z", 0)),
    "activation_patching": lambda m, tokens, cache: activation_patching(m, tokens, tokens, lambda x: x.sum()),
    "induction_score": lambda m, tokens, cache: induction_score(m, seq_len=4, batch=1),
    "residual_directions": lambda m, tokens, cache: interp.residual_directions(m, 5),
    # One-character tokens ("a" is 64, "b" 65), within the small model's 101 ids
    "test_prompt": lambda m, tokens, cache: test_prompt(
        m, "a", "b", prepend_space_to_answer=False, prepend_bos=False, top_k=1
    ),
    "generate_text": lambda m, tokens, cache: gpt2_small.generate_text(m, gpt2_small.get_tokenizer(), "a", 1),
    "stream_text": lambda m, tokens, cache: list(gpt2_small.stream_text(m, gpt2_small.get_tokenizer(), "a", 1)),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_names_a_model_that_is_not_ours(entry, model, tokens, run, without_shape_checks):
    """Before: a hub id's str, or another library's module (Hugging Face's GPT2LMHeadModel, the
    TransformerLens bridge), failed deep inside on an attribute it lacks ("'str' object has no
    attribute 'cfg'"), or, for ActivationCache, was kept to fail at its first use."""
    call = ENTRY_POINTS[entry]
    for other in ("gpt2", torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match=rf"^model must be a gpt2_small.Transformer, got {type(other).__name__}$"):
            call(other, tokens, run[1])
    with torch.no_grad():
        call(model, tokens, run[1])  # and ours runs


# --- the cache -----------------------------------------------------------------------------


def test_run_with_cache_returns_an_activation_cache_with_short_names(run):
    _, cache = run
    assert isinstance(cache, ActivationCache) and isinstance(cache, dict)
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    # TransformerLens's shorthands: layers from the end, and the embeddings by their short names.
    assert cache["resid_post", -1] is cache["blocks.2.hook_resid_post"]
    assert cache["z", -3] is cache["blocks.0.attn.hook_z"] is cache["z", np.int64(0)]
    assert cache["embed"] is cache["hook_embed"] and cache["pos_embed"] is cache["hook_pos_embed"]
    with pytest.raises(KeyError, match=r"layer 3 is outside \[-3, 3\) \(n_layers=3\)"):
        cache["resid_pre", 3]
    with pytest.raises(KeyError, match=r"layer -4 is outside \[-3, 3\)"):
        cache["resid_pre", -4]
    with pytest.raises(KeyError, match=r"the layer of \('resid_pre', 1.0\) must be an int, got float 1.0"):
        cache["resid_pre", 1.0]
    with pytest.raises(KeyError, match=r"the layer of \('resid_pre', True\) must be an int, got bool True"):
        cache["resid_pre", True]  # a bool is an Integral: it would read layer 1
    assert cache["scale", -1, "ln2"] is cache["blocks.2.ln2.hook_scale"] and cache["attn", 0] is cache["pattern", 0]
    assert cache["scale"] is cache["ln_final.hook_scale"]
    assert cache["k2"] is cache["k", 2] and cache["attn0"] is cache["pattern", 0]  # TransformerLens's compact keys
    assert cache["scale1ln2"] is cache["blocks.1.ln2.hook_scale"]
    with pytest.raises(KeyError, match="'blocks.7.attn.hook_k' is not in this cache"):
        cache["k7"]
    with pytest.raises(KeyError, match=r"a tuple key is \(name, layer\) or \(name, layer, layer_type\)"):
        cache["scale", 0, "ln1", "x"]
    with pytest.raises(KeyError, match=r"\('scale', 0\) names no hook: .* layer_type 'ln1' or 'ln2'"):
        cache["scale", 0]
    with pytest.raises(KeyError, match="'pattern' is not in this cache: hook 'pattern' is per layer: pass a layer"):
        cache["pattern"]
    with pytest.raises(
        KeyError, match=r"'blocks.9.hook_resid_pre' is not in this cache \(this model has blocks 0 to 2 "
    ):
        cache["blocks.9.hook_resid_pre"]
    # An optional hook, off in the run (TransformerLens's default): the KeyError says how to get it.
    with pytest.raises(
        KeyError,
        match=r"'blocks.1.attn.hook_result' is not in this cache \(it is one of TransformerLens's optional hooks: "
        r"run with model.set_use_attn_result\(True\) to cache it, or call cache.compute_head_results\(\)\)",
    ):
        cache["result", 1]
    with pytest.raises(KeyError, match=r"optional hooks: run with model.set_use_split_qkv_input\(True\) to cache it\)"):
        cache["blocks.0.hook_q_input"]
    with pytest.raises(KeyError, match=r"model.set_use_hook_mlp_in\(True\) to cache it\)"):
        cache["mlp_in", 2]
    with pytest.raises(KeyError, match=r"'blocks.9.hook_mlp_in' is not in this cache \(this model has blocks 0 to 2 "):
        cache["blocks.9.hook_mlp_in"]  # a block this model lacks: no setter adds it
    with pytest.raises(
        KeyError, match="'blocks.1.hook_out' is the TransformerLens bridge's name for 'blocks.1.hook_resid_post'"
    ):
        cache["blocks.1.hook_out"]
    with pytest.raises(ValueError, match="unknown hook name 'resid'"):
        interp.act_name("resid", 0)


def test_act_name_spells_every_hook_as_transformer_lens_get_act_name(model, run):
    _, cache = run
    # The optional hooks' names are the model's too, once their setters are on.
    optional = {}
    for setters in (("set_use_attn_result", "set_use_split_qkv_input", "set_use_hook_mlp_in"), ("set_use_attn_in",)):
        with_hooks = copy.deepcopy(model)
        for setter in setters:
            getattr(with_hooks, setter)(True)
        optional.update(with_hooks.hook_dict)
    ours = [
        *[(name, layer, None) for name in [*interp._PER_LAYER_HOOKS, *interp._ALIASES] for layer in (0, 2)],
        ("result", 0, "attn"), ("result2", None, None), ("mlp_in", 1, "b"), ("q_input", 1, "block"),
        *[(name, 1, layer_type) for name in ("scale", "normalized") for layer_type in ("ln1", "ln2")],
        ("scale", None, None), ("normalized", None, None), ("embed", None, None), ("pos_embed", None, None),
        ("k", 2, "a"), ("pattern", 0, "attention"), ("pre", 1, "m"), ("resid_mid", 1, "b"), ("attn_out", 0, "block"),
        ("blocks.1.hook_resid_pre", None, None), ("hook_embed", None, None), ("ln_final.hook_normalized", None, None),
        # get_act_name's compact spelling, name + layer [+ layer_type], for every name without a "_"
        *[(f"{name}{layer}", None, None) for name in [*interp._PER_LAYER_HOOKS, *interp._ALIASES] if "_" not in name
          for layer in (0, 2)],
        ("scale1ln2", None, None), ("normalized0ln1", None, None), ("k2a", None, None), ("post1mlp", None, None),
    ]  # fmt: skip
    for args in ours:
        name = interp.act_name(*args)
        assert name == get_act_name(*args), args
        # A hook this model has (with its optional hooks on), not merely TransformerLens's spelling of one.
        assert name in cache or name in optional, args
    # layer_type "ln_final" names ln_final's hooks (get_act_name spells them "ln_final.ln_final.hook_scale").
    for name in ("scale", "normalized"):
        assert interp.act_name(name, None, "ln_final") == f"ln_final.hook_{name}" and f"ln_final.hook_{name}" in cache
    for args, message in [
        (("blocks.0.attn.hook_pattern", 3, None), r"'blocks.0.attn.hook_pattern' is a full hook name already; pass no"),
        (("hook_embed", None, "a"), r"'hook_embed' is a full hook name already; .*layer_type='a'"),
        (("scale", 1, None), "layer_type 'ln1' or 'ln2'"),
        (("normalized", 1, "ln3"), "layer_type 'ln1' or 'ln2'"),
        (("scale", 1, "ln_final"), "layer_type 'ln1' or 'ln2'"),  # ln_final is no block's: pass no layer
        (("k", 2, "mlp"), r"hook 'k' takes layer_type None or one of \('a', 'attn', 'attention'\), got 'mlp'"),
        (("resid_pre", 2, "ln1"), "hook 'resid_pre' takes layer_type None or one of"),
        (("embed", 0, None), "hook 'embed' is the model's, not a layer's"),
        (("result", 0, "mlp"), r"hook 'result' takes layer_type None or one of \('a', 'attn', 'attention'\)"),
        (("scale1", None, None), "layer_type 'ln1' or 'ln2'"),  # get_act_name: a blocks.1.hook_scale nothing has
        (("z0b", None, None), r"hook 'z' takes layer_type None or one of \('a', 'attn', 'attention'\), got 'b'"),
        (("resid_pre3", None, None), r"unknown hook name 'resid_pre3'; give the layer apart: \('resid_pre', 3\)"),
        (("foo3", None, None), r"unknown hook name 'foo3'; use a full name or one of \["),
    ]:
        with pytest.raises(ValueError, match=message):
            interp.act_name(*args)


def test_stack_activation_stacks_one_hook_over_the_layers_before(run):
    _, cache = run
    patterns = cache.stack_activation("pattern")
    assert patterns.shape == (3, 3, 4, 10, 10)
    for layer in range(3):
        assert torch.equal(patterns[layer], cache["pattern", layer])
    scales = cache.stack_activation("scale", layer=2, sublayer_type="ln2")
    assert scales.shape == (2, 3, 10, 1) and torch.equal(scales[1], cache["blocks.1.ln2.hook_scale"])
    assert torch.equal(cache.stack_activation("resid_post", None), cache.stack_activation("resid_post", 3))
    with pytest.raises(ValueError, match="layer 0 has no layers before it to stack"):
        cache.stack_activation("z", 0)
    with pytest.raises(ValueError, match=r"layer 4 is outside \[0, n_layers=3\]"):
        cache.stack_activation("z", 4)
    with pytest.raises(KeyError, match=r"\('scale', 0\) names no hook: .* layer_type 'ln1' or 'ln2'"):
        cache.stack_activation("scale")


def test_to_moves_every_activation_in_place(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith(("hook_z", "hook_scale")))
    assert cache.to("meta") is cache  # the meta device: a real move, without a second real device
    assert len(cache) == 3 + 2 * 3 + 1 and all(value.device.type == "meta" for value in cache.values())
    assert cache["z", 1].shape == (3, 10, 4, 8)
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):
        cache.to("gpu")


def test_remove_batch_dim_equals_caching_without_it(model, tokens, run, caplog):
    with torch.no_grad():
        _, expected = model.run_with_cache(tokens[:1], remove_batch_dim=True)
        _, cache = model.run_with_cache(tokens[:1])
    assert cache.remove_batch_dim() is cache and not cache.has_batch_dim
    assert cache.keys() == expected.keys() and all(torch.equal(cache[k], expected[k]) for k in expected)
    torch.testing.assert_close(cache.decompose_resid(apply_ln=True), expected.decompose_resid(apply_ln=True))
    with caplog.at_level("WARNING"):
        cache.remove_batch_dim()
    assert "no batch axis already" in caplog.text and cache["z", 0].shape == (10, 4, 8)
    _, three = run
    with pytest.raises(ValueError, match=r"needs a cache of one sequence \(batch size 1\), got batch sizes \[3\]"):
        ActivationCache(dict(three), model).remove_batch_dim()


def test_accumulated_resid_at_the_end_through_ln_final_and_unembed_is_the_logits(model, run):
    logits, cache = run
    resid, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "final_post"] and resid.shape == (4, 3, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.unembed(model.ln_final(resid[-1])), logits)
        # apply_ln at the end is ln_final, w and b included, on each entry with its own statistics
        # (TransformerLens 4): the logit lens.
        normalized = cache.accumulated_resid(apply_ln=True)
        torch.testing.assert_close(model.unembed(normalized[-1]), logits)
        torch.testing.assert_close(normalized[1], model.ln_final(resid[1]))
        # The cached final scale instead (apply_ln_to_stack), then w and b, gives the same logits
        # for the last entry only, whose statistics those are.
        cached = cache.apply_ln_to_stack(resid) * model.ln_final.w + model.ln_final.b
        torch.testing.assert_close(model.unembed(cached[-1]), logits)
        assert not torch.allclose(cached[1], normalized[1], atol=1e-3)
    mid = cache.accumulated_resid(layer=2, incl_mid=True)
    assert mid.shape[0] == 5 and torch.equal(mid[1], cache["resid_mid", 0])
    torch.testing.assert_close(
        cache.accumulated_resid(layer=1, apply_ln=True)[-1], cache["blocks.1.ln1.hook_normalized"]
    )
    # mlp_input ends at layer's resid_mid, normalised by its ln2's cached scale.
    to_mlp, labels = cache.accumulated_resid(layer=1, mlp_input=True, apply_ln=True, return_labels=True)
    assert labels == ["0_pre", "1_pre", "1_mid"]
    torch.testing.assert_close(to_mlp[-1], cache["blocks.1.ln2.hook_normalized"])


def test_decomposed_resid_sums_to_the_residual_stream(run):
    _, cache = run
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[:4] == ["embed", "pos_embed", "0_attn_out", "0_mlp_out"] and len(labels) == 2 + 2 * 3
    torch.testing.assert_close(parts.sum(dim=0), cache["resid_post", 2])
    torch.testing.assert_close(cache.decompose_resid(layer=1).sum(dim=0), cache["resid_pre", 1])
    torch.testing.assert_close(cache.decompose_resid(layer=1, mlp_input=True).sum(dim=0), cache["resid_mid", 1])
    # apply_ln_to_stack uses the real pass's scale, so the normalized parts still add up.
    torch.testing.assert_close(
        cache.decompose_resid(apply_ln=True).sum(dim=0), cache["ln_final.hook_normalized"], rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(parts[2], torch.zeros_like(parts[2]))  # the parts are not trivially zero
    with pytest.raises(ValueError, match="nothing to decompose: layer=0, mode='attn', incl_embeds=False"):
        cache.decompose_resid(layer=0, mode="attn", incl_embeds=False)


@pytest.mark.parametrize("setter", ["set_use_split_qkv_input", "set_use_attn_in"])
def test_apply_ln_reads_ln1s_per_head_scale_while_the_heads_agree(model, tokens, run, setter):
    """With per-head attention inputs, ln1's cached scale has an n_heads axis. Unpatched, the heads'
    scales are the stream's, and normalising by them gives what it gives without; with one head's
    copy patched they differ, and no one scale is the stream's: refused, not a head picked."""
    _, plain = run
    per_head = copy.deepcopy(model)
    getattr(per_head, setter)(True)
    with torch.no_grad():
        _, cache = per_head.run_with_cache(tokens)
    assert cache["scale", 1, "ln1"].shape == (*tokens.shape, SMALL.n_heads, 1)
    for kwargs in ({"layer": 1, "apply_ln": True}, {"layer": 1, "apply_ln": True, "pos_slice": -1}):
        torch.testing.assert_close(cache.decompose_resid(**kwargs), plain.decompose_resid(**kwargs))
    # The same without the batch axis (remove_batch_dim): the head axis is then the scale's second.
    with torch.no_grad():
        _, one = per_head.run_with_cache(tokens[:1], remove_batch_dim=True)
        _, plain_one = model.run_with_cache(tokens[:1], remove_batch_dim=True)
    assert one["scale", 1, "ln1"].shape == (tokens.shape[1], SMALL.n_heads, 1)
    torch.testing.assert_close(
        one.decompose_resid(layer=1, apply_ln=True), plain_one.decompose_resid(layer=1, apply_ln=True)
    )
    name = "blocks.1.hook_v_input" if setter == "set_use_split_qkv_input" else "blocks.1.hook_attn_in"

    def patch(x, hook):
        x = x.clone()
        x[:, :, 2] *= 3.0
        return x

    with torch.no_grad(), per_head.hooks(fwd_hooks=[(name, patch)]):
        _, patched = per_head.run_with_cache(tokens)
    with pytest.raises(ValueError, match=r"layer 1's ln1 scale differs between heads in this cache"):
        patched.decompose_resid(layer=1, apply_ln=True)


def test_decompose_resid_refuses_a_mode_it_does_not_know(run, without_shape_checks):
    _, cache = run
    with pytest.raises(ValueError, match="mode must be 'all', 'attn' or 'mlp', got 'heads'"):
        cache.decompose_resid(mode="heads")
    # apply_ln passed positionally, where TransformerLens (and now this) has mode
    with pytest.raises(ValueError, match="mode must be 'all', 'attn' or 'mlp', got True"):
        cache.decompose_resid(None, False, True)


def test_stacked_head_results_plus_b_O_are_attn_out(model, run):
    _, cache = run
    heads, labels = cache.stack_head_results(return_labels=True)
    assert heads.shape == (12, 3, 10, 32) and labels[5] == "L1H1"
    for layer in range(3):
        layer_heads = heads[4 * layer : 4 * layer + 4]
        torch.testing.assert_close(layer_heads.sum(dim=0) + model.blocks[layer].attn.b_O, cache["attn_out", layer])
    with pytest.raises(ValueError, match="layer 0 has no heads before it"):
        cache.stack_head_results(layer=0)
    with pytest.raises(ValueError, match=r"layer 7 is outside \[0, n_layers=3\]"):
        cache.accumulated_resid(layer=7)


def test_stacked_neuron_results_plus_b_out_are_mlp_out(model, run):
    _, cache = run
    neurons, labels = cache.stack_neuron_results(layer=2, return_labels=True)
    assert neurons.shape == (2 * 64, 3, 10, 32) and labels[64 + 5] == "L1N5"
    for layer in range(2):
        layer_sum = neurons[64 * layer : 64 * layer + 64].sum(dim=0)
        torch.testing.assert_close(layer_sum + model.blocks[layer].mlp.b_out, cache["mlp_out", layer])
    one = cache.get_neuron_results(1, neuron_slice=5, pos_slice=-1)  # [batch d_model]
    torch.testing.assert_close(one, neurons[64 + 5, :, -1])
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        cache.get_neuron_results(1, project_output_onto=direction), neurons[64:].movedim(0, -2) @ direction
    )
    with pytest.raises(ValueError, match="layer 0 has no neurons before it"):
        cache.stack_neuron_results(layer=0)


@pytest.mark.parametrize("layer, mlp_input, stream", [(None, False, "final"), (0, False, "resid_pre"),
                                                      (1, True, "resid_mid"), (2, False, "resid_pre")])  # fmt: skip
def test_the_full_resid_decomposition_sums_to_the_stream_and_its_normalized_form(run, layer, mlp_input, stream):
    _, cache = run
    if stream == "final":
        target, normalized = cache["resid_post", 2], cache["ln_final.hook_normalized"]
    else:
        target, normalized = cache[stream, layer], cache["normalized", layer, "ln2" if mlp_input else "ln1"]
    for expand_neurons in (True, False):
        parts, labels = cache.get_full_resid_decomposition(layer, mlp_input, expand_neurons, return_labels=True)
        assert len(labels) == parts.shape[0] and labels[-3:] == ["embed", "pos_embed", "bias"]
        torch.testing.assert_close(parts.sum(dim=0), target, rtol=1e-5, atol=1e-5)
        # the cached-scale LayerNorm is linear, so the normalized components add up to what the block read
        scaled = cache.get_full_resid_decomposition(layer, mlp_input, expand_neurons, apply_ln=True)
        torch.testing.assert_close(scaled.sum(dim=0), normalized, rtol=1e-5, atol=1e-5)
        if layer != 0:  # before layer 0 there is no bias yet
            assert parts[-1].abs().min() > 0


def test_neuron_and_full_decompositions_refuse_what_has_no_meaning(run, without_shape_checks):
    _, cache = run
    for helper in ("stack_neuron_results", "get_full_resid_decomposition"):
        with pytest.raises(ValueError, match="mlp_input needs a layer below n_layers=3"):
            getattr(cache, helper)(-1, mlp_input=True)
        with pytest.raises(ValueError, match=r"project_output_onto must be a \[d_model=32\] or .* got \(31,\)"):
            getattr(cache, helper)(2, project_output_onto=torch.ones(31))


@pytest.mark.parametrize("layer", [None, -1, 3])
@pytest.mark.parametrize("helper", ["accumulated_resid", "decompose_resid", "apply_ln_to_stack"])
def test_mlp_input_after_the_last_block_is_refused_not_ignored(run, helper, layer):
    """There is no MLP after the last block, so no stream it reads. TransformerLens ignores mlp_input
    there (accumulated_resid, apply_ln_to_stack) or fails on a missing hook (decompose_resid)."""
    _, cache = run
    args = (cache.accumulated_resid(),) if helper == "apply_ln_to_stack" else ()
    with pytest.raises(ValueError, match="mlp_input needs a layer below n_layers=3: there is no MLP after the last"):
        getattr(cache, helper)(*args, layer=layer, mlp_input=True)
    # one block earlier, mlp_input is the input of block 2's MLP: resid_mid, read by ln2
    args = (cache.accumulated_resid(layer=2, mlp_input=True),) if helper == "apply_ln_to_stack" else ()
    stack = getattr(cache, helper)(*args, layer=2, mlp_input=True)
    if helper == "apply_ln_to_stack":
        torch.testing.assert_close(stack[-1], cache["normalized", 2, "ln2"])
    else:
        torch.testing.assert_close(stack[-1] if helper == "accumulated_resid" else stack.sum(0), cache["resid_mid", 2])


def test_a_cache_without_its_batch_axis_gives_the_same_helpers_without_it(model, tokens):
    with torch.no_grad():
        _, batched = model.run_with_cache(tokens[:1])
        _, single = model.run_with_cache(tokens[:1], remove_batch_dim=True)
    assert batched.has_batch_dim and not single.has_batch_dim
    assert single["pattern", 1].shape == batched["pattern", 1].shape[1:] == (4, 10, 10)
    for helper in ("accumulated_resid", "decompose_resid", "stack_head_results"):
        ours, labels = getattr(single, helper)(apply_ln=True, return_labels=True)
        expected, expected_labels = getattr(batched, helper)(apply_ln=True, return_labels=True)
        assert labels == expected_labels
        torch.testing.assert_close(ours, expected[:, 0], rtol=0, atol=0, msg=helper)
    with pytest.raises(ValueError, match="without remove_batch_dim=True"):
        direct_logit_attribution(model, single, correct=1, incorrect=2)
    # before: HookedRootModule's AssertionError, after the forward pass
    with pytest.raises(ValueError, match="remove_batch_dim=True needs one sequence .*got batch size 3"):
        model.run_with_cache(tokens, remove_batch_dim=True)


def test_run_with_cache_gives_a_plain_dict_with_return_cache_object_false(model, tokens, run):
    logits, cache = run
    with torch.no_grad():
        plain_logits, plain = model.run_with_cache(tokens, return_cache_object=False)
        _, plain_single = model.run_with_cache(tokens[:1], return_cache_object=False, remove_batch_dim=True)
        _, single = model.run_with_cache(tokens[:1], remove_batch_dim=True)
    assert type(plain) is dict and type(cache) is ActivationCache
    assert plain.keys() == cache.keys()
    torch.testing.assert_close(plain_logits, logits, rtol=0, atol=0)
    for name in cache:
        torch.testing.assert_close(plain[name], cache[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(plain_single[name], single[name], rtol=0, atol=0, msg=name)
    assert plain_single["blocks.0.attn.hook_pattern"].shape == (4, 10, 10)


def test_run_with_cache_incl_bwd_points_to_the_way_that_works(model, tokens):
    """Before: torch's "grad can be implicitly created only for scalar outputs" after the forward pass."""
    with pytest.raises(
        ValueError, match=r"incl_bwd=True calls backward\(\) .* model.add_caching_hooks\(incl_bwd=True\)"
    ):
        model.run_with_cache(tokens, incl_bwd=True)
    assert not any(hook.bwd_hooks or hook.fwd_hooks for hook in model.hook_dict.values())  # nothing left attached
    # The way the message gives: gradients of one's own loss, cached under TransformerLens's "_grad" names.
    cache = model.add_caching_hooks(names_filter=lambda name: name.endswith("hook_resid_pre"), incl_bwd=True)
    try:
        model(tokens).logsumexp(-1).sum().backward()
    finally:
        model.reset_hooks()
        model.zero_grad(set_to_none=True)
    grad = cache["blocks.1.hook_resid_pre_grad"]
    assert grad.shape == cache["blocks.1.hook_resid_pre"].shape and grad.abs().sum() > 0


def test_QK_is_the_bilinear_form_of_the_attention_scores_without_the_biases(model, run):
    _, cache = run
    for layer in range(3):
        attn = model.blocks[layer].attn
        x = cache[f"blocks.{layer}.ln1.hook_normalized"] * model.blocks[layer].ln1.w + model.blocks[layer].ln1.b
        q, k = cache["q", layer] - attn.b_Q, cache["k", layer] - attn.b_K  # [batch pos n_heads d_head]
        expected = torch.einsum("bqhd,bkhd->bhqk", q, k)
        QK = model.QK[layer].AB  # [n_heads d_model d_model]
        torch.testing.assert_close(torch.einsum("bqm,hmn,bkn->bhqk", x, QK, x), expected, rtol=1e-5, atol=1e-5)


def test_OV_is_what_each_head_writes_for_what_it_attends_to(model, run):
    _, cache = run
    for layer in range(3):
        attn = model.blocks[layer].attn
        x = cache[f"blocks.{layer}.ln1.hook_normalized"] * model.blocks[layer].ln1.w + model.blocks[layer].ln1.b
        written = torch.einsum("bhqk,bkm,hmn->bqn", cache["pattern", layer], x, model.OV[layer].AB)
        # Each pattern row sums to 1, so the value bias reaches the output as b_V W_O, once per head.
        bias = torch.einsum("hd,hdm->m", attn.b_V, attn.W_O) + attn.b_O
        torch.testing.assert_close(written + bias, cache["attn_out", layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_are_norm_ratios_of_the_materialised_products(model, mode):
    """Against the definition, in float64 with every [d_model d_model] product formed."""
    OV, QK = model.OV.AB.double(), model.QK.AB.double()  # [n_layers n_heads d_model d_model]
    later = {"Q": QK, "K": QK.mT, "V": OV}[mode]
    expected = torch.zeros(3, 4, 3, 4, dtype=torch.float64)
    for l1, h1, l2, h2 in np.ndindex(3, 4, 3, 4):
        if l1 < l2:
            product = torch.linalg.matrix_norm(OV[l1, h1] @ later[l2, h2])
            expected[l1, h1, l2, h2] = (
                product / torch.linalg.matrix_norm(OV[l1, h1]) / torch.linalg.matrix_norm(later[l2, h2])
            )
    scores = model.all_composition_scores(mode)
    assert scores.dtype == torch.float32 and not scores.requires_grad
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-7)
    assert expected[0, :, 1:].min() > 0.05  # random heads: about 1/sqrt(d_model) = 0.18, far from 0


def test_composition_scores_of_a_bf16_model_are_float32_and_refuse_an_unknown_mode(model, without_shape_checks):
    half = Transformer(SMALL)
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    rounded = Transformer(SMALL)
    rounded.load_state_dict(half.state_dict())  # the bf16 weights, held in float32
    scores = half.all_composition_scores("V")
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, rounded.all_composition_scores("V"), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="mode must be 'Q', 'K' or 'V', got 'q'"):
        model.all_composition_scores("q")


@pytest.mark.parametrize("ref", [SPECS[1]], ids=[SPECS[1].name], indirect=True)  # the bridge takes 30 s on GPT-2's
def test_composition_scores_and_head_labels_equal_transformer_lens(ref):
    assert ref.model.all_head_labels == ref.bridge.all_head_labels
    for mode in ("Q", "K", "V"):
        expected = ref.bridge.all_composition_scores(mode).scores
        torch.testing.assert_close(ref.model.all_composition_scores(mode), expected, rtol=1e-5, atol=1e-6, msg=mode)


def test_accumulated_bias_and_residual_directions_equal_transformer_lens(ref):
    model, bridge = ref.model, ref.bridge
    n_layers = ref.spec.n_layer
    for layer in range(n_layers + 1):
        for mlp_input in (False, True) if layer < n_layers else (False,):
            for include_mlp_biases in (False, True):
                args = (layer, mlp_input, include_mlp_biases)
                ours = model.accumulated_bias(*args)
                torch.testing.assert_close(ours, bridge.accumulated_bias(*args), rtol=1e-6, atol=1e-6, msg=str(args))
    # Two-sided: the biases are not zero, so each argument changes the sum.
    assert not torch.allclose(model.accumulated_bias(1), model.accumulated_bias(1, mlp_input=True))
    assert not torch.allclose(model.accumulated_bias(1), model.accumulated_bias(1, include_mlp_biases=False))
    ids = torch.tensor([[464, 3290], [50256, 11]])
    for tokens in (" Mary", 464, torch.tensor(464), torch.tensor([5]), ids[0], ids):
        expected = bridge.tokens_to_residual_directions(tokens)
        torch.testing.assert_close(model.tokens_to_residual_directions(tokens), expected, rtol=0, atol=0)
    assert model.tokens_to_residual_directions(ids).shape == (2, 2, ref.spec.n_embd)


def test_accumulated_bias_and_residual_directions_refuse_what_has_no_meaning(model, without_shape_checks):
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, n_layers=3\], got 4"):
        model.accumulated_bias(4)
    with pytest.raises(ValueError, match="mlp_input=True needs the block's own b_O, and there is no block 3"):
        model.accumulated_bias(3, mlp_input=True)
    with pytest.raises(ValueError, match=r"tokens: ' Mary and' is 2 tokens"):
        model.tokens_to_residual_directions(" Mary and")
    with pytest.raises(ValueError, match=r"^tokens: token id 101 is outside \[0, d_vocab=101\)$"):
        model.tokens_to_residual_directions(101)
    with pytest.raises(
        TypeError, match=r"^tokens must be a token id, a str of one token or a tensor of ids, got True$"
    ):
        model.tokens_to_residual_directions(True)
    with pytest.raises(TypeError, match=r"^tokens must be integer token ids, got dtype torch.float32$"):
        model.tokens_to_residual_directions(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"^tokens must have at most 2 axes \(\[batch pos\]\), got shape \(1, 1, 2\)$"):
        model.tokens_to_residual_directions(torch.zeros(1, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^tokens is empty$"):
        model.tokens_to_residual_directions(torch.tensor([], dtype=torch.long))


def test_cache_names_and_shapes_match_the_transformer_lens_bridge(ref):
    with torch.no_grad():
        _, ours = ref.model.run_with_cache(ref.tokens)
    assert isinstance(ours, ActivationCache)
    assert set(ours) <= set(ref.cache.keys())
    for name, value in ours.items():
        assert value.shape == ref.cache[name].shape, name
    # The residual-stream helpers, fed the bridge's own activations, agree with ours.
    bridge_resid = torch.stack([ref.cache[f"blocks.{i}.hook_resid_pre"] for i in range(ref.spec.n_layer)])
    torch.testing.assert_close(ours.accumulated_resid()[:-1], bridge_resid, rtol=1e-4, atol=1e-4)


def bridge_activations(ref, tokens: torch.Tensor, remove_batch_dim: bool = False) -> tuple[ActivationCache, object]:
    """Our ActivationCache holding the bridge's own activations (of every hook ours has), and the
    bridge's cache: helpers compared on them differ only in what the helpers do."""
    with torch.no_grad():
        _, ours = ref.model.run_with_cache(tokens, remove_batch_dim=remove_batch_dim)
        _, theirs = ref.bridge.run_with_cache(tokens, remove_batch_dim=remove_batch_dim)
    same_inputs = ActivationCache({name: theirs[name] for name in ours}, ref.model, has_batch_dim=not remove_batch_dim)
    return same_inputs, theirs


@pytest.mark.parametrize(
    ("helper", "kwargs"),
    [
        ("accumulated_resid", {}),
        ("accumulated_resid", {"apply_ln": True}),  # the logit lens: ln_final on each entry
        ("accumulated_resid", {"incl_mid": True, "apply_ln": True, "pos_slice": [0, 3]}),
        ("accumulated_resid", {"layer": 1, "incl_mid": True, "apply_ln": True, "pos_slice": -1}),
        ("accumulated_resid", {"layer": 2, "mlp_input": True, "apply_ln": True, "pos_slice": (1, 5)}),
        ("decompose_resid", {"apply_ln": True}),
        ("decompose_resid", {"layer": 1, "mlp_input": True, "apply_ln": True, "pos_slice": -1}),
        ("decompose_resid", {"mode": "attn", "incl_embeds": False, "pos_slice": slice(2, None)}),
        ("decompose_resid", {"mode": "mlp", "apply_ln": True}),
        ("stack_head_results", {"apply_ln": True}),
        ("stack_head_results", {"layer": 2, "incl_remainder": True, "pos_slice": -1, "apply_ln": True}),
        ("stack_neuron_results", {"layer": -1, "pos_slice": (2, 4)}),  # 36,864 neurons: 2 positions
        ("stack_neuron_results", {"layer": 2, "incl_remainder": True, "apply_ln": True, "neuron_slice": (3, 40)}),
        (
            "stack_neuron_results",
            {
                "layer": 1,
                "mlp_input": True,
                "incl_remainder": True,
                "apply_ln": True,
                "pos_slice": -1,
                "neuron_slice": 7,
            },
        ),  # fmt: skip
        ("stack_neuron_results", {"layer": 2, "incl_remainder": True, "project_output_onto": "one"}),
        ("stack_neuron_results", {"layer": 2, "incl_remainder": True, "apply_ln": True, "project_output_onto": "two"}),
        (
            "stack_neuron_results",
            {
                "layer": 1,
                "mlp_input": True,
                "incl_remainder": True,
                "apply_ln": True,
                "project_output_onto": "one",
                "pos_slice": [0, 5],
            },
        ),  # fmt: skip
        ("get_full_resid_decomposition", {"pos_slice": [1, 6]}),
        ("get_full_resid_decomposition", {"apply_ln": True, "pos_slice": -1}),
        ("get_full_resid_decomposition", {"layer": 0}),
        ("get_full_resid_decomposition", {"layer": 0, "mlp_input": True, "apply_ln": True}),
        ("get_full_resid_decomposition", {"layer": 2, "mlp_input": True, "expand_neurons": False, "apply_ln": True}),
        ("get_full_resid_decomposition", {"expand_neurons": False, "apply_ln": True, "project_output_onto": "two"}),
        ("get_full_resid_decomposition", {"layer": 1, "apply_ln": True, "project_output_onto": "one"}),
        ("get_full_resid_decomposition", {"layer": 1, "mlp_input": True, "project_output_onto": "two"}),
        (
            "get_full_resid_decomposition",
            {"layer": 1, "mlp_input": True, "apply_ln": True, "project_output_onto": "two"},
        ),  # fmt: skip
    ],
)
def test_residual_helpers_equal_transformer_lens_on_the_bridges_activations(ref, helper, kwargs):
    """Our helpers on the bridge's own activations against TransformerLens 4's on its cache: the
    same components, labels and normalisation, for every argument TransformerLens's take."""
    same_inputs, theirs = bridge_activations(ref, ref.tokens[:, :8])
    if "project_output_onto" in kwargs:  # one direction, or two, in the residual stream
        directions = torch.randn(ref.spec.n_embd, 2, generator=torch.Generator().manual_seed(0))
        kwargs = {
            **kwargs,
            "project_output_onto": directions[:, 0] if kwargs["project_output_onto"] == "one" else directions,
        }
    with torch.no_grad():
        expected, expected_labels = getattr(theirs, helper)(return_labels=True, **kwargs)
        actual, labels = getattr(same_inputs, helper)(return_labels=True, **kwargs)
    assert labels == expected_labels
    if not kwargs.get("incl_remainder"):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        return
    assert labels[-1] == "remainder"
    torch.testing.assert_close(actual[:-1], expected[:-1], rtol=1e-5, atol=1e-5)
    # The remainder is the stream less the sum of every component (6,144 neurons at layer 2 of
    # GPT-2 small's shape): float32 cancellation leaves ours and TransformerLens's each ~5e-5 from
    # the float64 value (measured), in directions that vary with the CPU's BLAS kernels.
    torch.testing.assert_close(actual[-1], expected[-1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "helper, kwargs",
    [
        ("get_full_resid_decomposition", {"apply_ln": True}),
        ("get_full_resid_decomposition", {"apply_ln": True, "expand_neurons": False}),
        ("stack_neuron_results", {"layer": 2, "apply_ln": True, "incl_remainder": True}),
        ("stack_neuron_results", {"layer": 2, "incl_remainder": True}),
    ],
)
def test_projections_of_a_bf16_model_onto_its_own_directions(model, tokens, helper, kwargs):
    """project_output_onto=model.W_U[:, ids] of a bf16 model: the LayerNorm-scaled stack is float32
    (the cached scale is), the directions bf16. Before: "expected m1 and m2 to have the same
    dtype". The projection equals the unprojected stack times the directions, up to bf16 rounding."""
    half = Transformer(SMALL)
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    directions = half.W_U[:, [3, 9]].detach()
    with torch.no_grad():
        cache = half.run_with_cache(tokens)[1]
        projected = getattr(cache, helper)(project_output_onto=directions, **kwargs)
        expected = getattr(cache, helper)(**kwargs).float() @ directions.float()
    assert projected.shape == expected.shape
    scale = float(expected.abs().max())
    assert (projected.float() - expected).abs().max() <= scale * 2**-6  # measured at most 0.007 of it


def test_apply_ln_to_stack_refuses_a_stack_cut_otherwise_than_it_is_told(run):
    """Before: one sequence's stack against a batch of 3's scales came back with a batch of 3
    (broadcast), and a stack cut to the last position raised torch's "The size of tensor a (3)
    must match the size of tensor b (10)"."""
    _, cache = run
    stack = cache.accumulated_resid(layer=2)  # [component batch=3 pos=10 d_model]
    with pytest.raises(ValueError) as one_sequence:
        cache.apply_ln_to_stack(stack[:, :1], layer=2)
    assert str(one_sequence.value) == (
        "residual_stack's (1, 10) (its axes between component and d_model) are not the cached scale's (3, 10) at "
        "pos_slice=None, batch_slice=None: pass the pos_slice and batch_slice the stack was cut with"
    )
    with pytest.raises(ValueError, match=r"^residual_stack's \(3,\) .* scale's \(3, 10\) at pos_slice=None, batch"):
        cache.apply_ln_to_stack(stack[:, :, -1], layer=2)
    with pytest.raises(ValueError, match=r"^residual_stack's \(3,\) .* scale's \(3, 10\) at pos_slice=None, batch"):
        cache.logit_attrs(cache.accumulated_resid(pos_slice=-1), tokens=1)  # its pos_slice left out
    # told, both are taken
    scaled = cache.apply_ln_to_stack(stack[:, :1], layer=2, batch_slice=[0])
    torch.testing.assert_close(scaled, cache.apply_ln_to_stack(stack, layer=2)[:, :1], rtol=0, atol=0)
    assert cache.logit_attrs(cache.accumulated_resid(pos_slice=-1), tokens=1, pos_slice=-1).shape == (4, 3)


def test_a_cache_made_under_autocast_decomposes_into_heads(model, tokens):
    """Under torch.autocast (bf16), z is cached in bf16 and W_O is the float32 model's. Before:
    "expected scalar type Float but found BFloat16" from the head results, and so from the full
    decomposition and direct_logit_attribution. The heads still sum to attn_out less b_O, up to
    the bf16 rounding of the run."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, cache = model.run_with_cache(tokens)
    assert cache["z", 0].dtype == torch.bfloat16 and model.blocks[0].attn.W_O.dtype == torch.float32
    with torch.no_grad():
        heads = cache.stack_head_results(layer=1)  # layer 0's 4 heads
        cache.compute_head_results()
        full = cache.get_full_resid_decomposition(apply_ln=True, expand_neurons=False)
        dla = direct_logit_attribution(model, cache, 5, 7)
    attn_out = cache["attn_out", 0].float() - model.blocks[0].attn.b_O.detach()
    torch.testing.assert_close(heads.sum(dim=0), attn_out, rtol=0, atol=float(attn_out.abs().max()) * 2**-6)
    torch.testing.assert_close(cache["result", 0].movedim(-2, 0), heads, rtol=0, atol=0)
    assert full.dtype == dla.contributions.dtype == torch.float32 and full.isfinite().all()


def test_apply_ln_to_stack_takes_transformer_lens_slices(ref):
    ours, theirs = bridge_activations(ref, ref.tokens[:, :8])
    with torch.no_grad():
        stack = ours.accumulated_resid(layer=2, pos_slice=-1)  # [component batch d_model]
        for kwargs in ({"layer": 2}, {"layer": 2, "batch_slice": [1]}, {"layer": 1, "mlp_input": True}):
            expected = theirs.apply_ln_to_stack(stack, pos_slice=-1, **kwargs)
            torch.testing.assert_close(ours.apply_ln_to_stack(stack, pos_slice=-1, **kwargs), expected)
        assert ours.apply_ln_to_stack(stack, 2, pos_slice=-1, batch_slice=[1]).shape == (3, 1, ref.spec.n_embd)
        # One sequence's stack, without a batch axis: batch_slice then picks the scale alone.
        one = stack[:, 1]  # [component d_model]
        kwargs = {"pos_slice": -1, "batch_slice": 1, "has_batch_dim": False}
        torch.testing.assert_close(ours.apply_ln_to_stack(one, 2, **kwargs), theirs.apply_ln_to_stack(one, 2, **kwargs))
        torch.testing.assert_close(
            ours.apply_ln_to_stack(one, 2, **kwargs), ours.apply_ln_to_stack(stack, 2, pos_slice=-1)[:, 1]
        )
        # TransformerLens divides by layer 1's cached scale instead, as if recompute_ln were not given.
        with pytest.raises(ValueError, match=r"recompute_ln runs ln_final, .*: pass layer=None .* not 1$"):
            ours.apply_ln_to_stack(stack, 1, pos_slice=-1, recompute_ln=True)


def test_stack_activation_and_the_unbatched_helpers_equal_transformer_lens(ref):
    same_inputs, theirs = bridge_activations(ref, ref.tokens[:1, :8], remove_batch_dim=True)
    direction = torch.randn(ref.spec.n_embd, generator=torch.Generator().manual_seed(0))  # -> [component]
    for args in [("pattern",), ("scale", -1, "ln2"), ("resid_post", 2)]:
        assert torch.equal(same_inputs.stack_activation(*args), theirs.stack_activation(*args)), args
    for helper, kwargs in [
        ("accumulated_resid", {"apply_ln": True, "pos_slice": -1}),
        ("decompose_resid", {"apply_ln": True, "mlp_input": True, "layer": 1}),
        ("stack_head_results", {"apply_ln": True, "pos_slice": (0, 3)}),
        ("stack_neuron_results", {"layer": 2, "apply_ln": True, "neuron_slice": 3, "pos_slice": -1}),
        ("get_full_resid_decomposition", {"apply_ln": True, "pos_slice": -1, "project_output_onto": direction}),
    ]:
        expected = getattr(theirs, helper)(**kwargs)
        torch.testing.assert_close(getattr(same_inputs, helper)(**kwargs), expected, rtol=1e-5, atol=1e-5)


def test_a_missing_cache_key_is_told_why_it_is_missing(model, tokens, run):
    """Before, each said only how many activations the cache held."""
    _, cache = run
    with pytest.raises(KeyError) as misspelt:
        cache["blocks.0.attn.hook_patern"]
    assert str(misspelt.value) == (
        "\"'blocks.0.attn.hook_patern' is not in this cache (no hook has that name; did you mean "
        "'blocks.0.attn.hook_pattern' or 'blocks.2.attn.hook_pattern' or 'blocks.1.attn.hook_pattern'?)\""
    )
    with torch.no_grad():
        _, filtered = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    with pytest.raises(KeyError) as left_out:
        filtered["blocks.0.hook_resid_pre"]  # a hook of the model, not of this run's cache
    assert str(left_out.value) == (
        "\"'blocks.0.hook_resid_pre' is not in this cache (a hook of the model that the run's names_filter left "
        'out; it holds 1 activation; see cache.keys())"'
    )
    with pytest.raises(
        KeyError,
        match=r"^\"'hook_xyzzy_plugh' is not in this cache \(it holds \d+ activations; see cache.keys\(\)\)\"$",
    ):
        cache["hook_xyzzy_plugh"]  # nothing close: no guess


@pytest.mark.parametrize("remove_batch_dim", [False, True], ids=["batched", "unbatched"])
def test_compute_head_results_equals_transformer_lens_and_sums_to_attn_out(ref, remove_batch_dim, caplog):
    tokens = ref.tokens[:1, :8] if remove_batch_dim else ref.tokens[:, :8]
    same_inputs, theirs = bridge_activations(ref, tokens, remove_batch_dim=remove_batch_dim)
    with pytest.raises(KeyError, match="is not in this cache"):
        same_inputs["result", 0]  # not before it is computed
    with torch.no_grad():
        same_inputs.compute_head_results()
        theirs.compute_head_results()
    for layer in range(ref.spec.n_layer):
        result = same_inputs["result", layer]
        assert result.shape == (*tokens.shape[remove_batch_dim:], ref.spec.n_head, ref.spec.n_embd)
        torch.testing.assert_close(result, theirs[f"blocks.{layer}.attn.hook_result"], rtol=1e-5, atol=1e-5)
        attn_out = result.sum(dim=-2) + ref.model.blocks[layer].attn.b_O
        torch.testing.assert_close(attn_out, same_inputs["attn_out", layer], rtol=1e-5, atol=1e-5)
    kept = same_inputs["result", 0]
    with caplog.at_level("WARNING"):
        same_inputs.compute_head_results()  # again: nothing to do, and said so
    assert same_inputs["result", 0] is kept and "already" in caplog.text


def test_patching_one_heads_result_needs_the_hook_and_equals_patching_its_z(model, tokens):
    """Without set_use_attn_result the model has no hook_result to patch (a computed cache's
    "result" is no hook), and says so. With it, patching head h's result from another run equals
    patching head h's z: the head's write is z[h] W_O[h]."""
    other = torch.randint(0, 101, tokens.shape, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"'blocks.1.attn.hook_result' is one of .* after model.set_use_attn_result"):
        interp.patched_logits(model, tokens, {"blocks.1.attn.hook_result": torch.zeros(1)}, "result1")
    with_result = copy.deepcopy(model)
    with_result.set_use_attn_result(True)
    with torch.no_grad():
        _, source = with_result.run_with_cache(other)
        by_result = interp.patched_logits(with_result, tokens, source, "result1", head=2)
        by_z = interp.patched_logits(model, tokens, source, "z1", head=2)
        clean = model(tokens)
    torch.testing.assert_close(by_result, by_z, rtol=1e-5, atol=1e-5)
    assert (by_result - clean).abs().max() > 1e-2
    grid = activation_patching(with_result, other, tokens, lambda logits: logits[:, -1, 0].mean(), "result", by="head")
    expected = activation_patching(model, other, tokens, lambda logits: logits[:, -1, 0].mean(), "z", by="head")
    torch.testing.assert_close(grid, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"'blocks.0.hook_q_input' is one of .* model.set_use_split_qkv_input"):
        activation_patching(model, other, tokens, lambda logits: logits.sum(), "q_input", by="head")


@pytest.mark.parametrize("batch_slice", [1, (0, 1), [1, 0], slice(None, None, -1), None])
def test_apply_slice_to_batch_dim_equals_transformer_lens(ref, batch_slice):
    same_inputs, theirs = bridge_activations(ref, ref.tokens[:, :8])
    if isinstance(batch_slice, slice):
        batch_slice = slice(None, None, 2)  # torch tensors take no negative step; TransformerLens's neither
    ours, expected = same_inputs.apply_slice_to_batch_dim(batch_slice), theirs.apply_slice_to_batch_dim(batch_slice)
    assert isinstance(ours, ActivationCache) and ours.has_batch_dim == expected.has_batch_dim
    assert ours.has_batch_dim == (not isinstance(batch_slice, int))
    for name, value in ours.items():
        assert torch.equal(value, expected[name]), name
    # The helpers work on the sliced cache, its batch axis gone or shortened.
    stack = ours.accumulated_resid(apply_ln=True, pos_slice=-1)
    torch.testing.assert_close(stack, expected.accumulated_resid(apply_ln=True, pos_slice=-1))


@pytest.mark.parametrize("batch_slice", [2, [2, 0]])
def test_apply_slice_to_batch_dim_keeps_an_entry_broadcast_over_the_batch_whole(model, run, batch_slice):
    """An entry of leading size 1 (a direction added beside a batch of 3) serves every sequence:
    it is kept as it is, where slicing it would take sequence 2 of a tensor that has one."""
    _, cache = run
    batched = ActivationCache(dict(cache) | {"direction": torch.ones(1, 10, SMALL.d_model)}, model)
    sliced = batched.apply_slice_to_batch_dim(batch_slice)
    assert sliced["direction"] is batched["direction"]
    index = torch.tensor(batch_slice)
    torch.testing.assert_close(sliced["resid_pre", 1], cache["resid_pre", 1][index], rtol=0, atol=0)


@pytest.mark.parametrize("batch_slice", [5, -4, [0, 3], (3, 5), slice(2, 2)])
def test_apply_slice_to_batch_dim_names_a_slice_outside_the_batch(run, batch_slice):
    """Before: torch's "index 5 is out of bounds for dimension 0 with size 3", naming neither, and
    for a range past the end an empty cache whose helpers failed later."""
    _, cache = run  # a batch of 3
    with pytest.raises(ValueError) as raised:
        cache.apply_slice_to_batch_dim(batch_slice)
    why = "picks none of" if isinstance(batch_slice, (tuple, slice)) else "indexes past"
    assert str(raised.value).startswith(f"batch_slice={batch_slice!r} {why} this cache's 3 sequences")
    assert cache.apply_slice_to_batch_dim(-3)["embed"].shape == cache["embed"].shape[1:]  # the first, from the end


@pytest.mark.parametrize(
    "pos_slice, why",
    [(10, "indexes past"), (-11, "indexes past"), ([0, 10], "indexes past"), ((10, 12), "picks none of")],
)
def test_residual_helpers_name_a_pos_slice_outside_the_positions(run, pos_slice, why):
    """Before: torch's "index 10 is out of bounds for dimension 1 with size 10", naming neither, or
    for a range past the end stacks of no position."""
    _, cache = run  # 10 positions
    for helper in (
        lambda: cache.accumulated_resid(pos_slice=pos_slice),
        lambda: cache.decompose_resid(pos_slice=pos_slice),
        lambda: cache.stack_head_results(pos_slice=pos_slice),
        lambda: cache.get_neuron_results(1, pos_slice=pos_slice),
        lambda: cache.stack_neuron_results(1, pos_slice=pos_slice),
        lambda: cache.get_full_resid_decomposition(pos_slice=pos_slice),
        lambda: cache.apply_ln_to_stack(torch.zeros(1, 3, 1, 32), pos_slice=pos_slice),
    ):
        with pytest.raises(ValueError) as raised:
            helper()
        assert str(raised.value).startswith(f"pos_slice={pos_slice!r} {why} this cache's 10 positions")
    assert cache.accumulated_resid(pos_slice=-10).shape == (4, 3, 32)  # the first, from the end


def test_apply_slice_to_batch_dim_refuses_an_unbatched_cache(ref):
    same_inputs, _ = bridge_activations(ref, ref.tokens[:1, :8], remove_batch_dim=True)
    with pytest.raises(ValueError, match="no batch axis to slice"):
        same_inputs.apply_slice_to_batch_dim(0)
    assert same_inputs.apply_slice_to_batch_dim(None).has_batch_dim is False  # nothing to slice: as it was


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tokens": 5},
        {"tokens": " the"},  # a str of one token
        {"tokens": torch.tensor(7), "incorrect_tokens": 11},
        {"tokens": "per-sequence", "incorrect_tokens": "per-sequence"},  # [batch]: every position
        {"tokens": torch.arange(100, 108)},  # [pos], a length other than the batch's: per position
        {"tokens": "per-token", "incorrect_tokens": "per-token"},  # [batch pos]
        {"tokens": "per-sequence", "pos_slice": -1},  # the stack of the last position only
        {"tokens": "per-sequence", "pos_slice": (2, 5)},
        {"tokens": 9, "batch_slice": 1},
        {"tokens": torch.tensor([[3]]), "batch_slice": [0]},  # one token in any shape is one token
    ],
)
def test_logit_attrs_equal_transformer_lens(ref, kwargs):
    same_inputs, theirs = bridge_activations(ref, ref.tokens[:, :8])
    gen = torch.Generator().manual_seed(3)
    batch = ref.spec.batch
    forms = {"per-sequence": (batch,), "per-token": (batch, 8)}
    drawn = {k: torch.randint(0, 50257, forms[v], generator=gen) for k, v in kwargs.items() if str(v) in forms}
    kwargs = {**kwargs, **drawn}
    with torch.no_grad():
        stack = theirs.decompose_resid(pos_slice=kwargs.get("pos_slice"))
        expected = theirs.logit_attrs(stack, **kwargs)
        actual = same_inputs.logit_attrs(stack, **kwargs)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_logit_attrs_of_an_unbatched_cache_equal_transformer_lens(ref):
    same_inputs, theirs = bridge_activations(ref, ref.tokens[:1, :8], remove_batch_dim=True)
    stack = theirs.accumulated_resid(layer=2)
    for kwargs in ({"tokens": torch.arange(200, 208)}, {"tokens": 4, "incorrect_tokens": 6}):
        expected = theirs.logit_attrs(stack, has_batch_dim=False, **kwargs)
        torch.testing.assert_close(same_inputs.logit_attrs(stack, has_batch_dim=False, **kwargs), expected)


def test_logit_attrs_of_a_processed_model_sum_to_the_logits_less_b_U(tiny_checkpoint):
    """With ln_final folded into W_U and b_U (process_weights), the attributions of the whole
    residual stream are the logits but for b_U. Unprocessed, ln_final's w is left out: they are not."""
    directory, _ = tiny_checkpoint
    tokens = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(4))
    targets = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(5))
    for processed in (True, False):
        model = Transformer.from_pretrained(directory)
        if processed:
            process_weights(model)
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
            total = cache.logit_attrs(cache.decompose_resid(), targets).sum(dim=0)
        expected = logits.gather(-1, targets[..., None])[..., 0] - model.b_U[targets]
        assert torch.allclose(total, expected, rtol=1e-5, atol=1e-5) == processed


def test_logit_attrs_refuses_tokens_it_cannot_read(model, run, without_shape_checks):
    _, cache = run
    stack = cache.decompose_resid()
    with pytest.raises(ValueError, match=r"tokens: ' Romeo and' is 2 tokens, \["):
        cache.logit_attrs(stack, " Romeo and")
    with pytest.raises(ValueError, match="must have the same shape"):
        cache.logit_attrs(stack, torch.tensor([1, 2]), incorrect_tokens=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=f"outside \\[0, d_vocab={model.cfg.d_vocab}\\)"):
        cache.logit_attrs(stack, model.cfg.d_vocab)
    with pytest.raises(TypeError, match="integer token ids, got dtype torch.float32"):
        cache.logit_attrs(stack, torch.tensor([1.0, 2.0]))


# --- test_prompt ---------------------------------------------------------------------------------


class LogitsOf:
    """TransformerLens's test_prompt reads a model through these: the bridge's tokenization (its
    BOS and answer handling are then TransformerLens's own) and our model's logits, so that its
    printout and ours are of the same numbers, to the last printed digit on any machine."""

    def __init__(self, bridge, model):
        self.bridge, self.model = bridge, model

    def __getattr__(self, name):  # to_tokens, to_str_tokens, to_string
        return getattr(self.bridge, name)

    def __call__(self, tokens):
        return self.model(tokens)


@pytest.mark.parametrize("ref", [SPECS[1]], ids=[SPECS[1].name], indirect=True)
@pytest.mark.parametrize(
    "prompt, answer, kwargs",
    [
        ("The cat sat on the", "mat", {}),
        ("Hello there my", "good old friend", {"top_k": 3}),  # one answer of three tokens
        ("One two", ["three", "four", " 3"], {}),  # alternatives for the next token
        ("One two", ["three", "four hundred"], {}),  # alternatives of several tokens: their first ones
        ("I said", "hello", {"prepend_space_to_answer": False, "prepend_bos": False, "top_k": 0}),
    ],
)
def test_test_prompt_prints_what_transformer_lens_prints(ref, capsys, prompt, answer, kwargs):
    tl_test_prompt(prompt, answer, LogitsOf(ref.bridge, ref.model), **kwargs)
    theirs = capsys.readouterr().out
    report = test_prompt(ref.model, prompt, answer, **kwargs)
    # rich wraps TransformerLens's long lines at 80 columns: compare word by word
    assert str(report).split() == theirs.split()
    assert str(report).count("Performance on answer token") == len(report.answers) == len(report.top)


def test_test_prompt_scores_each_answer_token_from_the_logits_before_it(without_shape_checks):
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=32, n_layers=1, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, init_range=0.5)
    model = Transformer(cfg).eval()
    report = test_prompt(model, "Once upon", "a time", top_k=4)
    tokens = to_tokens("<|endoftext|>Once upon a time")
    assert report.prompt_str_tokens == ["<|endoftext|>", "Once", " upon"]
    assert report.answer_str_tokens == [[" a", " time"]]
    with torch.no_grad():
        logits = model(tokens)[0]
    for i, (answers, top) in enumerate(zip(report.answers, report.top, strict=True)):
        before, target = logits[2 + i], int(tokens[0, 3 + i])  # the logits of the position before the token
        (score,) = answers
        assert score.rank == int((before > before[target]).sum()) and score.rank > 0
        assert score.logit == pytest.approx(float(before[target]), abs=1e-6)
        assert score.prob == pytest.approx(float(before.softmax(-1)[target]), rel=1e-5)
        assert [t.rank for t in top] == [0, 1, 2, 3] and top[0].logit == pytest.approx(float(before.max()))
        assert [t.logit for t in top] == sorted((t.logit for t in top), reverse=True)
    assert report.ranks == [[(" a", report.answers[0][0].rank)], [(" time", report.answers[1][0].rank)]]
    for kwargs, error, message in [
        ({"answer": ""}, ValueError, "answer must be a non-empty str or a non-empty list of them, got ''"),
        ({"answer": []}, ValueError, r"answer must be .*, got \[\]"),
        ({"answer": 3}, ValueError, "answer must be .*, got 3"),
        ({"top_k": -1}, ValueError, r"top_k must be an int in \[0, d_vocab=50257\], got -1"),
        ({"top_k": 2.0}, ValueError, "top_k must be an int"),
        ({"prompt": ["a"]}, TypeError, "prompt must be a str, got list"),
        ({"answer": "a" + " b" * 20}, ValueError, r"sequence length 24 must be in \[1, n_ctx=16\]"),
    ]:
        with pytest.raises(error, match=message):
            test_prompt(model, **{"prompt": "Once upon", "answer": "a time", **kwargs})


def test_test_prompt_leaves_out_a_padded_vocabularys_unused_ids(without_shape_checks):
    """The trainer pads d_vocab to 50304; ids 50257 and up have no text. Here one of them has the
    largest logit: test_prompt ranks, normalises and lists GPT-2's 50257 tokens, as sampling draws
    from them, where it raised naming the padding id it could not decode."""
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=32, n_layers=1, n_heads=4, d_head=8, d_mlp=64, d_vocab=50304, n_ctx=16)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.unembed.b_U[50300] = 50.0
    report = test_prompt(model, "Once upon", "a time", top_k=3)
    with torch.no_grad():
        logits = model(to_tokens("<|endoftext|>Once upon a time"))[0, 2:4]
    assert logits.argmax(-1).tolist() == [50300, 50300]
    real = logits[:, :50257]  # what the report must be of
    for position, (answers, top) in enumerate(zip(report.answers, report.top, strict=True)):
        (score,) = answers
        target = to_single_token(score.token)
        assert score.rank == int((real[position] > real[position, target]).sum())
        assert score.prob == pytest.approx(float(real[position].softmax(-1)[target]), rel=1e-5)
        expected = real[position].topk(3)
        assert [t.token for t in top] == [to_string([i]) for i in expected.indices.tolist()]
        assert [t.logit for t in top] == pytest.approx(expected.values.tolist(), abs=1e-6)
    assert len(test_prompt(model, "Once upon", "a time", top_k=50257).top[0]) == 50257
    with pytest.raises(ValueError, match=r"top_k must be an int in \[0, 50257\]: .* d_vocab=50304 .*, got 50258"):
        test_prompt(model, "Once upon", "a time", top_k=50258)


# --- logit lens and direct logit attribution -----------------------------------------------


def test_logit_lens_ends_at_the_model_logits_and_starts_at_the_embeddings(model, tokens, run):
    logits, cache = run
    lens = logit_lens(model, tokens)
    assert lens.labels == ["0_pre", "1_pre", "2_pre", "final_post"] and lens.logits.shape == (4, 3, 10, 101)
    torch.testing.assert_close(lens.logits[-1], logits)
    with torch.no_grad():
        embeddings = cache["hook_embed"] + cache["hook_pos_embed"]
        torch.testing.assert_close(lens.logits[0], model.unembed(model.ln_final(embeddings)))
    targets = tokens[:, 1:]
    log_probs = lens.log_probs_of(targets)
    assert log_probs.shape == (4, 3, 9)
    torch.testing.assert_close(log_probs[-1], logits[:, :-1].log_softmax(-1).gather(-1, targets[..., None])[..., 0])
    # a batch prefix would otherwise be gathered silently, and a longer target fail inside torch.gather
    for wrong in (targets[:1], torch.zeros(3, 11, dtype=torch.long)):
        with pytest.raises(
            ValueError, match=rf"targets must have shape \[batch=3, target_pos <= 10\].*got \({wrong.shape[0]}, "
        ):
            lens.log_probs_of(wrong)


def test_logit_lens_log_probs_of_names_targets_that_are_no_token_ids(model, tokens, without_shape_checks):
    """Before: torch's "index 101 is out of bounds for dimension 3 with size 101" from gather, its
    "Expected dtype int32/int64 for index" for floats, and "'list' object has no attribute 'ndim'"."""
    lens = logit_lens(model, tokens)
    targets = tokens[:, 1:]
    with pytest.raises(ValueError, match=r"^targets: token id 101 is outside \[0, d_vocab=101\)$"):
        lens.log_probs_of(torch.full_like(targets, 101))
    with pytest.raises(TypeError, match=r"^targets must be a tensor of token ids, got a torch.float32 tensor$"):
        lens.log_probs_of(targets.float())
    with pytest.raises(TypeError, match=r"^targets must be a tensor of token ids, got list$"):
        lens.log_probs_of(targets.tolist())
    assert torch.equal(lens.log_probs_of(targets.int()), lens.log_probs_of(targets))
    with pytest.raises(TypeError, match=r"^bos must be a token id, None or 'auto', got 1.5$"):
        induction_score(model, seq_len=4, bos=1.5)


def test_logit_lens_log_probs_of_a_bfloat16_model_are_taken_in_float32_and_a_float64_models_in_float64():
    """A bf16 model's lens holds bf16 logits; their log-softmax over the vocabulary, rounded to
    bf16, would be off by ~2**-9 of its magnitude (several nats here)."""
    logits = (4 * torch.randn(2, 1, 6, 50257, generator=torch.Generator().manual_seed(0))).bfloat16()
    targets = torch.randint(0, 50257, (1, 5), generator=torch.Generator().manual_seed(1))
    log_probs = interp.LogitLens(logits, ["0_pre", "final_post"]).log_probs_of(targets)
    assert log_probs.dtype == torch.float32
    expected = logits.float().log_softmax(-1)[:, :, :5].gather(-1, targets[None, ..., None].expand(2, 1, 5, 1))[..., 0]
    torch.testing.assert_close(log_probs, expected, rtol=1e-6, atol=0)
    # A float64 model's keep their digits: they were rounded to float32 too.
    log_probs = interp.LogitLens(logits.double(), ["0_pre", "final_post"]).log_probs_of(targets)
    assert log_probs.dtype == torch.float64
    expected = logits.double().log_softmax(-1)[:, :, :5].gather(-1, targets[None, ..., None].expand(2, 1, 5, 1))[..., 0]
    torch.testing.assert_close(log_probs, expected, rtol=1e-15, atol=0)


def test_cache_logit_lens_reads_the_cache_it_is_given_and_no_new_run(model, tokens, run):
    logits, cache = run
    runs = []
    handle = model.register_forward_pre_hook(lambda module, args: runs.append(1))
    try:
        lens = cache.logit_lens()
        mid = cache.logit_lens(incl_mid=True)
    finally:
        handle.remove()
    assert runs == []
    expected = logit_lens(model, tokens)
    assert lens.labels == expected.labels
    torch.testing.assert_close(lens.logits, expected.logits)
    torch.testing.assert_close(lens.logits[-1], logits)
    # incl_mid: each block's resid_mid between its resid_pre and the next, read the same way.
    assert mid.labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "final_post"]
    # Equal to float32 rounding, not bit for bit: the unembedding multiplies 7 streams here and 4
    # there, and a CPU's matrix-multiply kernels may round differently by shape (AVX2 ones do).
    torch.testing.assert_close(mid.logits[::2], lens.logits)
    with torch.no_grad():
        torch.testing.assert_close(mid.logits[3], model.unembed(model.ln_final(cache["resid_mid", 1])))
    torch.testing.assert_close(logit_lens(model, tokens, incl_mid=True).logits, mid.logits)
    # One prompt cached without its batch axis reads as batch 1; the row is the batched run's first.
    with torch.no_grad():
        _, single = model.run_with_cache(tokens[:1], remove_batch_dim=True)
    one = single.logit_lens()
    assert one.logits.shape == (4, 1, 10, 101)
    torch.testing.assert_close(one.logits, lens.logits[:, :1], rtol=1e-5, atol=1e-5)
    # A cache without the residual streams says which one it lacks.
    with torch.no_grad():
        _, partial = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("resid_pre"))
    with pytest.raises(KeyError, match="blocks.2.hook_resid_post"):
        partial.logit_lens()


def test_direct_logit_attribution_sums_to_the_logit_difference_minus_the_biases(model, run):
    logits, cache = run
    correct, incorrect = torch.tensor([5, 17, 42]), 7
    dla = direct_logit_attribution(model, cache, correct, incorrect)
    assert dla.contributions.shape == (2 + 3 * (4 + 2), 3)
    assert (
        dla.labels[:4] == ["embed", "pos_embed", "L0H0", "L0H1"] and "L2 MLP" in dla.labels and "L1 b_O" in dla.labels
    )
    expected = logits[:, -1].gather(1, correct[:, None])[:, 0] - logits[:, -1, incorrect]
    torch.testing.assert_close(dla.logit_diff, expected)
    torch.testing.assert_close(dla.contributions.sum(dim=0), expected - dla.bias, rtol=1e-5, atol=1e-5)
    assert dla.bias.abs().min() > 1e-3  # the biases are non-zero here, so leaving them out would fail
    assert not dla.contributions.requires_grad  # an analysis result, not part of a graph to backpropagate
    top = dla.top(3)
    assert len(top) == 3 and abs(top[0][1]) >= abs(top[1][1]) >= abs(top[2][1])
    # a 0-d tensor, as indexing to_tokens(...) gives, means the same as the int
    as_scalar_tensor = direct_logit_attribution(model, cache, correct, torch.tensor(incorrect))
    torch.testing.assert_close(as_scalar_tensor.contributions, dla.contributions, rtol=0, atol=0)


def test_direct_logit_attribution_of_a_bf16_model_is_taken_in_float32(model, tokens):
    """Before: "expected m1 and m2 to have the same dtype": the stacked components are float32,
    ln_final's w and W_U were not. Against the same bf16 weights held in float32, the gap is the
    bf16 activations' rounding."""
    half = Transformer(SMALL)
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    rounded = Transformer(SMALL)
    rounded.load_state_dict(half.state_dict())
    correct, incorrect = torch.tensor([5, 17, 42]), 7
    with torch.no_grad():
        dla = direct_logit_attribution(half, half.run_with_cache(tokens)[1], correct, incorrect)
        exact = direct_logit_attribution(rounded, rounded.run_with_cache(tokens)[1], correct, incorrect)
    assert dla.contributions.dtype == dla.bias.dtype == dla.logit_diff.dtype == torch.float32
    torch.testing.assert_close(dla.bias, exact.bias, rtol=0, atol=0)  # weights only: the same numbers
    scale = float(exact.contributions.abs().max())
    assert (dla.contributions - exact.contributions).abs().max() <= scale * 2**-5  # measured 0.036 of 2.2
    # the identity, up to the rounding of the model's bf16 logits (2**-8 of their size, two of them)
    gap = (dla.contributions.sum(dim=0) - (dla.logit_diff - dla.bias)).abs().max()
    assert gap <= float(dla.logit_diff.abs().max()) * 2**-7  # measured 0.0098 of 4.86


def test_logit_attribution_top_ranks_by_size_whatever_the_sign():
    """A component that pushes hard against the answer matters as much as one that pushes for it."""
    dla = interp.LogitAttribution(
        contributions=torch.tensor([[1.0, 1.0], [-3.0, -1.0], [0.5, -0.5], [2.5, 2.5]]),
        labels=["a", "b", "c", "d"],
        bias=torch.zeros(2),
        logit_diff=torch.zeros(2),
    )
    assert dla.top(3) == [("d", 2.5), ("b", -2.0), ("a", 1.0)]  # mean over the batch, ranked by |mean|
    assert dla.top(10) == [("d", 2.5), ("b", -2.0), ("a", 1.0), ("c", 0.0)]


def test_direct_logit_attribution_takes_no_text_for_a_token(model, run, without_shape_checks):
    """Before, in a user's code (no jaxtyping): torch's "new(): invalid data type 'str'"."""
    _, cache = run
    with pytest.raises(TypeError, match=r"^correct must be a token id \(int\) or a tensor of ids, got the str ' Romeo'; "
                       r"pass to_single_token\(' Romeo'\), which refuses text of several tokens$"):  # fmt: skip
        direct_logit_attribution(model, cache, " Romeo", 7)
    with pytest.raises(TypeError, match="^incorrect must be a token id"):
        direct_logit_attribution(model, cache, 7, "x")
    for not_ids in (torch.tensor([1.0, 2.0, 3.0]), True, torch.tensor(True)):  # a float, a bool: no id
        with pytest.raises(ValueError, match=r"^correct must be token ids \(ints\), got dtype torch\.(float32|bool)$"):
            direct_logit_attribution(model, cache, not_ids, 7)


def test_direct_logit_attribution_names_bad_token_ids_and_positions(model, run):
    _, cache = run  # batch 3, 10 positions, d_vocab 101
    for correct, match in [
        (101, r"^correct: token id 101 is outside \[0, d_vocab=101\)"),
        (-1, r"^correct: token id -1 is outside \[0, d_vocab=101\)"),  # would silently index the last column
        (torch.tensor([1, 2]), r"one token id or one per batch item \(3\), got shape \(2,\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            direct_logit_attribution(model, cache, correct, 7)
    with pytest.raises(ValueError, match=r"^incorrect: token id 500 is outside"):
        direct_logit_attribution(model, cache, 7, torch.tensor([1, 2, 500]))
    with pytest.raises(ValueError, match=r"pos=10 is outside the cache's 10 positions \(\[-10, 10\)\)"):
        direct_logit_attribution(model, cache, 1, 7, pos=10)
    first = direct_logit_attribution(model, cache, 1, 7, pos=-10)  # the first position, in range
    torch.testing.assert_close(first.contributions, direct_logit_attribution(model, cache, 1, 7, pos=0).contributions)


# --- activation patching -------------------------------------------------------------------


def test_patching_a_run_with_its_own_activations_changes_nothing(model, tokens):
    # Without pattern hooks, so that this run takes the same (sdpa) attention path as the patched ones.
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: not name.endswith(("pattern", "scores")))
    assert torch.equal(logits, model(tokens))
    for name in ("blocks.1.hook_resid_pre", "blocks.2.attn.hook_z", "blocks.0.mlp.hook_post"):
        assert torch.equal(patched_logits(model, tokens, cache, name), logits)
    assert torch.equal(patched_logits(model, tokens, cache, "blocks.1.attn.hook_z", pos=3, head=2), logits)
    # A head of a hook without a head axis: [:, :, 2] of resid_pre is residual dimension 2, which
    # was patched without a word.
    with pytest.raises(ValueError, match=r"head=2 needs a hook with a head axis, .*; got 'blocks.1.hook_resid_pre'"):
        patched_logits(model, tokens, cache, "blocks.1.hook_resid_pre", head=2)

    grad_enabled = []

    def metric(x):
        grad_enabled.append(torch.is_grad_enabled() or x.requires_grad)
        return x[:, -1, 0].mean()

    grid = activation_patching(model, tokens, tokens, metric, progress=False)
    assert grid.shape == (3, 10)
    assert grad_enabled == [False] * 30  # the 30 patched runs build no autograd graph
    torch.testing.assert_close(grid, torch.full((3, 10), float(logits[:, -1, 0].mean())))


E = slice(None)


@pytest.mark.parametrize(
    ("hook_name", "pos", "head", "where"),
    [
        ("blocks.0.attn.hook_pattern", 2, None, (E, E, 2)),  # pos is the query: every head, query 2
        ("blocks.0.attn.hook_pattern", 2, 1, (E, 1, 2)),
        ("blocks.0.attn.hook_attn_scores", None, 1, (E, 1)),
        ("blocks.0.attn.hook_z", 2, None, (E, 2)),
        ("blocks.0.attn.hook_z", 2, 1, (E, 2, 1)),
        ("blocks.0.attn.hook_z", None, 1, (E, E, 1)),
        ("blocks.0.hook_resid_pre", 2, None, (E, 2)),
    ],
)
def test_patched_logits_patches_exactly_the_named_slice(model, tokens, run, hook_name, pos, head, where):
    """Each layout's (pos, head) picks the right axes. Before, pos without head on a pattern hook
    indexed its n_heads axis: it patched head 2 at every query instead of query 2 in every head."""
    _, clean_cache = run
    corrupted = (tokens + 1) % 101

    def by_hand(activation, hook):
        activation = activation.clone()
        activation[where] = clean_cache[hook_name][where]
        return activation

    with torch.no_grad():
        expected = model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, by_hand)])
        patched = patched_logits(model, corrupted, clean_cache, hook_name, pos=pos, head=head)
        assert not torch.allclose(expected, model(corrupted), atol=1e-4)  # the slice matters
    torch.testing.assert_close(patched, expected, rtol=0, atol=0)


def test_patched_logits_backpropagates_through_a_patched_pattern(model, tokens, run):
    """With autograd on (gradients of a patched run, as attribution patching takes them), the
    patch writes a copy: written into the softmax's own output, which its backward reads, it
    would fail the backward ("modified by an inplace operation")."""
    _, clean_cache = run
    corrupted = (tokens + 1) % 101
    model.zero_grad(set_to_none=True)
    try:
        patched_logits(model, corrupted, clean_cache, "blocks.1.attn.hook_pattern", pos=3, head=1).sum().backward()
        assert model.blocks[1].attn.W_Q.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)


def test_patched_logits_takes_transformer_lens_compact_names(model, tokens, run):
    _, clean_cache = run
    corrupted = (tokens + 1) % 101
    with torch.no_grad():
        expected = patched_logits(model, corrupted, clean_cache, "blocks.1.attn.hook_z", pos=3, head=2)
        plain = dict(clean_cache)  # a plain dict of full names, as return_cache_object=False gives
        torch.testing.assert_close(patched_logits(model, corrupted, plain, "z1", pos=3, head=2), expected)
        torch.testing.assert_close(patched_logits(model, corrupted, clean_cache, "z1", pos=3, head=2), expected)
    with pytest.raises(ValueError, match=r"head=0 needs a hook with a head axis.*got 'blocks.1.hook_resid_pre'"):
        patched_logits(model, corrupted, clean_cache, "blocks.1.hook_resid_pre", head=0)


def test_patched_logits_takes_a_cache_keys_tuple_and_names_a_head_or_pos_out_of_range(
    model, tokens, run, without_shape_checks
):
    """act_name's own error for "resid_pre0" says to give the layer apart, ("resid_pre", 0); before,
    that tuple failed with "'tuple' object has no attribute 'startswith'". A head or pos out of
    range failed inside the hook with torch's IndexError, naming a dimension; a plain dict given to
    direct_logit_attribution with "'dict' object has no attribute 'has_batch_dim'"."""
    _, clean_cache = run
    corrupted = (tokens + 1) % 101
    with torch.no_grad():
        expected = patched_logits(model, corrupted, clean_cache, "blocks.1.attn.hook_z", pos=3, head=2)
        torch.testing.assert_close(patched_logits(model, corrupted, clean_cache, ("z", 1), pos=3, head=2), expected)
    with pytest.raises(ValueError, match=r"give the layer apart: \('resid_pre', 0\)"):
        patched_logits(model, corrupted, clean_cache, "resid_pre0")
    with pytest.raises(ValueError, match=r"^head=4 is outside \[-4, 4\): the model has n_heads=4$"):
        patched_logits(model, corrupted, clean_cache, ("z", 1), head=4)
    with pytest.raises(ValueError, match=r"^pos=-11 is outside \[-10, 10\): the tokens have 10 positions$"):
        patched_logits(model, corrupted, clean_cache, ("resid_pre", 0), pos=-11)
    with pytest.raises(TypeError, match=r"^head must be an int or None, got 1.0$"):
        patched_logits(model, corrupted, clean_cache, ("z", 1), head=1.0)
    with pytest.raises(TypeError, match=r"^a hook name must be a str, got int 3$"):
        patched_logits(model, corrupted, clean_cache, 3)
    with pytest.raises(
        TypeError, match=r"^cache must be the ActivationCache that model.run_with_cache\(tokens\) returns, got dict$"
    ):
        direct_logit_attribution(model, dict(clean_cache), 1, 2)


def test_patched_logits_refuses_a_source_of_another_shape(model, tokens, run):
    _, cache = run
    message = r"cannot patch blocks.0.hook_resid_pre: source \(3, 10, 32\) vs this run \(3, 5, 32\)"
    with pytest.raises(ValueError, match=message):
        patched_logits(model, tokens[:, :5], cache, "blocks.0.hook_resid_pre", pos=1)


def test_patching_leaves_the_source_cache_alone_when_a_later_hook_edits_in_place(model, tokens, run):
    """Layer 0's patched output is layer 1's input; a hook there that ablates in place, as
    TransformerLens users' hooks often do, must not write into the source cache."""
    _, cache = run
    before = cache["resid_post", 0].clone()

    def ablate(activation, hook):
        activation[:, 0] = 0.0
        return activation

    model.add_hook("blocks.1.hook_resid_pre", ablate)
    try:
        patched_logits(model, tokens, cache, "blocks.0.hook_resid_post")
    finally:
        model.reset_hooks()
    torch.testing.assert_close(cache["resid_post", 0], before, rtol=0, atol=0)


def test_patching_every_position_of_resid_pre_0_restores_the_clean_logits(model, tokens, run):
    clean_logits, clean_cache = run
    corrupted = tokens.clone()
    corrupted[:, 4] = (corrupted[:, 4] + 1) % 101
    with torch.no_grad():
        corrupted_logits = model(corrupted)
        assert not torch.allclose(corrupted_logits[:, 4:], clean_logits[:, 4:], atol=1e-3)
        restored = patched_logits(model, corrupted, clean_cache, "blocks.0.hook_resid_pre")
    torch.testing.assert_close(restored, clean_logits)


def test_patching_grids_by_position_and_by_head_locate_the_corruption(model, tokens):
    corrupted = tokens.clone()
    corrupted[:, 4] = (corrupted[:, 4] + 1) % 101
    with torch.no_grad():
        clean_last, corrupt_last = model(tokens)[:, -1], model(corrupted)[:, -1]

    def restored_fraction(logits):  # 1 = clean, 0 = corrupted
        return 1 - (logits[:, -1] - clean_last).norm() / (corrupt_last - clean_last).norm()

    by_pos = activation_patching(model, tokens, corrupted, restored_fraction, progress=False)
    assert by_pos.shape == (3, 10)
    # In layer 0 only the corrupted position carries the difference: patching it restores the
    # output fully, patching any other position leaves it corrupted.
    torch.testing.assert_close(by_pos[0, 4], torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(by_pos[0, :4], torch.zeros(4), atol=1e-5, rtol=0)
    assert by_pos[2, 9] > 0.1  # by the last layer the information has moved to the last position
    by_head = activation_patching(model, tokens, corrupted, restored_fraction, by="head", progress=False)
    assert by_head.shape == (3, 4) and by_head.abs().max() > 0.01
    # The documented default hooks: resid_pre by position, z by head.
    for by, hook, grid in (("position", "resid_pre", by_pos), ("head", "z", by_head)):
        named = activation_patching(model, tokens, corrupted, restored_fraction, hook=hook, by=by, progress=False)
        torch.testing.assert_close(named, grid, rtol=0, atol=0)
    with pytest.raises(ValueError, match="by='head' needs a hook with a head axis"):
        activation_patching(model, tokens, corrupted, restored_fraction, hook="mlp_out", by="head")
    with pytest.raises(ValueError, match="got 'resid_pre'"):  # an explicit hook is never swapped for another
        activation_patching(model, tokens, corrupted, restored_fraction, hook="resid_pre", by="head")
    # A full hook name names one layer; every row of the grid then patched layer 0.
    with pytest.raises(
        ValueError, match=r"patches it in each layer in turn; got 'blocks.1.attn.hook_z', so pass hook='z'"
    ):
        activation_patching(model, tokens, corrupted, restored_fraction, hook="blocks.1.attn.hook_z", by="head")
    with pytest.raises(ValueError, match=r"one of \['attn_in', 'attn_out', .*\]: .*; got 'hook_embed'$"):
        activation_patching(model, tokens, corrupted, restored_fraction, hook="hook_embed")
    with pytest.raises(ValueError, match="must have the same shape"):
        activation_patching(model, tokens, corrupted[:, :5], restored_fraction)
    with pytest.raises(ValueError, match=r"metric must return a scalar, got a tensor of shape \(3,\)"):
        activation_patching(model, tokens, corrupted, lambda logits: logits[:, -1, 0], progress=False)


# TransformerLens's patching module, with the hook names it patches in each grid
TL_PATCHING = [("get_act_patch_resid_pre", "resid_pre", "position"), ("get_act_patch_attn_out", "attn_out", "position"),
               ("get_act_patch_mlp_out", "mlp_out", "position"), ("get_act_patch_attn_head_out_all_pos", "z", "head"),
               ("get_act_patch_attn_head_q_all_pos", "q", "head"), ("get_act_patch_attn_head_k_all_pos", "k", "head"),
               ("get_act_patch_attn_head_v_all_pos", "v", "head"),
               ("get_act_patch_attn_head_pattern_all_pos", "pattern", "head")]  # fmt: skip


@pytest.mark.parametrize("ref", [SPECS[1]], ids=[SPECS[1].name], indirect=True)
def test_activation_patching_equals_transformer_lens_patching_on_the_bridge(ref):
    """Each grid against transformer_lens.patching's get_act_patch_* on the bridge, same tokens and
    metric. Not resid_mid: editing the bridge's hook_resid_mid reaches ln2 alone, not the stream that
    mlp_out is added to (see test_an_edit_of_resid_mid_is_the_stream_the_mlp_output_is_added_to)."""
    clean = ref.tokens[:2, :6]
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 7) % 50257

    def metric(logits):
        return (logits[:, -1, 11] - logits[:, -1, 12]).mean()

    with torch.no_grad():
        _, clean_cache = ref.bridge.run_with_cache(clean)
    for function, hook, by in TL_PATCHING:
        expected = getattr(tl_patching, function)(ref.bridge, corrupted, clean_cache, metric)
        grid = activation_patching(ref.model, clean, corrupted, metric, hook=hook, by=by, progress=False)
        torch.testing.assert_close(grid, expected, rtol=1e-4, atol=1e-4, msg=function)
        assert grid.abs().max() > 1e-3, function  # the corruption reaches the metric through this hook


def test_interp_flags_and_counts_are_checked_not_taken_for_truthy(model, tokens, run, without_shape_checks):
    """Before: incl_mid="no" and progress="no" were truthy, and top_heads(k=-1) sliced off the
    lowest-scoring head, returning all the others."""
    _, cache = run
    with pytest.raises(TypeError, match=r"^incl_mid must be True or False, got 'no'$"):
        logit_lens(model, tokens, incl_mid="no")
    with pytest.raises(TypeError, match=r"^incl_mid must be True or False, got 'no'$"):
        cache.logit_lens(incl_mid="no")
    with pytest.raises(TypeError, match=r"^progress must be True or False, got 'no'$"):
        activation_patching(model, tokens, tokens, lambda logits: logits.sum(), progress="no")
    with pytest.raises(TypeError, match=r"^prepend_space_to_answer must be True or False, got 'no'$"):
        interp.test_prompt(model, "Hello", "world", prepend_space_to_answer="no")  # was truthy
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.3]])
    for k in (0, -1, 1.0):
        with pytest.raises(ValueError, match=rf"^k must be an int >= 1, got {k}$"):
            interp.top_heads(scores, k=k)
    assert [name for name, _ in interp.top_heads(scores, k=9)] == ["L0H1", "L1H0", "L1H1", "L0H0"]


@pytest.mark.parametrize(
    ("method", "flag"),
    [
        ("accumulated_resid", "incl_mid"), ("accumulated_resid", "apply_ln"), ("accumulated_resid", "mlp_input"),
        ("accumulated_resid", "return_labels"), ("decompose_resid", "mlp_input"), ("decompose_resid", "apply_ln"),
        ("decompose_resid", "incl_embeds"), ("decompose_resid", "return_labels"),
        ("stack_head_results", "return_labels"), ("stack_head_results", "incl_remainder"),
        ("stack_head_results", "apply_ln"), ("stack_neuron_results", "return_labels"),
        ("stack_neuron_results", "incl_remainder"), ("stack_neuron_results", "apply_ln"),
        ("stack_neuron_results", "mlp_input"), ("get_full_resid_decomposition", "mlp_input"),
        ("get_full_resid_decomposition", "expand_neurons"), ("get_full_resid_decomposition", "apply_ln"),
        ("get_full_resid_decomposition", "return_labels"), ("apply_ln_to_stack", "mlp_input"),
        ("apply_ln_to_stack", "has_batch_dim"), ("apply_ln_to_stack", "recompute_ln"), ("logit_attrs", "has_batch_dim"),
    ],
)  # fmt: skip
def test_activation_cache_flags_are_checked_not_taken_for_truthy(run, method, flag, without_shape_checks):
    """Before: apply_ln="False" applied the LayerNorm, mlp_input="no" read resid_mid, and so on."""
    _, cache = run
    layer = 1 if method == "stack_neuron_results" else None
    stack = cache.accumulated_resid()
    args = {"apply_ln_to_stack": (stack,), "logit_attrs": (stack, 11)}.get(method, (layer,))
    getattr(cache, method)(*args, **{flag: False})  # the bool itself is taken
    with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got 'False'$"):
        getattr(cache, method)(*args, **{flag: "False"})


def test_activation_cache_layers_must_be_ints_or_none(run, without_shape_checks):
    """Before: layer=True was layer 1, and "2" or 2.0 failed inside a comparison or range()."""
    _, cache = run
    for layer in (True, "2", 2.0):
        with pytest.raises(TypeError, match=rf"^layer must be an int or None, got {re.escape(repr(layer))}$"):
            cache.accumulated_resid(layer)
    torch.testing.assert_close(cache.accumulated_resid(np.int64(1)), cache.accumulated_resid(1), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"^has_batch_dim must be True or False, got 1$"):
        interp.ActivationCache(dict(cache), cache.model, has_batch_dim=1)


def test_top_heads_ranks_nan_scores_last():
    """An ablated head's composition scores are NaN (0/0). Before: torch's descending sort put them
    first, so the top heads were the ones with no score."""
    nan = float("nan")
    scores = torch.tensor([[nan, 0.2, -1.0], [0.7, nan, -torch.inf]])
    assert [name for name, _ in interp.top_heads(scores, k=3)] == ["L1H0", "L0H1", "L0H2"]
    ranked = interp.top_heads(scores, k=6)
    assert [name for name, _ in ranked] == ["L1H0", "L0H1", "L0H2", "L1H2", "L0H0", "L1H1"]
    assert ranked[3][1] == -float("inf") and all(math.isnan(value) for _, value in ranked[4:])


def test_activation_patching_checks_its_arguments_before_the_clean_run(model, tokens, without_shape_checks):
    """Wrong types, as a user's code without jaxtyping's checks passes them (before: AttributeError
    or a TypeError from the first patched run), and bad ids before any run."""
    clean_runs = []
    model.hook_embed.add_hook(lambda x, hook: clean_runs.append(1))
    try:
        with pytest.raises(TypeError, match="tokens must be a torch.Tensor of token ids, got list"):
            activation_patching(model, tokens, tokens.tolist(), lambda logits: logits.sum())
        with pytest.raises(TypeError, match="tokens must be a torch.Tensor of token ids, got list"):
            activation_patching(model, tokens.tolist(), tokens, lambda logits: logits.sum())
        with pytest.raises(ValueError, match="by must be 'position' or 'head', got 'layer'"):
            activation_patching(model, tokens, tokens, lambda logits: logits.sum(), by="layer")
        with pytest.raises(TypeError, match="metric must be a function of the patched logits, got NoneType"):
            activation_patching(model, tokens, tokens, None)
        with pytest.raises(ValueError, match=r"token id 101 is outside \[0, d_vocab=101\)"):
            activation_patching(model, tokens, torch.full_like(tokens, 101), lambda logits: logits.sum())
        assert clean_runs == []
    finally:
        model.reset_hooks()


def test_activation_patching_shows_a_progress_bar_unless_told_not_to(model, tokens, capsys):
    for progress in (True, False):
        activation_patching(model, tokens, tokens, lambda logits: logits.sum(), by="head", progress=progress)
        shown = capsys.readouterr().err
        assert ("patching z by head" in shown) == progress, shown


# --- induction heads -----------------------------------------------------------------------


def induction_circuit(vocab: int = 24, n_ctx: int = 32, strength: float = 3.0) -> Transformer:
    """A 2-layer model whose weights implement induction by hand: L0H0 copies each position's
    previous token into a subspace, and L1H0 attends from token t to where the previous token was t.

    Residual stream: [token one-hot | position one-hot | previous-token one-hot]. MLPs and the
    other heads are zero. `strength` sharpens the attention (LayerNorm rescales the stream).
    """
    d_model = 2 * vocab + n_ctx
    cfg = TransformerConfig(
        d_model=d_model, n_layers=2, n_heads=2, d_head=d_model // 2, d_mlp=16, d_vocab=vocab, n_ctx=n_ctx
    )
    model = Transformer(cfg).eval()
    tok, pos, prev = 0, vocab, vocab + n_ctx  # where each subspace starts
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 or p is not model.unembed.W_U:
                p.zero_()
        for block in model.blocks:
            block.ln1.w.fill_(1.0)
            block.ln2.w.fill_(1.0)
        model.ln_final.w.fill_(1.0)
        model.embed.W_E[:, tok:vocab] = torch.eye(vocab)
        model.pos_embed.W_pos[:, pos : pos + n_ctx] = torch.eye(n_ctx)
        previous_token, induction = model.blocks[0].attn, model.blocks[1].attn
        for p in range(n_ctx):
            previous_token.W_Q[0, pos + p, p] = strength  # query at position p ...
            if p + 1 < n_ctx:
                previous_token.W_K[0, pos + p, p + 1] = strength  # ... matches the key at position p - 1
        for t in range(vocab):
            previous_token.W_V[0, tok + t, t] = 1.0
            previous_token.W_O[0, t, prev + t] = 1.0  # write the attended (previous) token
            induction.W_Q[0, tok + t, t] = strength  # query: my token
            induction.W_K[0, prev + t, t] = strength  # key: whose previous token was mine
    return model


def test_induction_score_finds_the_hand_built_induction_head_and_not_a_random_models():
    handmade = induction_score(induction_circuit(), seq_len=12, batch=8)
    assert handmade.shape == (2, 2)
    assert handmade[1, 0] > 0.9, handmade
    others = handmade.flatten()[[0, 1, 3]]
    assert (others < 0.2).all(), handmade
    torch.manual_seed(0)
    random_model = Transformer(induction_circuit().cfg).eval()
    random = induction_score(random_model, seq_len=12, batch=8)
    assert random.max() < 0.2, random
    assert interp.top_heads(handmade, k=1) == [("L1H0", pytest.approx(float(handmade[1, 0])))]
    # no <|endoftext|> in this vocabulary, so no bos: 2 * seq_len positions
    with pytest.raises(ValueError, match="exceeds n_ctx=32; pass seq_len <= 16"):
        induction_score(random_model, seq_len=17)
    assert induction_score(random_model, seq_len=16).shape == (2, 2)
    for seq_len in (0, 1):  # no second copy, or one whose "next token" is the query itself
        with pytest.raises(ValueError, match=f"seq_len must be an int >= 2, got {seq_len}"):
            induction_score(random_model, seq_len=seq_len)
    for batch in (0, -2, True):  # before: "tokens has batch size 0" from the forward pass, and torch's RuntimeError
        with pytest.raises(ValueError, match=f"batch must be an int >= 1, got {batch}"):
            induction_score(random_model, seq_len=4, batch=batch)


@pytest.mark.parametrize("bos", [None, 0])
def test_induction_score_is_the_mean_attention_to_the_token_after_the_earlier_copy(bos):
    """Against a loop over the repeated half's queries, with and without a bos in front."""
    model, seq_len = induction_circuit(), 6
    scores = induction_score(model, seq_len=seq_len, batch=3, seed=2, bos=bos)
    tokens = interp.repeated_tokens(model.cfg.d_vocab, seq_len, 3, seed=2, bos=bos)
    _, cache = model.run_with_cache(tokens)
    offset = 0 if bos is None else 1
    for layer in range(2):
        pattern = cache["pattern", layer]
        queries = range(offset + seq_len, offset + 2 * seq_len)  # the second copy
        expected = sum(pattern[:, :, q, q - seq_len + 1] for q in queries).mean(dim=0) / seq_len
        torch.testing.assert_close(scores[layer], expected, rtol=1e-6, atol=1e-7)
    assert scores[1, 0] > 0.9  # the induction head, a bos in front or not


def test_induction_score_prepends_endoftext_only_when_the_vocabulary_has_it(monkeypatch):
    seen = []

    def recording(d_vocab, seq_len, batch, seed=0, bos=None):
        seen.append(bos)
        return interp_repeated_tokens(d_vocab, seq_len, batch, seed, bos)

    interp_repeated_tokens = interp.repeated_tokens
    monkeypatch.setattr(interp, "repeated_tokens", recording)
    for d_vocab, bos in ((50257, 50256), (50256, None)):
        cfg = TransformerConfig(d_model=8, n_layers=1, n_heads=2, d_head=4, d_mlp=8, d_vocab=d_vocab, n_ctx=8)
        model = Transformer(cfg).eval()
        induction_score(model, seq_len=3, batch=1)
        assert seen.pop() == bos
        if bos is None:
            assert induction_score(model, seq_len=4, batch=1).shape == (1, 2)  # 2 * 4 fills n_ctx=8
        else:  # the bos takes one position of n_ctx
            with pytest.raises(ValueError, match=r"2 \* seq_len \+ 1 = 9 exceeds n_ctx=8; pass seq_len <= 3"):
                induction_score(model, seq_len=4, batch=1)


def test_repeated_tokens_repeat_distinct_tokens_after_an_optional_bos():
    tokens = interp.repeated_tokens(d_vocab=50304, seq_len=6, batch=3, seed=1, bos=50256)
    assert tokens.shape == (3, 13) and (tokens[:, 0] == 50256).all()
    assert torch.equal(tokens[:, 1:7], tokens[:, 7:])
    assert all(len(set(row)) == 6 for row in tokens[:, 1:7].tolist()) and tokens[:, 1:].max() < 50256
    # At the limit each half is every real token once: never <|endoftext|> nor a padding id.
    whole = interp.repeated_tokens(d_vocab=50304, seq_len=50256, batch=1)
    assert torch.equal(whole[0, :50256].sort().values, torch.arange(50256))
    with pytest.raises(ValueError, match="seq_len=50257 exceeds the 50256 distinct tokens available"):
        interp.repeated_tokens(d_vocab=50304, seq_len=50257, batch=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        # before: shape (2, 198), each "copy" a half of a permutation with its last token cut off
        ({"seq_len": -1}, ValueError, r"^seq_len must be an int >= 1, got -1$"),
        ({"seq_len": 0}, ValueError, r"^seq_len must be an int >= 1, got 0$"),  # before: shape (2, 0)
        ({"seq_len": 5.0}, ValueError, r"^seq_len must be an int >= 1, got 5.0$"),
        ({"batch": 0}, ValueError, r"^batch must be an int >= 1, got 0$"),  # before: shape (0, 10)
        ({"batch": -1}, ValueError, r"^batch must be an int >= 1, got -1$"),  # before: "negative dimension -1"
        ({"d_vocab": 0}, ValueError, r"^d_vocab must be an int >= 1, got 0$"),
        ({"seed": 1.5}, TypeError, r"^seed must be an int or None, got 1.5$"),  # before: torch's "expected a long"
        ({"seed": 2**64}, ValueError, r"^seed 18446744073709551616 is outside the range torch's generators take"),
        ({"bos": 100}, ValueError, r"^bos must be None or a token id in \[0, d_vocab=100\), got 100$"),
        ({"bos": -1}, ValueError, r"^bos must be None or a token id in \[0, d_vocab=100\), got -1$"),
        ({"bos": True}, ValueError, r"^bos must be None or a token id in \[0, d_vocab=100\), got True$"),
    ],
)
def test_repeated_tokens_names_a_bad_argument(kwargs, error, message, without_shape_checks):
    arguments = {"d_vocab": 100, "seq_len": 5, "batch": 2, "seed": 0, "bos": None} | kwargs
    with pytest.raises(error, match=message):
        interp.repeated_tokens(**arguments)
    good = {"d_vocab": 100, "seq_len": 5, "batch": 2, "seed": 0, "bos": 99}
    assert interp.repeated_tokens(**good).shape == (2, 11)


# --- plots ---------------------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        extrema = image.convert("L").getextrema()
        assert extrema[0] < extrema[1]  # not a blank image
        return image.size


@pytest.mark.parametrize("kind", ["attention", "logit_lens", "patching", "induction", "composition", "composition-144"])
def test_plots_write_non_empty_pngs_of_the_figure_size(kind, tmp_path, run, model, tokens):
    _, cache = run
    path = tmp_path / "sub" / f"{kind}.png"
    labels = [f"t{i}" for i in range(10)]
    if kind == "attention":
        fig = interp.plot_attention_patterns(cache["pattern", 0][0], labels, path=path)
    elif kind == "logit_lens":
        lens = logit_lens(model, tokens)
        fig = interp.plot_logit_lens(lens.log_probs_of(tokens[:, 1:])[:, 0], lens.labels, labels[1:], path=path)
    elif kind == "patching":
        fig = interp.plot_patching(torch.randn(3, 10), token_labels=labels, path=path)
    elif kind == "induction":
        fig = interp.plot_induction_scores(torch.rand(3, 4), path=path)
    elif kind == "composition":
        fig = interp.plot_composition_scores(model.all_composition_scores("K"), path=path)
    else:  # GPT-2 small's 144 heads: a label per layer
        fig = interp.plot_composition_scores(torch.rand(12, 12, 12, 12), mode="Q", path=path)
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [f"L{layer}" for layer in range(12)]
    width, height = fig.get_size_inches() * fig.dpi
    assert path.stat().st_size > 1000
    # Saved at the figure's own size, not cropped: 0.35 * 3 + 1.8 inches is 284.999... pixels,
    # which matplotlib 3.10 truncates and 3.11 rounds, so either whole number is the right size.
    size = _png_size(path)
    assert size[0] in {int(width), round(width)} and size[1] in {int(height), round(height)}, (size, width, height)


def test_a_plot_path_under_home_is_expanded(home):
    interp.plot_induction_scores(torch.rand(3, 4), path="~/plots/induction.png")
    assert (home / "plots" / "induction.png").stat().st_size > 1000 and not Path("~").exists()


def test_a_plot_path_is_an_image_file_written_where_the_log_says(tmp_path, caplog):
    """Before: a directory, "plots" or "plots/", was written as plots.png beside it; a path with no
    suffix was written with .png added while the log named it without; an unknown suffix was
    refused by matplotlib after its directory had been made."""
    scores = torch.rand(3, 4)
    (tmp_path / "plots").mkdir()
    for spelled in (tmp_path / "plots", f"{tmp_path / 'new'}/"):
        with pytest.raises(ValueError, match=rf"^path {re.escape(repr(str(spelled)))} is a directory; name the image"):
            interp.plot_induction_scores(scores, path=spelled)
    with pytest.raises(ValueError, match=r"matplotlib writes no '\.xyz'; use one of \[.*'png'"):
        interp.plot_induction_scores(scores, path=tmp_path / "other" / "scores.xyz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"] and not any((tmp_path / "plots").iterdir())
    with caplog.at_level(logging.INFO, logger="gpt2_small.interp"):
        interp.plot_induction_scores(scores, path=tmp_path / "plots" / "scores")
        interp.plot_induction_scores(scores, path=tmp_path / "plots" / "scores.SVG")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["scores.SVG", "scores.png"]
    assert f"wrote {tmp_path / 'plots' / 'scores.png'}" in caplog.text


def test_plots_name_values_with_the_wrong_number_of_axes(run, tmp_path, without_shape_checks):
    """A cache entry with its batch axis still on: before, matplotlib's "Invalid shape (2, 4, 10, 10)
    for image data", or, with 3 or 4 key positions, a pattern drawn as RGB colours without an error.
    Checked past jaxtyping, as in a user's code."""
    _, cache = run
    path = tmp_path / "plot.png"
    pattern = cache["pattern", 0][:, :, :3, :3]  # [batch n_heads 3 3]: imshow would take it for RGB
    with pytest.raises(ValueError, match=r"^pattern must be a tensor \[n_heads query_pos key_pos\], got shape "):
        interp.plot_attention_patterns(pattern, path=path)
    with pytest.raises(ValueError, match=r"values must be a tensor \[component pos\], got shape \(3, 2, 9\); "):
        interp.plot_logit_lens(torch.randn(3, 2, 9), ["a", "b", "c"], path=path)
    with pytest.raises(ValueError, match=r"values must be a tensor \[n_layers width\], got list"):
        interp.plot_patching([[0.0, 1.0]], path=path)
    with pytest.raises(ValueError, match=r"scores must be a tensor \[n_layers n_heads\], got shape \(12,\)"):
        interp.plot_induction_scores(torch.rand(12), path=path)
    axes = r"\[n_layers n_heads n_layers n_heads\]"
    with pytest.raises(ValueError, match=rf"scores must be a tensor {axes}, got shape \(3, 4\); pass model.all_comp"):
        interp.plot_composition_scores(torch.rand(3, 4), path=path)
    with pytest.raises(ValueError, match=rf"scores must be {axes}, got shape \(3, 4, 2, 4\)"):
        interp.plot_composition_scores(torch.rand(3, 4, 2, 4), path=path)
    empty = r"has an empty axis \(shape {}\); there is nothing to draw"
    with pytest.raises(ValueError, match=r"^values \[n_layers width\] " + empty.format(r"\(2, 0\)")):
        interp.plot_patching(torch.zeros(2, 0), path=path)
    with pytest.raises(ValueError, match=r"^pattern \[n_heads query_pos key_pos\] " + empty.format(r"\(0, 3, 3\)")):
        interp.plot_attention_patterns(torch.zeros(0, 3, 3), path=path)
    with pytest.raises(ValueError, match=r"^scores \[n_layers n_heads n_layers n_heads\] " + empty.format(".*")):
        interp.plot_composition_scores(torch.zeros(0, 0, 0, 0), path=path)
    assert not path.exists()
    interp.plot_attention_patterns(pattern[0], path=path)  # one prompt's pattern
    assert path.stat().st_size > 1000


def test_plots_name_labels_that_do_not_fit_the_values(run, tmp_path):
    """Before: matplotlib's "The number of FixedLocator locations (10) ... does not match the number
    of labels (9)", naming neither the argument nor the axis; a by='head' map dropped token_labels."""
    _, cache = run
    labels = [f"t{i}" for i in range(9)]  # one short of the 10 positions
    path = tmp_path / "plot.png"
    with pytest.raises(ValueError, match="^token_labels has 9 labels for 10 key positions$"):
        interp.plot_attention_patterns(cache["pattern", 0][0], labels, path=path)
    with pytest.raises(ValueError, match=r"^layer_labels has 2 labels for 3 rows \(components\)$"):
        interp.plot_logit_lens(torch.randn(3, 9), ["0_pre", "1_pre"], labels, path=path)
    with pytest.raises(ValueError, match="^token_labels has 9 labels for 10 positions$"):
        interp.plot_logit_lens(torch.randn(3, 10), ["a", "b", "c"], labels, path=path)
    with pytest.raises(ValueError, match="^token_labels has 9 labels for 10 positions$"):
        interp.plot_patching(torch.randn(3, 10), token_labels=labels, path=path)
    with pytest.raises(ValueError, match="a by='head' map has heads across"):
        interp.plot_patching(torch.randn(3, 4), by="head", token_labels=labels, path=path)
    with pytest.raises(
        ValueError, match="by must be 'position' or 'head', as given to activation_patching, got 'layer'"
    ):
        interp.plot_patching(torch.randn(3, 4), by="layer", path=path)
    assert not path.exists()
    interp.plot_logit_lens(torch.randn(3, 9), ["a", "b", "c"], labels, path=path)  # labels that fit
    assert path.stat().st_size > 1000


def test_heatmaps_scale_label_and_annotate_as_documented(tmp_path):
    """What each heatmap promises beyond writing a PNG: its colour scale, axis titles, tick labels
    and annotations (checked on the Figure, as a picture cannot be compared here)."""
    values = torch.tensor([[0.5, -2.0, 1.0], [0.25, 0.0, -0.5]])
    image = interp.plot_patching(values).axes[0]
    assert image.images[0].get_clim() == (-2.0, 2.0)  # symmetric about 0: red restores, blue hurts
    assert (image.get_xlabel(), image.get_ylabel()) == ("position", "layer")
    assert interp.plot_patching(torch.zeros(2, 3)).axes[0].images[0].get_clim() == (-1.0, 1.0)
    by_head = interp.plot_patching(values, by="head").axes[0]
    assert by_head.get_xlabel() == "head" and [t.get_text() for t in by_head.get_xticklabels()] == ["0", "1", "2"]
    labelled = interp.plot_patching(values, token_labels=["a", "b", "c"]).axes[0]
    assert labelled.get_xlabel() == "" and [t.get_text() for t in labelled.get_xticklabels()] == ["a", "b", "c"]
    assert {t.get_rotation() for t in labelled.get_xticklabels()} == {90.0}

    induction = interp.plot_induction_scores(torch.tensor([[0.05, 0.1], [0.2, 0.125]])).axes[0]
    assert induction.images[0].get_clim() == (0.0, 1.0)  # a fraction of attention, whatever the data
    assert [t.get_text() for t in induction.texts] == ["0.05", "0.10", "0.20", "0.12"]
    assert (induction.get_xlabel(), induction.get_ylabel()) == ("head", "layer")
    lens = interp.plot_logit_lens(-torch.rand(2, 3), ["0_pre", "final"]).axes[0]
    assert [t.get_text() for t in lens.get_yticklabels()] == ["0_pre", "final"]
    assert lens.images[0].get_clim()[1] < 0  # the data's own range: log-probs are negative

    title = "a title much longer than the three columns under it would leave room for"
    assert interp.plot_patching(values, title=title).get_size_inches()[0] >= 0.09 * len(title) + 1.0


def test_attention_pattern_grid_has_an_axis_per_head_and_labels_short_prompts(run):
    _, cache = run
    pattern = cache["pattern", 0][0]  # [n_heads=4 10 10]
    five = torch.cat([pattern, pattern[:1]])
    fig = interp.plot_attention_patterns(five, [f"t{i}" for i in range(10)])
    assert len(fig.axes) == 8  # 4 columns, 2 rows; the last 3 empty and hidden
    assert [ax.axison for ax in fig.axes] == [True] * 5 + [False] * 3
    assert [ax.get_title() for ax in fig.axes[:5]] == [f"head {h}" for h in range(5)]
    assert all(ax.images[0].get_clim() == (0.0, 1.0) for ax in fig.axes[:5])  # probabilities
    uniform = interp.plot_attention_patterns(torch.full((1, 4, 4), 0.25))  # the same scale, not the data's
    assert uniform.axes[0].images[0].get_clim() == (0.0, 1.0)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [f"t{i}" for i in range(10)]
    two = interp.plot_attention_patterns(pattern[:2])
    assert len(two.axes) == 2 and two.get_size_inches()[0] == pytest.approx(6.4)  # no empty columns
    # Past 40 positions the token labels would overlap: axis titles instead.
    long = torch.softmax(torch.randn(1, 41, 41), dim=-1)
    ax = interp.plot_attention_patterns(long, [f"tok{i}" for i in range(41)]).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("key position", "query position")
    assert not any(t.get_text().startswith("tok") for t in ax.get_xticklabels())


def test_a_heatmap_of_many_positions_stays_a_viewable_size_and_labels_every_kth():
    """Before: 0.35 inch per column whatever their number: a logit lens of 1,024 positions was
    361 inches wide (36,000 pixels) with 1,024 overlapping labels."""
    layers = [f"{i}_pre" for i in range(13)]
    short = interp.plot_logit_lens(torch.randn(13, 60), layers, [f"t{i}" for i in range(60)])
    assert short.get_size_inches()[0] == pytest.approx(0.35 * 60 + 2.5)  # up to 60, as it was: one label each
    assert [t.get_text() for t in short.axes[0].get_xticklabels()] == [f"t{i}" for i in range(60)]
    long = interp.plot_logit_lens(torch.randn(13, 1024), layers, [f"t{i}" for i in range(1024)])
    assert long.get_size_inches()[0] == pytest.approx(0.35 * 60 + 2.5)
    step = 18  # ceil(1024 / 60)
    assert list(long.axes[0].get_xticks()) == list(range(0, 1024, step))
    assert [t.get_text() for t in long.axes[0].get_xticklabels()] == [f"t{i}" for i in range(0, 1024, step)]
    assert [t.get_text() for t in long.axes[0].get_yticklabels()] == layers  # 13 rows: every one
    tall = interp.plot_patching(torch.randn(100, 3))  # rows past 60 too
    assert tall.get_size_inches()[1] == pytest.approx(0.35 * 60 + 1.8)
    assert list(tall.axes[0].get_yticks()) == list(range(0, 100, 2))


def test_composition_plot_labels_heads_or_layers_and_scales_from_zero_to_the_maximum():
    scores = torch.rand(2, 3, 2, 3) * 0.5
    ax = interp.plot_composition_scores(scores, mode="V").axes[0]
    labels = ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels == [t.get_text() for t in ax.get_yticklabels()]
    assert ax.images[0].get_clim() == (0.0, pytest.approx(float(scores.max())))
    assert ax.get_title() == "V-composition scores" and "OV circuit" in ax.get_xlabel() and not ax.lines
    for mode in ("Q", "K"):  # K-composition reads through the QK circuit too, by its keys
        assert "QK circuit" in interp.plot_composition_scores(scores, mode=mode).axes[0].get_xlabel(), mode
    assert interp.plot_composition_scores(torch.zeros(2, 3, 2, 3)).axes[0].images[0].get_clim() == (0.0, 1.0)
    # 7 layers of 7 heads (49 > 48): one label per layer, at the middle of its block, and lines between blocks.
    big = interp.plot_composition_scores(torch.rand(7, 7, 7, 7)).axes[0]
    assert [t.get_text() for t in big.get_xticklabels()] == [f"L{layer}" for layer in range(7)]
    assert list(big.get_xticks()) == [7 * layer + 3 for layer in range(7)]
    assert len(big.lines) == 2 * 6


def test_heatmaps_scale_by_the_finite_values_and_draw_the_others_grey(model, caplog):
    """A zero-ablated head's composition scores are NaN (0/0, as TransformerLens's), and a patching
    metric can divide by zero. Before: one NaN made the colour scale's ends NaN, so matplotlib drew
    every cell on [-0.1, 0.1], saturated, and the NaN cells blank, in the colour of 0."""
    ablated = Transformer(SMALL)
    ablated.load_state_dict(model.state_dict())
    with torch.no_grad():
        ablated.blocks[0].attn.W_O[1] = 0.0
    scores = ablated.all_composition_scores("K")
    assert scores[0, 1, 1:].isnan().all() and scores.isnan().sum() == 2 * 4  # L0H1 onto L1 and L2's heads
    grey = matplotlib.colors.to_rgba("0.6")
    caplog.set_level("WARNING", logger="gpt2_small.interp")
    image = interp.plot_composition_scores(scores).axes[0].images[0]
    assert image.get_clim() == (0.0, pytest.approx(float(scores.nan_to_num().max())))
    assert image.cmap.get_bad() == pytest.approx(grey) and image.cmap(0.0) != pytest.approx(grey)
    values = torch.tensor([[float("nan"), 1.0], [0.5, -2.0], [float("inf"), 0.0]])
    image = interp.plot_patching(values).axes[0].images[0]
    assert image.get_clim() == (-2.0, 2.0) and image.cmap.get_bad() == pytest.approx(grey)
    pattern = torch.full((2, 3, 3), 1 / 3)
    pattern[1, 2] = float("nan")
    fig = interp.plot_attention_patterns(pattern)
    assert all(ax.images[0].cmap.get_bad() == pytest.approx(grey) for ax in fig.axes)
    assert [r.getMessage() for r in caplog.records] == [
        "K-composition scores: 8 of 144 values are not finite (NaN or inf), drawn grey",
        "activation patching: 2 of 6 values are not finite (NaN or inf), drawn grey",
        "attention patterns, head 1: 3 of 9 values are not finite (NaN or inf), drawn grey",
    ]
